"""The whole daqif system as one set of supervised processes (`daqif serve`, `daqif demo`,
the `daqif.testing` fixtures).

Layout under the data root (default `./daqif-data`):

    <data-root>/raw/                 files the writer records (the writer's allowed root is the data root)
    <data-root>/dpm/                 the DPM workspace
    <data-root>/olas/                the default receiver directory for data products
    <data-root>/writer-config.json   the writer's detector config (created with embedded defaults)
    <data-root>/logs/<server>.log    each server's output (when run quietly)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from daqif import defaults
from servers.supervisor import ChildSpec, grpc_health_probe, http_probe, tcp_probe

DEFAULT_DPM_PORT = defaults.DPM_PORT
DEFAULT_REST_PORT = defaults.WRITER_REST_PORT
DEFAULT_WRITER_GRPC_PORT = defaults.WRITER_GRPC_PORT
DEFAULT_STREAM_PORT = defaults.SIM_STREAM_PORT

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

    @property
    def dpm_address(self) -> str:
        return f"{self.host}:{self.dpm_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def writer_grpc_address(self) -> str:
        return f"{self.host}:{self.writer_grpc_port}"

    @property
    def stream(self) -> str:
        return self.stream_endpoint or f"tcp://{self.host}:{self.stream_port}"

    def detector(self) -> dict[str, object]:
        """The writer's detector config (the file's content once it exists)."""
        if self.writer_config_file.exists():
            loaded: dict[str, object] = json.loads(self.writer_config_file.read_text())
            return {**DEFAULT_DETECTOR, **loaded}
        return dict(DEFAULT_DETECTOR)

    def prepare(self) -> None:
        """Create the data root layout and the writer's config file (embedded defaults)."""
        for directory in (self.data_root, self.raw_dir, self.workspace, self.receiver_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if not self.writer_config_file.exists():
            detector = {**DEFAULT_DETECTOR, **self.detector_overrides}
            self.writer_config_file.write_text(json.dumps(detector, indent=2) + "\n")


_DTYPES = {8: "uint8", 16: "uint16", 32: "uint32"}


def children(config: SystemConfig) -> list[ChildSpec]:
    """The servers of the system, in start order: simulator (if any), writer, DPM."""
    python = sys.executable
    roots = [str(config.data_root.resolve()), *(str(p) for p in config.extra_allowed_roots)]
    specs: list[ChildSpec] = []
    if config.simulate:
        detector = config.detector()
        bit_depth = detector.get("bit_depth", 16)
        dtype = _DTYPES.get(bit_depth if isinstance(bit_depth, int) else 16, "uint16")
        specs.append(
            ChildSpec(
                name="sim",
                argv=[
                    python,
                    "-m",
                    "servers.sim.main",
                    "--endpoint",
                    config.stream,
                    "--shape",
                    str(detector["image_pixel_height"]),
                    str(detector["image_pixel_width"]),
                    "--dtype",
                    dtype,
                    "--rate",
                    str(config.sim_rate),
                    "--count",
                    "0",
                    "--header",
                    config.sim_header,
                    "--compress",
                    config.sim_compress,
                ],
                probe=tcp_probe(config.host, config.stream_port),
            )
        )
    writer = [
        python,
        "-m",
        "servers.writer.main",
        "--host",
        config.host,
        "--rest-port",
        str(config.rest_port),
        "--grpc-port",
        str(config.writer_grpc_port),
        "--stream",
        config.stream,
        "--config",
        str(config.writer_config_file),
        "--data-root",
        str(config.data_root),
    ]
    for root in roots:
        writer += ["--allowed-root", root]
    if config.redis_url:
        writer += ["--redis-url", config.redis_url]
    specs.append(ChildSpec(name="writer", argv=writer, probe=http_probe(f"{config.rest_url}/writer/status")))
    dpm = [
        python,
        "-m",
        "servers.dpm.main",
        "--host",
        config.host,
        "--port",
        str(config.dpm_port),
        "--workspace",
        str(config.workspace),
        "--data-root",
        str(config.data_root),
    ]
    for root in roots:
        dpm += ["--allowed-root", root]
    specs.append(ChildSpec(name="dpm", argv=dpm, probe=grpc_health_probe(config.dpm_address)))
    return specs
