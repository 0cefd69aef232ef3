"""`daqif demo`: the whole chain once, end to end, on embedded defaults.

1. starts the system (simulator, writer, DPM) on free loopback ports under the data root;
2. records `--frames` frames from the simulator through the writer (std_daq REST `write_async`);
3. builds a Data Product Specification from the written file plus a keyword source;
4. queues it on the DPM and follows it to COMPLETED with a progress display;
5. verifies the product's checksum (`daqif-dpm-merge --verify`), prints where it is and a summary
   (frames, bytes, time per stage), stops the system and exits 0.

With `--fits` (ESO style; only the DPM runs): instead of 1-3, writes two FITS files as a detector
control system does (a primary HDU with detector keywords, one image extension per chip,
CHECKSUM/DATASUM), queues them with OCM and TCS `fitsKeywords` sources (the first file as
`target.source`), then 4-5: the product is `<fileId>.fits`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daqif.cli._output import console, fail
from daqif.cli.dpm import follow_daq
from daqif.dpm_client import DaqStatus, DpmClient, substate_name
from daqif.errors import DaqException
from daqif.v1 import dpm_pb2


def add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="record frames and build a verified data product, end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--data-root", type=Path, default=Path("daqif-data"), help="default ./daqif-data")
    demo.add_argument("--frames", type=int, default=200, help="frames to record (default 200)")
    demo.add_argument("--rate", type=float, default=500.0, help="simulator frames per second (default 500)")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per stage (default 120)")
    demo.add_argument(
        "--fits", action="store_true", help="ESO style: FITS detector files into a FITS product"
    )
    demo.add_argument("--chips", type=int, default=4, help="--fits: image extensions per detector file (4)")
    demo.set_defaults(func=run_demo)


class StageClock:
    """Wall time of each named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def begin(self, name: str) -> None:
        self.end()
        self._name, self._start = name, time.monotonic()

    def end(self) -> None:
        if self._name:
            self.stages[self._name] = time.monotonic() - self._start
            self._name = ""


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(url, json=body, timeout=30)
    payload: dict[str, Any] = response.json()
    if response.status_code != 200 or payload.get("status") != "ok":
        raise RuntimeError(f"writer refused {url}: {payload.get('message') or payload}")
    return payload


def record(rest_url: str, output_file: Path, frames: int, timeout: float) -> dict[str, Any]:
    """Record `frames` frames through the writer; return the final acquisition object."""
    _post(f"{rest_url}/writer/write_async", {"output_file": str(output_file), "n_images": frames})
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]recording"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("record", total=frames)
        while True:
            writer = requests.get(f"{rest_url}/writer/status", timeout=10).json()["writer"]
            acquisition = writer["acquisition"]
            progress.update(task, completed=acquisition["stats"]["n_write_completed"])
            if acquisition["state"] in ("FINISHED", "FAILED") and writer["state"] != "WRITING":
                result: dict[str, Any] = acquisition
                return result
            if time.monotonic() > deadline:
                requests.post(f"{rest_url}/writer/stop", json={}, timeout=10)
                raise RuntimeError(f"recording did not finish within {timeout:.0f} s")
            time.sleep(0.1)


def build_specification(daq_id: str, raw_file: Path, receiver: Path) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": daq_id},
        "sources": [
            {
                "type": "fitsKeywords",
                "sourceName": "ocm",
                "keywords": [
                    {"type": "valueKeyword", "name": "OBJECT", "value": "DEMO", "comment": "daqif demo"},
                    {"type": "valueKeyword", "name": "ORIGIN", "value": "daqif"},
                    {"type": "esoKeyword", "name": "DET DIT", "value": 0.002},
                    {"type": "literalKeyword", "value": "COMMENT recorded by daqif demo"},
                ],
            },
            {"type": "hdf5File", "sourceName": "det1", "location": str(raw_file)},
        ],
        "receivers": [{"type": "olasReceiver", "path": str(receiver)}],
        "keywordDictionaries": [],
    }


FITS_DICTIONARIES = ("ESO-VLT-DIC.DAQIF_OBS", "ESO-VLT-DIC.DAQIF_TCS", "ESO-VLT-DIC.DAQIF_DCS")


def write_fits_detector_files(raw_dir: Path, daq_id: str, chips: int) -> list[Path]:
    """Two FITS files as detector control systems write them: primary keywords, one image per chip."""
    from daqif.testing import write_fits_detector_file

    files = []
    for n, det in enumerate(("dcs1", "dcs2"), start=1):
        keywords: dict[str, Any] = {
            "INSTRUME": ("DAQIF", "instrument name"),
            "EXPTIME": (0.5 * n, "exposure time [s]"),
            "DATE-OBS": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
            f"ESO DET{n} NAME": (det, "detector name"),
            f"ESO DET{n} DIT": (0.5 * n, "integration time [s]"),
            f"ESO DET{n} CHIPS": (chips, "number of chips"),
        }
        path = raw_dir / f"{daq_id}.{det}.fits"
        files.append(
            write_fits_detector_file(
                path, keywords=keywords, chips=chips, shape=(256, 256), seed=n, extname=f"DET{n}.CHIP"
            )
        )
    return files


def build_fits_specification(daq_id: str, files: list[Path], receiver: Path) -> dict[str, Any]:
    """ESO's shape: OCM and TCS keywords, a detector file as target.source and one more fitsFile."""
    return {
        "id": daq_id,
        "target": {
            "fileId": daq_id,
            "source": {"type": "fitsFile", "sourceName": "dcs1", "location": str(files[0])},
        },
        "sources": [
            {
                "type": "fitsKeywords",
                "sourceName": "ocm",
                "keywords": [
                    {"type": "valueKeyword", "name": "OBJECT", "value": "DEMO", "comment": "daqif demo"},
                    {"type": "valueKeyword", "name": "ORIGIN", "value": "daqif"},
                    {
                        "type": "esoKeyword",
                        "name": "DPR CATG",
                        "value": "TEST",
                        "comment": "observation category",
                    },
                    {"type": "literalKeyword", "value": "COMMENT merged by the daqif demo"},
                ],
            },
            {
                "type": "fitsKeywords",
                "sourceName": "tcs",
                "keywords": [
                    {"type": "valueKeyword", "name": "RA", "value": 10.684708, "comment": "[deg] 00:42:44.3"},
                    {"type": "valueKeyword", "name": "DEC", "value": 41.26875, "comment": "[deg] +41:16:07"},
                    {"type": "esoKeyword", "name": "TEL AIRM START", "value": 1.12, "comment": "airmass"},
                ],
            },
            {
                "type": "fitsFile",
                "sourceName": "dcs2",
                "location": str(files[1]),
                "keywordRules": [{"type": "filter", "selectionPatterns": ["+e DET2 *"]}],
            },
        ],
        "receivers": [{"type": "olasReceiver", "path": str(receiver)}],
        # The DPM's built-in dictionaries: every ESO keyword of the product must be defined there.
        "keywordDictionaries": list(FITS_DICTIONARIES),
    }


def stage_times(statuses: list[DaqStatus]) -> dict[str, float]:
    """Seconds spent in each DPM substate, from the status stream's timestamps."""
    times: dict[str, float] = {}
    for current, following in itertools.pairwise(statuses):
        if following.substate != current.substate:
            name = substate_name(current.substate)
            times[name] = times.get(name, 0.0) + max(0.0, following.timestamp - current.timestamp)
    return times


def run_demo(args: argparse.Namespace) -> int:
    from servers import system
    from servers.supervisor import ChildFailed, Supervisor

    if args.frames < 1:
        return fail("--frames must be at least 1")
    if args.chips < 1:
        return fail("--chips must be at least 1")
    # Port 0 everywhere: every server picks a free port and reports it in its ready line.
    config = system.SystemConfig(
        data_root=args.data_root.resolve(),
        dpm_port=0,
        rest_port=0,
        writer_grpc_port=0,
        stream_port=0,
        simulate=True,
        sim_rate=args.rate,
    )
    config.prepare()
    clock = StageClock()
    console.print(
        f"daqif demo: data root {config.data_root} (server logs in {config.log_dir})", highlight=False
    )
    clock.begin("start servers")
    supervisor = Supervisor(log_dir=config.log_dir, max_restarts=0)
    try:
        config = system.start(config, supervisor, ("dpm",) if args.fits else ("sim", "writer", "dpm"))
    except ChildFailed as exc:
        return fail(f"the system did not start: {exc}")
    try:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        daq_id = f"DEMO.{stamp}"
        if args.fits:
            clock.begin("write FITS files")
            files = write_fits_detector_files(config.raw_dir, daq_id, args.chips)
            raw_file = files[0]
            what = f"{len(files)} FITS files, {args.chips} chips each"
            console.print(f"wrote {what}: {', '.join(map(str, files))}", highlight=False, soft_wrap=True)
            clock.begin("data product")
            spec = build_fits_specification(daq_id, files, config.receiver_dir)
        else:
            raw_file = config.raw_dir / f"{daq_id}.h5"
            clock.begin("record")
            acquisition = record(config.rest_url, raw_file, args.frames, args.timeout)
            if acquisition["state"] != "FINISHED" or acquisition["message"] != "Completed.":
                return fail(f"recording failed: {acquisition['state']} {acquisition['message']}")
            what = f"{acquisition['stats']['n_write_completed']} frames"
            console.print(f"recorded {what} to {raw_file}", highlight=False, soft_wrap=True)
            clock.begin("data product")
            spec = build_specification(daq_id, raw_file, config.receiver_dir)
        spec_file = config.data_root / f"{daq_id}.spec.json"
        spec_file.write_text(json.dumps(spec, indent=2) + "\n")
        seen: list[DaqStatus] = []
        with DpmClient(config.dpm_address) as dpm:
            reply = dpm.queue_daq(spec)
            final = (
                dpm.wait_for(reply.id, timeout=args.timeout, on_status=seen.append)
                if not console.is_terminal
                else follow_daq(dpm, reply.id, args.timeout, seen=seen)  # its timings too
            )
        if final.substate != dpm_pb2.DAQ_SUB_STATE_COMPLETED:
            return fail(f"the DAQ ended {substate_name(final.substate)}: {final.message}")
        product = config.receiver_dir / Path(final.result).name  # <fileId>.h5 or .fits

        clock.begin("verify")
        verify = subprocess.run(
            [sys.executable, "-m", "servers.dpm.merge_cli", "--verify", str(product)],
            capture_output=True,
            text=True,
        )
        clock.end()
        if verify.returncode != 0:
            return fail(f"product {product} does not verify: {verify.stdout.strip()} {verify.stderr.strip()}")
    except (DaqException, RuntimeError, requests.RequestException) as exc:
        return fail(str(exc))
    finally:
        supervisor.stop()

    checksum = verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else "OK"
    table = Table("stage", "seconds", title=f"daqif demo: {what}, {product.stat().st_size:,} bytes")
    for name, seconds in clock.stages.items():
        table.add_row(name, f"{seconds:.2f}")
    for name, seconds in stage_times(seen).items():
        table.add_row(f"  DPM {name.lower()}", f"{seconds:.3f}")
    console.print(table)
    for label, value in [("raw file", raw_file), ("specification", spec_file), ("verify", checksum)]:
        console.print(f"{label}: {value}", highlight=False, soft_wrap=True)
    console.print(f"data product: {product}", highlight=False, soft_wrap=True)
    return 0
