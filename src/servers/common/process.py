"""The one way daqif starts and stops a child process.

`spawn` starts a program in a new session (its own process group, so a stop reaches the children it
starts too) without `preexec_fn`: a Python callback between fork and exec is unsafe in a process
that runs gRPC threads. A child that must not outlive its parent asks for it itself, first thing in
its `main`, with `die_with_parent()`: the parent passes its pid in `DAQIF_PARENT_PID`, and the child
sets `PR_SET_PDEATHSIG` and then checks the parent is still the one it was started by (closing the
race of a parent that died between fork and the `prctl`).

`terminate` is SIGTERM to the group, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

PARENT_PID_ENV = "DAQIF_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = subprocess.STDOUT,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session with stdin from /dev/null.

    `env` is added to this process's environment (not a replacement of it); `PYTHONUNBUFFERED` is
    set so a Python child's ready line and log reach the parent at once.
    """
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if die_with_parent:
        child_env[PARENT_PID_ENV] = str(os.getpid())
    else:
        child_env.pop(PARENT_PID_ENV, None)
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=child_env,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
    )


def die_with_parent() -> None:
    """In a child started by `spawn`: get SIGTERM when the parent dies; exit now if it already has.

    A no-op in a process not started that way (no `DAQIF_PARENT_PID`), or off Linux.
    """
    wanted = os.environ.pop(PARENT_PID_ENV, None)
    if wanted is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != wanted:
        raise SystemExit(f"parent process {wanted} is gone; not starting")


def terminate(process: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 10.0) -> int:
    """Stop `process` and its process group: SIGTERM, wait up to `grace` seconds, then SIGKILL.

    Returns the exit code (negative: the signal that ended it).
    """
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    kill(process)
    return process.returncode


def kill(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL `process` and its process group (a crash, as `kill -9` makes one), and reap it."""
    _signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _signal_group(process: subprocess.Popen[bytes] | subprocess.Popen[str], sig: signal.Signals) -> None:
    # A group that is already gone (the child exited and was reaped) is not an error. The child is
    # signalled by its pid only when its group cannot be (it left it): a second SIGTERM would reach
    # a Python child while it exits from the first, when its handler is gone, and kill it.
    try:
        os.killpg(process.pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            os.kill(process.pid, sig)


def descendants(pid: int) -> set[int]:
    """Every live descendant process of `pid` (read from /proc), e.g. to check none is left."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


SYSTEM_DIRS = ("/usr/sbin", "/sbin")
"""Where Debian installs administration tools (`mkfs.xfs`, `losetup`, `filefrag`): not on a
plain user's PATH (`/usr/local/bin:/usr/bin:/bin`), yet root may run them."""


def system_tool(name: str) -> str | None:
    """The path of the program `name`, searched on PATH and then in `SYSTEM_DIRS`; None if absent."""
    import shutil

    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SYSTEM_DIRS]))
