"""Benchmark of the DPM server (`daqif-dpm-server`), each figure beside a baseline measured in the same run.

    python tools/bench_dpm.py                          # every mode, default sizes (~5 minutes)
    python tools/bench_dpm.py --modes small --small-daqs 1000 --rounds 3
    python tools/bench_dpm.py --modes data --size-gib 2
    python tools/bench_dpm.py --modes data --size-gib 2 --filesystem xfs   # root: loop-mounted XFS
    python tools/bench_dpm.py --modes scale --daqs 50000 --drop-caches    # root: cold page cache

Modes (issue 12 targets on the 2-core reference machine):
- `small`: `--small-daqs` DAQs of one 1 MiB HDF5 source and one receiver, `max_merges` 4, queued
  32 in flight, until every one is archived, followed as a coordinator would, through
  `WatchDaqStatus` (each DAQ's COMPLETED status is published once it is archived; a DAQ with an
  ERROR alert gets one RetryMergeDaq and is counted; each DAQ must end COMPLETED; `--follow poll`
  polls GetActiveDaqs every 20 ms instead, as the bench did before). DAQs/s, and
  CPU milliseconds per DAQ of the server (user, system) and of the merge side (the launcher and
  its workers, from /proc/PID/stat: far steadier than the rate on a shared machine), both timed
  and counted from when the started server and its merge launcher are idle (the launcher's import
  of the merge, ~0.7 s of CPU after SERVING, was counted before: ~2 ms per DAQ of a 300-DAQ
  round), against the
  serial hand-written loop doing the product work (copy of the source,
  fsync, rename, hard link into the receiver) in a fresh `python` process, start-up included
  (`small_vs_loop` >= 0.1; `small_daqs_per_s` >= 100). `--rounds` interleaved rounds (DPM, loop,
  loop, DPM, ...), medians with min-max. With `--count-syscalls`, one more DPM run under
  `strace -f -c` counts fsync/fdatasync/rename calls per DAQ (server, launcher and merges).
- `status`: GetDaqStatus calls/s ÷ calls/s of a bare grpcio server answering the standard health
  Check (the "echo", same RPC shape), same client (one blocking stub, sequential calls), both
  servers in their own process, interleaved rounds (target >= 0.7); also 32 calls in flight.
  QueueDaq latency p50/p99 (persisted durably before the reply).
- `data`: two HDF5 sources (one bitshuffle-LZ4) of `--size-gib` in total, collected (copies: a
  collected source is a snapshot), merged (fsync) and released (hard link) by the DPM, queue to
  archived, against `cp` of the same files made durable (fsync inside the timed span), same disk,
  interleaved (`data_path_ratio_vs_cp_fsync` >= 0.9); plain `cp` (not durable) for reference;
  the seconds the DPM spent in each state (from its log) and the bytes read from and written to
  the disk in each timed span (/proc/diskstats of the work directory's device: every program
  using it counts).
  `--filesystem xfs` (or `btrfs`) runs it on a fresh file system in a sparse image file in the
  work directory, loop-mounted with direct I/O, sources, DPM, receivers and `cp` all inside it
  (root, mkfs.xfs from xfsprogs; unmounted and deleted at the end); there `cp` clones (reflinks),
  so `cp --reflink=never` + fsync is timed too (`data_path_ratio_vs_cp_reflink_never_fsync`).
- `scale`: `--daqs` active DAQs (held SCHEDULED by `max_active_daqs: 0`): GetActiveDaqs
  (<= 200 ms), `kill -9`, optionally a cold page cache (`--drop-caches`, root), start until the
  health check answers SERVING (<= 3 s), and the first GetActiveDaqs after it.
Prints one JSON summary with machine facts; the load average is sampled beside every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h5py
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_facts, process_times
from bench_merge import time_cp, write_source

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.v1 import dpm_pb2, dpm_pb2_grpc
from servers.common.launch import DpmOptions, DpmProcess
from servers.common.process import descendants, system_tool

ECHO_SERVER = """
import asyncio, sys
import grpc
import h5py
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main():
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def dpm_server(directory: Path, allowed_root: Path, settings: dict[str, Any]) -> DpmProcess:
    """A DPM on a free port with its workspace, settings file and log in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "dpm-config.json"
    config.write_text(json.dumps(settings))
    options = DpmOptions(workspace=directory / "dpm-workspace", allowed_roots=(allowed_root,), config=config)
    return DpmProcess(options, log_file=directory / "dpm-server.log")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def keyword_spec(daq_id: str) -> str:
    return json.dumps(
        {
            "id": daq_id,
            "target": {"fileId": daq_id},
            "sources": [
                {
                    "type": "fitsKeywords",
                    "sourceName": "ocm",
                    "keywords": [{"type": "valueKeyword", "name": "OBJECT", "value": "bench"}],
                }
            ],
        }
    )


def calls_per_second(call: Callable[[], Any], seconds: float) -> float:
    for _ in range(200):  # warm up
        call()
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            call()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


async def concurrent_calls_per_second(
    address: str, make_call: Any, seconds: float, in_flight: int = 32
) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = make_call(channel)
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await call()
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return count / (time.perf_counter() - start)


def measure_status_ratio(dpm_address: str, echo_address: str, daq_id: str, seconds: float) -> dict[str, Any]:
    with (
        grpc.insecure_channel(dpm_address) as dpm_channel,
        grpc.insecure_channel(echo_address) as echo_channel,
    ):
        status_stub = dpm_pb2_grpc.DpmDaqControlStub(dpm_channel)
        health_stub = health_pb2_grpc.HealthStub(echo_channel)
        status_request = dpm_pb2.GetDaqStatusRequest(id=daq_id)
        health_request = health_pb2.HealthCheckRequest(service="")
        echo, dpm = [], []
        for _ in range(3):  # interleaved rounds: both see the same machine load
            echo.append(calls_per_second(lambda: health_stub.Check(health_request), seconds))
            dpm.append(calls_per_second(lambda: status_stub.GetDaqStatus(status_request), seconds))

    def status_call(channel: Any) -> Any:
        stub = dpm_pb2_grpc.DpmDaqControlStub(channel)
        return lambda: stub.GetDaqStatus(status_request)

    def echo_call(channel: Any) -> Any:
        stub = health_pb2_grpc.HealthStub(channel)
        return lambda: stub.Check(health_request)

    echo_c, dpm_c = [], []
    for _ in range(2):
        echo_c.append(asyncio.run(concurrent_calls_per_second(echo_address, echo_call, seconds)))
        dpm_c.append(asyncio.run(concurrent_calls_per_second(dpm_address, status_call, seconds)))
    return {
        "echo_calls_per_s": round(statistics.median(echo)),
        "getdaqstatus_calls_per_s": round(statistics.median(dpm)),
        "getdaqstatus_ratio": round(statistics.median(dpm) / statistics.median(echo), 3),
        "echo_calls_per_s_concurrent": round(statistics.median(echo_c)),
        "getdaqstatus_calls_per_s_concurrent": round(statistics.median(dpm_c)),
        "getdaqstatus_ratio_concurrent": round(statistics.median(dpm_c) / statistics.median(echo_c), 3),
    }


async def queue_many(address: str, ids: list[str], in_flight: int = 32) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dpm_pb2_grpc.DpmDaqControlStub(channel)
        todo = iter(ids)

        async def worker() -> None:
            for daq_id in todo:
                await stub.QueueDaq(dpm_pb2.QueueDaqRequest(specification=keyword_spec(daq_id)))

        await asyncio.gather(*(worker() for _ in range(in_flight)))


def wait_archived(client: DpmClient, daq_id: str, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = client.get_daq_status(daq_id)
        except DaqException as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return
            raise
        if status.error:
            raise RuntimeError(f"DAQ {daq_id} failed: {[a.description for a in status.alerts]}")
        time.sleep(0.005)
    raise TimeoutError(daq_id)


class FilesystemUnavailable(Exception):
    """`--filesystem` cannot be set up here; the message says why."""


MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


@contextlib.contextmanager
def scratch_filesystem(kind: str, work: Path, size_bytes: int) -> Iterator[Path]:
    """A fresh `kind` file system (`xfs` with reflinks, or `btrfs`) in a sparse image file in `work`,
    loop-mounted (direct I/O on the image: no second page cache below it) at `work/<kind>`; yields
    the mount point. Unmounted, detached and deleted at the end, also on an error or Ctrl-C."""
    if os.geteuid() != 0:
        raise FilesystemUnavailable(f"--filesystem {kind} needs root (losetup and mount)")
    tools: dict[str, str] = {}
    for tool in (MKFS[kind][0], "losetup", "mount", "umount"):
        found = system_tool(tool)  # Debian keeps mkfs.* and losetup in /usr/sbin
        if found is None:
            package = {"mkfs.xfs": "xfsprogs", "mkfs.btrfs": "btrfs-progs"}.get(tool, "util-linux")
            raise FilesystemUnavailable(f"--filesystem {kind}: {tool} not found (apt-get install {package})")
        tools[tool] = found
    image = work / f"{kind}.img"
    mount_point = work / kind
    device = ""
    mounted = False

    def run(argv: list[str]) -> str:
        done = subprocess.run([tools.get(argv[0], argv[0]), *argv[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            raise FilesystemUnavailable(
                f"--filesystem {kind}: {' '.join(argv)} failed: {done.stderr.strip()}"
            )
        return done.stdout.strip()

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up too
    try:
        with open(image, "wb") as handle:
            handle.truncate(size_bytes)  # sparse: the image takes only what is written to it
        run([*MKFS[kind], str(image)])
        device = run(["losetup", "--find", "--show", "--direct-io=on", str(image)])
        mount_point.mkdir()
        run(["mount", "-o", "discard", device, str(mount_point)])  # discard: freed blocks leave the image
        mounted = True
        yield mount_point
    finally:
        if (
            mounted
            and subprocess.run([tools["umount"], str(mount_point)], capture_output=True).returncode != 0
        ):
            subprocess.run([tools["umount"], "--lazy", str(mount_point)], capture_output=True)
        if device:
            subprocess.run([tools["losetup"], "--detach", device], capture_output=True)
        with contextlib.suppress(OSError):
            mount_point.rmdir()
        with contextlib.suppress(OSError):
            image.unlink()
        signal.signal(signal.SIGTERM, previous)


def device_bytes(path: Path) -> tuple[int, int] | None:
    """Bytes read and written so far on the block device holding `path` (/proc/diskstats), None
    if unknown.

    Counts every writer of that device: on the shared disk other programs add to it; on a
    `--filesystem` loop device only this bench writes."""
    st_dev = os.stat(path).st_dev
    major, minor = os.major(st_dev), os.minor(st_dev)
    with contextlib.suppress(OSError), open("/proc/diskstats") as stats:
        for line in stats:
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return int(fields[5]) * 512, int(fields[9]) * 512
    return None


# The server's one INFO line per DAQ when it ends: "DAQ <id>: COMPLETED (...); SCHEDULED 0.002 s, …".
FINAL_LINE = re.compile(r" INFO servers\.dpm\.lifecycle: DAQ (\S+): [A-Z_]+ \(.*\); (.*)$")
STATE_SPENT = re.compile(r"([A-Z_]+) (\d+\.\d+) s")


def phase_seconds(log: Path) -> dict[str, dict[str, Any]]:
    """Seconds per DAQ state (COLLECTING, MERGING, RELEASING) from the server log's line per DAQ."""
    spent: dict[str, list[float]] = {}
    for line in log.read_text().splitlines():
        found = FINAL_LINE.search(line)
        if found:
            for state, seconds in STATE_SPENT.findall(found[2]):
                spent.setdefault(state.lower(), []).append(float(seconds))
    return {state: spread(seconds) for state, seconds in spent.items()}


def time_cp_copying(sources: list[Path], target: Path) -> float:
    """`cp --reflink=never` of `sources` into `target`, fsynced: the bytes copied and written even
    where the file system could share extents (GNU cp clones by default where it can)."""
    target.mkdir(exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", *map(str, sources), str(target)], check=True)
    for source in sources:
        fd = os.open(target / source.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def measure_data_path(work: Path, size_gib: float, repeat: int, copying_cp: bool = False) -> dict[str, Any]:
    data = work / "data"
    raw = data / "raw"
    raw.mkdir(parents=True)
    half = int(size_gib * 2**30 / 2)
    sources = [raw / "det1.h5", raw / "det2.h5"]
    write_source(sources[0], half, compressed=False, seed=1)
    write_source(sources[1], half, compressed=True, seed=2)
    nbytes = sum(s.stat().st_size for s in sources)
    server = dpm_server(work / "server-data", data, {"max_active_daqs": 1})
    server.start()
    dpm_times, cp_times, cp_fsync_times, loads = [], [], [], []
    dpm_io: list[tuple[int, int]] = []  # bytes read, written on the device during the timed span
    cp_io: list[tuple[int, int]] = []
    cp_copy_times: list[float] = []
    try:
        with DpmClient(server.address, timeout=60) as client:
            for i in range(repeat):
                receiver = data / f"olas{i}"
                receiver.mkdir()
                spec = {
                    "id": f"DATA{i}",
                    "target": {"fileId": f"DATA{i}"},
                    "sources": [
                        {"type": "hdf5File", "sourceName": f"det{k + 1}", "location": str(s)}
                        for k, s in enumerate(sources)
                    ],
                    "receivers": [{"type": "olasReceiver", "path": str(receiver)}],
                }

                def run_dpm(spec: dict[str, Any] = spec) -> float:
                    os.sync()  # nothing of the previous step left for this one to write
                    before = device_bytes(work)
                    start = time.perf_counter()
                    client.queue_daq(spec)
                    wait_archived(client, spec["id"])
                    elapsed = time.perf_counter() - start
                    after = device_bytes(work)
                    if before is not None and after is not None:
                        dpm_io.append((after[0] - before[0], after[1] - before[1]))
                    return elapsed

                def run_cp_fsync() -> float:
                    os.sync()
                    before = device_bytes(work)
                    elapsed = time_cp(sources, work / "cp", durable=True)
                    after = device_bytes(work)
                    if before is not None and after is not None:
                        cp_io.append((after[0] - before[0], after[1] - before[1]))
                    return elapsed

                loads.append(load_average())
                if i % 2 == 0:
                    dpm_times.append(run_dpm())
                    cp_times.append(time_cp(sources, work / "cp", durable=False))
                else:
                    cp_times.append(time_cp(sources, work / "cp", durable=False))
                    dpm_times.append(run_dpm())
                cp_fsync_times.append(run_cp_fsync())
                if copying_cp:
                    os.sync()
                    cp_copy_times.append(time_cp_copying(sources, work / "cp"))
                # Free the disk: the next run builds its product afresh.
                shutil.rmtree(work / "server-data" / "dpm-workspace" / "products" / f"DATA{i}")
                shutil.rmtree(receiver)
    finally:
        server.stop()
    phases = phase_seconds(work / "server-data" / "dpm-server.log")
    dpm_s, cp_s, cp_fsync_s = (statistics.median(t) for t in (dpm_times, cp_times, cp_fsync_times))
    result = {
        "bytes": nbytes,
        "dpm_s": round(dpm_s, 3),
        "cp_s": round(cp_s, 3),
        "cp_fsync_s": round(cp_fsync_s, 3),
        "dpm_mib_per_s": round(nbytes / 2**20 / dpm_s, 1),
        "data_path_ratio": round(cp_s / dpm_s, 3),
        "data_path_ratio_vs_cp_fsync": round(cp_fsync_s / dpm_s, 3),
        "dpm_seconds": spread(dpm_times),
        "cp_fsync_seconds": spread(cp_fsync_times),
        "load_average": spread(loads, 2),
        # To the device below the work directory during the timed span (by every program on it).
        "device_gib_read_written_dpm": [[round(r / 2**30, 2), round(w / 2**30, 2)] for r, w in dpm_io],
        "device_gib_read_written_cp_fsync": [[round(r / 2**30, 2), round(w / 2**30, 2)] for r, w in cp_io],
        "dpm_state_seconds": phases,
    }
    if cp_copy_times:
        cp_copy_s = statistics.median(cp_copy_times)
        result["cp_reflink_never_fsync_seconds"] = spread(cp_copy_times)
        result["data_path_ratio_vs_cp_reflink_never_fsync"] = round(cp_copy_s / dpm_s, 3)
    return result


SERIAL_LOOP = """
import os, sys, time
start = time.perf_counter()
source, work, receiver, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
size = os.stat(source).st_size
for i in range(n):
    final = os.path.join(work, f"P{i:05d}.h5")
    tmp = final + ".tmp"
    with open(source, "rb") as src, open(tmp, "xb") as dst:
        copied = 0
        while copied < size:
            copied += os.copy_file_range(src.fileno(), dst.fileno(), size - copied, copied, copied)
        os.fsync(dst.fileno())
    os.rename(tmp, final)
    os.link(final, os.path.join(receiver, f"P{i:05d}.h5"))
fd = os.open(work, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median with min and max."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": len(values),
    }


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def small_spec(daq_id: str, source: Path, receiver: Path) -> str:
    return json.dumps(
        {
            "id": daq_id,
            "target": {"fileId": daq_id},
            "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
            "receivers": [{"type": "olasReceiver", "path": str(receiver)}],
        }
    )


def write_small_source(path: Path) -> None:
    """One 1 MiB HDF5 source: two 512x512 uint16 frames, one chunk each."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "det/data", data=rng.integers(0, 4000, (2, 512, 512), dtype=np.uint16), chunks=(1, 512, 512)
        )
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def run_small_daqs(
    directory: Path, source: Path, n: int, strace: bool = False, follow: str = "watch"
) -> tuple[float, dict[str, Any]]:
    """Queue `n` small DAQs on a fresh DPM; seconds from the first QueueDaq to the last archived."""
    receiver = directory / "olas"
    receiver.mkdir(parents=True)
    server = dpm_server(directory / "server", source.parent, {"max_merges": 4, "max_active_daqs": 16})
    server.start()
    tracer = None
    if strace:
        trace_file = directory / "strace.txt"
        tracer = subprocess.Popen(
            [
                "strace",
                "-f",
                "-c",
                "-o",
                str(trace_file),
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2",
                "-p",
                str(server.pid),
            ]
            + [a for c in sorted(descendants(server.pid)) for a in ("-p", str(c))],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # strace attaches
    errors: set[str] = set()
    try:
        ids = [f"S{i:05d}" for i in range(n)]
        wait_until_idle(server.pid)
        cpu_before = _cpu_seconds(server.pid)
        start = time.perf_counter()
        texts = [small_spec(i, source, receiver) for i in ids]
        if follow == "watch":
            asyncio.run(queue_and_watch(server.address, texts, errors))
        else:
            asyncio.run(queue_texts(server.address, texts))
            poll_until_archived(server.address, errors)
        elapsed = time.perf_counter() - start
        cpu_after = _cpu_seconds(server.pid)
        with DpmClient(server.address, timeout=60) as client:
            completed = sum(
                client.get_daq_status(i, include_archived=True).substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
                for i in ids
            )
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        server.stop()
    facts: dict[str, Any] = {"errors": len(errors), "completed": completed}
    facts["cpu_ms_per_daq"] = {
        name: round((cpu_after[name] - cpu_before[name]) * 1000 / n, 2) for name in cpu_before
    }
    for line in (directory / "server" / "dpm-server.log").read_text().splitlines():
        found = re.search(r"store: (\d+) changes in (\d+) group commits", line)
        if found:
            changes, batches = int(found[1]), int(found[2])
            facts["store"] = {
                "changes_per_daq": round(changes / n, 2),
                "fdatasyncs_per_daq": round(batches / n, 2),
            }
    if tracer is not None:
        facts["syscalls_per_daq"] = {
            name: round(count / n, 2) for name, count in parse_strace_counts(directory / "strace.txt").items()
        }
    shutil.rmtree(directory)
    return elapsed, facts


def poll_until_archived(address: str, errors: set[str]) -> None:
    """`--follow poll` (the bench before WatchDaqStatus): GetActiveDaqs every 20 ms until none is
    active; a DAQ with an ERROR alert gets one RetryMergeDaq."""
    with DpmClient(address, timeout=60) as client:
        while True:
            active = client.get_active_daqs()
            for status in active:
                if status.error and status.id not in errors:
                    errors.add(status.id)
                    client.retry_merge_daq(status.id)
            if not active:
                return
            time.sleep(0.02)


def wait_until_idle(server_pid: int, timeout: float = 60.0) -> None:
    """Wait until the server and the merge launcher have finished starting: SERVING comes before
    the launcher has imported the merge (~0.7 s of CPU) and before the server's own last warm-ups,
    which would otherwise be counted (and timed) as the first DAQs' cost."""
    deadline = time.monotonic() + timeout
    last = sum(_cpu_seconds(server_pid).values())
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(_cpu_seconds(server_pid).values())
        if now - last < 0.005:  # under 2% of one core: idle
            return
        last = now


def _cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds so far: the server (user, system) and the merge side (the launcher and every
    merge worker it forked, live or reaped: their times reach the launcher's `cutime`/`cstime`)."""

    def times(pid: int) -> tuple[float, float, float, float]:
        try:
            return process_times(pid)
        except OSError:
            return 0.0, 0.0, 0.0, 0.0

    server = times(server_pid)
    merge_user = merge_system = 0.0
    for child in descendants(server_pid):
        t = times(child)
        merge_user += t[0] + t[2]
        merge_system += t[1] + t[3]
    return {
        "server_user": server[0],
        "server_system": server[1],
        "merge_user": merge_user,
        "merge_system": merge_system,
    }


def parse_strace_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in {"fsync", "fdatasync", "rename", "renameat", "renameat2"}:
            counts[fields[-1]] = int(fields[3])
    return counts


def run_serial_loop(directory: Path, source: Path, n: int) -> float:
    """The hand-written loop in a fresh interpreter: copy, fsync, rename, link per product."""
    (directory / "work").mkdir(parents=True)
    (directory / "olas").mkdir()
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            SERIAL_LOOP,
            str(source),
            str(directory / "work"),
            str(directory / "olas"),
            str(n),
        ],
        check=True,
    )
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory)
    return elapsed


def measure_small(
    work: Path, n: int, rounds: int, count_syscalls: bool, follow: str = "watch"
) -> dict[str, Any]:
    data = work / "small"
    data.mkdir()
    source = data / "det.h5"
    write_small_source(source)
    dpm_rates, loop_rates, loads, errors, completed = [], [], [], 0, 0
    store: list[dict[str, float]] = []
    cpu: list[dict[str, float]] = []
    for r in range(rounds):
        order = ["dpm", "loop"] if r % 2 == 0 else ["loop", "dpm"]
        for what in order:
            loads.append(load_average())
            if what == "dpm":
                elapsed, facts = run_small_daqs(data / f"dpm{r}", source, n, follow=follow)
                dpm_rates.append(n / elapsed)
                store.append(facts.get("store", {}))
                cpu.append(facts["cpu_ms_per_daq"])
                errors += facts["errors"]
                completed += facts["completed"]
            else:
                loop_rates.append(n / run_serial_loop(data / f"loop{r}", source, n))
    result: dict[str, Any] = {
        "daqs_per_round": n,
        "source_bytes": source.stat().st_size,
        "dpm_daqs_per_s": spread(dpm_rates, 1),
        "serial_loop_products_per_s": spread(loop_rates, 1),
        "small_vs_loop": round(statistics.median(dpm_rates) / statistics.median(loop_rates), 3),
        "error_alerts": errors,
        "completed": f"{completed} of {n * rounds}",
        "store_per_round": store,
        "cpu_ms_per_daq_per_round": cpu,
        "load_average": spread(loads, 2),
    }
    if count_syscalls:
        _, facts = run_small_daqs(data / "strace", source, min(n, 300), strace=True, follow=follow)
        result["syscalls_per_daq"] = facts.get("syscalls_per_daq")
    return result


async def queue_and_watch(address: str, texts: list[str], errors: set[str]) -> None:
    """Queue `texts` (32 in flight) and follow `WatchDaqStatus` until each DAQ is COMPLETED (the
    status published once it is archived); a DAQ with an ERROR alert gets one RetryMergeDaq.

    A coordinator follows the status stream rather than polling GetActiveDaqs. The watch is
    known to be registered when it delivers the first DAQ's status (its current one, or a change),
    so the others are queued after that; a dropped watch (UNAVAILABLE) is opened again, and its
    first replies are the current status of every active DAQ.
    """
    ids = [json.loads(t)["id"] for t in texts]
    pending = set(ids)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dpm_pb2_grpc.DpmDaqControlStub(channel)
        first = asyncio.Event()

        async def follow() -> None:
            while pending:
                call = stub.WatchDaqStatus(dpm_pb2.WatchDaqStatusRequest())
                try:
                    async for status in call:
                        first.set()
                        if status.error and status.id not in errors:
                            errors.add(status.id)
                            await stub.RetryMergeDaq(dpm_pb2.RetryMergeDaqRequest(id=status.id))
                        if status.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED:
                            pending.discard(status.id)
                            if not pending:
                                call.cancel()
                                return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                # Dropped: the DAQs archived meanwhile are not active any more; ask for them.
                for daq_id in sorted(pending):
                    reply = await stub.GetDaqStatus(
                        dpm_pb2.GetDaqStatusRequest(id=daq_id, include_archived=True)
                    )
                    if reply.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED:
                        pending.discard(daq_id)

        watching = asyncio.create_task(follow())
        await stub.QueueDaq(dpm_pb2.QueueDaqRequest(specification=texts[0]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first.wait()), 30)
        if not first.is_set():  # archived before the watch began: it will never be seen there
            reply = await stub.GetDaqStatus(dpm_pb2.GetDaqStatusRequest(id=ids[0], include_archived=True))
            if reply.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED:
                pending.discard(ids[0])
        await queue_texts(address, texts[1:])
        await watching


async def queue_texts(address: str, texts: list[str], in_flight: int = 32) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dpm_pb2_grpc.DpmDaqControlStub(channel)
        todo = iter(texts)

        async def worker() -> None:
            for text in todo:
                await stub.QueueDaq(dpm_pb2.QueueDaqRequest(specification=text))

        await asyncio.gather(*(worker() for _ in range(in_flight)))


def measure_status(work: Path, latency_samples: int, seconds: float) -> dict[str, Any]:
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    server = dpm_server(work / "status-server", work, {"max_active_daqs": 0})
    result: dict[str, Any] = {}
    try:
        assert echo.stdout is not None
        echo_address = f"127.0.0.1:{int(echo.stdout.readline())}"
        server.start()
        with DpmClient(server.address, timeout=60) as client:
            latencies = []
            result["load_average_before"] = load_average()
            for i in range(latency_samples):
                text = keyword_spec(f"BENCH.{i:06d}")
                start = time.perf_counter()
                client.queue_daq(text)
                latencies.append((time.perf_counter() - start) * 1000)
            result["queuedaq_ms"] = {
                "samples": len(latencies),
                "p50": round(percentile(latencies, 50), 3),
                "p99": round(percentile(latencies, 99), 3),
                "max": round(max(latencies), 3),
            }
            result |= measure_status_ratio(server.address, echo_address, "BENCH.000000", seconds)
            result["load_average_after"] = load_average()
    finally:
        server.stop()
        echo.kill()
        echo.wait()
    return result


def drop_caches() -> bool:
    """Empty the page cache (root only); False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def wait_serving(address: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.005)


def measure_scale(work: Path, daqs: int, cold: bool, repeat: int) -> dict[str, Any]:
    server = dpm_server(work / "scale-server", work, {"max_active_daqs": 0})
    server.start()
    result: dict[str, Any] = {"daqs": daqs}
    try:
        start = time.perf_counter()
        asyncio.run(queue_many(server.address, [f"SCALE.{i:06d}" for i in range(daqs)]))
        result["queue_fill_daqs_per_s"] = round(daqs / (time.perf_counter() - start))
        with DpmClient(server.address, timeout=60) as client:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                active = client.get_active_daqs()
                times.append((time.perf_counter() - start) * 1000)
            assert len(active) == daqs
            result["getactivedaqs_ms"] = spread(times, 1) | {"load_average": load_average()}
        restarts, firsts, loads, dropped = [], [], [], True
        for _ in range(repeat):
            server.kill()
            if cold:
                dropped = drop_caches() and dropped
            loads.append(load_average())
            start = time.perf_counter()
            server.start(timeout=600)
            wait_serving(server.address)
            restarts.append(time.perf_counter() - start)
            with DpmClient(server.address, timeout=60) as client:
                start = time.perf_counter()
                active = client.get_active_daqs()
                firsts.append((time.perf_counter() - start) * 1000)
                assert len(active) == daqs
        result["restart_until_serving_s"] = spread(restarts)
        result["first_getactivedaqs_after_restart_ms"] = spread(firsts, 1)
        result["cold_page_cache"] = cold and dropped
        result["load_average"] = spread(loads, 2)
    finally:
        server.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="small,status,data,scale", help="comma-separated modes to run")
    parser.add_argument("--small-daqs", type=int, default=500, help="small DAQs per round (mode small)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (mode small)")
    parser.add_argument("--count-syscalls", action="store_true", help="mode small: one run under strace -c")
    parser.add_argument(
        "--follow",
        choices=("watch", "poll"),
        default="watch",
        help="mode small: follow the DAQs by WatchDaqStatus (default) or poll GetActiveDaqs every 20 ms",
    )
    parser.add_argument("--daqs", type=int, default=10000, help="active DAQs (mode scale)")
    parser.add_argument("--drop-caches", action="store_true", help="mode scale: cold page cache (root)")
    parser.add_argument("--restarts", type=int, default=3, help="restarts measured (mode scale)")
    parser.add_argument("--latency-samples", type=int, default=2000, help="QueueDaq calls timed one by one")
    parser.add_argument("--size-gib", type=float, default=0.25, help="size of the data path sources")
    parser.add_argument("--repeat", type=int, default=3, help="data path repetitions (medians)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one calls/s round")
    parser.add_argument("--dir", type=Path, default=None, help="working directory (default: temporary)")
    parser.add_argument(
        "--filesystem",
        choices=sorted(MKFS),
        default=None,
        help="mode data on a fresh loop-mounted file system of this kind made in the working directory "
        "(xfs: reflink=1; root, mkfs.xfs/mkfs.btrfs); sources, DPM, receivers and cp all inside it",
    )
    args = parser.parse_args()
    modes = set(args.modes.split(","))

    work = Path(tempfile.mkdtemp(prefix="bench-dpm-", dir=args.dir))
    result: dict[str, Any] = {"machine": machine_facts(work), "settings": vars(args) | {"dir": str(work)}}
    targets: dict[str, bool] = {}
    try:
        if "small" in modes:
            small = result["small"] = measure_small(
                work, args.small_daqs, args.rounds, args.count_syscalls, args.follow
            )
            targets["small DAQs/s >= 100"] = small["dpm_daqs_per_s"]["median"] >= 100
            targets["small vs serial loop >= 0.1"] = small["small_vs_loop"] >= 0.1
            targets["no ERROR alert, every DAQ COMPLETED"] = (
                small["error_alerts"] == 0
                and small["completed"]
                == f"{args.small_daqs * args.rounds} of {args.small_daqs * args.rounds}"
            )
        if "status" in modes:
            status = result["status"] = measure_status(work, args.latency_samples, args.seconds)
            targets["getdaqstatus_ratio >= 0.7"] = status["getdaqstatus_ratio"] >= 0.7
            targets["queuedaq p50 <= 5 ms"] = status["queuedaq_ms"]["p50"] <= 5
            targets["queuedaq p99 <= 20 ms"] = status["queuedaq_ms"]["p99"] <= 20
        if "data" in modes:
            if args.filesystem is None:
                data = result["data_path"] = measure_data_path(work, args.size_gib, args.repeat)
            else:
                # Sources, one product and one cp copy at a time, plus room for the file system.
                size = int(args.size_gib * 2**30 * 4) + 2 * 2**30
                try:
                    with scratch_filesystem(args.filesystem, work, size) as mounted:
                        result["data_path_filesystem"] = machine_facts(mounted)
                        data = result["data_path"] = measure_data_path(
                            mounted, args.size_gib, args.repeat, copying_cp=True
                        )
                except FilesystemUnavailable as exc:
                    print(f"bench_dpm: {exc}", file=sys.stderr)
                    return 2
            targets["data path vs cp+fsync >= 0.9"] = data["data_path_ratio_vs_cp_fsync"] >= 0.9
        if "scale" in modes:
            scale = result["scale"] = measure_scale(work, args.daqs, args.drop_caches, args.restarts)
            targets["getactivedaqs <= 200 ms"] = scale["getactivedaqs_ms"]["median"] <= 200
            targets["first getactivedaqs after restart <= 200 ms"] = (
                scale["first_getactivedaqs_after_restart_ms"]["median"] <= 200
            )
            targets["restart until SERVING <= 3 s"] = scale["restart_until_serving_s"]["median"] <= 3
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["targets"] = targets
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
