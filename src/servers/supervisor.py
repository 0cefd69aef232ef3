"""Run several daqif servers as supervised child processes.

Used by `daqif serve`, `daqif demo` and the `daqif.testing` fixtures. Each child is started in
its own session (so a terminal's Ctrl-C reaches only the supervisor, which stops the children in
order), is asked to die with its parent (`PR_SET_PDEATHSIG`), has its output prefixed and
forwarded or written to a log file, and counts as started only once its readiness probe passes
(a gRPC health check, an HTTP GET, a TCP connect). A child that dies is reported with its exit
code and last output lines, and restarted while it has restarts left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

Probe = Callable[[], bool]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_probe(host: str, port: int) -> Probe:
    """Ready once something accepts TCP connections on host:port."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def http_probe(url: str) -> Probe:
    """Ready once GET `url` answers 200."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


def grpc_health_probe(address: str) -> Probe:
    """Ready once the gRPC health service at `address` answers SERVING."""

    def probe() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


@dataclass
class ChildSpec:
    """How to run one server."""

    name: str
    argv: Sequence[str]
    probe: Probe
    env: dict[str, str] | None = None
    cwd: Path | None = None


class ChildFailed(RuntimeError):
    """A child did not come up, or died and has no restarts left."""


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    reader: threading.Thread | None = None


class Supervisor:
    """Start children in order, watch them, stop them in reverse order."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        output: TextIO | None = None,
        log_dir: Path | None = None,
        max_restarts: int = 3,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.children = [Child(spec) for spec in children]
        self.output = output
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.process.pid for c in self.children if c.process is not None}

    def _pump(self, child: Child, stream: TextIO | None) -> None:
        process = child.process
        assert process is not None and process.stdout is not None
        log = open(self.log_dir / f"{child.spec.name}.log", "ab") if self.log_dir else None  # noqa: SIM115
        try:
            for raw in iter(process.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                child.tail.append(line)
                if log is not None:
                    log.write(raw)
                    log.flush()
                if stream is not None:
                    with self._lock:
                        stream.write(f"[{child.spec.name}] {line}\n")
                        stream.flush()
        finally:
            if log is not None:
                log.close()

    def _launch(self, child: Child) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(child.spec.env or {})}
        child.tail.clear()
        child.process = subprocess.Popen(
            list(child.spec.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=child.spec.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child.reader = threading.Thread(target=self._pump, args=(child, self.output), daemon=True)
        child.reader.start()

    def _wait_ready(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert child.process is not None
        while time.monotonic() < deadline:
            code = child.process.poll()
            if code is not None:
                raise ChildFailed(self._death_note(child, code, "while starting"))
            if child.spec.probe():
                return
            time.sleep(0.1)
        raise ChildFailed(f"{child.spec.name} did not become ready within {timeout:.0f} s{self._tail(child)}")

    def _tail(self, child: Child) -> str:
        if child.reader is not None:
            child.reader.join(timeout=0.5)
        lines = list(child.tail)[-10:]
        return ("; last output:\n    " + "\n    ".join(lines)) if lines else ""

    def _death_note(self, child: Child, code: int, when: str) -> str:
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"{child.spec.name} died {when} ({how}){self._tail(child)}"

    def start(self, timeout: float = 60.0) -> None:
        """Start every child in order, each once the previous one is ready. On failure, stop all."""
        try:
            for child in self.children:
                self._launch(child)
                self._wait_ready(child, timeout)
        except BaseException:
            self.stop()
            raise

    def check(self, ready_timeout: float = 60.0) -> None:
        """Report and restart children that died; raise `ChildFailed` when one has no restarts left."""
        for child in self.children:
            if child.process is None:
                continue
            code = child.process.poll()
            if code is None:
                continue
            note = self._death_note(child, code, "unexpectedly")
            if child.restarts >= self.max_restarts:
                raise ChildFailed(f"{note}; giving up after {child.restarts} restarts")
            child.restarts += 1
            self.report(f"supervisor: {note}; restarting ({child.restarts}/{self.max_restarts})")
            self._launch(child)
            self._wait_ready(child, ready_timeout)

    def run(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Watch the children until `stop` is set; raise `ChildFailed` if one cannot be kept up."""
        while not stop.wait(poll_interval):
            self.check()

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every child (reverse order), SIGKILL what is left after `timeout`; return exit codes."""
        codes: dict[str, int | None] = {}
        for child in reversed(self.children):
            process = child.process
            if process is None:
                continue
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.report(
                        f"supervisor: {child.spec.name} ignored SIGTERM for {timeout:.0f} s; killing it"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            codes[child.spec.name] = process.returncode
            # Anything the child left behind in its session (e.g. a data path process) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            if child.reader is not None:
                child.reader.join(timeout=2)
        return codes
