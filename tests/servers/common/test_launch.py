"""The one launcher: a real server started on port 0 reports the ports it bound; stop, kill and
restart (on the same ports); a child that dies early, prints a bad ready line or is never ready
is reported with its output; command lines built from typed options."""

from __future__ import annotations

import socket
import struct
import sys
import threading
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.launch import (
    Command,
    DpmOptions,
    DpmProcess,
    ServerProcess,
    ServerStartError,
    SimOptions,
    SimProcess,
    WriterOptions,
    WriterProcess,
    free_port,
    port_in_use,
)
from servers.common.process import is_alive
from servers.common.ready import parse_ready_line


def python(server: str, script: str) -> Command:
    return Command(server=server, argv=(sys.executable, "-c", script))


def says_then_sleeps(server: str, line: str) -> Command:
    return python(server, f"import time; print({line!r}, flush=True); time.sleep(60)")


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_dpm_on_port_0_reports_the_port_it_bound_and_serves_there(tmp_path: Path) -> None:
    options = DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,))
    with DpmProcess(options, log_file=tmp_path / "dpm.log") as dpm:
        assert dpm.ready.server == "dpm"
        assert dpm.ready.port("grpc") != 0
        assert dpm.address == f"127.0.0.1:{dpm.ready.port('grpc')}"
        assert serving(dpm.address)
    assert dpm.returncode == 0
    assert f"daqif-ready dpm grpc={dpm.address}" in dpm.log_text()


def test_writer_killed_restarts_on_the_same_ports(tmp_path: Path) -> None:
    with SimProcess(SimOptions(shape=(8, 8), rate=10, linger=0)) as sim:
        writer = WriterProcess(WriterOptions(stream=sim.endpoint, data_root=tmp_path / "data"))
        with writer:
            first = writer.ready
            first_pid = writer.pid
            assert first.port("rest") != first.port("grpc")
            writer.kill()
            assert not is_alive(first_pid) and writer.returncode == -9
            writer.restart()
            assert writer.pid != first_pid
            assert writer.ready == first
            status = requests.get(f"{writer.rest_url}/writer/status", timeout=10).json()
            assert status["writer"]["state"] == "READY"
            assert serving(writer.grpc_address)


def test_stop_is_a_clean_sigterm_and_the_simulator_reports_what_it_sent(tmp_path: Path) -> None:
    sim = SimProcess(SimOptions(shape=(4, 4), rate=50, linger=0)).start()
    assert sim.ready.address("stream") == sim.endpoint
    assert sim.stop() == 0
    assert not sim.running
    assert sim.summary().endpoint == sim.endpoint


def test_sim_restarted_after_stop_binds_the_endpoint_of_its_first_start() -> None:
    sim = SimProcess(SimOptions(shape=(4, 4), rate=5, linger=0)).start()
    try:
        first = sim.endpoint
        sim.restart()
        assert sim.endpoint == first
    finally:
        sim.stop()


def test_child_that_dies_before_it_is_ready_is_reported_with_its_output() -> None:
    child = ServerProcess(python("broken", "print('no such detector: XYZ'); raise SystemExit(3)"))
    with pytest.raises(ServerStartError) as info:
        child.start(timeout=30)
    message = str(info.value)
    assert message.startswith("broken exited with exit code 3 before it was ready:")
    assert "no such detector: XYZ" in message
    assert child.returncode == 3


def test_a_server_that_cannot_bind_its_port_is_reported_with_its_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        dpm = DpmProcess(DpmOptions(port=port, workspace=tmp_path / "ws"))
        with pytest.raises(ServerStartError, match=f"cannot bind the DPM gRPC services to 127.0.0.1:{port}"):
            dpm.start()
    assert dpm.returncode == 2
    assert not (tmp_path / "ws").exists()  # refused before it touched a workspace


def test_malformed_ready_line_fails_the_start_and_the_child_is_stopped() -> None:
    child = ServerProcess(
        python("bad", "import time; print('daqif-ready bad grpc=nowhere', flush=True); time.sleep(60)")
    )
    with pytest.raises(ServerStartError, match="grpc=nowhere is not HOST:PORT"):
        child.start(timeout=30)
    assert not is_alive(child.pid)


def test_ready_line_of_another_server_is_refused() -> None:
    child = ServerProcess(
        python("dpm", "import time; print('daqif-ready writer grpc=127.0.0.1:1', flush=True); time.sleep(60)")
    )
    with pytest.raises(ServerStartError, match="printed the ready line of 'writer', not 'dpm'"):
        child.start(timeout=30)
    assert not is_alive(child.pid)


def test_child_never_ready_is_killed_after_the_timeout() -> None:
    child = ServerProcess(python("sleepy", "print('starting...', flush=True); import time; time.sleep(60)"))
    with pytest.raises(ServerStartError, match=r"sleepy was not ready within 0.5 s(.|\n)*starting\.\.\."):
        child.start(timeout=0.5)
    assert not is_alive(child.pid)


def test_log_file_holds_the_output_of_every_run(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "fake.log"
    script = "import sys; print('daqif-ready fake x=127.0.0.1:1'); print('to stderr', file=sys.stderr)"
    child = ServerProcess(python("fake", script), log_file=log)
    child.start()
    assert child.wait(30) == 0
    child.start()
    assert child.wait(30) == 0
    assert log.read_text().splitlines() == ["daqif-ready fake x=127.0.0.1:1", "to stderr"] * 2
    assert child.tail() == ["daqif-ready fake x=127.0.0.1:1", "to stderr"]


def test_starting_a_running_server_again_is_refused() -> None:
    child = ServerProcess(
        python("fake", "import time; print('daqif-ready fake x=127.0.0.1:1', flush=True); time.sleep(60)")
    )
    child.start()
    try:
        with pytest.raises(RuntimeError, match="fake is already running"):
            child.start()
    finally:
        child.stop()


def test_each_command_line_is_built_from_its_typed_options(tmp_path: Path) -> None:
    py = sys.executable
    assert DpmOptions(
        workspace=tmp_path, allowed_roots=(tmp_path, Path("/b")), config=Path("c.json")
    ).command() == [
        *(py, "-m", "servers.dpm.main", "--port", "0", "--workspace", str(tmp_path)),
        *("--allowed-root", str(tmp_path), "--allowed-root", "/b", "--config", "c.json"),
    ]
    writer = WriterOptions(stream="tcp://h:1", data_root=tmp_path, rest_port=5, redis_url="redis://r")
    assert writer.command() == [
        *(py, "-m", "servers.writer.main", "--stream", "tcp://h:1", "--rest-port", "5", "--grpc-port", "0"),
        *("--data-root", str(tmp_path), "--redis-url", "redis://r"),
    ]
    sim = SimOptions(shape=(3, 4), count=7, header="daqif", extra_args=("--sndhwm", "9"))
    assert sim.command() == [
        *(py, "-m", "servers.sim.main", "--endpoint", "tcp://127.0.0.1:*", "--shape", "3", "4"),
        *("--count", "7", "--header", "daqif", "--sndhwm", "9"),
    ]


def test_pinned_options_ask_for_the_ports_of_a_ready_line(tmp_path: Path) -> None:
    writer = WriterOptions(stream="tcp://h:1", data_root=tmp_path)
    pinned = writer.pinned(parse_ready_line("daqif-ready writer rest=http://127.0.0.1:7 grpc=127.0.0.1:8"))
    assert (pinned.rest_port, pinned.grpc_port, pinned.stream) == (7, 8, "tcp://h:1")
    assert DpmOptions().pinned(parse_ready_line("daqif-ready dpm grpc=127.0.0.1:9")).port == 9
    sim = SimOptions().pinned(parse_ready_line("daqif-ready sim stream=tcp://127.0.0.1:10"))
    assert sim.endpoint == "tcp://127.0.0.1:10"


def test_bad_options_are_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        DpmOptions(port=70000)
    with pytest.raises(ValueError, match="socket"):
        WriterOptions(stream="tcp://h:1", data_root=tmp_path, socket="req")  # type: ignore[arg-type]


def test_port_in_use_sees_a_listener_and_not_a_free_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_free_port_is_below_the_ephemeral_range_and_not_held_even_in_time_wait() -> None:
    low, _ = ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1
    # A client's connection that ended first on its side holds its port in TIME_WAIT for a minute:
    # a server started on it could not bind it, so it is not free.
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        client.bind(("127.0.0.1", port))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        client.close()
        accepted.close()
    for _ in range(100):
        assert free_port() != port


def test_options_leave_no_port_to_the_server_once_the_launcher_chose_them(tmp_path: Path) -> None:
    def choose(host: str | None) -> int:
        return {None: 20001, "127.0.0.1": 20002, "0.0.0.0": 20003, "::1": 20004}[host]

    writer = WriterOptions(stream="tcp://h:1", data_root=tmp_path, grpc_port=7).with_ports(choose)
    assert (writer.rest_port, writer.grpc_port) == (20001, 7)
    dpm = DpmOptions(metrics_port=0).with_ports(choose)
    assert (dpm.port, dpm.metrics_port) == (20001, 20001)
    assert DpmOptions().with_ports(choose).metrics_port is None  # no metrics endpoint stays none
    assert SimOptions().with_ports(choose).endpoint == "tcp://127.0.0.1:20002"
    assert SimOptions(endpoint="tcp://*:0").with_ports(choose).endpoint == "tcp://*:20003"
    assert SimOptions(endpoint="tcp://[::1]:*").with_ports(choose).endpoint == "tcp://[::1]:20004"
    assert SimOptions(endpoint="ipc:///tmp/x").with_ports(choose).endpoint == "ipc:///tmp/x"
    assert SimOptions(endpoint="tcp://127.0.0.1:5").with_ports(choose).endpoint == "tcp://127.0.0.1:5"


def test_a_server_on_port_0_gets_a_port_the_kernel_never_lends_to_a_connection(tmp_path: Path) -> None:
    low, _ = ephemeral_range()
    options = DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,), metrics_port=0)
    with DpmProcess(options) as dpm:
        assert dpm.ready.port("grpc") < low and dpm.ready.port("metrics") < low
        assert serving(dpm.address)


def test_a_restart_whose_port_a_client_holds_waits_until_the_client_lets_it_go(tmp_path: Path) -> None:
    # The kernel lent the stopped server's metrics port to another process's connection (the
    # port was in its ephemeral range, or that process bound it): the restart tries again until
    # the connection is gone, then serves on the same ports.
    options = DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,), metrics_port=0)
    dpm = DpmProcess(options, log_file=tmp_path / "dpm.log").start()
    try:
        first = dpm.ready
        dpm.stop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.socket()
            client.bind(("127.0.0.1", first.port("metrics")))
            client.connect(listener.getsockname())
            # It ends with a reset, so no TIME_WAIT holds the port after it.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            threading.Timer(2.0, client.close).start()
            dpm.start(timeout=60)
        assert dpm.ready == first
        assert f"cannot bind the Prometheus metrics to 127.0.0.1:{first.port('metrics')}" in dpm.log_text()
        assert requests.get(f"http://127.0.0.1:{first.port('metrics')}/metrics", timeout=10).ok
    finally:
        dpm.stop()


def test_a_restart_whose_port_stays_busy_fails_at_its_timeout_naming_the_port(tmp_path: Path) -> None:
    options = DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,))
    dpm = DpmProcess(options).start()
    port = dpm.ready.port("grpc")
    dpm.stop()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        with pytest.raises(ServerStartError) as info:
            dpm.start(timeout=4)
    message = str(info.value)
    assert f"cannot bind the DPM gRPC services to 127.0.0.1:{port}" in message
    assert "starts)" in message and not dpm.running


def test_a_first_start_whose_chosen_port_was_taken_meanwhile_tries_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race of two launchers choosing one port, made certain: the first choice is taken
    # between the launcher's check and the server's bind.
    import servers.common.launch as launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen(1)
        choices = iter([taken.getsockname()[1]])
        monkeypatch.setattr(launch, "free_port", lambda host=None: next(choices, None) or free_port(host))
        dpm = DpmProcess(
            DpmOptions(workspace=tmp_path / "ws", allowed_roots=(tmp_path,)), log_file=tmp_path / "log"
        )
        with dpm:
            assert dpm.ready.port("grpc") != taken.getsockname()[1]
            assert serving(dpm.address)
        assert f"127.0.0.1:{taken.getsockname()[1]}" in dpm.log_text()  # the first try said so
