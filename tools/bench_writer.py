"""Benchmark of the writer (issue 12): prints a JSON summary with machine facts, then a table.

Three variants write the same frames to the same directory, interleaved (the order turns each
round), every one timed until its file is durable (fsync'd with its folder, inside the timed
span), each run writing ``--gib`` (5 GiB: at least 2 s on a disk that takes 2.5 GB/s with
``O_DIRECT``; 3 GiB runs took 1.4 s there), after ``os.sync()`` so no run pays for the one
before. A run shorter than ``--min-run-s`` (2 s) is named in a warning and in the summary's
``runs_under_min``: its figures are start-up and noise more than throughput, so raise ``--gib``:

- **daqif**: a real ``daqif-writer`` (REST + gRPC control plane, data path process) and a PUSH
  simulator over TCP loopback; timed from REST ``write_async`` until gRPC ``WatchStatus`` shows
  the acquisition FINISHED (the writer fsyncs before it says so). ``end_push_ms`` is the time from
  the data path's stop time (file durable) to the client seeing FINISHED. ``--datapath-io
  page-cache`` runs it through the page cache (the path compressed frames take);
- **peer**: ``tools/bench_peer.py``, the writer a user would write by hand (pyzmq PULL
  ``copy=False`` + h5py ``write_direct_chunk``, one frame per chunk, then fsync), against its own
  simulator; timed from creating its file until it is durable;
- **plain write**: Python ``os.pwrite`` of the same frames at the file offsets the daqif file has
  them (read from its chunk index), then fsync: the cost of the bytes alone, through the page cache
  (the issue 12 baseline);
- **plain direct**: the same frames at the same offsets with ``O_DIRECT`` from page-aligned memory,
  4 MiB per write, then fsync: the bytes alone on the path the writer takes by default
  (``--datapath-io direct``, docs/writer.md "Direct I/O"), without receiving or copying them.

Sizes: 64 KiB (256x128 uint16), 512 KiB (512x512), 4 MiB (2048x1024), 8 MiB (2048x2048).
Reported per size: medians with min-max of GB/s, daqif frames/s, daqif ÷ peer, daqif ÷ plain and
daqif ÷ plain direct (ratios of the same round), the load average (1 min) at the start of each run.
With ``--loss-frames N``: frames lost from a PUB source at the highest rate that holds.

With ``--live`` it measures only what the live preview costs: the daqif run with the writer's live
stream on (``--live-stream``, ``--live-rate``, default 10 Hz, and a client reading ``/daq/live``
all along) and off, ``--rounds`` interleaved rounds per size; it reports on ÷ off per round (the
target is >= 0.95) and the frames lost (gaps in the file's image ids; the target is 0).

With ``--pollers N`` it measures only what status polling costs: a real writer (REST control plane
and data path) records 20,000 64 KiB frames from a PUB source at ``--poller-rate`` (4 kHz), once
with no client, once with N threads polling ``/writer/status`` as fast as they can, and once more
with N pollers and the data path put back to the control plane's nice (what a writer without the
privilege to raise it gets), for ``--poller-rounds`` rounds; it reports the frames lost in each and
the control plane's CPU per poll.

With ``--workers 1 2`` it measures only writer groups (docs/writer.md, "Writer groups"): one
writer with 1 and 2 data paths and a group of two writer processes on loopback record the same
frames from one PUSH simulator sending as fast as it can (``--gib``, the first of ``--sizes``,
``--rounds`` interleaved rounds); it reports aggregate frames/s, the ratio to one data path,
frames lost (gaps in the recorded image ids) and the time from the end being seen to the
virtual-dataset file being written (from the coordinator's log).

The defaults take about 5 minutes on 2 cores. The machine may be shared: read the load average
beside each figure and the per-round values in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from bench_common import machine_facts, process_times

from daqif.frame import PATTERN_PERIOD, expected_frame
from servers.common.atomic import fsync_directory
from servers.common.launch import SimOptions, SimProcess, free_port
from servers.writer.datapath.api import WriteJob, WritePhase, WriteResult
from servers.writer.datapath.handle import ProcessDataPath, rcvhwm_for_frames

SIZES: dict[str, tuple[int, int]] = {
    "64KiB": (256, 128),
    "512KiB": (512, 512),
    "4MiB": (2048, 1024),
    "8MiB": (2048, 2048),
    # Not multiples of 4096 bytes (no O_DIRECT: batches through the page cache), not in the default run:
    "63KiB": (252, 128),  # 64,512 bytes
    "eiger500k": (514, 1030),  # 1,058,840 bytes, an Eiger 500k module with its gap pixels
}
DEFAULT_SIZES = ("64KiB", "512KiB", "4MiB", "8MiB")
DTYPE = "uint16"


def start_sim(shape: tuple[int, int], *extra: str, endpoint: str = "tcp://127.0.0.1:*") -> SimProcess:
    options = SimOptions(endpoint=endpoint, shape=shape, dtype=DTYPE, linger=0, extra_args=extra)
    return SimProcess(options).start(timeout=120)


def start_pub_sim(shape: tuple[int, int], rate: float, n: int, endpoint: str) -> SimProcess:
    """A PUB simulator at `rate` Hz; the extra frames cover the subscription's start (a PUB source
    drops frames until the subscriber is connected)."""
    return start_sim(
        shape, "--socket", "pub", "--rate", str(rate), "--count", str(n + int(rate) + 1000), endpoint=endpoint
    )


def run_deadline_s(n: int, shape: tuple[int, int]) -> float:
    """How long one write of `n` frames may take: 2 minutes and 100 MB/s, far below any disk here."""
    return 120.0 + n * frame_bytes_of(shape) / 100e6


def wait_finished(watch: Iterator[Any], rest_url: str, n: int) -> Any:
    """The first FINISHED or FAILED status from the `WatchStatus` stream `watch`. When the stream's
    deadline passes first, a RuntimeError says how many of the `n` frames the writer wrote (a write
    missing frames waits for them for ever, as std_daq's does)."""
    import requests

    from daqif.errors import DaqException
    from daqif.writer_client import acquisition_state_name

    try:
        for status in watch:
            if acquisition_state_name(status.acquisition.state) in ("FINISHED", "FAILED"):
                return status
    except DaqException as exc:
        stats = requests.get(rest_url + "/writer/status", timeout=30).json()["writer"]["acquisition"]["stats"]
        raise RuntimeError(
            f"the write did not finish before its deadline ({exc}): {stats['n_write_completed']} of {n} "
            "frames written"
        ) from None
    raise RuntimeError("the writer's status stream ended before the write finished")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def make_job(path: Path, n: int, shape: tuple[int, int]) -> WriteJob:
    return WriteJob(
        output_file=str(path),
        n_images=n,
        run_id="bench",
        detector_name="bench",
        height=shape[0],
        width=shape[1],
        dtype=DTYPE,
    )


def wait_result(datapath: ProcessDataPath, timeout: float) -> WriteResult:
    def ended() -> WriteResult | None:
        progress = datapath.progress()
        return progress.result if progress.phase in (WritePhase.FINISHED, WritePhase.FAILED) else None

    result: WriteResult = wait_until(ended, timeout, "the write to end")
    if result.error:
        raise RuntimeError(f"write failed: {result.error}")
    return result


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def detector_config(directory: Path, shape: tuple[int, int]) -> Path:
    config = directory / f"detector-{shape[0]}x{shape[1]}.json"
    config.write_text(
        json.dumps(
            {
                "detector_name": "bench",
                "bit_depth": 16,
                "image_pixel_height": shape[0],
                "image_pixel_width": shape[1],
            }
        )
    )
    return config


def daqif_run(
    directory: Path,
    shape: tuple[int, int],
    n: int,
    live_rate: float | None = None,
    datapath_io: str = "direct",
) -> tuple[dict[str, Any], list[int]]:
    """A real writer (REST + gRPC + data path) records `n` frames from a PUSH simulator: timed from
    REST ``write_async`` until gRPC ``WatchStatus`` shows FINISHED (the file is durable then).
    Returns the run and the file offsets of the chunks (for the plain write). With `live_rate`
    the writer publishes its live stream at that rate and a viewer reads ``/daq/live`` (MJPEG)
    all along, so the control plane encodes a JPEG of every sample. `datapath_io` is the writer's
    ``--datapath-io``."""
    import threading

    import requests

    from daqif.writer_client import WriterClient, acquisition_state_name
    from servers.common.launch import WriterOptions, WriterProcess

    path = directory / f"daqif-{shape[0]}x{shape[1]}.h5"
    sim = start_sim(shape)
    live_args: tuple[str, ...] = ("--datapath-io", datapath_io)
    if live_rate is not None:
        live_args += ("--live-stream", f"tcp://127.0.0.1:{free_port()}", "--live-rate", str(live_rate))
    writer = WriterProcess(
        WriterOptions(
            stream=sim.endpoint,
            data_root=directory,
            config=detector_config(directory, shape),
            extra_args=live_args,
        )
    ).start(timeout=120)
    viewer_parts = [0]
    stop_viewer = threading.Event()

    def view() -> None:  # a browser showing /daq/live
        with requests.get(writer.rest_url + "/daq/live", stream=True, timeout=60) as reply:
            for chunk in reply.iter_content(chunk_size=None):
                viewer_parts[0] += chunk.count(b"Content-Type: image/jpeg")
                if stop_viewer.is_set():
                    return

    viewer = threading.Thread(target=view, daemon=True) if live_rate is not None else None
    if viewer is not None:
        viewer.start()
    try:
        with requests.Session() as rest, WriterClient(writer.grpc_address, timeout=None) as client:

            def received() -> bool:
                stats = rest.get(writer.rest_url + "/daq/stats", timeout=30).json()["stats"]
                return bool(stats["counters"]["received"])

            wait_until(received, 60, "frames to reach the writer")
            time.sleep(1.0)  # the receive queue fills, as it does for the peer
            watch = client.watch_status(timeout=run_deadline_s(n, shape))
            next(watch)  # the current status; every change follows
            os.sync()  # start from a clean page cache, as every variant does
            load = os.getloadavg()[0]
            cpu_start = process_cpu(writer, sim)
            start = time.perf_counter()
            reply = rest.post(
                writer.rest_url + "/writer/write_async",
                json={"output_file": str(path), "n_images": n},
                timeout=30,
            ).json()
            if reply["status"] != "ok":
                raise RuntimeError(f"write_async refused: {reply}")
            status = wait_finished(watch, writer.rest_url, n)
            state = acquisition_state_name(status.acquisition.state)
            elapsed = time.perf_counter() - start
            seen = time.time()
            cpu = {k: round(v - cpu_start[k], 3) for k, v in process_cpu(writer, sim).items()}
            if state != "FINISHED" or status.acquisition.message != "Completed.":
                raise RuntimeError(f"the write did not complete: {status.acquisition.message}")
            # The data path's stop time is taken once the file is durable: what follows is the push.
            end_push_ms = (seen - status.acquisition.stats.stop_time) * 1000
    finally:
        stop_viewer.set()
        writer.stop()
        sim.stop(60)
        if viewer is not None:
            viewer.join(timeout=30)
    with h5py.File(path, "r") as f:
        offsets: list[int] = []
        f["bench/data"].id.chunk_iter(lambda info: offsets.append(info.byte_offset))
        ids = f["bench/image_id"][:]
    path.unlink()
    # A frame lost between the socket and the file is a gap in the ids (a PUSH source drops none).
    lost = int(n - len(ids)) + (int(ids[-1] - ids[0]) + 1 - len(ids) if len(ids) else 0)
    run = _throughput(n, shape, elapsed, load) | {"end_push_ms": round(end_push_ms, 2), "frames_lost": lost}
    run["cpu_seconds"] = cpu
    if live_rate is not None:
        run["viewer_jpeg_parts"] = viewer_parts[0]
    return run, sorted(offsets)


def process_cpu(writer: Any, sim: SimProcess) -> dict[str, float]:
    """User + system CPU seconds used so far by the writer's control plane, its data path, the
    simulator and this process (the bench: its status client, and the viewer of ``--live``)."""
    (datapath_pid,) = writer.data_path_pids()
    times = os.times()
    return {
        "control_plane": cpu_seconds(writer.pid),
        "data_path": cpu_seconds(datapath_pid),
        "simulator": cpu_seconds(sim.pid),
        "bench": times.user + times.system,
    }


def peer_run(directory: Path, shape: tuple[int, int], n: int) -> dict[str, Any]:
    """`bench_peer.py`, the hand-written writer, records `n` frames from a PUSH simulator."""
    path = directory / f"peer-{shape[0]}x{shape[1]}.h5"
    sim = start_sim(shape)
    try:
        command = [sys.executable, str(Path(__file__).with_name("bench_peer.py")), sim.endpoint, str(path)]
        command += [str(n), str(shape[0]), str(shape[1]), str(rcvhwm_for_frames(frame_bytes_of(shape)))]
        load = os.getloadavg()[0]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600).stdout
    finally:
        sim.stop(60)
    path.unlink()
    return _throughput(n, shape, float(out), load)


def plain_run(directory: Path, shape: tuple[int, int], offsets: list[int]) -> dict[str, Any]:
    """Python writes the same frames at the offsets the writer's file has them, then fsyncs."""
    frames = [expected_frame(i, shape, DTYPE).tobytes() for i in range(PATTERN_PERIOD)]
    path = directory / f"plain-{shape[0]}x{shape[1]}.bin"

    def write(fd: int) -> None:
        for index, offset in enumerate(offsets):
            os.pwrite(fd, frames[(index + 1) % PATTERN_PERIOD], offset)

    elapsed, load = durable_write(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, write)
    return _throughput(len(offsets), shape, elapsed, load)


def durable_write(path: Path, flags: int, write: Callable[[int], None]) -> tuple[float, float]:
    """Time `write(fd)` into a new file at `path` opened with `flags`, its fsync and its folder's,
    after ``os.sync()``; the file is removed after. Returns the seconds and the load average at the start."""
    os.sync()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        write(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed, load


def plain_direct_run(directory: Path, shape: tuple[int, int], offsets: list[int]) -> dict[str, Any] | None:
    """The same frames at the same offsets with ``O_DIRECT`` from page-aligned memory, each run
    of contiguous frames in writes of `direct.BATCH_BYTES` (as the writer's direct I/O does, minus
    the receiving and the copy into its batch buffers), then fsync: the bytes alone on the path
    the writer takes. None when the offsets are not aligned (the writer went through the page cache)."""
    import mmap

    from servers.writer.datapath import direct

    frame_bytes = frame_bytes_of(shape)
    if any(offset % direct.ALIGN for offset in offsets) or frame_bytes % direct.ALIGN:
        return None
    per_batch = direct.batch_frames(frame_bytes)
    patterns = [expected_frame(i, shape, DTYPE).tobytes() for i in range(PATTERN_PERIOD)]
    batches: dict[int, mmap.mmap] = {}  # first frame's pattern -> a batch of the frames after it
    for phase in {(start + 1) % PATTERN_PERIOD for start in range(0, len(offsets), per_batch)}:
        buffer = mmap.mmap(-1, per_batch * frame_bytes)
        for k in range(per_batch):
            buffer[k * frame_bytes : (k + 1) * frame_bytes] = patterns[(phase + k) % PATTERN_PERIOD]
        batches[phase] = buffer
    path = directory / f"plain-direct-{shape[0]}x{shape[1]}.bin"

    def write(fd: int) -> None:
        index = 0
        while index < len(offsets):
            count = 1  # frames of this write: contiguous in the file, at most a batch
            while (
                count < per_batch
                and index + count < len(offsets)
                and offsets[index + count] == offsets[index] + count * frame_bytes
            ):
                count += 1
            batch = batches.get((index + 1) % PATTERN_PERIOD)
            if batch is None:  # a run broken where the writer's batches are not
                raise RuntimeError(f"frame {index}'s chunk is not where a direct batch would start")
            with memoryview(batch) as view:
                os.pwrite(fd, view[: count * frame_bytes], offsets[index])
            index += count

    elapsed, load = durable_write(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, write)
    return _throughput(len(offsets), shape, elapsed, load)


def frame_bytes_of(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1] * np.dtype(DTYPE).itemsize


def _throughput(n: int, shape: tuple[int, int], seconds: float, load: float) -> dict[str, Any]:
    return {
        "frames": n,
        "seconds": round(seconds, 3),
        "frames_per_s": round(n / seconds, 1),
        "gb_per_s": round(n * frame_bytes_of(shape) / seconds / 1e9, 3),
        "load_average_1min": round(load, 2),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(float(np.median(values)), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def throughput_main(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Per size: `--rounds` interleaved rounds of daqif, the peer and the plain write (the order
    turns each round, so no variant always runs after the same one)."""
    sizes: dict[str, Any] = {}
    for name in args.sizes.split(","):
        shape = SIZES[name]
        n = max(16, int(args.gib * 2**30 / frame_bytes_of(shape)))
        order = ["daqif", "peer", "plain_write", "plain_direct"]
        if args.also_page_cache:
            order.insert(1, "daqif_page_cache")
        runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in order}
        offsets: list[int] = []
        for round_ in range(args.rounds):
            for variant in order:
                print(f"[{name}] round {round_ + 1}: {variant}, {n} frames ...", file=sys.stderr, flush=True)
                if variant == "daqif":
                    run, offsets = daqif_run(directory, shape, n, datapath_io=args.datapath_io)
                elif variant == "daqif_page_cache":
                    run, _ = daqif_run(directory, shape, n, datapath_io="page-cache")
                elif variant == "peer":
                    run = peer_run(directory, shape, n)
                elif variant == "plain_write":
                    run = plain_run(directory, shape, offsets)
                else:
                    direct_run = plain_direct_run(directory, shape, offsets)
                    if direct_run is None:  # the daqif file is not laid out for direct writes
                        continue
                    run = direct_run
                runs[variant].append(run)
            order = order[1:] + order[:1]  # the plain write needs the offsets of round 1's daqif
        over_peer = [d["gb_per_s"] / p["gb_per_s"] for d, p in zip(runs["daqif"], runs["peer"], strict=True)]
        over_plain = [
            d["gb_per_s"] / p["gb_per_s"] for d, p in zip(runs["daqif"], runs["plain_write"], strict=True)
        ]
        over_direct = [
            d["gb_per_s"] / p["gb_per_s"] for d, p in zip(runs["daqif"], runs["plain_direct"], strict=False)
        ]
        sizes[name] = {
            "shape": list(shape),
            "frames_per_run": n,
            "daqif_gb_per_s": _spread([r["gb_per_s"] for r in runs["daqif"]]),
            "daqif_frames_per_s": _spread([r["frames_per_s"] for r in runs["daqif"]]),
            "peer_gb_per_s": _spread([r["gb_per_s"] for r in runs["peer"]]),
            "plain_write_gb_per_s": _spread([r["gb_per_s"] for r in runs["plain_write"]]),
            "daqif_over_peer": _spread(over_peer),
            "daqif_over_plain_write": _spread(over_plain),
            "plain_direct_gb_per_s": _spread([r["gb_per_s"] for r in runs["plain_direct"]] or [float("nan")]),
            "daqif_over_plain_direct": _spread(over_direct or [float("nan")]),
            "end_push_ms": _spread([r["end_push_ms"] for r in runs["daqif"]]),
            **_over_page_cache(runs),
            "load_average_1min": _spread([r["load_average_1min"] for v in runs.values() for r in v]),
            "shortest_run_s": min(r["seconds"] for v in runs.values() for r in v),
            "runs": runs,
        }
    return sizes


def _over_page_cache(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The `--also-page-cache` figures (none without it)."""
    if "daqif_page_cache" not in runs:
        return {}
    over = [
        d["gb_per_s"] / p["gb_per_s"] for d, p in zip(runs["daqif"], runs["daqif_page_cache"], strict=True)
    ]
    cache_over_peer = [
        c["gb_per_s"] / p["gb_per_s"] for c, p in zip(runs["daqif_page_cache"], runs["peer"], strict=True)
    ]
    return {
        "daqif_page_cache_gb_per_s": _spread([r["gb_per_s"] for r in runs["daqif_page_cache"]]),
        "daqif_page_cache_frames_per_s": _spread([r["frames_per_s"] for r in runs["daqif_page_cache"]]),
        "daqif_over_daqif_page_cache": _spread(over),
        "daqif_page_cache_over_peer": _spread(cache_over_peer),
    }


def live_main(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """The ``--live`` mode: per size, `--rounds` interleaved rounds of the daqif run with the live
    stream (and an MJPEG viewer) on and off; the ratio on ÷ off of each round, and frames lost."""
    sizes: dict[str, Any] = {}
    for name in args.sizes.split(","):
        shape = SIZES[name]
        n = max(16, int(args.gib * 2**30 / frame_bytes_of(shape)))
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        order = ["off", "on"]
        for round_ in range(args.rounds):
            for variant in order:
                print(
                    f"[{name}] round {round_ + 1}: preview {variant}, {n} frames ...",
                    file=sys.stderr,
                    flush=True,
                )
                rate = args.live_rate if variant == "on" else None
                runs[variant].append(daqif_run(directory, shape, n, live_rate=rate)[0])
            order.reverse()
        ratio = [on["gb_per_s"] / off["gb_per_s"] for on, off in zip(runs["on"], runs["off"], strict=True)]
        sizes[name] = {
            "shape": list(shape),
            "frames_per_run": n,
            "live_rate_hz": args.live_rate,
            "off_gb_per_s": _spread([r["gb_per_s"] for r in runs["off"]]),
            "on_gb_per_s": _spread([r["gb_per_s"] for r in runs["on"]]),
            "on_over_off": _spread(ratio),
            "frames_lost": {v: [r["frames_lost"] for r in rs] for v, rs in runs.items()},
            "viewer_jpeg_parts": [r["viewer_jpeg_parts"] for r in runs["on"]],
            # What the preview costs beside the data path, per round: the control plane's (SUB,
            # scaling, JPEG, the MJPEG response) and the viewer's CPU on minus off, per second of write.
            "preview_cpu_share": _spread(
                [
                    sum(on["cpu_seconds"][k] - off["cpu_seconds"][k] for k in ("control_plane", "bench"))
                    / on["seconds"]
                    for on, off in zip(runs["on"], runs["off"], strict=True)
                ]
            ),
            # Where the CPU goes: each process's CPU seconds in the timed span, per variant.
            "cpu_seconds": {
                v: {k: _spread([r["cpu_seconds"][k] for r in rs]) for k in rs[0]["cpu_seconds"]}
                for v, rs in runs.items()
            },
            "load_average_1min": _spread([r["load_average_1min"] for v in runs.values() for r in v]),
            "runs": runs,
        }
    return sizes


def loss_run(directory: Path, rate: float, n: int) -> dict[str, Any]:
    """Record `n` 64 KiB frames from a PUB source at `rate`; lost = gaps in the recorded ids."""
    shape = SIZES["64KiB"]
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    # A real deployment sizes the receive queue for its detector; 512 MiB absorbs ~0.5 s of stalls.
    datapath = ProcessDataPath(endpoint, "sub", rcvhwm=rcvhwm_for_frames(shape[0] * shape[1] * 2, 512 << 20))
    path = directory / "loss.h5"
    os.sync()  # earlier runs' dirty pages would otherwise be written back during this one
    try:
        datapath.start()
        datapath.open_write(make_job(path, n, shape))
        # Extra frames cover the subscription's start (a PUB source drops frames until then).
        sim = start_pub_sim(shape, rate, n, endpoint)
        try:
            deadline = n / rate * 3 + 60
            wait_until(
                lambda: datapath.progress().phase is WritePhase.FINISHED or not sim.running,
                deadline,
                "the write or the simulator to end",
            )
            time.sleep(0.5)
            result = datapath.stop_write() or datapath.progress().result
        finally:
            sim.stop(60)
        sim_summary = sim.summary()
    finally:
        datapath.close()
    assert result is not None
    with h5py.File(path, "r") as f:
        ids = f["bench/image_id"][:]
    path.unlink()
    span = int(ids[-1] - ids[0] + 1) if len(ids) else 0
    lost_inside = span - len(ids)
    return {
        "rate_hz": rate,
        "frames_requested": n,
        "frames_written": int(result.n_written),
        "frames_lost": lost_inside + (n - int(result.n_written)),
        "simulator_max_lag_s": round(sim_summary.max_lag_s, 4),
    }


def thread_nices(pid: int) -> list[int]:
    """The nice of each thread of `pid` (Linux nice is per thread)."""
    nices = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        nices.append(int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16]))
    return sorted(set(nices))


def set_thread_nices(pid: int, nice: int) -> None:
    """Set every thread of `pid` to `nice` (lowering a priority needs no privilege)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used."""
    user, system, _, _ = process_times(pid)
    return user + system


def sched_seconds(pid: int) -> tuple[float, float]:
    """(on CPU, waiting for a CPU) seconds summed over the threads of `pid` (``schedstat``)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():  # OSError once `pid` is gone
        with contextlib.suppress(OSError):
            on_cpu, queued, _ = task.joinpath("schedstat").read_text().split()
            run += int(on_cpu)
            wait += int(queued)
    return run / 1e9, wait / 1e9


def autogroup_of(pid: int) -> str | None:
    """``/proc/PID/autogroup`` (``/autogroup-N nice K``): the session whose nice weighs, or None."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    except OSError:
        return None


def largest_gap(ids: Any) -> tuple[int, int]:
    """(frames missing, image id after which they are missing) of the largest gap in `ids`."""
    if len(ids) < 2:
        return 0, -1
    steps = np.diff(ids.astype(np.int64)) - 1
    at = int(np.argmax(steps))
    return int(steps[at]), int(ids[at])


def poller_run(directory: Path, pollers: int, rate: float, n: int, *, boost: bool = True) -> dict[str, Any]:
    """Record `n` 64 KiB frames from a PUB source through a real writer while `pollers` threads
    poll ``/writer/status``; lost = gaps in the recorded ids, short = frames not recorded when the
    simulator ended. With `boost` false the data path is put back to the control plane's nice
    (the writer's behaviour without the privilege to raise it)."""
    import threading

    import requests

    from servers.common.launch import WriterOptions, WriterProcess

    shape = SIZES["64KiB"]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = directory / "poll-detector.json"
    config.write_text(
        json.dumps(
            {
                "detector_name": "bench",
                "bit_depth": 16,
                "image_pixel_height": shape[0],
                "image_pixel_width": shape[1],
            }
        )
    )
    path = directory / "poll.h5"
    os.sync()
    writer = WriterProcess(
        WriterOptions(stream=endpoint, data_root=directory, config=config, socket="sub")
    ).start(timeout=120)
    (datapath_pid,) = writer.data_path_pids()
    if not boost:
        set_thread_nices(datapath_pid, os.getpriority(os.PRIO_PROCESS, writer.pid))
        with contextlib.suppress(FileNotFoundError):  # the session's nice (autogroups), as the writer's
            Path(f"/proc/{datapath_pid}/autogroup").write_text("0\n")
    datapath_nices = thread_nices(datapath_pid)
    datapath_autogroup = autogroup_of(datapath_pid)
    writer_autogroup = autogroup_of(writer.pid)
    stop = threading.Event()
    polls = [0] * pollers

    def poll(index: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                session.get(writer.rest_url + "/writer/status", timeout=30).raise_for_status()
                polls[index] += 1

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(pollers)]
    try:
        for thread in threads:
            thread.start()
        reply = requests.post(
            writer.rest_url + "/writer/write_async",
            json={"output_file": str(path), "n_images": n},
            timeout=30,
        ).json()
        assert reply["status"] == "ok", reply
        started = time.monotonic()
        control_cpu_start = cpu_seconds(writer.pid)
        datapath_sched_start = sched_seconds(datapath_pid)
        sim = start_pub_sim(shape, rate, n, endpoint)
        # The simulator stands in for a detector, which does not share its CPU with the pollers: it
        # runs boosted like the data path (when allowed), so that what is measured is the writer.
        with contextlib.suppress(PermissionError, FileNotFoundError):
            set_thread_nices(sim.pid, -10)
            Path(f"/proc/{sim.pid}/autogroup").write_text("-10\n")
        sim_sched_start = sched_seconds(sim.pid)
        sim_autogroup = autogroup_of(sim.pid)
        sim_sched_last = sim_sched_start  # the simulator may end first: its last figures count
        try:

            def ended() -> bool:
                nonlocal sim_sched_last
                with contextlib.suppress(OSError):
                    sim_sched_last = sched_seconds(sim.pid)
                status = requests.get(writer.rest_url + "/writer/status", timeout=30).json()["writer"]
                return status["acquisition"]["state"] in ("FINISHED", "FAILED") or not sim.running

            wait_until(ended, n / rate * 3 + 60, "the write or the simulator to end")
            elapsed = time.monotonic() - started
            control_cpu = cpu_seconds(writer.pid) - control_cpu_start
            datapath_sched = [
                b - a for a, b in zip(datapath_sched_start, sched_seconds(datapath_pid), strict=True)
            ]
            sim_sched = [b - a for a, b in zip(sim_sched_start, sim_sched_last, strict=True)]
            requests.post(writer.rest_url + "/writer/stop", json={}, timeout=30)
        finally:
            sim.stop(60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        writer.stop()
    with h5py.File(path, "r") as f:
        ids = f["bench/image_id"][:]
    path.unlink()
    span = int(ids[-1] - ids[0] + 1) if len(ids) else 0
    gap, gap_after = largest_gap(ids)
    return {
        "pollers": pollers,
        "rate_hz": rate,
        "frames_requested": n,
        "frames_written": len(ids),
        # Gaps in the recorded ids: frames the writer received too late (the PUB queue overflowed).
        "frames_lost": span - len(ids),
        "largest_gap": {"frames": gap, "after_image_id": gap_after},
        "frames_short": n - len(ids),
        # The data path's threads: CPU used, and time they were runnable but waited for a CPU
        # (high wait = starved by the pollers; low wait with a gap = blocked on something).
        "datapath_cpu_s": round(datapath_sched[0], 3),
        "datapath_runqueue_wait_s": round(datapath_sched[1], 3),
        # The same for the simulator: a PUB source drops frames itself when its sending thread
        # waits for a CPU while the frames are due.
        "sim_cpu_s": round(sim_sched[0], 3),
        "sim_runqueue_wait_s": round(sim_sched[1], 3),
        "sim_autogroup": sim_autogroup,
        "status_polls_per_s": round(sum(polls) / max(elapsed, 1e-9)),
        # The control plane's CPU per poll (its cost with no poller is the baseline of each round).
        "control_plane_cpu_fraction": round(control_cpu / max(elapsed, 1e-9), 3),
        "control_plane_cpu_us_per_poll": round(control_cpu / sum(polls) * 1e6) if sum(polls) else None,
        "datapath_thread_nices": datapath_nices,
        "datapath_autogroup": datapath_autogroup,
        "writer_autogroup": writer_autogroup,
    }


def scale_run(
    directory: Path, shape: tuple[int, int], n: int, workers: int, remote_members: int
) -> dict[str, Any]:
    """A writer with `workers` data paths and `remote_members` other writers (a writer group, all
    on loopback) records `n` frames from one PUSH simulator sending as fast as it can: timed from
    REST ``write_async`` until gRPC ``WatchStatus`` shows FINISHED (every part durable and the
    virtual-dataset file written)."""
    import re

    import requests

    from daqif.writer_client import WriterClient, acquisition_state_name
    from servers.common.launch import WriterOptions, WriterProcess

    path = directory / f"scale-w{workers}-m{remote_members}.h5"
    config = detector_config(directory, shape)
    for old_log in directory.glob("*.log"):  # the coordinator's log is read for this run only
        old_log.unlink()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    sim: SimProcess | None = None
    started: list[WriterProcess] = []
    try:
        members = []
        for k in range(remote_members):
            member = WriterProcess(
                WriterOptions(stream=endpoint, data_root=directory, config=config),
                log_file=directory / f"member{k}.log",
            ).start(timeout=120)
            started.append(member)
            members.append(member.grpc_address)
        coordinator = WriterProcess(
            WriterOptions(
                stream=endpoint,
                data_root=directory,
                config=config,
                workers=workers if workers > 1 else None,
                group_members=tuple(members),
            ),
            log_file=directory / f"coordinator-w{workers}-m{remote_members}.log",
        ).start(timeout=120)
        started.append(coordinator)
        with requests.Session() as rest, WriterClient(coordinator.grpc_address, timeout=None) as client:
            watch = client.watch_status(timeout=run_deadline_s(n, shape))
            next(watch)
            os.sync()
            load = os.getloadavg()[0]
            reply = rest.post(
                coordinator.rest_url + "/writer/write_async",
                json={"output_file": str(path), "n_images": n},
                timeout=30,
            ).json()
            if reply["status"] != "ok":
                raise RuntimeError(f"write_async refused: {reply}")
            # The detector starts once the write is open (the std_daq sequence), sending as fast as
            # the writers take frames (PUSH waits for a free receive queue). Its ready line comes
            # right before its first send.
            sim = start_sim(shape, "--count", str(n), "--linger", "120", endpoint=endpoint)
            start = time.perf_counter()
            status = wait_finished(watch, coordinator.rest_url, n)
            state = acquisition_state_name(status.acquisition.state)
            elapsed = time.perf_counter() - start
            if state != "FINISHED" or status.acquisition.message != "Completed.":
                raise RuntimeError(f"the write did not complete: {status.acquisition.message}")
        sent = sim.wait_done(120)
        end_ms = re.findall(r"the file written ([0-9.]+) ms after the end was seen", coordinator.log_text())
    finally:
        for writer in reversed(started):
            writer.stop()
        if sim is not None:
            sim.stop(60)
    with h5py.File(path, "r") as f:
        ids = f["bench/image_id"][:].astype(np.int64)
        parts = len(f.attrs["source_files"]) if "source_files" in f.attrs else 1
    for leftover in directory.glob(f"{path.stem}*.h5"):
        leftover.unlink()
    return _throughput(n, shape, elapsed, load) | {
        "frames_sent": sent.frames_sent,
        "frames_recorded": len(ids),
        "frames_lost": sent.frames_sent - len(set(ids.tolist())),
        "parts": parts,
        # From the simulator's last send until the client saw FINISHED (queues drained, every part
        # durable, the virtual-dataset file written).
        "last_frame_to_file_ready_ms": round((elapsed - sent.elapsed_s) * 1000, 1),
        # The part of it after the coordinator saw the total reached (stop, join), from its log.
        "end_seen_to_file_ready_ms": float(end_ms[-1]) if end_ms else None,
    }


def scale_main(args: argparse.Namespace) -> int:
    """The ``--workers N ...`` mode: one writer with N data paths for each N, and a group of two
    writer processes, interleaved rounds on one size; aggregate throughput vs one data path."""
    name = args.sizes.split(",")[0]
    shape = SIZES[name]
    n = max(16, int(args.gib * 2**30 / frame_bytes_of(shape)))
    variants = [(f"workers {w}", w, 0) for w in args.workers] + [("group of 2 writers", 1, 1)]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    with bench_directory(args.dir) as directory:
        machine = machine_facts(directory)
        for round_ in range(args.rounds):
            turned = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for label, workers, members in turned:
                print(
                    f"[scale] round {round_ + 1}: {label}, {n} frames of {name} ...",
                    file=sys.stderr,
                    flush=True,
                )
                runs[label].append(scale_run(directory, shape, n, workers, members))
    base = runs[variants[0][0]]
    summary: dict[str, Any] = {
        "benchmark": "daqif writer groups: one write shared among data paths on one PUSH source "
        "(REST write_async -> FINISHED: parts durable, virtual-dataset file written)",
        "machine": machine,
        "size": name,
        "frames_per_run": n,
        "variants": {
            label: {
                "frames_per_s": _spread([r["frames_per_s"] for r in rs]),
                "gb_per_s": _spread([r["gb_per_s"] for r in rs]),
                "throughput_over_workers_1": _spread(
                    [r["frames_per_s"] / b["frames_per_s"] for r, b in zip(rs, base, strict=True)]
                ),
                "frames_lost": [r["frames_lost"] for r in rs],
                "last_frame_to_file_ready_ms": [r["last_frame_to_file_ready_ms"] for r in rs],
                "end_seen_to_file_ready_ms": [r["end_seen_to_file_ready_ms"] for r in rs],
                "load_average_1min": [r["load_average_1min"] for r in rs],
                "runs": rs,
            }
            for label, rs in runs.items()
        },
        "load_average_at_end": os.getloadavg(),
    }
    emit(summary, args.out)
    for label, entry in summary["variants"].items():
        print(
            f"{label:20} {_cell(entry['frames_per_s'])} frames/s  "
            f"x{_cell(entry['throughput_over_workers_1'])} "
            f"lost {entry['frames_lost']}  end ms {entry['last_frame_to_file_ready_ms']}",
            file=sys.stderr,
        )
    return 0


def polling_main(args: argparse.Namespace) -> int:
    """The ``--pollers N`` mode: frames lost with 0 and N status pollers, interleaved rounds."""
    rounds: list[dict[str, Any]] = []
    with bench_directory(args.dir) as directory:
        machine = machine_facts(directory)
        for round_ in range(args.poller_rounds):
            for pollers, boost in ((0, True), (args.pollers, True), (args.pollers, False)):
                label = f"{pollers} pollers" + ("" if boost else ", data path not boosted")
                print(f"[poll] round {round_ + 1}: {label} ...", file=sys.stderr, flush=True)
                run = poller_run(directory, pollers, args.poller_rate, args.poller_frames, boost=boost)
                rounds.append({"case": label, **run})
    summary = {
        "benchmark": "daqif writer: frames lost to status polling",
        "driver": "real daqif-writer (REST + data path), PUB simulator, pollers are threads of this process",
        "machine": machine,
        "rounds": rounds,
        "frames_lost": {
            case: [r["frames_lost"] for r in rounds if r["case"] == case]
            for case in dict.fromkeys(r["case"] for r in rounds)
        },
    }
    emit(summary, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, help="where files are written (default: a temporary directory)")
    parser.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help="comma-separated subset of " + ",".join(SIZES) + " (default %(default)s)",
    )
    parser.add_argument("--gib", type=float, default=5.0, help="GiB written per run (default %(default)s)")
    parser.add_argument(
        "--datapath-io",
        choices=("direct", "page-cache"),
        default="direct",
        help="the daqif writer's --datapath-io (default %(default)s): page-cache measures the path "
        "compressed frames take",
    )
    parser.add_argument(
        "--also-page-cache",
        action="store_true",
        help="one more variant in every round: the writer with --datapath-io page-cache (HDF5 writes "
        "each frame's chunk), and the ratio of the writer to it",
    )
    parser.add_argument(
        "--min-run-s",
        type=float,
        default=2.0,
        help="warn about runs shorter than this (default %(default)s s): raise --gib",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per size (default %(default)s)"
    )
    parser.add_argument("--loss-frames", type=int, default=0, help="frames in the PUB loss test (0 = skip)")
    parser.add_argument("--loss-attempts", type=int, default=6, help="rates tried in the loss test")
    parser.add_argument("--pollers", type=int, default=0, help="only measure status polling with N clients")
    parser.add_argument("--poller-rounds", type=int, default=4, help="rounds of the polling measurement")
    parser.add_argument(
        "--poller-rate", type=float, default=4000.0, help="PUB rate of the polling measurement"
    )
    parser.add_argument("--poller-frames", type=int, default=20_000, help="frames per polling round")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="only measure writer groups: one writer with each number of data paths (e.g. 1 2) and "
        "a group of two writer processes, on the first of --sizes",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument(
        "--live",
        action="store_true",
        help="only measure what the live preview costs: preview on ÷ off, interleaved rounds, frames lost",
    )
    parser.add_argument(
        "--live-rate", type=float, default=10.0, help="live stream rate of --live, Hz (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.pollers:
        return polling_main(args)
    if args.live:
        return live_mode(args)
    if args.workers:
        return scale_main(args)

    summary: dict[str, Any] = {
        "benchmark": "daqif writer end to end (REST write_async -> FINISHED, file durable) vs the "
        "hand-written peer (tools/bench_peer.py) and a plain write at the same offsets, all fsync'd",
    }
    with bench_directory(args.dir) as directory:
        summary["machine"] = machine_facts(directory)
        summary["datapath_io"] = args.datapath_io
        summary["sizes"] = throughput_main(args, directory)
        summary["runs_under_min"] = short_runs(summary["sizes"], args.min_run_s)
        if args.loss_frames:
            measured = summary["sizes"].get("64KiB", {}).get("daqif_frames_per_s", {}).get("median", 8000.0)
            rate = round(float(measured) * 0.9, -1)
            attempts = []
            for _ in range(args.loss_attempts):
                print(f"[loss] {args.loss_frames} frames at {rate:.0f} Hz ...", file=sys.stderr, flush=True)
                attempt = loss_run(directory, rate, args.loss_frames)
                attempts.append(attempt)
                if attempt["frames_lost"] == 0:
                    break
                rate = round(rate * 0.85, -1)
            held = [a for a in attempts if a["frames_lost"] == 0]
            summary["loss"] = {
                "source": "PUB (drops when the writer falls behind), 64 KiB frames",
                "attempts": attempts,
                "highest_rate_without_loss_hz": held[0]["rate_hz"] if held else None,
            }
    summary["load_average_at_end"] = os.getloadavg()
    emit(summary, args.out)
    print(_table(summary), file=sys.stderr)
    if summary["runs_under_min"]:
        print(
            f"WARNING: {len(summary['runs_under_min'])} runs took under {args.min_run_s:g} s "
            f"(shortest {min(r['seconds'] for r in summary['runs_under_min']):.2f} s): raise --gib",
            file=sys.stderr,
        )
    return 0


def short_runs(sizes: dict[str, Any], min_seconds: float) -> list[dict[str, Any]]:
    """Every run of every size and variant that took less than `min_seconds`."""
    return [
        {"size": name, "variant": variant, "round": i + 1, "seconds": run["seconds"]}
        for name, entry in sizes.items()
        for variant, runs in entry["runs"].items()
        for i, run in enumerate(runs)
        if run["seconds"] < min_seconds
    ]


def live_mode(args: argparse.Namespace) -> int:
    summary: dict[str, Any] = {
        "benchmark": "daqif writer with the live preview on (--live-stream, a /daq/live MJPEG viewer) "
        "÷ off, REST write_async -> FINISHED, file durable, PUSH source",
    }
    with bench_directory(args.dir) as directory:
        summary["machine"] = machine_facts(directory)
        summary["sizes"] = live_main(args, directory)
    summary["load_average_at_end"] = os.getloadavg()
    emit(summary, args.out)
    for name, entry in summary["sizes"].items():
        print(
            f"{name:6} off {_cell(entry['off_gb_per_s'])} GB/s  on {_cell(entry['on_gb_per_s'])} GB/s  "
            f"on/off {_cell(entry['on_over_off'])}  lost {entry['frames_lost']}  "
            f"load {_cell(entry['load_average_1min'])}",
            file=sys.stderr,
        )
        for variant, cpu in entry["cpu_seconds"].items():
            shares = ", ".join(f"{k} {v['median']:.2f}" for k, v in cpu.items())
            print(f"       CPU s per run, preview {variant}: {shares}", file=sys.stderr)
        print(
            f"       preview CPU (cores) beside the data path: {_cell(entry['preview_cpu_share'])}",
            file=sys.stderr,
        )
    return 0


@contextlib.contextmanager
def bench_directory(given: Path | None) -> Iterator[Path]:
    """`--dir` (created if needed, kept), else a temporary directory removed at the end."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    directory = Path(tempfile.mkdtemp(prefix="daqif-bench-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def emit(summary: dict[str, Any], out: Path | None) -> None:
    """Print the summary as JSON (stdout), and write it to `out` too when given (``--out``)."""
    text = json.dumps(summary, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def _cell(value: dict[str, float]) -> str:
    return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"


def _table(summary: dict[str, Any]) -> str:
    """One line per size: medians with min-max, the ratios and the load beside them."""
    columns = ["daqif_gb_per_s", "peer_gb_per_s", "plain_write_gb_per_s", "daqif_over_peer"]
    columns += ["daqif_over_plain_write", "plain_direct_gb_per_s", "daqif_over_plain_direct"]
    if any("daqif_over_daqif_page_cache" in entry for entry in summary["sizes"].values()):
        columns += ["daqif_page_cache_gb_per_s", "daqif_page_cache_over_peer", "daqif_over_daqif_page_cache"]
    columns += ["load_average_1min"]
    lines = ["size  frames/s  " + "  ".join(f"{c:18}" for c in columns) + "  push ms"]
    for name, entry in summary["sizes"].items():
        cells = "  ".join(f"{_cell(entry[c]):18}" for c in columns)
        fps = entry["daqif_frames_per_s"]["median"]
        lines.append(f"{name:6}{fps:>8.0f}  {cells}  {entry['end_push_ms']['median']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
