"""`daqif.testing`: a pytest plugin that runs real daqif servers for your tests.

Installed with daqif (entry point `pytest11`), so the fixtures are available in any test suite
of an environment where daqif is installed — no conftest needed:

    def test_my_ocm_queues_a_daq(dpm_server, tmp_path):
        reply = dpm_server.client.queue_daq(my_specification(tmp_path))
        final = dpm_server.client.wait_for(reply.id, timeout=30)
        assert final.result.endswith(".h5")

    def test_my_beamline_script_records(writer, simulator):
        from std_daq_client import StdDaqClient
        StdDaqClient(writer.rest_url).start_writer_sync(
            {"output_file": str(writer.data_root / "raw" / "x.h5"), "n_images": 10})

Fixtures (function scope; each starts fresh processes in a temporary directory and stops them
afterwards; every server binds port 0 and the fixture learns the port it got from the server's
ready line, so parallel runs never race for a port; each server's log is in `data_root/logs/`):

- `dpm_server`  → `DpmServer`: `.address`, `.client` (a `DpmClient`), `.data_root`, `.workspace`,
  `.receiver_dir`; `.kill()` (SIGKILL, for crash tests) and `.restart()` (same port and workspace).
- `simulator`   → `Simulator`: `.endpoint`, `.shape`, `.dtype` (64x64 uint16 frames at 1 kHz, ids from 1).
- `writer`      → `Writer` fed by `simulator`: `.rest_url` (std_daq REST), `.grpc_address`,
  `.data_root` (output files must lie under it; `.raw_dir` exists).
- `daq_system`  → `DaqSystem`: all three in one data root, with `.dpm`, `.writer`, `.simulator`.

Everything a test may write lies under `data_root`, which the servers accept as allowed root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from daqif import defaults

if TYPE_CHECKING:
    from daqif.dpm_client import DpmClient
    from servers.supervisor import Supervisor
    from servers.system import SystemConfig

TEST_DETECTOR: dict[str, object] = {
    "detector_name": defaults.DETECTOR_NAME,
    "bit_depth": 16,
    "image_pixel_height": 64,
    "image_pixel_width": 64,
}


def _config(data_root: Path, simulate: bool = True) -> SystemConfig:
    from servers.system import SystemConfig

    # Port 0 everywhere: each server binds a free port and reports it in its ready line, so
    # parallel test runs never race for a port.
    config = SystemConfig(
        data_root=data_root,
        dpm_port=0,
        rest_port=0,
        writer_grpc_port=0,
        stream_port=0,
        simulate=simulate,
        sim_rate=1000.0,
        detector_overrides=dict(TEST_DETECTOR),
    )
    config.prepare()
    return config


@contextlib.contextmanager
def _running(config: SystemConfig, names: set[str]) -> Iterator[tuple[SystemConfig, Supervisor]]:
    """Start the servers `names` of `config`; yield the config with their bound ports."""
    from servers import system
    from servers.supervisor import Supervisor

    supervisor = Supervisor(log_dir=config.log_dir, max_restarts=0)
    try:
        yield system.start(config, supervisor, names), supervisor
    finally:
        supervisor.stop()


@dataclass
class DpmServer:
    """A running `daqif-dpm-server`."""

    config: SystemConfig
    supervisor: Supervisor
    client: DpmClient = field(init=False)

    def __post_init__(self) -> None:
        from daqif.dpm_client import DpmClient

        self.client = DpmClient(self.address)

    @property
    def address(self) -> str:
        return self.config.dpm_address

    @property
    def data_root(self) -> Path:
        return self.config.data_root

    @property
    def workspace(self) -> Path:
        return self.config.workspace

    @property
    def receiver_dir(self) -> Path:
        return self.config.receiver_dir

    @property
    def pid(self) -> int:
        return self.supervisor.process("dpm").pid

    def kill(self) -> None:
        """SIGKILL the server and its children (no clean-up runs), for crash-recovery tests."""
        self.supervisor.process("dpm").kill()

    def restart(self) -> None:
        """Start the server again (stopping it first if it runs) on the same port and workspace;
        returns once it serves."""
        self.supervisor.process("dpm").restart()


@dataclass
class Simulator:
    config: SystemConfig

    @property
    def endpoint(self) -> str:
        return self.config.stream

    @property
    def shape(self) -> tuple[int, int]:
        detector = self.config.detector()
        return (int(str(detector["image_pixel_height"])), int(str(detector["image_pixel_width"])))

    @property
    def dtype(self) -> str:
        return "uint16"


@dataclass
class Writer:
    config: SystemConfig

    @property
    def rest_url(self) -> str:
        return self.config.rest_url

    @property
    def grpc_address(self) -> str:
        return self.config.writer_grpc_address

    @property
    def data_root(self) -> Path:
        return self.config.data_root

    @property
    def raw_dir(self) -> Path:
        return self.config.raw_dir


@dataclass
class DaqSystem:
    config: SystemConfig
    dpm: DpmServer
    writer: Writer
    simulator: Simulator

    @property
    def data_root(self) -> Path:
        return self.config.data_root


@pytest.fixture
def dpm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DpmServer]:
    """A fresh DPM server on a free port with its own data root."""
    config = _config(tmp_path_factory.mktemp("daqif-dpm"), simulate=False)
    with _running(config, {"dpm"}) as (bound, supervisor):
        server = DpmServer(bound, supervisor)
        try:
            yield server
        finally:
            server.client.close()


@pytest.fixture
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """A detector simulator sending 64x64 uint16 frames at 1 kHz from image id 1."""
    with _running(_config(tmp_path_factory.mktemp("daqif-system")), {"sim"}) as (bound, _):
        yield Simulator(bound)


@pytest.fixture
def writer(simulator: Simulator) -> Iterator[Writer]:
    """A writer connected to `simulator`, with the std_daq REST API and gRPC WriterControl."""
    with _running(simulator.config, {"writer"}) as (bound, _):
        yield Writer(bound)


@pytest.fixture
def daq_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaqSystem]:
    """Simulator, writer and DPM sharing one data root (`.data_root`)."""
    config = _config(tmp_path_factory.mktemp("daqif-system"))
    with _running(config, {"sim", "writer", "dpm"}) as (bound, supervisor):
        dpm = DpmServer(bound, supervisor)
        try:
            yield DaqSystem(bound, dpm, Writer(bound), Simulator(bound))
        finally:
            dpm.client.close()
