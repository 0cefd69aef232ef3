"""Running `daqif-dpm-merge` as its own process, without paying its start-up for every DAQ.

The DPM runs each merge in a separate process (a crash or a kill of the merge cannot harm the
server, and an abort kills it). Merges are forked by the merge launcher
(`servers.dpm.merge_launcher`), a process started once with `servers.common.process.spawn` that
imports only the merge program and forks merge workers; each merge runs `merge_cli.main` with the
same arguments as the command line would, output appended to the DAQ's `logs/merge.log`, and
answers with its exit code (see the launcher for how workers are reused, killed and replaced).

Why not `multiprocessing`'s fork server (used before): its children re-import the server's
`__main__` (~40-55 ms of a ~60 ms DAQ), and `Process.start()` polls every other child's sentinel
from the calling thread while another thread waits in `Process.join()`: both read the 4-byte exit
status from one pipe, one gets EOF, and a merge that succeeded is reported as exit 255 (issue 12).
Here one reader, on the event loop, receives every exit code, each sent once by the launcher.

The launcher is started from the server's main thread (the thread its death signal is tied to:
`warm_up` at start, and `run` on the event loop, which is the main thread); it dies with the
server, and every running merge with it, so no orphan keeps writing into the workspace while the
restarted server merges again. If it dies, the merges it ran fail (ERROR `merging`, retried by
RetryMergeDaq) and the next merge starts a new one.

The lifecycle sees only `MergeRunner` (warm up, run one merge, close); `LauncherMergeRunner` is the
real one, and the lifecycle tests run the whole state table in-process with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from servers.common.process import spawn
from servers.dpm.merge_launcher import MergeSetup
from servers.dpm.transfer import ProcessResult

LAUNCHER_MODULE = "servers.dpm.merge_launcher"
# The merge needs no BLAS: one thread keeps the launcher single-threaded, so forking it is safe.
_LAUNCHER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


class MergeRunner(Protocol):
    """How the lifecycle runs the merge program of one DAQ."""

    def warm_up(self) -> None:
        """Prepare, so that the first merge starts fast (called once, from the main thread)."""

    async def run(
        self, argv: Sequence[str], log_path: Path, setup: MergeSetup | None = None
    ) -> ProcessResult:
        """Run `daqif-dpm-merge ARGV`, output appended to `log_path`, after making the files of
        `setup` (in the merge process, not the server); cancelling kills it."""
        ...

    def close(self) -> None:
        """Stop (running merges are killed); called once the drivers are stopped."""


class _Launcher:
    """One running merge launcher: its process, its socket and the merges waiting for an exit code."""

    def __init__(self, jobs_per_worker: int | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-m", LAUNCHER_MODULE, "--fd", str(theirs.fileno())]
            if jobs_per_worker is not None:
                argv += ["--jobs-per-worker", str(jobs_per_worker)]
            self.process = spawn(
                argv, env=_LAUNCHER_ENV, stdout=None, stderr=None, pass_fds=[theirs.fileno()]
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._buffer = b""
        self._reading = False
        self.alive = True

    async def run(self, argv: Sequence[str], log_path: Path, setup: MergeSetup | None = None) -> int:
        """The exit code of one merge; cancelling kills it (and waits until it is dead)."""
        loop = asyncio.get_running_loop()
        if not self._reading:
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True
        request_id = next(self._ids)
        done: asyncio.Future[int] = loop.create_future()
        self._waiting[request_id] = done
        # Shielded: a request half-written by a cancellation would garble the stream.
        try:
            request: dict[str, Any] = {"run": request_id, "argv": list(argv), "log": str(log_path)}
            if setup is not None:
                request["setup"] = setup.to_json()
            await asyncio.shield(self._send(request))
        except OSError:
            self._waiting.pop(request_id, None)
            raise
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                with contextlib.suppress(OSError):
                    await asyncio.shield(self._send({"kill": request_id}))
                with contextlib.suppress(Exception):
                    await asyncio.shield(done)
            raise

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.alive:
            raise OSError(f"the merge launcher (pid {self.process.pid}) is not running")
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, json.dumps(message).encode() + b"\n")
        except OSError as exc:  # it died since: EPIPE or ECONNRESET before its exit is noticed
            raise OSError(
                f"the merge launcher (pid {self.process.pid}) is not running: {exc.strerror or exc}"
            ) from None

    def _on_readable(self) -> None:
        try:
            chunk = self._sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._died()
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "exited" in message:
                self._resolve(int(message["exited"]), code=int(message["code"]))
            elif "failed" in message:
                self._resolve(int(message["failed"]), error=OSError(str(message["error"])))

    def _resolve(self, request_id: int, code: int = 0, error: OSError | None = None) -> None:
        done = self._waiting.pop(request_id, None)
        if done is None or done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(code)

    def _died(self) -> None:
        self.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(2)  # it closed its end: it is exiting
        error = f"the merge launcher (pid {self.process.pid}) exited with code {self.process.returncode}"
        for request_id in list(self._waiting):
            self._resolve(request_id, error=OSError(error))

    def close(self) -> None:
        """Close the socket: the launcher kills its merges and exits."""
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_event_loop().remove_reader(self._sock.fileno())
            self._reading = False
        if self.alive:
            self.alive = False
            self._sock.close()


class LauncherMergeRunner:
    """The real runner: each merge run by a merge worker of the merge launcher.

    `jobs_per_worker`: merges a worker runs before it is replaced (default: the launcher's).
    """

    def __init__(self, jobs_per_worker: int | None = None) -> None:
        self._jobs_per_worker = jobs_per_worker
        self._launcher: _Launcher | None = None

    def warm_up(self) -> None:
        # Spawning only: the launcher imports the merge in the background.
        if self._launcher is None or not self._launcher.alive:
            self._launcher = _Launcher(self._jobs_per_worker)

    async def run(
        self, argv: Sequence[str], log_path: Path, setup: MergeSetup | None = None
    ) -> ProcessResult:
        """Run `daqif-dpm-merge ARGV` in its own process; output appended to `log_path` after the
        files of `setup` are made there (`merge_launcher.MergeSetup`).

        Returns the exit code and, on failure, the last lines the merge wrote (its one-line error).
        Cancelling the caller kills the merge process. `OSError` if it could not be started.
        """
        self.warm_up()  # on the event loop, i.e. the main thread
        assert self._launcher is not None
        offset = log_path.stat().st_size if log_path.exists() else 0
        code = await self._launcher.run(argv, log_path, setup)
        lines: tuple[str, ...] = ()
        if code != 0:
            with open(log_path, "rb") as handle:
                handle.seek(offset)
                tail = handle.read().decode("utf-8", "replace")
            header = setup.header if setup is not None else None  # written by the worker: not an error
            lines = tuple(line.strip() for line in tail.splitlines() if line.strip() not in ("", header))[
                -50:
            ]
        return ProcessResult(code, lines)

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._launcher.process.wait(10)
            self._launcher = None
