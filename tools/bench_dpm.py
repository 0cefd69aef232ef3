"""Benchmark of the DPM server (`daqif-dpm-server`), measured against references in the same run.

    python tools/bench_dpm.py                   # 10,000 DAQs, 0.25 GiB of sources: ~2 minutes
    python tools/bench_dpm.py --size-gib 2      # the target size of the data path measure

Measures (targets of issue 2 on the 2-core reference machine):
- `getdaqstatus_ratio`: GetDaqStatus calls/s ÷ calls/s of a bare grpcio server answering the
  standard health Check (the "echo"), same client (one blocking stub, sequential calls), both
  servers in their own process, interleaved rounds (target >= 0.7). Also with an asyncio client
  keeping 32 calls in flight (`..._concurrent`).
- `queuedaq_ms`: QueueDaq latency p50/p99, persisted durably before the reply (<= 5 / <= 20 ms).
- `getactivedaqs_ms`: GetActiveDaqs with `--daqs` active DAQs (held SCHEDULED by
  `max_active_daqs: 0`), median of 5 calls (<= 200 ms).
- `restart_s`: `kill -9` of the server holding `--daqs` DAQs, start until the health check
  answers SERVING (<= 5 s).
- `data_path_ratio`: `cp` of two HDF5 sources (one bitshuffle-LZ4) ÷ queue-to-archived time of a
  DAQ collecting (copies: a collected source is a snapshot), merging (fsync) and releasing
  (hard link) the same sources, same disk, medians of `--repeat` alternating runs (>= 0.8);
  `..._vs_cp_fsync` compares with a `cp` made durable too.
Prints one JSON summary with machine facts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_facts
from bench_merge import time_cp, write_source

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.v1 import dpm_pb2, dpm_pb2_grpc
from servers.common.launch import DpmOptions, DpmProcess

ECHO_SERVER = """
import asyncio, sys
import grpc
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


def measure_data_path(work: Path, size_gib: float, repeat: int) -> dict[str, Any]:
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
    dpm_times, cp_times, cp_fsync_times = [], [], []
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
                    start = time.perf_counter()
                    client.queue_daq(spec)
                    wait_archived(client, spec["id"])
                    return time.perf_counter() - start

                if i % 2 == 0:
                    dpm_times.append(run_dpm())
                    cp_times.append(time_cp(sources, work / "cp", durable=False))
                else:
                    cp_times.append(time_cp(sources, work / "cp", durable=False))
                    dpm_times.append(run_dpm())
                cp_fsync_times.append(time_cp(sources, work / "cp", durable=True))
                # Free the disk: the next run builds its product afresh.
                shutil.rmtree(work / "server-data" / "dpm-workspace" / "products" / f"DATA{i}")
                shutil.rmtree(receiver)
    finally:
        server.stop()
    dpm_s, cp_s, cp_fsync_s = (statistics.median(t) for t in (dpm_times, cp_times, cp_fsync_times))
    return {
        "bytes": nbytes,
        "dpm_s": round(dpm_s, 3),
        "cp_s": round(cp_s, 3),
        "cp_fsync_s": round(cp_fsync_s, 3),
        "dpm_mib_per_s": round(nbytes / 2**20 / dpm_s, 1),
        "data_path_ratio": round(cp_s / dpm_s, 3),
        "data_path_ratio_vs_cp_fsync": round(cp_fsync_s / dpm_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--daqs", type=int, default=10000, help="active DAQs for GetActiveDaqs and restart")
    parser.add_argument("--latency-samples", type=int, default=2000, help="QueueDaq calls timed one by one")
    parser.add_argument("--size-gib", type=float, default=0.25, help="size of the data path sources")
    parser.add_argument("--repeat", type=int, default=3, help="data path repetitions (medians)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one calls/s round")
    parser.add_argument("--dir", type=Path, default=None, help="working directory (default: temporary)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dpm-", dir=args.dir))
    result: dict[str, Any] = {"machine": machine_facts(work), "settings": vars(args) | {"dir": str(work)}}
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    server = dpm_server(work / "server", work, {"max_active_daqs": 0})
    try:
        assert echo.stdout is not None
        echo_address = f"127.0.0.1:{int(echo.stdout.readline())}"
        server.start()
        with DpmClient(server.address, timeout=60) as client:
            latencies = []
            for i in range(args.latency_samples):
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
            result["status"] = measure_status_ratio(
                server.address, echo_address, "BENCH.000000", args.seconds
            )

            rest = [f"BENCH.{i:06d}" for i in range(args.latency_samples, args.daqs)]
            start = time.perf_counter()
            asyncio.run(queue_many(server.address, rest))
            result["queue_fill_daqs_per_s"] = (
                round(len(rest) / (time.perf_counter() - start)) if rest else None
            )
            times = []
            for _ in range(5):
                start = time.perf_counter()
                active = client.get_active_daqs()
                times.append((time.perf_counter() - start) * 1000)
            result["getactivedaqs_ms"] = {
                "daqs": len(active),
                "median": round(statistics.median(times), 1),
                "max": round(max(times), 1),
            }

        server.kill()
        start = time.perf_counter()
        server.start()
        result["restart_s"] = {"daqs": args.daqs, "until_serving": round(time.perf_counter() - start, 3)}
        with DpmClient(server.address, timeout=60) as client:
            assert len(client.get_active_daqs()) == args.daqs
        server.stop()

        result["data_path"] = measure_data_path(work, args.size_gib, args.repeat)
    finally:
        server.stop()
        echo.kill()
        echo.wait()
        shutil.rmtree(work, ignore_errors=True)
    s = result["status"]
    result["targets"] = {
        "getdaqstatus_ratio >= 0.7": s["getdaqstatus_ratio"] >= 0.7,
        "queuedaq p50 <= 5 ms": result["queuedaq_ms"]["p50"] <= 5,
        "queuedaq p99 <= 20 ms": result["queuedaq_ms"]["p99"] <= 20,
        "getactivedaqs <= 200 ms": result["getactivedaqs_ms"]["median"] <= 200,
        "data_path_ratio >= 0.8": result["data_path"]["data_path_ratio"] >= 0.8,
        "restart <= 5 s": result["restart_s"]["until_serving"] <= 5,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
