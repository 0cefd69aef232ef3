"""File moving primitives shared by collecting and releasing: copy, rsync, child processes.

Every child process (rsync, the merge program) is started so that it dies with the server
(`PR_SET_PDEATHSIG` through `setpriv`, when installed): after a `kill -9` of the server no
orphan keeps writing into the workspace while the restarted server redoes the step. Cancelling
the awaiting task kills the child; cancelling a copy stops it at its next chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shlex
import shutil
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_COPY_CHUNK = 64 * 1024 * 1024


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
        proc = await asyncio.create_subprocess_exec(
            *_dying_with_server(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_handle if log_handle is not None else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        lines: deque[str] = deque(maxlen=50)
        try:
            async for raw in proc.stderr:
                if log_handle is not None:
                    log_handle.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    lines.append(line)
            code = await proc.wait()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return ProcessResult(code, tuple(lines))
    finally:
        if log_handle is not None:
            log_handle.close()


def rsync_argv(rsync_command: str, remote_shell: str, source: str, destination: str) -> list[str]:
    """The rsync command line for one file (`remote_shell` given to rsync's `-e`)."""
    return [*shlex.split(rsync_command), "-e", remote_shell, "--times", "--checksum", source, destination]


def copy_file(source: Path, destination: Path, stop: threading.Event) -> int:
    """Copy `source` to a new file `destination` with fsync; return bytes copied.

    Stops (raising `TransferError`) at the next chunk once `stop` is set.
    """
    copied = 0
    with open(source, "rb") as src, open(destination, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        in_kernel = _copy_file_range
        while copied < size:
            if stop.is_set():
                raise TransferError(f"copy of {source} was stopped")
            count = min(_COPY_CHUNK, size - copied)
            try:
                n = in_kernel(src.fileno(), dst.fileno(), copied, count)
            except OSError as exc:
                # copy_file_range refuses some file system pairs (EXDEV on many kernels).
                if in_kernel is _sendfile or exc.errno not in _FALL_BACK:
                    raise
                in_kernel = _sendfile
                continue
            if n == 0:
                break
            copied += n
        dst.flush()
        os.fsync(dst.fileno())
    return copied


_FALL_BACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset, offset)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    os.lseek(dst, offset, os.SEEK_SET)
    return os.sendfile(dst, src, offset, count)


async def copy_in_thread(source: Path, destination: Path) -> int:
    """`copy_file` on a worker thread; cancelling the caller stops the copy and waits for it."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, copy_file, source, destination, stop)
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


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
