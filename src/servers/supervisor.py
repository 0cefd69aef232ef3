"""Run several daqif servers as supervised child processes (`daqif serve`, `daqif demo`, the
`daqif.testing` fixtures).

Each child is started through the one launcher (`servers.common.launch`): in its own session (so a
terminal's Ctrl-C reaches only the supervisor, which stops the children in reverse order), asking
to die with its parent, counted as started once it printed its ready line. Its output goes to
`<log dir>/<name>.log` and, prefixed with `[name]`, to `output`. A child that dies is reported with
its exit code and last output lines and restarted on the same ports while it has restarts left; a
child that exits cleanly on its own (exit code 0, e.g. the DPM after an `Exit` call) is reported
and not restarted, and the others keep running.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from servers.common.commands import ServerOptions
from servers.common.launch import ServerProcess, ServerStartError


@dataclass
class ChildSpec:
    """How to run one server."""

    name: str
    options: ServerOptions
    env: dict[str, str] | None = None
    cwd: Path | None = None


class ChildFailed(RuntimeError):
    """A child did not come up, or died and has no restarts left."""


@dataclass
class Child:
    process: ServerProcess[Any]
    restarts: int = 0
    exited: bool = False
    """It stopped cleanly on its own and is not restarted."""

    @property
    def name(self) -> str:
        return self.process.name


class Supervisor:
    """Start children in order, watch them, stop them in reverse order."""

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        output: TextIO | None = None,
        log_dir: Path | None = None,
        max_restarts: int = 3,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.output = output
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self.children: list[Child] = []
        self._pending: list[Child] = []
        for spec in children:
            self._pending.append(self._child(spec))

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _child(self, spec: ChildSpec) -> Child:
        if any(c.name == spec.name for c in [*self.children, *self._pending]):
            raise ValueError(f"two children are called {spec.name!r}")
        forward = None if self.output is None else self._forwarder(spec.name, self.output)
        log_file = None if self.log_dir is None else self.log_dir / f"{spec.name}.log"
        process: ServerProcess[Any] = ServerProcess(
            spec.options, name=spec.name, log_file=log_file, on_line=forward, env=spec.env, cwd=spec.cwd
        )
        return Child(process)

    def _forwarder(self, name: str, stream: TextIO) -> Callable[[str], None]:
        def forward(line: str) -> None:
            with self._lock:  # one write per line: lines of several children never interleave
                stream.write(f"[{name}] {line}\n")
                stream.flush()

        return forward

    def announce(self, line: str) -> None:
        """Write `line` to `output` (stdout if none) in one piece, never inside a child's line."""
        stream = self.output or sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def process(self, name: str) -> ServerProcess[Any]:
        """The launcher handle of child `name` (its ready line, pid, `kill()`, ...)."""
        for child in self.children:
            if child.name == name:
                return child.process
        raise KeyError(f"no child {name!r} (children: {', '.join(c.name for c in self.children)})")

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self.children}

    def start(self, timeout: float = 60.0) -> None:
        """Start every child given to the constructor in order, each once the previous one is
        ready. On failure, stop all and raise `ChildFailed`."""
        pending, self._pending = self._pending, []
        for child in pending:
            self._start(child, timeout)

    def start_child(self, spec: ChildSpec, timeout: float = 60.0) -> ServerProcess[Any]:
        """Start one more child and return once it is ready (its handle holds the bound ports).
        On failure, stop all and raise `ChildFailed`."""
        child = self._child(spec)
        self._start(child, timeout)
        return child.process

    def _start(self, child: Child, timeout: float) -> None:
        self.children.append(child)
        try:
            child.process.start(timeout)
        except ServerStartError as exc:
            self.stop()
            raise ChildFailed(str(exc)) from None
        except BaseException:
            self.stop()
            raise

    @property
    def all_exited(self) -> bool:
        """Every child has stopped cleanly on its own (nothing is left to watch)."""
        return bool(self.children) and all(c.exited for c in self.children)

    def check(self, ready_timeout: float = 60.0) -> None:
        """Report children that exited; restart those that died while they have restarts left,
        raise `ChildFailed` for one that has none."""
        for child in self.children:
            code = child.process.returncode
            if code is None or child.exited:
                continue
            if code == 0:
                child.exited = True
                self.report(
                    f"supervisor: {child.name} exited cleanly (exit code 0); not restarted, "
                    "the others keep running"
                )
                continue
            note = f"{child.name} died unexpectedly ({_how(code)}){_tail(child.process)}"
            if child.restarts >= self.max_restarts:
                raise ChildFailed(f"{note}; giving up after {child.restarts} restarts")
            child.restarts += 1
            self.report(f"supervisor: {note}; restarting ({child.restarts}/{self.max_restarts})")
            try:
                child.process.start(ready_timeout)
            except ServerStartError as exc:
                raise ChildFailed(f"{child.name} could not be restarted: {exc}") from None

    def run(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Watch the children until `stop` is set or every child has exited cleanly; raise
        `ChildFailed` if one cannot be kept up."""
        while not stop.wait(poll_interval):
            self.check()
            if self.all_exited:
                return

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every child's process group (reverse order), SIGKILL what is left after
        `timeout`; return the exit codes."""
        codes: dict[str, int | None] = {}
        for child in reversed(self.children):
            if not child.process.started:
                continue
            was_running = child.process.running
            code = child.process.stop(timeout)
            if was_running and code == -9:
                self.report(f"supervisor: {child.name} ignored SIGTERM for {timeout:.0f} s; killed it")
            codes[child.name] = code
        return codes


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _tail(process: ServerProcess[Any]) -> str:
    lines = process.tail(10)
    return ("; last output:\n    " + "\n    ".join(lines)) if lines else ""
