"""The one way to start a daqif server process: `daqif serve`, `daqif demo`, `daqif.testing`, the
servers' tests and the benchmarks all use it.

    with WriterProcess(WriterOptions(stream=sim.endpoint, data_root=root), log_file=log) as writer:
        StdDaqClient(writer.rest_url).get_status()
        writer.kill()        # SIGKILL to its process group, as a crash
        writer.restart()     # the same ports it bound the first time

Each server's command line is built in one place, from typed options (`servers.common.commands`:
`DpmOptions`, `WriterOptions`, `SimOptions`; `Command` for any other program that prints a ready
line; re-exported here). A port of 0 (the default here) is a free one the launcher picks
(`free_port`) below the kernel's ephemeral range, never one the kernel chose: the kernel lends
ephemeral ports to outgoing connections, so a port it gave a server may be some client's source
port by the time the server restarts on it (and that client's TIME_WAIT holds it for a minute). A
first start whose chosen port was taken by someone else meanwhile is tried again with other ports;
a restart whose port is busy is tried again on the same ports until its timeout. The launcher
learns every bound port from the server's ready line (`servers.common.ready`), and `restart()`
asks for the same ports again.

The child is started by `servers.common.process.spawn` (a new session, no `preexec_fn`); its stdout
and stderr are read by one thread per child that appends them to the log file, hands each line to
`on_line` (the supervisor prefixes and forwards them) and keeps the last lines for the error of a
child that dies before it is ready. A server asks to die with its parent itself
(`die_with_parent()`), and Linux ties that to the *thread* that started it: start servers from a
thread that lives as long as they should.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import random
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Generic, Self, TypeVar

from servers.common import process as processes
from servers.common.commands import Command, DpmOptions, ServerOptions, SimOptions, WriterOptions
from servers.common.ready import ReadyLine, ReadyLineError, is_ready_line, parse_ready_line

if TYPE_CHECKING:
    from servers.sim.main import SimStats

__all__ = [
    "Command",
    "DpmOptions",
    "DpmProcess",
    "ServerOptions",
    "ServerProcess",
    "ServerStartError",
    "SimOptions",
    "SimProcess",
    "WriterOptions",
    "WriterProcess",
    "free_port",
    "port_in_use",
]

TAIL_LINES = 40
"""How many of a child's last output lines the launcher keeps (for errors and summaries)."""

BIND_RETRY_S = 0.25
"""Pause before a start whose port was busy is tried again (a restart: within its `timeout`)."""

FIRST_START_ATTEMPTS = 5
"""Starts with freshly chosen ports before a first start whose chosen port was busy gives up."""

PORTS_BELOW_EPHEMERAL = 12_000
"""How many ports below the kernel's ephemeral range `free_port` picks from."""


class ServerStartError(RuntimeError):
    """A server exited, printed a bad ready line or was not ready in time; the message says which,
    with its command line and its last output lines."""


OptionsT = TypeVar("OptionsT", bound=ServerOptions)


class _Run:
    """One run of a child: its process, the thread draining its output, what it said."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        log: IO[bytes] | None,
        on_line: Callable[[str], None] | None,
    ) -> None:
        self.process = process
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.ready: ReadyLine | None = None
        self.bad_ready: str | None = None
        self.said_ready = threading.Event()
        self._log = log
        self._on_line = on_line
        self._reader = threading.Thread(target=self._pump, name=f"output of {process.pid}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            for raw in iter(stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line)
                if self._log is not None:
                    self._log.write(raw)
                    self._log.flush()
                if self._on_line is not None:
                    self._on_line(line)
                if not self.said_ready.is_set() and is_ready_line(line):
                    try:
                        self.ready = parse_ready_line(line)
                    except ReadyLineError as exc:
                        self.bad_ready = str(exc)
                    self.said_ready.set()
        finally:
            stdout.close()
            if self._log is not None:
                self._log.close()

    def finish(self, timeout: float = 2.0) -> None:
        """Wait (briefly) for the output of a stopped child to be read to its end."""
        self._reader.join(timeout)


class ServerProcess(Generic[OptionsT]):
    """A server child process: `start()` until its ready line, `stop()`, `kill()`, `restart()`."""

    def __init__(
        self,
        options: OptionsT,
        *,
        name: str | None = None,
        log_file: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.options = options
        self.name = name or options.server
        self.log_file = log_file
        self.on_line = on_line
        self.env = dict(env or {})
        self.cwd = cwd
        self._run: _Run | None = None
        self._first_ready: ReadyLine | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Self:
        """Start the server and return once it printed its ready line.

        A port of 0 is one `free_port` chooses; a second start (after `stop` or `kill`) asks for the
        ports the first start bound. A start that cannot bind such a port is tried again (see the
        module's notes). Raises `ServerStartError` (with the end of its output) if it exits first,
        prints a malformed ready line or is not ready within `timeout` seconds; it is not left
        running then.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        first = self._first_ready
        deadline = time.monotonic() + timeout
        attempts = 0
        last_busy: ServerStartError | None = None
        while True:
            attempts += 1
            options = self.options.with_ports(free_port) if first is None else self.options.pinned(first)
            argv = options.command()
            run = self._spawn(argv)
            try:
                self._wait_ready(run, argv, deadline, timeout)
                break
            except ServerStartError as exc:
                # A port the launcher chose was taken between its check and the server's bind: the
                # next start chooses others. A restart's port is busy: whoever holds it (a process
                # of the last run not yet gone, a client the kernel lent it to) lets it go in time.
                if first is not None:
                    busy = _cannot_bind(run, _ports(options))
                    retry = busy and time.monotonic() + BIND_RETRY_S < deadline
                else:
                    busy = _cannot_bind(run, _ports(options) - _ports(self.options))
                    retry = busy and attempts < FIRST_START_ATTEMPTS
                if busy:
                    last_busy = exc
                if not retry:
                    if attempts > 1:  # the last start may have run out of time before it could say so
                        raise ServerStartError(f"{last_busy or exc} (after {attempts} starts)") from None
                    raise
                time.sleep(BIND_RETRY_S)
        assert run.ready is not None
        if self._first_ready is None:
            self._first_ready = run.ready
        return self

    def _spawn(self, argv: Sequence[str]) -> _Run:
        log: IO[bytes] | None = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_file, "ab")  # noqa: SIM115 - the output thread closes it
        try:
            child = processes.spawn(argv, env=self.env, stdout=subprocess.PIPE, cwd=self.cwd)
        except BaseException:
            if log is not None:
                log.close()
            raise
        run = self._run = _Run(child, log, self.on_line)
        return run

    def _wait_ready(self, run: _Run, argv: Sequence[str], deadline: float, timeout: float) -> None:
        # The child's exit is polled: a grandchild holding the pipe open would hide the end of file.
        while not run.said_ready.wait(0.05):
            code = run.process.poll()
            if code is not None:
                run.finish()
                if run.said_ready.is_set():  # it printed the line, then exited at once
                    break
                raise ServerStartError(self._note(f"exited with {_how(code)} before it was ready", argv, run))
            if time.monotonic() > deadline:
                processes.kill(run.process)
                run.finish()
                raise ServerStartError(self._note(f"was not ready within {timeout:g} s", argv, run))
        if run.bad_ready is not None:
            processes.kill(run.process)
            raise ServerStartError(self._note(run.bad_ready, argv, run))
        assert run.ready is not None
        if run.ready.server != self.options.server:
            processes.kill(run.process)
            raise ServerStartError(
                self._note(
                    f"printed the ready line of {run.ready.server!r}, not {self.options.server!r}", argv, run
                )
            )

    def _note(self, what: str, argv: Sequence[str], run: _Run) -> str:
        lines = list(run.tail)[-15:]
        output = ("\n  last output:\n    " + "\n    ".join(lines)) if lines else "\n  (no output)"
        return f"{self.name} {what}: {' '.join(argv)}{output}"

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL after `grace` seconds; return its exit code
        (negative: the signal that ended it; `None` if it never started)."""
        if self._run is None:
            return None
        code = processes.terminate(self._run.process, grace)
        # Whatever the server left behind in its process group goes too.
        processes.kill(self._run.process)
        self._run.finish()
        return code

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash: no clean-up runs) and reap it."""
        if self._run is not None:
            processes.kill(self._run.process)
            self._run.finish()

    def restart(self, timeout: float = 60.0) -> Self:
        """Stop the server if it runs, then start it again on the ports of its first start."""
        self.stop()
        return self.start(timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the server to exit on its own; return its exit code."""
        run = self._started()
        code = run.process.wait(timeout)
        run.finish()
        return code

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what it is --------------------------------------------------------------------------

    def _started(self) -> _Run:
        if self._run is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._run

    @property
    def pid(self) -> int:
        """The pid of the current (or last) run."""
        return self._started().process.pid

    @property
    def started(self) -> bool:
        """It was started at least once."""
        return self._run is not None

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last run, `None` while it runs."""
        return self._started().process.poll()

    @property
    def ready(self) -> ReadyLine:
        """The ready line of the current (or last) run: every bound address."""
        ready = self._started().ready
        if ready is None:
            raise RuntimeError(f"{self.name} has not printed its ready line")
        return ready

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last output lines of the current (or last) run."""
        return list(self._started().tail)[-lines:]

    def log_text(self) -> str:
        """Everything the server wrote to its log file so far (every run)."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")


class DpmProcess(ServerProcess[DpmOptions]):
    """A `daqif-dpm-server` child."""

    @property
    def address(self) -> str:
        """`HOST:PORT` of its gRPC services."""
        return self.ready.address("grpc")


class WriterProcess(ServerProcess[WriterOptions]):
    """A `daqif-writer` child."""

    @property
    def rest_url(self) -> str:
        """Base URL of its std_daq REST API."""
        return self.ready.address("rest")

    @property
    def grpc_address(self) -> str:
        """`HOST:PORT` of its gRPC WriterControl."""
        return self.ready.address("grpc")

    def data_path_pids(self) -> list[int]:
        """Pids of the writer's child processes (its data path)."""
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                children.extend(int(p) for p in (task / "children").read_text().split())
        return children


class SimProcess(ServerProcess[SimOptions]):
    """A `daqif-sim` child."""

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint it bound."""
        return self.ready.address("stream")

    def summary(self) -> SimStats:
        """What the last run sent (as printed on its `done` line)."""
        from servers.sim.main import parse_done_line

        for line in reversed(self.tail()):
            stats = parse_done_line(line)
            if stats is not None:
                return stats
        raise RuntimeError(f"{self.name} printed no summary line; last output: {self.tail(5)}")

    def wait_done(self, timeout: float = 60.0) -> SimStats:
        """Wait for the simulator to finish its `count` frames; return its summary."""
        code = self.wait(timeout)
        if code != 0:
            raise RuntimeError(f"{self.name} exited with {_how(code)}; last output: {self.tail(5)}")
        return self.summary()


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on `host:port` (a bind without SO_REUSEPORT fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as every server sets it: a port in TIME_WAIT is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port(host: str | None = "127.0.0.1") -> int:
    """A TCP port nothing uses on `host` (`None`: loopback) at the moment, below the kernel's
    ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`).

    The kernel hands out ports of that range to outgoing connections and to binds of port 0 only,
    so a port below it stays free until a server binds it by number, and again after that server
    stops (a restart). It is checked with a bind without SO_REUSEADDR: a port some connection
    still holds in TIME_WAIT is not free either. Falls back to a port the kernel picks when the
    range leaves no room below it.
    """
    host = host or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    first = max(1024, low - PORTS_BELOW_EPHEMERAL)
    pick = random.SystemRandom()  # not the `random` module's state (hypothesis seeds it per test)
    for _ in range(64 if low - first >= 1000 else 0):
        port = pick.randrange(first, low)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        chosen: int = probe.getsockname()[1]
        return chosen


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range: 32768-60999


def _ports(options: ServerOptions) -> set[int]:
    """Every port number `options` put on their command line (0, `*`: none)."""
    ports: set[int] = set()
    argv = options.command()
    for flag, value in itertools.pairwise(argv):
        if flag.endswith("port") and value.isdigit():
            ports.add(int(value))
        elif flag == "--endpoint" and value.rpartition(":")[2].isdigit():
            ports.add(int(value.rpartition(":")[2]))
    ports.discard(0)
    return ports


def _cannot_bind(run: _Run, ports: Iterable[int]) -> bool:
    """The child exited saying it cannot bind one of `ports` (every daqif server's wording:
    `servers.common.grpc_server.cannot_bind`, the simulator's and the live stream's)."""
    if run.process.poll() is None:
        return False
    lines = [line for line in run.tail if ": cannot bind " in line]
    return any(f":{port}:" in line or f":{port} " in line for line in lines for port in ports)


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"
