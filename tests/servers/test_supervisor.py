"""The supervisor starts children once they are ready, reports and restarts a child that dies,
and leaves no process behind when it stops."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from servers.supervisor import ChildFailed, ChildSpec, Supervisor, free_port, http_probe, is_alive, tcp_probe


def http_server(port: int, directory: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(directory),
    ]


def test_start_waits_for_probe_and_stop_ends_every_child(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    specs = [
        ChildSpec(f"web{i}", http_server(p, tmp_path), http_probe(f"http://127.0.0.1:{p}/"))
        for i, p in enumerate(ports)
    ]
    output = io.StringIO()
    supervisor = Supervisor(specs, output=output)
    supervisor.start(timeout=30)
    pids = supervisor.pids()
    assert all(tcp_probe("127.0.0.1", p)() for p in ports)
    codes = supervisor.stop()
    assert set(codes) == {"web0", "web1"}
    assert not any(is_alive(pid) for pid in pids.values())


def test_child_that_exits_while_starting_is_reported_with_its_output(tmp_path: Path) -> None:
    spec = ChildSpec(
        "broken",
        [sys.executable, "-c", "print('bad config: no such detector'); raise SystemExit(3)"],
        lambda: False,
    )
    with pytest.raises(ChildFailed) as info:
        Supervisor([spec]).start(timeout=30)
    assert "broken died while starting (exit code 3)" in str(info.value)
    assert "bad config: no such detector" in str(info.value)


def test_child_that_never_becomes_ready_fails_start_and_is_stopped(tmp_path: Path) -> None:
    spec = ChildSpec("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"], lambda: False)
    supervisor = Supervisor([spec])
    with pytest.raises(ChildFailed, match="did not become ready"):
        supervisor.start(timeout=1)
    assert not any(is_alive(pid) for pid in supervisor.pids().values())


def test_dead_child_is_reported_and_restarted_then_given_up(tmp_path: Path) -> None:
    port = free_port()
    reports: list[str] = []
    spec = ChildSpec("web", http_server(port, tmp_path), http_probe(f"http://127.0.0.1:{port}/"))
    supervisor = Supervisor([spec], max_restarts=1, report=reports.append)
    supervisor.start(timeout=30)
    try:
        first = supervisor.pids()["web"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while supervisor.pids()["web"] == first and time.monotonic() < deadline:
            supervisor.check(ready_timeout=30)
            time.sleep(0.05)
        assert supervisor.pids()["web"] != first
        assert any("web died unexpectedly (signal 9)" in r and "restarting (1/1)" in r for r in reports)
        os.kill(supervisor.pids()["web"], signal.SIGKILL)
        with pytest.raises(ChildFailed, match="giving up after 1 restarts"):
            stop = threading.Event()
            threading.Timer(20, stop.set).start()
            supervisor.run(stop, poll_interval=0.05)
    finally:
        supervisor.stop()


def test_stop_kills_grandchildren_left_in_the_childs_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    spec = ChildSpec("parent", [sys.executable, "-c", script], pid_file.exists)
    supervisor = Supervisor([spec])
    supervisor.start(timeout=30)
    grandchild = int(pid_file.read_text())
    assert is_alive(grandchild)
    supervisor.stop(timeout=5)
    deadline = time.monotonic() + 5
    while is_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(grandchild)
