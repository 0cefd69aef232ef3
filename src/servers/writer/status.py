"""The writer's status objects, as the Standard DAQ reports them (REST payloads, Redis entries).

Frozen snapshots made by `WriterCore`; `to_json` gives the Standard DAQ's JSON with its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from servers.writer.datapath.api import FrameCounters
from servers.writer.states import AcquisitionState, DeploymentState, WriterState

MESSAGE_COMPLETED = "Completed."
MESSAGE_INTERRUPTED = "Interrupted."
MESSAGE_NO_ACQUISITION = "No acquisition yet."


@dataclass(frozen=True)
class Acquisition:
    """One acquisition as the seed reports it (`acquisition` of the status, an entry of the logs)."""

    state: AcquisitionState = AcquisitionState.FINISHED
    message: str = MESSAGE_NO_ACQUISITION
    n_images: int = 0
    output_file: str | None = None
    run_id: int | None = None
    n_write_completed: int = 0
    n_write_requested: int = 0
    start_time: float | None = None
    stop_time: float | None = None
    writer_user_id: int | None = None
    """The `writer_user_id` of the write request (a daqif extension); None: it named none."""

    @property
    def happened(self) -> bool:
        """False for the placeholder shown before the first acquisition."""
        return self.output_file is not None

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "n_images": self.n_images,
            "output_file": self.output_file,
            "run_id": self.run_id,
        }
        if self.writer_user_id is not None:  # only for a write that asked (daqif extension)
            info["writer_user_id"] = self.writer_user_id
        return {
            "info": info,
            "message": self.message,
            "state": self.state.value,
            "stats": {
                "n_write_completed": self.n_write_completed,
                "n_write_requested": self.n_write_requested,
                "start_time": self.start_time,
                "stop_time": self.stop_time,
            },
        }


@dataclass(frozen=True)
class WriterStatus:
    """The DAQ status object of the seed (`/writer/status`, Redis `daq:status`)."""

    state: WriterState
    acquisition: Acquisition

    def to_json(self) -> dict[str, Any]:
        return {"acquisition": self.acquisition.to_json(), "state": self.state.value}


@dataclass(frozen=True)
class Throughput:
    bytes_per_second: float = 0.0
    images_per_second: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {"bytes_per_second": self.bytes_per_second, "images_per_second": self.images_per_second}


@dataclass(frozen=True)
class DaqStats:
    """Throughput over the last second (`detector` = frames received, `writer` = frames written)
    plus the cumulative frame counters since the writer started."""

    detector: Throughput = Throughput()
    writer: Throughput = Throughput()
    counters: FrameCounters = field(default_factory=FrameCounters)

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector.to_json(),
            "writer": self.writer.to_json(),
            "counters": {
                "received": self.counters.received,
                "written": self.counters.written,
                "discarded": self.counters.discarded,
                "malformed": self.counters.malformed,
            },
        }


@dataclass(frozen=True)
class Deployment:
    """The status of the last config deployment (`/daq/deployment`); a single-node deployment."""

    config_id: str
    status: DeploymentState
    message: str
    servers: Mapping[str, str]
    start_time: float | None
    stop_time: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "config_id": self.config_id,
            "message": self.message,
            "servers": dict(self.servers),
            "stats": {"start_time": self.start_time, "stop_time": self.stop_time},
            "status": self.status.value,
        }
