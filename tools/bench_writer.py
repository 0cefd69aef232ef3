"""Benchmark of the writer's data path (issue 3's table): prints a JSON summary with machine facts.

Simulator (``python -m servers.sim.main``) and data path (`ProcessDataPath`) run as separate
processes over TCP loopback. The data path is driven through its handle directly (the REST/gRPC
control plane adds nothing per frame); the output says so.

Measures, each against a reference measured in the same run:

- writer bytes/s for 64 KiB (256x128 uint16), 512 KiB (512x512) and 4 MiB (2048x1024) frames,
  divided by a plain Python file write of the same frames to the same directory;
- frames/s written for 64 KiB frames;
- with ``--compress bslz4``: raw-equivalent bytes/s divided by the uncompressed run;
- frames lost in a write of 20,000 64 KiB frames from a PUB source at the highest rate that
  holds (starting near the measured write rate, 15 % lower per attempt);
- the data path's resident memory, sampled during a long 4 MiB-frame write (``--rss-gib``).

With ``--pollers N`` it measures only what status polling costs: a real writer (REST control plane
and data path) records 20,000 64 KiB frames from a PUB source at ``--poller-rate`` (4 kHz), once
with no client, once with N threads polling ``/writer/status`` as fast as they can, and once more
with N pollers and the data path put back to the control plane's nice (what a writer without the
privilege to raise it gets), for ``--poller-rounds`` rounds; it reports the frames lost in each and
the control plane's CPU per poll.

Defaults finish in about a minute or two on 2 cores; ``--repeat 3 --rss-gib 10`` is the full run
(the machine is shared: the per-round ratios show how much the load drifted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from bench_common import machine_facts

from daqif.frame import PATTERN_PERIOD, expected_frame
from servers.common.launch import SimOptions, SimProcess
from servers.supervisor import free_port
from servers.writer.datapath.api import WriteJob, WritePhase, WriteResult
from servers.writer.datapath.handle import ProcessDataPath, rcvhwm_for_frames

SIZES: dict[str, tuple[int, int]] = {"64KiB": (256, 128), "512KiB": (512, 512), "4MiB": (2048, 1024)}
DEFAULT_FRAMES = {"64KiB": 10_000, "512KiB": 1_500, "4MiB": 200}
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


def writer_run(
    directory: Path, shape: tuple[int, int], n: int, *, compress: bool, sample_rss: bool = False
) -> dict[str, Any]:
    """Record `n` frames from a simulator sending as fast as it can (PUSH: nothing is lost)."""
    frame_bytes = shape[0] * shape[1] * np.dtype(DTYPE).itemsize
    extra = ["--header", "daqif", "--compress", "bslz4"] if compress else []
    sim = start_sim(shape, *extra)
    datapath = ProcessDataPath(sim.endpoint, "pull", rcvhwm=rcvhwm_for_frames(frame_bytes))
    path = directory / f"writer-{shape[0]}x{shape[1]}-{'bslz4' if compress else 'raw'}.h5"
    samples: list[int] = []
    try:
        datapath.start()
        wait_until(lambda: datapath.counters().received > 0, 60, "frames to arrive")
        os.sync()  # start from clean page cache, like the plain-write reference
        datapath.open_write(make_job(path, n, shape))
        if sample_rss:
            assert datapath.pid is not None
            while datapath.progress().phase not in (WritePhase.FINISHED, WritePhase.FAILED):
                samples.append(rss_bytes(datapath.pid))
                time.sleep(0.25)
        result = wait_result(datapath, timeout=3600)
        counters = datapath.counters()
    finally:
        datapath.close()
        sim.stop(60)
        sim_summary = sim.summary()
    elapsed = result.stop_time - result.start_time
    fsync_s = fsync_file(path)
    file_bytes = path.stat().st_size
    path.unlink()
    run: dict[str, Any] = {
        "frames": n,
        "frame_bytes": frame_bytes,
        "compressed": compress,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(n / elapsed, 1),
        "raw_bytes_per_s": round(n * frame_bytes / elapsed),
        "durable_seconds": round(elapsed + fsync_s, 3),
        "durable_raw_bytes_per_s": round(n * frame_bytes / (elapsed + fsync_s)),
        "file_bytes": file_bytes,
        "stored_bytes_per_frame": round(counters.bytes_written / max(1, counters.written)),
        "malformed": counters.malformed,
        "simulator_frames_per_s": round(sim_summary.frames_per_s, 1),
    }
    if samples:
        quarter = max(1, len(samples) // 4)
        run["rss_samples"] = len(samples)
        run["rss_mib_min"] = round(min(samples) / 2**20, 1)
        run["rss_mib_max"] = round(max(samples) / 2**20, 1)
        run["rss_mib_first_quarter_mean"] = round(float(np.mean(samples[:quarter])) / 2**20, 1)
        run["rss_mib_last_quarter_mean"] = round(float(np.mean(samples[-quarter:])) / 2**20, 1)
        step = max(1, len(samples) // 40)
        run["rss_mib_series"] = [round(value / 2**20) for value in samples[::step]]
    return run


def fsync_file(path: Path) -> float:
    """Seconds to make `path` durable (what is still in the page cache goes to disk)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def plain_write(directory: Path, shape: tuple[int, int], n: int) -> dict[str, Any]:
    """The reference: Python writes the same frames to a file in the same directory."""
    frames = [expected_frame(i, shape, DTYPE).tobytes() for i in range(PATTERN_PERIOD)]
    path = directory / f"plain-{shape[0]}x{shape[1]}.bin"
    os.sync()
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for i in range(1, n + 1):
            handle.write(frames[i % PATTERN_PERIOD])
        elapsed = time.perf_counter() - start
        handle.flush()
        os.fsync(handle.fileno())
    durable = time.perf_counter() - start
    path.unlink()
    frame_bytes = len(frames[0])
    return {
        "frames": n,
        "seconds": round(elapsed, 3),
        "bytes_per_s": round(n * frame_bytes / elapsed),
        "durable_seconds": round(durable, 3),
        "durable_bytes_per_s": round(n * frame_bytes / durable),
    }


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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    datapath_nices = thread_nices(datapath_pid)
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
        sim = start_pub_sim(shape, rate, n, endpoint)
        try:

            def ended() -> bool:
                status = requests.get(writer.rest_url + "/writer/status", timeout=30).json()["writer"]
                return status["acquisition"]["state"] in ("FINISHED", "FAILED") or not sim.running

            wait_until(ended, n / rate * 3 + 60, "the write or the simulator to end")
            elapsed = time.monotonic() - started
            control_cpu = cpu_seconds(writer.pid) - control_cpu_start
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
    return {
        "pollers": pollers,
        "rate_hz": rate,
        "frames_requested": n,
        "frames_written": len(ids),
        # Gaps in the recorded ids: frames the writer received too late (the PUB queue overflowed).
        "frames_lost": span - len(ids),
        "frames_short": n - len(ids),
        "status_polls_per_s": round(sum(polls) / max(elapsed, 1e-9)),
        # The control plane's CPU per poll (its cost with no poller is the baseline of each round).
        "control_plane_cpu_fraction": round(control_cpu / max(elapsed, 1e-9), 3),
        "control_plane_cpu_us_per_poll": round(control_cpu / sum(polls) * 1e6) if sum(polls) else None,
        "datapath_thread_nices": datapath_nices,
    }


def polling_main(args: argparse.Namespace) -> int:
    """The ``--pollers N`` mode: frames lost with 0 and N status pollers, interleaved rounds."""
    own_dir = args.dir is None
    directory: Path = Path(tempfile.mkdtemp(prefix="daqif-bench-")) if own_dir else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    try:
        for round_ in range(args.poller_rounds):
            for pollers, boost in ((0, True), (args.pollers, True), (args.pollers, False)):
                label = f"{pollers} pollers" + ("" if boost else ", data path not boosted")
                print(f"[poll] round {round_ + 1}: {label} ...", file=sys.stderr, flush=True)
                run = poller_run(directory, pollers, args.poller_rate, args.poller_frames, boost=boost)
                rounds.append({"case": label, **run})
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    summary = {
        "benchmark": "daqif writer: frames lost to status polling",
        "driver": "real daqif-writer (REST + data path), PUB simulator, pollers are threads of this process",
        "machine": machine_facts(Path(tempfile.gettempdir())),
        "rounds": rounds,
        "frames_lost": {
            case: [r["frames_lost"] for r in rounds if r["case"] == case]
            for case in dict.fromkeys(r["case"] for r in rounds)
        },
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, help="where files are written (default: a temporary directory)")
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES)
    )
    parser.add_argument("--frames-scale", type=float, default=1.0, help="multiply the default frame counts")
    parser.add_argument("--no-compress", action="store_true", help="skip the bslz4 runs")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per size (medians are reported)")
    parser.add_argument("--loss-frames", type=int, default=20_000, help="frames in the loss test (0 = skip)")
    parser.add_argument("--loss-attempts", type=int, default=6, help="rates tried in the loss test")
    parser.add_argument(
        "--rss-gib", type=float, default=1.0, help="GiB of 4 MiB frames for the RSS run (0 = skip)"
    )
    parser.add_argument("--pollers", type=int, default=0, help="only measure status polling with N clients")
    parser.add_argument("--poller-rounds", type=int, default=4, help="rounds of the polling measurement")
    parser.add_argument(
        "--poller-rate", type=float, default=4000.0, help="PUB rate of the polling measurement"
    )
    parser.add_argument("--poller-frames", type=int, default=20_000, help="frames per polling round")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if args.pollers:
        return polling_main(args)

    own_dir = args.dir is None
    directory: Path = Path(tempfile.mkdtemp(prefix="daqif-bench-")) if own_dir else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "benchmark": "daqif writer data path",
        "driver": "ProcessDataPath handle directly (no REST/gRPC control plane); simulator and data "
        "path are separate processes over tcp loopback",
        "machine": machine_facts(directory),
        "sizes": {},
    }
    try:
        for name in args.sizes.split(","):
            shape = SIZES[name]
            n = max(10, int(DEFAULT_FRAMES[name] * args.frames_scale))
            runs: dict[str, list[dict[str, Any]]] = {"writer": [], "plain_write": [], "writer_bslz4": []}
            # Interleaved repeats: a shared machine's load drifts; ratios use each round's own pair.
            for round_ in range(args.repeat):
                print(f"[{name}] round {round_ + 1}: writer, {n} frames ...", file=sys.stderr, flush=True)
                runs["writer"].append(writer_run(directory, shape, n, compress=False))
                print(f"[{name}] round {round_ + 1}: plain file write ...", file=sys.stderr, flush=True)
                runs["plain_write"].append(plain_write(directory, shape, n))
                if not args.no_compress:
                    print(f"[{name}] round {round_ + 1}: writer, bslz4 ...", file=sys.stderr, flush=True)
                    runs["writer_bslz4"].append(writer_run(directory, shape, n, compress=True))
            ratios = [
                w["raw_bytes_per_s"] / p["bytes_per_s"]
                for w, p in zip(runs["writer"], runs["plain_write"], strict=True)
            ]
            # Page-cache speed swings with the kernel's write-back of earlier runs; the durable ratio
            # (each side timed until its file is on disk) is the steadier comparison.
            durable = [
                w["durable_raw_bytes_per_s"] / p["durable_bytes_per_s"]
                for w, p in zip(runs["writer"], runs["plain_write"], strict=True)
            ]
            entry: dict[str, Any] = {
                "shape": list(shape),
                **{key: value for key, value in runs.items() if value},
                "writer_over_plain_write_per_round": [round(r, 3) for r in ratios],
                "writer_over_plain_write": round(float(np.median(ratios)), 3),
                "writer_over_plain_write_durable_per_round": [round(r, 3) for r in durable],
                "writer_over_plain_write_durable": round(float(np.median(durable)), 3),
                "writer_frames_per_s": round(
                    float(np.median([w["frames_per_s"] for w in runs["writer"]])), 1
                ),
            }
            if runs["writer_bslz4"]:
                gains = [
                    c["raw_bytes_per_s"] / w["raw_bytes_per_s"]
                    for c, w in zip(runs["writer_bslz4"], runs["writer"], strict=True)
                ]
                entry["bslz4_raw_equivalent_over_uncompressed_per_round"] = [round(g, 3) for g in gains]
                entry["bslz4_raw_equivalent_over_uncompressed"] = round(float(np.median(gains)), 3)
            summary["sizes"][name] = entry
        if "64KiB" in summary["sizes"]:
            summary["frames_per_s_64KiB"] = summary["sizes"]["64KiB"]["writer_frames_per_s"]
        if args.loss_frames:
            start_rate = float(summary.get("frames_per_s_64KiB", 8000.0)) * 0.9
            attempts = []
            rate = round(start_rate, -1)
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
                "frames_lost_at_that_rate": 0 if held else None,
            }
        if args.rss_gib:
            n = max(16, int(args.rss_gib * 2**30 / (4 * 2**20)))
            print(f"[rss] 4 MiB frames, {n} frames ({args.rss_gib} GiB) ...", file=sys.stderr, flush=True)
            summary["rss_4MiB"] = writer_run(directory, SIZES["4MiB"], n, compress=False, sample_rss=True)
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
