"""File moving primitives shared by collecting and releasing: rsync, child processes, a copy.

Every child process (rsync, the merge program) is started so that it dies with the server
(`PR_SET_PDEATHSIG` through `setpriv`, when installed): after a `kill -9` of the server no
orphan keeps writing into the workspace while the restarted server redoes the step. The death
signal reaches only the direct child, and rsync starts children of its own (the remote shell,
its receiver): each rsync therefore leads its own process group, which a cancellation kills
whole, and every process the server starts inherits `DAQIF_DPM_WORKSPACE=<workspace>` in its
environment, so the next server on the workspace finds and kills what outlived a `kill -9`
(`kill_leftovers`, at start-up, under the workspace lock). Cancelling a copy stops it at its
next chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class TransferError(Exception):
    """A copy, link or rsync that failed; the message says what and why."""


# `setpriv --pdeathsig KILL` (util-linux) sets PR_SET_PDEATHSIG and execs the command. Doing it
# with a Python `preexec_fn` instead forces a plain fork() of a process running gRPC threads,
# whose fork handlers then write errors into the child's stderr.
_SETPRIV = shutil.which("setpriv")


def _dying_with_server(argv: Sequence[str]) -> list[str]:
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


WORKSPACE_VARIABLE = "DAQIF_DPM_WORKSPACE"


def mark_children(workspace: Path) -> None:
    """Make every process started from now on carry the workspace in its environment."""
    os.environ[WORKSPACE_VARIABLE] = str(workspace)


def kill_leftovers(workspace: Path) -> list[int]:
    """SIGKILL every process (but this one) marked with `workspace`; return their pids.

    Only call it holding the workspace lock: the server that started them is then dead.
    """
    marker = f"{WORKSPACE_VARIABLE}={workspace}".encode()
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not readable: not one of ours
        if marker in environment:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    error_lines: tuple[str, ...]  # the last non-empty stderr lines (at most 50)

    @property
    def last_error_line(self) -> str:
        return self.error_lines[-1] if self.error_lines else ""

    @property
    def rsync_reason(self) -> str:
        """rsync's first own complaint (`rsync: ...`), which names the cause; else the last line."""
        for line in self.error_lines:
            if line.startswith("rsync: "):
                return line.removeprefix("rsync: ")
        return self.last_error_line


async def run_process(argv: Sequence[str], *, log_path: Path | None = None) -> ProcessResult:
    """Run `argv`; stdout and stderr are appended to `log_path` (else captured).

    Returns the exit code and the last non-empty stderr line (for the alert). If the awaiting
    task is cancelled, the child is killed before the cancellation propagates.
    """
    log_handle = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed below
    try:
        spawning = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *_dying_with_server(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_handle if log_handle is not None else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a kill reaches rsync's children too
            )
        )
        lines: deque[str] = deque(maxlen=50)
        try:
            # Shielded: a cancellation (an abort) while the child is being spawned must still get the
            # child, to kill it below; otherwise it would run on, unowned.
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            proc = await spawning
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        assert proc.stderr is not None
        try:
            async for raw in proc.stderr:
                if log_handle is not None:
                    log_handle.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    lines.append(line)
            code = await proc.wait()
        except asyncio.CancelledError:
            if proc.returncode is None:  # not reaped yet: its pid still names its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            raise
        return ProcessResult(code, tuple(lines))
    finally:
        if log_handle is not None:
            log_handle.close()


def rsync_argv(rsync_command: str, remote_shell: str, source: str, destination: str) -> list[str]:
    """The rsync command line for one file (`remote_shell` given to rsync's `-e`).

    `--` ends the options, so no operand is read as one (QueueDaq already refuses hosts and
    paths starting with `-`); `--protect-args` sends the remote path to the remote rsync as
    data, never through the remote shell's word splitting and globbing. `--sparse` keeps holes as
    holes: a stopped direct-I/O write is mostly hole (docs/writer.md, "Direct I/O"), and rsync
    would otherwise write its whole size in zeros.
    """
    return [
        *shlex.split(rsync_command),
        "-e",
        remote_shell,
        "--protect-args",
        "--times",
        "--checksum",
        "--sparse",
        "--",
        source,
        destination,
    ]


async def rsync(rsync_command: str, remote_shell: str, source: str, destination: str, what: str) -> None:
    """Copy one file with rsync (`rsync_argv`); `TransferError` saying `what` failed and why."""
    argv = rsync_argv(rsync_command, remote_shell, source, destination)
    try:
        result = await run_process(argv)
    except OSError as exc:
        raise TransferError(f"cannot run rsync ({argv[0]}): {exc.strerror}") from None
    if result.returncode != 0:
        why = result.rsync_reason or f"exit code {result.returncode}"
        raise TransferError(f"{what} failed: {why}")


async def run_stoppable(work: Callable[[threading.Event], T]) -> T:
    """`work(stop)` on a worker thread; cancelling the caller sets `stop` and waits for it to end.

    A copy (`copy_file(..., stop=stop)`) checks `stop` between chunks, so an abort does not wait
    for a large file.
    """
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, stop)
    try:
        await asyncio.wait({future})
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({future})
        raise
    return future.result()


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def same_content(a: Path, b: Path) -> bool:
    """True if `a` and `b` are the same file, or have the same size and checksum."""
    sa, sb = os.stat(a), os.stat(b)
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    return sa.st_size == sb.st_size and file_digest(a) == file_digest(b)
