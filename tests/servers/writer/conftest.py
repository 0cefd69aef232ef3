"""Fixtures for the writer's tests: a real simulator, a real writer process, a real redis-server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from daqif.testing import wait_for
from servers.common.launch import SimOptions, SimProcess, WriterOptions, WriterProcess, free_port

SHAPE = (48, 32)
DETECTOR_NAME = "TESTDET"
SIM_RATE = 400.0


Simulator = SimProcess


def start_simulator(rate: float = SIM_RATE, count: int = 0, shape: tuple[int, int] = SHAPE) -> Simulator:
    """`daqif-sim` on a free port, sending `shape` uint16 frames with the Standard DAQ header."""
    options = SimOptions(shape=shape, dtype="uint16", rate=rate, count=count, header="stddaq", linger=0)
    return SimProcess(options).start(timeout=30)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with start_simulator() as sim:
        yield sim


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def detector_config(tmp_path: Path) -> Path:
    """A detector config file matching the simulator's frames (the writer saves changes to it)."""
    path = tmp_path / "detector.json"
    path.write_text(
        json.dumps(
            {
                "detector_name": DETECTOR_NAME,
                "detector_type": "eiger",
                "bit_depth": 16,
                "image_pixel_height": SHAPE[0],
                "image_pixel_width": SHAPE[1],
            }
        )
    )
    return path


WriterFactory = Callable[..., WriterProcess]


@pytest.fixture
def writer_factory(tmp_path: Path, data_root: Path, detector_config: Path) -> Iterator[WriterFactory]:
    """Start writers (connected to a given stream; options: those of `WriterOptions`) that are
    stopped after the test."""
    started: list[WriterProcess] = []

    def start(stream: str, **options: Any) -> WriterProcess:
        options.setdefault("config", detector_config)
        writer = WriterProcess(
            WriterOptions(stream=stream, data_root=data_root, **options),
            log_file=tmp_path / f"writer{len(started)}.log",
        )
        started.append(writer)
        return writer.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def writer(writer_factory: WriterFactory, simulator: Simulator) -> WriterProcess:
    """A writer fed by the simulator, output confined to `data_root`."""
    return writer_factory(simulator.endpoint)


def rest_status(writer: WriterProcess) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(writer.rest_url + "/writer/status", timeout=10).json()["writer"]
    return body


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, no persistence. Small stream nodes so that
    approximate (`MAXLEN ~`) trimming is visible after a few entries."""
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(executable):
        pytest.fail("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--stream-node-max-entries",
            "4",
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), timeout=20)
        yield RedisServer(process, port)
    finally:
        client.close()
        stop_process(process)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
