"""`daqif serve --simulate`: the published std_daq_client writes a file through it, a DpmClient
merges that file, and SIGINT stops every child."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
from std_daq_client import StdDaqClient

from daqif.dpm_client import DpmClient
from daqif.v1 import dpm_pb2
from servers.supervisor import descendants, free_port, grpc_health_probe, http_probe, is_alive


def test_serve_simulate_records_merges_and_stops_on_sigint(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("dpm", "rest", "wgrpc", "stream")}
    data = tmp_path / "data"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daqif.cli.main",
            "serve",
            "--simulate",
            "--data-root",
            str(data),
            "--dpm-port",
            str(ports["dpm"]),
            "--rest-port",
            str(ports["rest"]),
            "--writer-grpc-port",
            str(ports["wgrpc"]),
            "--stream-port",
            str(ports["stream"]),
            "--sim-rate",
            "500",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        rest = f"http://127.0.0.1:{ports['rest']}"
        dpm_address = f"127.0.0.1:{ports['dpm']}"
        deadline = time.monotonic() + 90
        while not (http_probe(f"{rest}/writer/status")() and grpc_health_probe(dpm_address)()):
            assert serve.poll() is None, serve.communicate()[0]
            assert time.monotonic() < deadline, "daqif serve did not come up"
            time.sleep(0.2)

        raw = data / "raw" / "serve-test.h5"
        status = StdDaqClient(url_base=rest).start_writer_sync({"output_file": str(raw), "n_images": 25})
        assert status["acquisition"]["state"] == "FINISHED"
        assert status["acquisition"]["message"] == "Completed."

        spec = {
            "id": "SERVE.TEST.1",
            "target": {"fileId": "SERVE.TEST.1"},
            "sources": [{"type": "hdf5File", "sourceName": "det1", "location": str(raw)}],
            "receivers": [{"type": "olasReceiver", "path": str(data / "olas")}],
        }
        with DpmClient(dpm_address) as dpm:
            reply = dpm.queue_daq(spec)
            final = dpm.wait_for(reply.id, timeout=60)
        assert final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
        with h5py.File(data / "olas" / "SERVE.TEST.1.h5", "r") as product:
            assert product["det1/SIM1/data"].shape[0] == 25

        children = descendants(serve.pid)
        assert len(children) >= 3  # sim, writer (+ its data path), dpm
        serve.send_signal(signal.SIGINT)
        output, _ = serve.communicate(timeout=60)
        assert serve.returncode == 0, output
        deadline = time.monotonic() + 10
        while any(is_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if is_alive(pid)], output
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
