"""Fixtures shared by the server tests: the detector simulator as a real subprocess."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from servers.sim.launch import SimProcess, start_sim


def free_tcp_port() -> int:
    """A loopback TCP port that was free a moment ago (for a source that must bind a known port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SimFactory = Callable[..., SimProcess]


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    """Start simulators: ``sim_factory("--shape", "64", "32", "--count", "10", port=None)``.

    Arguments are ``daqif-sim`` flags (``--endpoint`` is added: the given `port`, else any free
    port the simulator picks itself). Every simulator is killed at teardown.
    """
    started: list[SimProcess] = []

    def start(*args: str, port: int | None = None) -> SimProcess:
        sim = start_sim(*args, endpoint=f"tcp://127.0.0.1:{port if port is not None else '*'}")
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.kill()


@pytest.fixture
def tcp_port() -> int:
    """A free loopback TCP port (for a simulator that must bind a port known in advance)."""
    return free_tcp_port()
