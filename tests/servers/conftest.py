"""Fixtures shared by the server tests: the detector simulator as a real subprocess."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


def free_tcp_port() -> int:
    """A loopback TCP port that was free a moment ago (for a source that must bind a known port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SimProcess:
    """A running ``python -m servers.sim.main``."""

    process: subprocess.Popen[str]
    endpoint: str
    lines: queue.Queue[str] = field(repr=False)

    def wait_done(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the simulator to exit on its own; return its summary (`SimStats` as a dict)."""
        self.process.wait(timeout)
        return self._summary()

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM it, wait, return its summary."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout)
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        assert self.process.returncode == 0, f"simulator exited with {self.process.returncode}"
        while True:
            try:
                line = self.lines.get(timeout=10)
            except queue.Empty:
                raise AssertionError("the simulator printed no summary line") from None
            if line.startswith("daqif-sim: done "):
                summary: dict[str, Any] = json.loads(line.removeprefix("daqif-sim: done "))
                return summary


SimFactory = Callable[..., SimProcess]


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    """Start simulators: ``sim_factory("--shape", "64", "32", "--count", "10", port=None)``.

    Arguments are ``daqif-sim`` flags (``--endpoint`` is added: the given `port`, else any free
    port the simulator picks itself). Every simulator is killed at teardown.
    """
    started: list[SimProcess] = []

    def start(*args: str, port: int | None = None) -> SimProcess:
        endpoint = f"tcp://127.0.0.1:{port if port is not None else '*'}"
        command = [sys.executable, "-m", "servers.sim.main", "--endpoint", endpoint, *args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line.strip())

        threading.Thread(target=pump, daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            process.kill()
            raise AssertionError("the simulator did not report its endpoint") from None
        match = re.match(r"daqif-sim: bound (tcp://\S+)", first)
        if match is None:
            process.kill()
            raise AssertionError(f"unexpected simulator output: {first!r}")
        sim = SimProcess(process, match.group(1), lines)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        if sim.process.poll() is None:
            sim.process.kill()
        sim.process.wait(30)


@pytest.fixture
def tcp_port() -> int:
    """A free loopback TCP port (for a simulator that must bind a port known in advance)."""
    return free_tcp_port()
