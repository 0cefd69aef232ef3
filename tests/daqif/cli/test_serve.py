"""`daqif serve`: the published std_daq_client writes a file through it, a DpmClient merges that file,
SIGINT stops every child; a second serve on the same ports exits naming the busy port while the
first keeps serving; `daqif dpm exit` is a clean stop of the DPM, not a crash to restart."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import requests
from std_daq_client import StdDaqClient

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.tls import TlsConfig
from daqif.v1 import dpm_pb2
from daqif.writer_client import WriterClient
from servers.common.launch import free_port
from servers.common.process import descendants, is_alive
from servers.common.ready import ReadyLine, is_ready_line, parse_ready_line


class Serve:
    """A `daqif serve` subprocess whose output is read line by line as it comes."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daqif.cli.main", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(self.lines[-1])
        self._new.put(None)

    def wait_for_line(self, wanted: str, timeout: float = 90.0) -> str:
        """The first line (from now on) containing `wanted`; fails if serve ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {wanted!r} within {timeout} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"serve ended before a line with {wanted!r}:\n{self.output}")
            if wanted in line:
                return line

    def ready(self) -> ReadyLine:
        line = self.wait_for_line("daqif-ready serve")
        assert is_ready_line(line), line
        return parse_ready_line(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def interrupt(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.close()


def any_ports() -> list[str]:
    return [
        *("--dpm-port", "0", "--rest-port", "0", "--writer-grpc-port", "0", "--stream-port", "0"),
        *("--dpm-metrics-port", "0", "--web-port", "0"),
    ]


def no_detector() -> list[str]:
    """An external detector that is not there: the writer connects and waits."""
    return ["--stream", f"tcp://127.0.0.1:{free_port()}"]


def test_serve_simulate_records_merges_and_stops_on_sigint(tmp_path: Path, serves: list[Serve]) -> None:
    data = tmp_path / "data"
    serve = Serve(tmp_path, "--simulate", "--data-root", str(data), *any_ports(), "--sim-rate", "500")
    serves.append(serve)
    ready = serve.ready()
    rest, dpm_address = ready.address("rest"), ready.address("dpm")

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

    children = descendants(serve.process.pid)
    assert len(children) >= 3  # sim, writer (+ its data path), dpm
    assert serve.interrupt() == 0, serve.output
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if is_alive(pid)], serve.output
    for name in ("sim", "writer", "dpm"):
        assert f"daqif-ready {name} " in (data / "logs" / f"{name}.log").read_text()


def test_serve_writers_2_runs_a_writer_group_whose_file_is_one_virtual_dataset(
    tmp_path: Path, serves: list[Serve]
) -> None:
    data = tmp_path / "data"
    serve = Serve(
        tmp_path, "--simulate", "--writers", "2", "--data-root", str(data), *any_ports(), "--sim-rate", "500"
    )
    serves.append(serve)
    rest = serve.ready().address("rest")
    raw = data / "raw" / "group.h5"
    status = StdDaqClient(url_base=rest).start_writer_sync({"output_file": str(raw), "n_images": 40})
    assert status["acquisition"]["stats"]["n_write_completed"] == 40
    with h5py.File(raw, "r") as f:
        data_set = f["SIM1/data"]
        assert data_set.is_virtual and data_set.shape[0] == 40
        ids = f["SIM1/image_id"][:]
        assert ids.tolist() == sorted(ids.tolist()) and len(set(ids.tolist())) == 40
    assert sorted(p.name for p in raw.parent.glob("group_*.h5")) == ["group_0.h5", "group_1.h5"]
    assert serve.interrupt() == 0, serve.output


def test_second_serve_on_the_same_ports_exits_naming_the_port_and_the_first_keeps_serving(
    tmp_path: Path, serves: list[Serve]
) -> None:
    data = tmp_path / "data"
    first = Serve(tmp_path, "--data-root", str(data), *any_ports(), *no_detector())
    serves.append(first)
    ready = first.ready()
    dpm_port = ready.endpoint("dpm").port
    rest_port = ready.endpoint("rest").port
    writer_grpc_port = ready.endpoint("writer_grpc").port

    second = subprocess.run(
        [
            *(sys.executable, "-m", "daqif.cli.main", "serve", "--data-root", str(data)),
            *("--dpm-port", str(dpm_port), "--rest-port", str(rest_port)),
            *("--writer-grpc-port", str(writer_grpc_port), *no_detector()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert second.returncode == 1
    assert f"port {dpm_port} (DPM gRPC) on 127.0.0.1 is already in use" in second.stderr
    assert "Traceback" not in second.stderr

    assert first.process.poll() is None
    with DpmClient(ready.address("dpm")) as dpm:
        assert dpm.get_active_daqs() == []
    assert requests.get(f"{ready.address('rest')}/writer/status", timeout=10).status_code == 200
    assert first.interrupt() == 0, first.output


def test_dpm_exit_under_serve_is_a_clean_stop_that_is_not_restarted(
    tmp_path: Path, serves: list[Serve]
) -> None:
    data = tmp_path / "data"
    serve = Serve(tmp_path, "--data-root", str(data), *any_ports(), *no_detector())
    serves.append(serve)
    ready = serve.ready()
    exit_cli = subprocess.run(
        [sys.executable, "-m", "daqif.cli.main", "dpm", "exit", "--address", ready.address("dpm")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exit_cli.returncode == 0, exit_cli.stderr
    serve.wait_for_line("dpm exited cleanly (exit code 0); not restarted")
    assert "[dpm]" in serve.output and "stopping (Exit requested)" in serve.output
    # The writer keeps serving; nothing was restarted.
    assert requests.get(f"{ready.address('rest')}/writer/status", timeout=10).status_code == 200
    assert serve.process.poll() is None
    assert serve.interrupt() == 0, serve.output
    assert "restarting" not in serve.output
    assert (data / "logs" / "dpm.log").read_text().count("daqif-ready dpm ") == 1


def test_serve_with_tls_flags_serves_both_grpc_ports_over_mutual_tls(
    tmp_path: Path, serves: list[Serve], tls_files: Any
) -> None:
    server = tls_files.server
    tls_args = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    tls_args += ["--tls-client-ca", str(tls_files.ca_cert)]
    serve = Serve(tmp_path, "--data-root", str(tmp_path / "data"), *any_ports(), *no_detector(), *tls_args)
    serves.append(serve)
    ready = serve.ready()
    assert ready.address("dpm").startswith("grpcs://")
    assert ready.address("writer_grpc").startswith("grpcs://")
    with DpmClient(ready.address("dpm"), tls=tls_files.client_tls) as dpm:
        assert dpm.get_active_daqs() == []
    with WriterClient(ready.address("writer_grpc"), tls=tls_files.client_tls) as writer:
        assert writer.get_status().state
    without_certificate = TlsConfig(ca=tls_files.ca_cert)
    with DpmClient(ready.address("dpm"), tls=without_certificate) as dpm, pytest.raises(DaqException) as info:
        dpm.get_active_daqs()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert serve.interrupt() == 0, serve.output


def test_serve_refuses_an_unusable_certificate_before_starting_anything(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = subprocess.run(
        [sys.executable, "-m", "daqif.cli.main", "serve", "--data-root", str(tmp_path / "data"),
         "--tls-cert", str(missing), "--tls-key", str(missing)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert not (tmp_path / "data").exists()
