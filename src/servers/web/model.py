"""What the status page shows, as the page receives it (JSON of these models), and how each is made
from the `daqif.v1` messages of the DPM and the writer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from daqif.dpm_client import FINAL_SUBSTATES, substate_name
from daqif.v1 import dpm_pb2, writer_pb2
from daqif.writer_client import acquisition_state_name, writer_state_name


class _Card(BaseModel):
    model_config = ConfigDict(frozen=True)


class AlertCard(_Card):
    id: str
    severity: str
    """ERROR, WARNING or INFO."""
    description: str


class DaqCard(_Card):
    """One DAQ: active, or one of the most recent finished ones."""

    id: str
    substate: str
    final: bool
    """COMPLETED or ABORTED (archived by the DPM)."""
    error: bool
    alerts: tuple[AlertCard, ...]
    result: str
    """The product's path once merged."""
    message: str
    timestamp: float


class WriterCard(_Card):
    """The writer's state and its current (or last) acquisition."""

    state: str
    acquisition: str
    message: str
    output_file: str
    n_images: int
    n_written: int


class RatePoint(_Card):
    """Throughput of the last second: frames and bytes received from the detector."""

    t: float
    fps: float
    bps: float


class StorageCard(_Card):
    path: str
    capacity: int
    free: int
    available: int


class Link(_Card):
    """Whether the page reaches a server; `message` says what it waits for when it does not."""

    up: bool
    message: str


def daq_card(status: dpm_pb2.DaqStatus) -> DaqCard:
    severity = dpm_pb2.AlertSeverity.Name
    return DaqCard(
        id=status.id,
        substate=substate_name(status.substate),
        final=status.substate in FINAL_SUBSTATES,
        error=status.error,
        alerts=tuple(
            AlertCard(
                id=a.id,
                severity=severity(a.severity).removeprefix("ALERT_SEVERITY_"),
                description=a.description,
            )
            for a in status.alerts
        ),
        result=status.result,
        message=status.message,
        timestamp=status.timestamp,
    )


def writer_card(status: writer_pb2.WriterStatus) -> WriterCard:
    acquisition = status.acquisition
    return WriterCard(
        state=writer_state_name(status.state),
        acquisition=acquisition_state_name(acquisition.state),
        message=acquisition.message,
        output_file=acquisition.info.output_file,
        n_images=acquisition.info.n_images,
        n_written=acquisition.stats.n_write_completed,
    )


def storage_card(storage: dpm_pb2.StorageStatus) -> StorageCard:
    return StorageCard(
        path=storage.path, capacity=storage.capacity, free=storage.free, available=storage.available
    )
