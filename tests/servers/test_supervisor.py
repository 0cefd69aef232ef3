"""The supervisor starts children once they printed their ready line, reports and restarts a child
that dies (on the same ports), lets a child that exits cleanly stay stopped, and leaves no process
behind when it stops."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from daqif.testing import wait_for
from servers.common.launch import Command, SimOptions
from servers.common.process import is_alive
from servers.supervisor import ChildFailed, ChildSpec, Supervisor


def python(name: str, script: str) -> Command:
    return Command(server=name, argv=(sys.executable, "-c", script))


READY_THEN_EXIT_0 = "print('daqif-ready fake x=127.0.0.1:1', flush=True)"


def slow_sim() -> SimOptions:
    return SimOptions(shape=(4, 4), rate=5, linger=0)


def test_start_waits_for_ready_lines_and_stop_ends_every_child(tmp_path: Path) -> None:
    output = io.StringIO()
    specs = [ChildSpec("sim0", slow_sim()), ChildSpec("sim1", slow_sim())]
    supervisor = Supervisor(specs, output=output, log_dir=tmp_path / "logs")
    supervisor.start(timeout=30)
    pids = supervisor.pids()
    endpoints = {supervisor.process(name).ready.address("stream") for name in ("sim0", "sim1")}
    assert len(endpoints) == 2
    codes = supervisor.stop()
    assert codes == {"sim0": 0, "sim1": 0}
    assert not any(is_alive(pid) for pid in pids.values())
    assert "[sim0] daqif-ready sim stream=tcp://127.0.0.1:" in output.getvalue()
    assert "daqif-ready sim stream=" in (tmp_path / "logs" / "sim1.log").read_text()


def test_child_that_exits_while_starting_is_reported_with_its_output() -> None:
    spec = ChildSpec("broken", python("broken", "print('bad config: no such detector'); raise SystemExit(3)"))
    with pytest.raises(ChildFailed) as info:
        Supervisor([spec]).start(timeout=30)
    assert "broken exited with exit code 3 before it was ready" in str(info.value)
    assert "bad config: no such detector" in str(info.value)


def test_child_that_never_becomes_ready_fails_start_and_is_stopped() -> None:
    spec = ChildSpec("sleepy", python("sleepy", "import time; time.sleep(60)"))
    supervisor = Supervisor([spec])
    with pytest.raises(ChildFailed, match="sleepy was not ready within 1 s"):
        supervisor.start(timeout=1)
    assert not any(is_alive(pid) for pid in supervisor.pids().values())


def test_dead_child_is_restarted_on_the_same_port_then_given_up() -> None:
    reports: list[str] = []
    supervisor = Supervisor([ChildSpec("sim", slow_sim())], max_restarts=1, report=reports.append)
    supervisor.start(timeout=30)
    try:
        sim = supervisor.process("sim")
        first_pid, first_endpoint = sim.pid, sim.ready.address("stream")
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: sim.returncode is not None)
        supervisor.check(ready_timeout=30)
        assert sim.pid != first_pid and sim.running
        assert sim.ready.address("stream") == first_endpoint
        assert any("sim died unexpectedly (signal 9)" in r and "restarting (1/1)" in r for r in reports)
        os.kill(sim.pid, signal.SIGKILL)
        stop = threading.Event()
        timer = threading.Timer(20, stop.set)
        timer.start()
        try:
            with pytest.raises(ChildFailed, match="giving up after 1 restarts"):
                supervisor.run(stop, poll_interval=0.05)
        finally:
            timer.cancel()
    finally:
        supervisor.stop()


def test_child_that_exits_cleanly_is_reported_not_restarted_and_the_others_keep_running() -> None:
    reports: list[str] = []
    specs = [ChildSpec("sim", slow_sim()), ChildSpec("quits", python("fake", READY_THEN_EXIT_0))]
    supervisor = Supervisor(specs, report=reports.append)
    supervisor.start(timeout=30)
    try:
        quits = supervisor.process("quits")
        sim_pid = supervisor.process("sim").pid
        wait_for(lambda: quits.returncode is not None)
        supervisor.check()
        supervisor.check()  # reported once, and still not restarted
        assert reports == [
            "supervisor: quits exited cleanly (exit code 0); not restarted, the others keep running"
        ]
        assert quits.returncode == 0
        assert supervisor.process("sim").pid == sim_pid and supervisor.process("sim").running
        assert not supervisor.all_exited
    finally:
        supervisor.stop()


def test_run_returns_once_every_child_has_exited_cleanly() -> None:
    supervisor = Supervisor([ChildSpec("quits", python("fake", READY_THEN_EXIT_0))], report=lambda _: None)
    supervisor.start(timeout=30)
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)
    timer.start()
    try:
        supervisor.run(stop, poll_interval=0.05)
    finally:
        timer.cancel()
    assert not stop.is_set() and supervisor.all_exited


def test_stop_kills_grandchildren_left_in_the_childs_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # The grandchild ignores SIGTERM, so only the SIGKILL to the group after the stop ends it.
    grandchild = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid())); "
        f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r}); time.sleep(120)"
    )
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits, leaving the grandchild\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
        "print('daqif-ready parent x=127.0.0.1:1', flush=True)\n"
        "time.sleep(120)\n"
    )
    supervisor = Supervisor([ChildSpec("parent", python("parent", script))])
    supervisor.start(timeout=30)
    grandchild_pid = int(pid_file.read_text())
    assert is_alive(grandchild_pid)
    assert supervisor.stop(timeout=5) == {"parent": 0}
    wait_for(lambda: not is_alive(grandchild_pid), timeout=5)


def test_two_children_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two children are called 'sim'"):
        Supervisor([ChildSpec("sim", slow_sim()), ChildSpec("sim", slow_sim())])
