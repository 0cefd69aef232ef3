"""The merge launcher: a small process that imported the merge once and forks one process per merge.

    python -m servers.dpm.merge_launcher --fd N      (started by `merge_runner`; not a user command)

The DPM runs each merge in its own process (a crash or a kill of the merge cannot harm the
server; an abort kills it). Starting `python -m servers.dpm.merge_cli` costs ~0.5 s of imports
(h5py, numpy, the filters), and multiprocessing's fork server re-imports the server's
`__main__` (gRPC, the whole server: ~40-55 ms) in every child. This launcher imports only
`servers.dpm.merge_cli`, single-threaded (OpenBLAS is asked for one thread), so a plain
`os.fork()` per merge is safe and costs about a millisecond; the merge process runs
`merge_cli.main(argv)` with stdout and stderr appended to the DAQ's `logs/merge.log`.

Protocol: one JSON object per line on a Unix stream socket (fd `N`), both ways.

    server → launcher   {"run": ID, "argv": [...], "log": PATH}    fork a merge
                        {"kill": ID}                               SIGKILL it (if still running)
    launcher → server   {"exited": ID, "code": C}                  it ended (C < 0: killed by -C)
                        {"failed": ID, "error": TEXT}              it could not be forked

Each child is watched through a pidfd in the one select loop, and only this loop reaps: an exit
code is read exactly once, by its owner (no thread races another for it). A kill goes through
the pidfd, so it can never reach a recycled pid.

Death: the launcher gets SIGTERM when the server dies (`servers.common.process.die_with_parent`,
checked before the slow imports); each merge gets SIGKILL when the launcher dies. When the
server closes the socket (stop), the launcher kills its merges and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import selectors
import signal
import socket
import sys
from typing import Any

from servers.common.process import die_with_parent

_PR_SET_PDEATHSIG = 1
MERGE_MODULE = "servers.dpm.merge_cli"
"""The only module the launcher preloads: what a merge process needs."""


class Launcher:
    """The select loop: requests from the server, exits of the merge processes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._children: dict[int, tuple[int, int]] = {}  # request id -> (pid, pidfd)
        self._buffer = b""

    def serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    if not self._read_requests():
                        self._kill_all()
                        return
                else:
                    self._reap(key.data)

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
                self._start(int(request["run"]), [str(a) for a in request["argv"]], str(request["log"]))
            elif "kill" in request:
                child = self._children.get(int(request["kill"]))
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(child[1], signal.SIGKILL)
        return True

    def _start(self, request_id: int, argv: list[str], log_path: str) -> None:
        launcher = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            self._send({"failed": request_id, "error": f"cannot fork the merge process: {exc}"})
            return
        if pid == 0:  # the merge process
            try:
                self._sock.close()
                self._selector.close()
                for _, pidfd in self._children.values():
                    os.close(pidfd)
                run_merge(argv, log_path, launcher)
            finally:
                os._exit(1)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # cannot happen for our own unreaped child; never leave it unwatched
            _, status = os.waitpid(pid, 0)
            self._send({"exited": request_id, "code": os.waitstatus_to_exitcode(status)})
            return
        self._children[request_id] = (pid, pidfd)
        self._selector.register(pidfd, selectors.EVENT_READ, request_id)

    def _reap(self, request_id: int) -> None:
        pid, pidfd = self._children.pop(request_id)
        self._selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self._send({"exited": request_id, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the server is gone: its death signal follows
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _kill_all(self) -> None:
        for pid, pidfd in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(pidfd)
        self._children.clear()


def run_merge(argv: list[str], log_path: str, launcher: int) -> None:
    """In the forked merge process: die with the launcher, log to `log_path`, run the merge, exit."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(1)  # the launcher died before the death signal was set
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process ends below
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    main = importlib.import_module(MERGE_MODULE).main
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


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # before the slow imports: a server that died meanwhile is noticed now
    parser = argparse.ArgumentParser(prog="daqif-dpm-merge-launcher")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which closes us
    importlib.import_module(MERGE_MODULE)
    sock = socket.socket(fileno=args.fd)
    Launcher(sock).serve()


if __name__ == "__main__":
    main()
