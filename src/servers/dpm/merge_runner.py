"""Running `daqif-dpm-merge` as its own process, without paying its start-up for every DAQ.

The DPM runs each merge in a separate process (a crash or a kill of the merge cannot harm the
server, and an abort kills it). Starting `python -m servers.dpm.merge_cli` costs about half a
second of imports (h5py, numpy, the filters) per DAQ, so merges are forked from a
`multiprocessing` fork server that imported the merge program once. Each merge process runs
`merge_cli.main` with the same arguments as the command line would, with stdout and stderr
appended to the DAQ's `logs/merge.log`, and exits with its exit code.

The fork server is started from a fresh interpreter (never forked from the server, whose gRPC
threads must not be forked), from the server's main thread. It and each merge process have
PR_SET_PDEATHSIG set (`forkserver_guard`): after a `kill -9` of the DPM the fork server dies,
and every running merge with it, so no orphan keeps writing into the workspace while the
restarted server merges again.

The lifecycle sees only `MergeRunner` (warm up, run one merge); `ForkServerMergeRunner` is the
real one, and the lifecycle tests run the whole state table in-process with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from servers.dpm.transfer import ProcessResult

_PR_SET_PDEATHSIG = 1
SERVER_PID_VARIABLE = "DAQIF_DPM_SERVER_PID"
# The guard first: the fork server is protected before the slow imports.
_PRELOAD = ["servers.dpm.forkserver_guard", "servers.dpm.merge_cli"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends."""
    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def warm_up() -> None:
    """Start the fork server now, so that the first merge does not wait for it.

    Call it from the main thread: the fork server's death signal is tied to the thread that
    started it (it only spawns the process; the imports happen in the fork server).
    """
    os.environ[SERVER_PID_VARIABLE] = str(os.getpid())
    multiprocessing.forkserver.ensure_running()


def _merge_process(argv: list[str], log_path: str) -> None:  # runs in the forked merge process
    guard = sys.modules.get("servers.dpm.forkserver_guard")
    die_with_parent()
    if guard is None or os.getppid() != guard.FORKSERVER_PID:
        os._exit(1)  # not forked by the guarded fork server, or it died before the guard was set
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process ends below
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    from servers.dpm.merge_cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        print(f"daqif-dpm-merge: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def run_merge(argv: Sequence[str], log_path: Path) -> ProcessResult:
    """Run `daqif-dpm-merge ARGV` in its own process; output appended to `log_path`.

    Returns the exit code and, on failure, the last line the merge wrote (its one-line error).
    Cancelling the caller kills the merge process.
    """
    offset = log_path.stat().st_size if log_path.exists() else 0
    process = _context.Process(target=_merge_process, args=(list(argv), str(log_path)), daemon=False)
    loop = asyncio.get_running_loop()
    # On the main thread: if the fork server has to be (re)started, it is tied to this thread.
    process.start()
    try:
        await loop.run_in_executor(None, process.join)
    except asyncio.CancelledError:
        process.kill()
        with contextlib.suppress(Exception):
            await asyncio.shield(loop.run_in_executor(None, process.join))
        raise
    code = process.exitcode if process.exitcode is not None else -1
    process.close()
    lines: tuple[str, ...] = ()
    if code != 0:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            tail = handle.read().decode("utf-8", "replace")
        lines = tuple(line.strip() for line in tail.splitlines() if line.strip())[-50:]
    return ProcessResult(code, lines)


class MergeRunner(Protocol):
    """How the lifecycle runs the merge program of one DAQ."""

    def warm_up(self) -> None:
        """Prepare, so that the first merge starts fast (called once, from the main thread)."""

    async def run(self, argv: Sequence[str], log_path: Path) -> ProcessResult:
        """Run `daqif-dpm-merge ARGV`, output appended to `log_path`; cancelling kills it."""
        ...


class ForkServerMergeRunner:
    """The real runner: each merge a process forked from the preloaded fork server."""

    def warm_up(self) -> None:
        warm_up()

    async def run(self, argv: Sequence[str], log_path: Path) -> ProcessResult:
        return await run_merge(argv, log_path)
