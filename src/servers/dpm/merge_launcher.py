"""The merge launcher: a small process that imported the merge once and forks one process per merge.

    python -m servers.dpm.merge_launcher --fd N [--jobs-per-worker K]   (started by `merge_runner`)

The DPM runs each merge in a process of its own (a crash or a kill of the merge cannot harm the
server; an abort kills it). Starting `python -m servers.dpm.merge_cli` costs ~0.5 s of imports
(h5py, numpy, the filters), and multiprocessing's fork server re-imports the server's
`__main__` (gRPC, the whole server: ~40-55 ms) in every child. This launcher imports only
`servers.dpm.merge_cli`, single-threaded (OpenBLAS is asked for one thread), so `os.fork()` is
safe, and forks merge workers: each runs merges one after the other (`merge_cli.main(argv)`,
stdout and stderr appended to the DAQ's `logs/merge.log`), so the cost of a fork (copy-on-write
faults of the whole interpreter: ~15 ms of system time) and of the merge's first call are paid
once per `JOBS_PER_WORKER` merges, not per merge. There are never more workers than merges
running at once (the server's `max_merges`), plus the ones being replaced.

Isolation stays per merge where it matters: a merge that crashes its worker, or is killed (an
abort, a timeout: the worker is SIGKILLed), ends only that worker, and its request is answered
with the worker's exit status; a fresh worker takes the next merge. A worker is recycled after
`JOBS_PER_WORKER` merges, so whatever a merge leaves behind in memory stays bounded.

Protocol: one JSON object per line on a Unix stream socket (fd `N`), both ways.

    server → launcher   {"run": ID, "argv": [...], "log": PATH, "setup": {...}}   run a merge
                        {"kill": ID}                               SIGKILL it (if still running)
    launcher → server   {"exited": ID, "code": C}                  it ended (C < 0: killed by -C)
                        {"failed": ID, "error": TEXT}              it could not be forked

`setup` (optional, `MergeSetup`) are the files of the attempt, made by the worker before the merge:
the output directory made afresh, the specification written, the previous report removed, a
header line appended to the log. The server used to make them in a hop to one of its worker
threads, which cost it more CPU (thread wake-ups, GIL hand-offs at each system call) than the
work itself; here they cost a process that holds no lock the server needs.

Each worker is watched through a pidfd in the one select loop, and only this loop reaps and
answers: each request gets exactly one answer (no thread races another for an exit code). A kill
goes through the pidfd, so it can never reach a recycled pid.

Death: the launcher gets SIGTERM when the server dies (`servers.common.process.die_with_parent`,
checked before the slow imports); each worker gets SIGKILL when the launcher dies. When the
server closes the socket (stop), the launcher kills its workers and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from servers.common.process import die_with_parent

_PR_SET_PDEATHSIG = 1
MERGE_MODULE = "servers.dpm.merge_cli"
"""The only module the launcher preloads: what a merge process needs."""
JOBS_PER_WORKER = 200
"""Merges a worker runs before a fresh one replaces it (whatever a merge leaves behind is bounded)."""


@dataclass(frozen=True)
class MergeSetup:
    """The files of one merge attempt, made by the merge worker before it merges.

    `output_dir` (the DPM's `products/<id>/`) is removed with whatever an earlier attempt left
    in it and made again; `specification` is written to `spec_path`; the files of `remove` (the
    earlier attempt's report) are removed; `header` is the first line the attempt appends to its log.
    """

    output_dir: str
    spec_path: str
    specification: str
    header: str
    remove: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> MergeSetup:
        return cls(
            output_dir=str(document["output_dir"]),
            spec_path=str(document["spec_path"]),
            specification=str(document["specification"]),
            header=str(document["header"]),
            remove=tuple(str(p) for p in document.get("remove", ())),
        )

    def apply(self, log_path: str) -> None:
        """Make the files (blocking); `OSError` says what could not be made. The log's directory
        is made too, so the log can be opened next."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        shutil.rmtree(self.output_dir, ignore_errors=True)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.spec_path, "w", encoding="utf-8") as handle:
            handle.write(self.specification)
        for path in self.remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class _Worker:
    """A merge process: forked once, runs merges one after the other until recycled or killed."""

    def __init__(self, pid: int, pidfd: int, sock: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.job: int | None = None  # the request it runs
        self.jobs = 0
        self.buffer = b""


class Launcher:
    """The select loop: requests from the server, results and deaths of the merge workers."""

    def __init__(self, sock: socket.socket, jobs_per_worker: int = JOBS_PER_WORKER) -> None:
        self._sock = sock
        self._jobs_per_worker = jobs_per_worker
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._workers: dict[int, _Worker] = {}  # pid -> worker
        self._running: dict[int, _Worker] = {}  # request id -> the worker running it
        self._buffer = b""

    def serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    if not self._read_requests():
                        self._kill_all()
                        return
                elif isinstance(key.data, tuple):
                    self._on_worker_death(key.data[1])
                elif key.data.pid in self._workers:  # not reaped earlier in this round
                    self._read_results(key.data)

    def _read_requests(self) -> bool:
        try:
            chunk = self._sock.recv(1 << 16)
        except ConnectionError:
            chunk = b""
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            request = json.loads(line)
            if "run" in request:
                self._start(int(request["run"]), line)
            elif "kill" in request:
                worker = self._running.get(int(request["kill"]))
                if worker is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        return True

    def _start(self, request_id: int, request: bytes) -> None:
        # A worker being recycled (its socket closed) takes no more requests.
        worker = next((w for w in self._workers.values() if w.job is None and w.sock.fileno() >= 0), None)
        if worker is None:
            try:
                worker = self._fork_worker()
            except OSError as exc:
                self._send({"failed": request_id, "error": f"cannot fork a merge process: {exc}"})
                return
        worker.job = request_id
        worker.jobs += 1
        self._running[request_id] = worker
        with contextlib.suppress(OSError):  # it died: its death reports the request
            worker.sock.sendall(request + b"\n")

    def _fork_worker(self) -> _Worker:
        launcher = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # the merge worker
            try:
                ours.close()
                self._sock.close()
                self._selector.close()
                for other in self._workers.values():
                    other.sock.close()
                    os.close(other.pidfd)
                run_worker(theirs, launcher)
            finally:
                os._exit(1)
        theirs.close()
        worker = _Worker(pid, os.pidfd_open(pid), ours)
        self._workers[pid] = worker
        self._selector.register(worker.sock, selectors.EVENT_READ, worker)
        self._selector.register(worker.pidfd, selectors.EVENT_READ, ("death", pid))
        return worker

    def _read_results(self, worker: _Worker) -> None:
        try:
            chunk = worker.sock.recv(1 << 16)
        except (BlockingIOError, ConnectionError):
            chunk = b""
        if not chunk:
            return  # it is exiting: its pidfd reports it
        worker.buffer += chunk
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            if worker.job is not None:
                self._running.pop(worker.job, None)
                self._send({"exited": worker.job, "code": int(json.loads(line)["code"])})
                worker.job = None
        if worker.job is None and worker.jobs >= self._jobs_per_worker:
            self._selector.unregister(worker.sock)
            worker.sock.close()  # it exits at EOF; a fresh one takes the next merge

    def _on_worker_death(self, pid: int) -> None:
        worker = self._workers[pid]
        if worker.sock.fileno() >= 0:
            worker.sock.setblocking(False)
            self._read_results(worker)  # its last result may still be in the socket
        if worker.sock.fileno() >= 0:
            self._selector.unregister(worker.sock)
            worker.sock.close()
        del self._workers[pid]
        self._selector.unregister(worker.pidfd)
        _, status = os.waitpid(pid, 0)
        os.close(worker.pidfd)
        if worker.job is not None:
            self._running.pop(worker.job, None)
            # Ended before it answered: a crash or a kill, never a success.
            code = os.waitstatus_to_exitcode(status) or 1
            self._send({"exited": worker.job, "code": code})

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the server is gone: its death signal follows
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _kill_all(self) -> None:
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
            os.close(worker.pidfd)
        self._workers.clear()


def run_worker(sock: socket.socket, launcher: int) -> None:
    """In a forked merge worker: die with the launcher; run each merge request it sends."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(1)  # the launcher died before the death signal was set
    main = importlib.import_module(MERGE_MODULE).main
    null = os.open(os.devnull, os.O_WRONLY)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process ends with os._exit
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    buffer = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            os._exit(0)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            request = json.loads(line)
            setup = MergeSetup.from_json(request["setup"]) if request.get("setup") else None
            code = run_merge(main, [str(a) for a in request["argv"]], str(request["log"]), setup)
            os.dup2(null, 1)  # nothing of the next merge's set-up reaches this one's log
            os.dup2(null, 2)
            sock.sendall(json.dumps({"code": code}).encode() + b"\n")


def run_merge(
    main: Callable[[list[str]], int], argv: list[str], log_path: str, setup: MergeSetup | None = None
) -> int:
    """Run one merge with stdout and stderr appended to `log_path`; its exit code.

    With `setup`, its files are made first (a failure is the merge's one-line error, exit 1).
    """
    failure = None
    if setup is not None:
        try:
            setup.apply(log_path)
        except OSError as exc:
            failure = f"cannot prepare the merge: {exc.strerror or exc}: {exc.filename}"
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return 1  # no log to say why; the server reports the exit code
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if setup is not None:
        print(setup.header)
    if failure is not None:
        print(f"daqif-dpm-merge: error: {failure}", file=sys.stderr)
        code = 1
    else:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            print(f"daqif-dpm-merge: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # before the slow imports: a server that died meanwhile is noticed now
    parser = argparse.ArgumentParser(prog="daqif-dpm-merge-launcher")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server")
    parser.add_argument("--jobs-per-worker", type=int, default=JOBS_PER_WORKER, help="merges per worker")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which closes us
    importlib.import_module(MERGE_MODULE)
    sock = socket.socket(fileno=args.fd)
    Launcher(sock, args.jobs_per_worker).serve()


if __name__ == "__main__":
    main()
