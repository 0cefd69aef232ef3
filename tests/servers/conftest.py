"""Fixtures shared by the server tests: the detector simulator as a real subprocess."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from servers.common.launch import SimOptions, SimProcess, free_port

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
        sim = SimProcess(SimOptions(endpoint=endpoint, extra_args=args))
        started.append(sim)
        return sim.start()

    yield start
    for sim in started:
        sim.kill()


@pytest.fixture
def tcp_port() -> int:
    """A free loopback TCP port (for a simulator that must bind a port known in advance)."""
    return free_port()
