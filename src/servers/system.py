"""The whole daqif system as one set of supervised processes (`daqif serve`, `daqif demo`,
the `daqif.testing` fixtures).

Layout under the data root (default `./daqif-data`):

    <data-root>/raw/                 what the writer records (its only root); the DPM reads sources here
    <data-root>/dpm/                 the DPM workspace
    <data-root>/olas/                the default receiver directory for data products
    <data-root>/writer-config.json   the writer's detector config (created with embedded defaults)
    <data-root>/logs/<server>.log    each server's output (sim, writer, dpm, web), appended across runs

`dpm_metrics_port` turns on the DPM's Prometheus endpoint and `web_port` adds the status page
(`servers.web`), a read-only client of the DPM and the writer started after them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from daqif import defaults
from daqif.tls import tls_address
from servers.common.commands import DpmOptions, ServerOptions, SimOptions, WebOptions, WriterOptions
from servers.common.ready import ReadyLine
from servers.common.tls import ServerTls
from servers.supervisor import ChildSpec, Supervisor

DEFAULT_DPM_PORT = defaults.DPM_PORT
DEFAULT_REST_PORT = defaults.WRITER_REST_PORT
DEFAULT_WRITER_GRPC_PORT = defaults.WRITER_GRPC_PORT
DEFAULT_STREAM_PORT = defaults.SIM_STREAM_PORT
DEFAULT_DPM_METRICS_PORT = defaults.DPM_METRICS_PORT
DEFAULT_WEB_PORT = defaults.WEB_PORT

DEFAULT_DETECTOR: dict[str, object] = {
    "detector_name": defaults.DETECTOR_NAME,
    "detector_type": defaults.DETECTOR_TYPE,
    "bit_depth": defaults.BIT_DEPTH,
    "image_pixel_height": defaults.IMAGE_PIXEL_HEIGHT,
    "image_pixel_width": defaults.IMAGE_PIXEL_WIDTH,
    "n_modules": 1,
    "start_udp_port": 50000,
    "writer_user_id": 0,
    "module_positions": {"0": [0, 511, 511, 0]},
}


@dataclass
class SystemConfig:
    """What `daqif serve` runs; every server binds `host` (loopback unless told otherwise)."""

    data_root: Path
    host: str = "127.0.0.1"
    dpm_port: int = DEFAULT_DPM_PORT
    rest_port: int = DEFAULT_REST_PORT
    writer_grpc_port: int = DEFAULT_WRITER_GRPC_PORT
    stream_port: int = DEFAULT_STREAM_PORT
    stream_endpoint: str | None = None  # an external detector; default: the simulator's endpoint
    simulate: bool = False
    sim_rate: float = 100.0
    sim_header: str = "stddaq"
    sim_compress: str = "none"
    redis_url: str | None = None
    extra_allowed_roots: list[Path] = field(default_factory=list)
    detector_overrides: dict[str, object] = field(default_factory=dict)
    tls: ServerTls | None = None
    """Serve the gRPC ports (DPM, writer WriterControl) over TLS; the writer's REST stays HTTP."""
    dpm_metrics_port: int | None = None
    """The DPM's Prometheus `/metrics` port (0: a free one); `None`: no metrics endpoint."""
    web_port: int | None = None
    """The status page's port (0: a free one); `None`: no status page."""
    writers: int = 1
    """Data paths of the writer: with N > 1 a writer group of N on this host (`--workers N`)."""

    @property
    def raw_dir(self) -> Path:
        return self.data_root / "raw"

    @property
    def workspace(self) -> Path:
        return self.data_root / "dpm"

    @property
    def receiver_dir(self) -> Path:
        return self.data_root / "olas"

    @property
    def log_dir(self) -> Path:
        return self.data_root / "logs"

    @property
    def writer_config_file(self) -> Path:
        return self.data_root / "writer-config.json"

    def _grpc_address(self, port: int) -> str:
        address = f"{self.host}:{port}"
        return tls_address(address) if self.tls is not None else address

    @property
    def dpm_address(self) -> str:
        """The DPM's gRPC address (`grpcs://HOST:PORT` over TLS, as the clients take it)."""
        return self._grpc_address(self.dpm_port)

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def writer_grpc_address(self) -> str:
        """The writer's gRPC address (`grpcs://HOST:PORT` over TLS)."""
        return self._grpc_address(self.writer_grpc_port)

    @property
    def dpm_metrics_url(self) -> str | None:
        """`http://HOST:PORT` of the DPM's Prometheus endpoint (`/metrics` under it), if it has one."""
        return None if self.dpm_metrics_port is None else f"http://{self.host}:{self.dpm_metrics_port}"

    @property
    def web_url(self) -> str | None:
        """`http://HOST:PORT/` of the status page, if there is one."""
        return None if self.web_port is None else f"http://{self.host}:{self.web_port}/"

    @property
    def stream(self) -> str:
        # ZeroMQ spells "any free port" `*`.
        return self.stream_endpoint or f"tcp://{self.host}:{self.stream_port or '*'}"

    def requested_ports(self) -> dict[str, int]:
        """The fixed ports this system asks for, by what binds them (port 0: any free one)."""
        ports = {
            "DPM gRPC": self.dpm_port,
            "writer REST": self.rest_port,
            "writer gRPC": self.writer_grpc_port,
        }
        if self.simulate and self.stream_endpoint is None:
            ports["simulator stream"] = self.stream_port
        if self.dpm_metrics_port is not None:
            ports["DPM metrics"] = self.dpm_metrics_port
        if self.web_port is not None:
            ports["status page"] = self.web_port
        return {what: port for what, port in ports.items() if port != 0}

    def bound(self, ready: ReadyLine) -> SystemConfig:
        """This config with the ports a server of the system reported in its ready line."""
        if ready.server == "sim":
            return replace(self, stream_port=ready.port("stream"))
        if ready.server == "writer":
            return replace(self, rest_port=ready.port("rest"), writer_grpc_port=ready.port("grpc"))
        if ready.server == "web":
            return replace(self, web_port=ready.port("http"))
        if ready.server == "dpm":
            metrics = ready.port("metrics") if self.dpm_metrics_port is not None else None
            return replace(self, dpm_port=ready.port("grpc"), dpm_metrics_port=metrics)
        raise ValueError(f"{ready.server!r} is not a server of the system")

    def detector(self) -> dict[str, object]:
        """The writer's detector config (the file's content once it exists)."""
        if self.writer_config_file.exists():
            loaded: dict[str, object] = json.loads(self.writer_config_file.read_text())
            return {**DEFAULT_DETECTOR, **loaded}
        return dict(DEFAULT_DETECTOR)

    def protected(self) -> dict[str, Path]:
        """What no allowed root may contain or lie inside, by what it is."""
        return {
            "the DPM workspace": self.workspace,
            "the receiver directory": self.receiver_dir,
            "the log directory": self.log_dir,
            "the writer's config file": self.writer_config_file,
        }

    def check_roles_apart(self) -> None:
        """Refuse allowed roots that overlap what another role owns: the writer could otherwise overwrite
        a released product, an active DAQ's files or its own config. `ValueError` names both paths."""
        for root in _roots(self):
            root = root.resolve()
            for what, path in self.protected().items():
                path = path.resolve()
                if root == path or root in path.parents or path in root.parents:
                    raise ValueError(
                        f"allowed root {root} overlaps {what} {path}: the writer could overwrite it; "
                        "give a directory apart from both"
                    )

    def prepare(self) -> None:
        """Create the data root layout and the writer's config file (embedded defaults)."""
        for directory in (self.data_root, self.raw_dir, self.workspace, self.receiver_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if not self.writer_config_file.exists():
            detector = {**DEFAULT_DETECTOR, **self.detector_overrides}
            self.writer_config_file.write_text(json.dumps(detector, indent=2) + "\n")


_DTYPES = {8: "uint8", 16: "uint16", 32: "uint32"}
_ORDER = ("sim", "writer", "dpm", "web")


def sim_options(config: SystemConfig) -> SimOptions:
    """The simulator of the system: the writer's detector geometry, sent until stopped."""
    detector = config.detector()
    bit_depth = detector.get("bit_depth", 16)
    return SimOptions(
        endpoint=config.stream,
        shape=(int(str(detector["image_pixel_height"])), int(str(detector["image_pixel_width"]))),
        dtype=_DTYPES.get(bit_depth if isinstance(bit_depth, int) else 16, "uint16"),
        rate=config.sim_rate,
        count=0,
        header="daqif" if config.sim_header == "daqif" else "stddaq",
        compress="bslz4" if config.sim_compress == "bslz4" else "none",
    )


def _roots(config: SystemConfig) -> tuple[Path, ...]:
    # Roles apart: the writer writes, and the DPM reads sources, under raw/ only, never where the DPM
    # keeps its workspace or releases products, nor where serve keeps logs and the writer's config.
    return (config.raw_dir.resolve(), *config.extra_allowed_roots)


def writer_options(config: SystemConfig) -> WriterOptions:
    """The writer of the system, reading `config.stream`, its detector config in the data root."""
    return WriterOptions(
        stream=config.stream,
        data_root=config.raw_dir,
        host=config.host,
        rest_port=config.rest_port,
        grpc_port=config.writer_grpc_port,
        config=config.writer_config_file,
        allowed_roots=_roots(config),
        redis_url=config.redis_url or None,
        tls=config.tls,
        workers=config.writers if config.writers > 1 else None,
    )


def dpm_options(config: SystemConfig) -> DpmOptions:
    """The DPM of the system, its workspace in the data root."""
    return DpmOptions(
        host=config.host,
        port=config.dpm_port,
        workspace=config.workspace,
        data_root=config.data_root,
        # Receiver paths must lie under the DPM's allowed roots too: it releases into olas/.
        allowed_roots=(*_roots(config), config.receiver_dir.resolve()),
        tls=config.tls,
        metrics_port=config.dpm_metrics_port,
    )


def web_options(config: SystemConfig) -> WebOptions:
    """The status page of the system, reading the DPM and the writer's gRPC ports."""
    return WebOptions(
        dpm=config.dpm_address, writer=config.writer_grpc_address, host=config.host, port=config.web_port or 0
    )


def children(config: SystemConfig) -> list[ChildSpec]:
    """The servers of the system, in start order: simulator (if any), writer, DPM.

    With port 0 somewhere, start them with `start` instead: the writer must be told the port the
    simulator bound.
    """
    specs = [ChildSpec("sim", sim_options(config))] if config.simulate else []
    specs += [ChildSpec("writer", writer_options(config)), ChildSpec("dpm", dpm_options(config))]
    return specs + ([ChildSpec("web", web_options(config))] if config.web_port is not None else [])


def start(config: SystemConfig, supervisor: Supervisor, names: Iterable[str] = _ORDER) -> SystemConfig:
    """Start the servers `names` (of sim, writer, dpm, web; the simulator only with
    `config.simulate`, the status page only with `config.web_port`) in order under `supervisor`;
    return `config` with every port the servers bound.

    Raises `ChildFailed` (every child stopped) if one does not come up.
    """
    wanted = set(names)
    unknown = wanted - set(_ORDER)
    if unknown:
        raise ValueError(f"no such server in the system: {', '.join(sorted(unknown))}")
    builders: dict[str, Callable[[SystemConfig], ServerOptions]] = {
        "sim": sim_options,
        "writer": writer_options,
        "dpm": dpm_options,
        "web": web_options,
    }
    for name in _ORDER:
        if name not in wanted or (name == "sim" and not config.simulate):
            continue
        if name == "web" and config.web_port is None:
            continue
        ready = supervisor.start_child(ChildSpec(name, builders[name](config))).ready
        config = config.bound(ready)
    return config
