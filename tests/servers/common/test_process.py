"""`spawn` starts a child in its own session; a child that asked to die with its parent does;
`terminate` escalates to SIGKILL for a child that ignores SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daqif.testing import wait_for
from servers.common.process import PARENT_PID_ENV, descendants, is_alive, spawn, terminate


def wait_until_dead(pid: int, timeout: float = 10.0) -> None:
    wait_for(lambda: not is_alive(pid), timeout, f"process {pid} to end")


def test_spawned_child_leads_its_own_session() -> None:
    child = spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
        assert child.pid in descendants(os.getpid())
    finally:
        terminate(child, grace=5)


def test_child_that_asked_to_die_with_its_parent_dies_when_the_parent_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    grandchild = (
        "import os, time\n"
        "from servers.common.process import die_with_parent\n"
        "die_with_parent()\n"
        f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import sys, time\n"
        "from servers.common.process import spawn\n"
        f"spawn([sys.executable, '-c', {grandchild!r}])\n"
        "time.sleep(120)\n"
    )
    middle = spawn([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert time.monotonic() < deadline and middle.poll() is None
            time.sleep(0.02)
        orphan = int(pid_file.read_text())
        assert is_alive(orphan)
        os.kill(middle.pid, signal.SIGKILL)  # only the parent: the grandchild is in its own session
        middle.wait(10)
        wait_until_dead(orphan)
    finally:
        terminate(middle, grace=1)


def test_die_with_parent_refuses_to_start_when_the_parent_is_already_gone() -> None:
    # In a child: die_with_parent also sets this process's death signal.
    script = "from servers.common.process import die_with_parent; die_with_parent(); print('started')"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, PARENT_PID_ENV: "999999999"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "parent process 999999999 is gone; not starting" in result.stderr
    assert "started" not in result.stdout


def test_terminate_kills_a_child_that_ignores_sigterm() -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); "
        "time.sleep(60)"
    )
    child = spawn([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"ok\n"
    assert terminate(child, grace=0.2) == -signal.SIGKILL
    child.stdout.close()


def test_terminate_returns_the_exit_code_of_a_clean_stop() -> None:
    child = spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    assert terminate(child, grace=10) == -signal.SIGTERM
    assert not is_alive(child.pid)
