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
afterwards; every server gets a port the launcher picks, free and below the kernel's ephemeral range
(so a `.restart()` finds it free again: `servers.common.launch`), and the fixture learns it from the
server's ready line; each server's log is in `data_root/logs/`):

- `dpm_server`  → `DpmServer`: `.address`, `.client` (a `DpmClient`), `.data_root`, `.workspace`,
  `.receiver_dir`, `.metrics_url` (its Prometheus `/metrics`); `.kill()` (SIGKILL, for crash
  tests) and `.restart()` (same port and workspace).
- `simulator`   → `Simulator`: `.endpoint`, `.shape`, `.dtype` (64x64 uint16 frames at 1 kHz, ids from 1).
- `writer`      → `Writer` fed by `simulator`: `.rest_url` (std_daq REST), `.grpc_address`,
  `.data_root` (output files must lie under it; `.raw_dir` exists).
- `daq_system`  → `DaqSystem`: all three in one data root, with `.dpm`, `.writer`, `.simulator`.
- `tls_files`   → `TlsFiles`: a throw-away CA (`daqif.certificates`) and the certificates it issued
  in a temporary directory: `.ca_cert`, `.server` (for 127.0.0.1 and localhost), `.client`, their
  `.server_tls` (mutual TLS) and `.client_tls` (a `daqif.tls.TlsConfig` showing `.client`).
- `tls_dpm_server` → `DpmServer` served with mutual TLS from `tls_files`: `.address` is
  `grpcs://HOST:PORT`, `.client` already holds the client certificate, `.tls` the files (to make
  other clients, or `ca.issue(...)` more certificates).

`cryptography` (a daqif dependency) makes the certificates: keys and certificates never leave the
test's temporary directory, and are valid for one day.

Everything a test may write lies under `data_root`, which the servers accept as allowed root.

Waiting for a server: servers change state in their own time (a write ends, a DAQ is archived, a
metric is scraped), so a test polls. `wait_for(predicate, timeout=60, what="the write to end")` calls
`predicate` every 50 ms until it returns something truthy and returns that value, so a test can keep
what it waited for (`status = wait_for(lambda: (s := client.get_status())["state"] == "READY" and s)`).
It is a generous wait, not a timing check: a condition still unmet after `timeout` seconds fails the
test with an `AssertionError` naming `what` (default: the predicate and the file and line it is
defined at), the timeout and the last value the predicate returned. An exception the predicate raises
is not caught (a server that refuses is an error, not "not yet"). Blocking: from asyncio code, poll
with `await asyncio.sleep` instead.

FITS sources for a DPM test (or a demo): `write_fits_detector_file(path, keywords={...}, chips=2)`
writes a file as a detector control system does (a primary HDU with the detector's keywords,
no data, and one image extension `CHIP<n>` per chip, with CHECKSUM/DATASUM), and
`fits_file_source(name, path, rules)` is its `fitsFile` specification entry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pytest

from daqif import defaults
from daqif.errors import quote

if TYPE_CHECKING:
    from daqif.certificates import CertificatePair, ThrowawayCa
    from daqif.dpm_client import DpmClient
    from daqif.tls import TlsConfig
    from servers.common.tls import ServerTls
    from servers.supervisor import Supervisor
    from servers.system import SystemConfig

TEST_DETECTOR: dict[str, object] = {
    "detector_name": defaults.DETECTOR_NAME,
    "bit_depth": 16,
    "image_pixel_height": 64,
    "image_pixel_width": 64,
}


def _config(data_root: Path, simulate: bool = True, tls: ServerTls | None = None) -> SystemConfig:
    from servers.system import SystemConfig

    # Port 0 everywhere: the launcher picks each a free port (below the ephemeral range) and the
    # server reports it in its ready line; a start that lost a port to a parallel run is tried again.
    config = SystemConfig(
        data_root=data_root,
        dpm_port=0,
        rest_port=0,
        writer_grpc_port=0,
        stream_port=0,
        dpm_metrics_port=0,
        simulate=simulate,
        sim_rate=1000.0,
        detector_overrides=dict(TEST_DETECTOR),
        tls=tls,
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
class TlsFiles:
    """A throw-away CA and the certificates it issued for one test."""

    ca: ThrowawayCa
    server: CertificatePair
    """The server's certificate, for 127.0.0.1 and localhost."""
    client: CertificatePair
    """A client certificate the servers of `server_tls` accept."""

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (what clients trust, and servers ask client certificates to chain to)."""
        return self.ca.cert

    @property
    def server_tls(self) -> ServerTls:
        """Mutual TLS for a server: its certificate, client certificates required."""
        from servers.common.tls import ServerTls

        return ServerTls(cert=self.server.cert, key=self.server.key, client_ca=self.ca.cert)

    @property
    def client_tls(self) -> TlsConfig:
        """A client trusting the CA and showing `client`."""
        from daqif.tls import TlsConfig

        return TlsConfig(ca=self.ca.cert, cert=self.client.cert, key=self.client.key)


@dataclass
class DpmServer:
    """A running `daqif-dpm-server`."""

    config: SystemConfig
    supervisor: Supervisor
    tls: TlsFiles | None = None
    """The certificates of a server run over TLS (`tls_dpm_server`)."""
    client: DpmClient = field(init=False)

    def __post_init__(self) -> None:
        from daqif.dpm_client import DpmClient

        self.client = DpmClient(self.address, tls=self.tls.client_tls if self.tls is not None else None)

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
    def metrics_url(self) -> str:
        """`http://HOST:PORT/metrics`: the server's Prometheus metrics."""
        return f"{self.config.dpm_metrics_url}/metrics"

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
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throw-away CA with a server certificate (127.0.0.1, localhost) and a client certificate."""
    from daqif.certificates import ThrowawayCa

    ca = ThrowawayCa.create(tmp_path_factory.mktemp("daqif-tls"))
    return TlsFiles(ca, ca.issue("server", hosts=["127.0.0.1", "localhost"]), ca.issue("client"))


@pytest.fixture
def tls_dpm_server(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[DpmServer]:
    """A fresh DPM server like `dpm_server`, served with mutual TLS; `.client` shows `tls_files.client`."""
    config = _config(tmp_path_factory.mktemp("daqif-dpm"), simulate=False, tls=tls_files.server_tls)
    with _running(config, {"dpm"}) as (bound, supervisor):
        server = DpmServer(bound, supervisor, tls_files)
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


T = TypeVar("T")

WAIT_INTERVAL_S = 0.05


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 60.0,
    what: str | None = None,
    *,
    interval: float = WAIT_INTERVAL_S,
) -> T:
    """Call `predicate` until it returns something truthy; return that value.

    A generous wait for a server's state, not a timing check: after `timeout` seconds without a
    truthy value, `AssertionError` naming `what` (default: the predicate and where it is defined),
    the timeout and the last value. Exceptions of `predicate` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what or _describe(predicate)}: not within {timeout:g} s (last value: {quote(value)})"
            )
        time.sleep(interval)


def _describe(predicate: Callable[[], object]) -> str:
    """`test_x.<locals>.<lambda> (test_x.py:42)`: a lambda's repr names no place."""
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    code = getattr(predicate, "__code__", None)
    if code is None:
        return name
    return f"{name} ({Path(code.co_filename).name}:{code.co_firstlineno})"


def write_fits_detector_file(
    path: Path,
    *,
    keywords: dict[str, Any] | None = None,
    chips: int = 2,
    shape: tuple[int, int] = (16, 16),
    dtype: str = ">i2",
    seed: int = 0,
    compressed: bool = False,
    primary_data: bool = False,
    checksum: bool = True,
    extname: str = "CHIP",
) -> Path:
    """Write a FITS file as a detector control system does: primary keywords, one image per chip.

    `keywords` names FITS keywords (`EXPTIME`) or ESO ones written as `HIERARCH ESO <name>`
    (`{"ESO DET DIT": 0.5}`); a value may be `(value, comment)`. Chip `n` (from 1) is the image
    extension `<extname><n>` (`CHIP1`, …) with `EXTVER = n` and `HIERARCH ESO DET CHIP<n> ID`; its
    pixels come from `seed` (reproducible). `compressed` writes tile-compressed (Rice) extensions;
    `primary_data` puts an image in the primary HDU too; `checksum` adds CHECKSUM/DATASUM to every
    HDU.
    """
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    header = fits.Header()
    for name, value in (keywords or {}).items():
        card_name = f"HIERARCH {name}" if name.startswith("ESO ") or len(name) > 8 else name
        header[card_name] = value
    data = rng.integers(0, 1000, size=shape).astype(dtype) if primary_data else None
    hdus: list[Any] = [fits.PrimaryHDU(data=data, header=header)]
    for n in range(1, chips + 1):
        pixels = rng.integers(0, 4000, size=shape).astype(dtype)
        chip = fits.Header()
        chip["EXTVER"] = n
        chip[f"HIERARCH ESO DET CHIP{n} ID"] = (f"chip-{n}", "chip identifier")
        if compressed:
            hdus.append(
                fits.CompImageHDU(pixels, header=chip, name=f"{extname}{n}", compression_type="RICE_1")
            )
        else:
            hdus.append(fits.ImageHDU(pixels, header=chip, name=f"{extname}{n}"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path, overwrite=True, checksum=checksum)
    return path


def fits_file_source(
    source_name: str, location: str | Path, keyword_rules: list[Any] | None = None
) -> dict[str, Any]:
    """The `fitsFile` source of a Data Product Specification (rules None: copy every keyword)."""
    source: dict[str, Any] = {"type": "fitsFile", "sourceName": source_name, "location": str(location)}
    if keyword_rules is not None:
        source["keywordRules"] = keyword_rules
    return source
