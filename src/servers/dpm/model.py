"""The DPM's data: substates, alerts, the per-DAQ record and the status views it publishes.

Transport-free: the gRPC adapter maps these to `daqif.v1` messages at the edge. A `DaqRecord`
is mutable and owned by the lifecycle (`lifecycle.py` is the only place that changes it);
`DaqStatusView` is an immutable snapshot handed to callers and watchers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from daqif.errors import bounded

MAX_ALERT_CHARS = 500
"""Characters of an alert description kept (then `… (N more characters)`)."""


class SubState(StrEnum):
    """DPM substates; names match the `daqif.v1.DaqSubState` suffixes."""

    SCHEDULED = "SCHEDULED"
    COLLECTING = "COLLECTING"
    MERGING = "MERGING"
    RELEASING = "RELEASING"
    COMPLETED = "COMPLETED"
    ABORTING = "ABORTING"
    ABORTED = "ABORTED"

    @property
    def is_final(self) -> bool:
        return self in (SubState.COMPLETED, SubState.ABORTED)

    @property
    def state(self) -> State:
        return State.COMPLETED if self.is_final else State.MERGING


class State(StrEnum):
    """Top-level DAQ state in the DPM; names match `daqif.v1.DaqState` suffixes."""

    MERGING = "MERGING"
    COMPLETED = "COMPLETED"


class Severity(StrEnum):
    """Alert severities; names match the `daqif.v1.AlertSeverity` suffixes."""

    ERROR = "ERROR"
    WARNING = "WARNING"
    INFO = "INFO"


@dataclass(frozen=True)
class Alert:
    """An active condition. `id` is stable per condition, e.g. `collecting:det1`."""

    id: str
    severity: Severity
    description: str
    timestamp: float


class DaqStatusView(NamedTuple):
    """What `GetDaqStatus` answers and `WatchDaqStatus` streams.

    A named tuple (immutable, compared field by field): made ~10x faster than a frozen dataclass,
    which counts at start-up (one per active DAQ: 50,000).
    """

    id: str
    file_id: str
    substate: SubState
    alerts: tuple[Alert, ...]
    result: str
    message: str
    timestamp: float

    @property
    def state(self) -> State:
        return self.substate.state

    @property
    def error(self) -> bool:
        return any(a.severity is Severity.ERROR for a in self.alerts)


@dataclass
class SourceRecord:
    """Collection of one HDF5 source. `size`/`mtime_ns` are the original's at collection time."""

    source_name: str
    location: str
    local_path: str = ""
    bytes: int = 0
    outcome: str = "pending"
    timestamp: float = 0.0
    size: int = -1
    mtime_ns: int = -1
    references: int = 0
    """Files the source refers to (virtual, external data) collected with it."""
    reference_bytes: int = 0
    stored_bytes: int = -1
    """The disk space the collected copies take (holes take none); -1 in records written before
    2026-12-02, for which `bytes` + `reference_bytes` stand in."""

    @property
    def collected(self) -> bool:
        return self.outcome in ("linked", "copied", "rsync")  # "linked": workspaces of earlier versions


@dataclass
class ReleaseRecord:
    """Delivery of the product to one receiver."""

    index: int
    path: str
    host: str = ""
    released_path: str = ""
    outcome: str = "pending"
    timestamp: float = 0.0

    @property
    def released(self) -> bool:
        return self.outcome in ("hardlink", "symlink", "copy", "rsync", "present")


@dataclass
class HistoryEntry:
    substate: SubState
    timestamp: float
    message: str


@dataclass
class DaqRecord:
    """Everything the DPM knows about one DAQ; persisted as one JSON file per DAQ."""

    id: str
    file_id: str
    seq: int
    specification: str
    substate: SubState = SubState.SCHEDULED
    message: str = "queued"
    timestamp: float = field(default_factory=time.time)
    result: str = ""
    alerts: dict[str, Alert] = field(default_factory=dict)
    sources: list[SourceRecord] = field(default_factory=list)
    receivers: list[ReleaseRecord] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)

    def view(self) -> DaqStatusView:
        return DaqStatusView(
            id=self.id,
            file_id=self.file_id,
            substate=self.substate,
            alerts=tuple(self.alerts.values()),
            result=self.result,
            message=self.message,
            timestamp=self.timestamp,
        )

    @property
    def has_error(self) -> bool:
        return any(a.severity is Severity.ERROR for a in self.alerts.values())

    def set_alert(self, alert_id: str, severity: Severity, description: str) -> None:
        """Raise (or replace) the alert `alert_id`; its description becomes the status message.

        The description is bounded (`MAX_ALERT_CHARS`): a path of 4,096 characters or the
        output of a failed program must not make every status of 10,000 DAQs huge.
        """
        description = bounded(description, MAX_ALERT_CHARS)
        now = time.time()
        self.alerts[alert_id] = Alert(alert_id, severity, description, now)
        self.timestamp = now
        self.message = description

    def clear_alert(self, alert_id: str) -> None:
        self.alerts.pop(alert_id, None)

    def count_attempt(self, step: str) -> None:
        self.attempts[step] = self.attempts.get(step, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "id": self.id,
            "file_id": self.file_id,
            "seq": self.seq,
            "specification": self.specification,
            "substate": self.substate.value,
            "message": self.message,
            "timestamp": self.timestamp,
            "result": self.result,
            "alerts": [
                {
                    "id": a.id,
                    "severity": a.severity.value,
                    "description": a.description,
                    "timestamp": a.timestamp,
                }
                for a in self.alerts.values()
            ],
            "sources": [dict(vars(s)) for s in self.sources],  # flat records: no deep copy (asdict)
            "receivers": [dict(vars(r)) for r in self.receivers],
            "attempts": dict(self.attempts),
            "history": [
                {"substate": h.substate.value, "timestamp": h.timestamp, "message": h.message}
                for h in self.history
            ],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DaqRecord:
        # Start-up decodes 50,000 of these: enum members by dict lookup (the enum call costs ~3x).
        substate = _SUBSTATES
        return cls(
            id=raw["id"],
            file_id=raw["file_id"],
            seq=int(raw["seq"]),
            specification=raw["specification"],
            substate=substate[raw["substate"]],
            message=raw.get("message", ""),
            timestamp=float(raw.get("timestamp", 0.0)),
            result=raw.get("result", ""),
            alerts={
                a["id"]: Alert(a["id"], _SEVERITIES[a["severity"]], a["description"], float(a["timestamp"]))
                for a in raw.get("alerts", ())
            },
            sources=[SourceRecord(**s) for s in raw.get("sources", ())],
            receivers=[ReleaseRecord(**r) for r in raw.get("receivers", ())],
            attempts={str(k): int(v) for k, v in raw.get("attempts", {}).items()},
            history=[
                HistoryEntry(substate[h["substate"]], float(h["timestamp"]), h.get("message", ""))
                for h in raw.get("history", ())
            ],
        )


_SUBSTATES: dict[str, SubState] = {s.value: s for s in SubState}
_SEVERITIES: dict[str, Severity] = {s.value: s for s in Severity}


@dataclass(frozen=True)
class InternalStatus:
    """`GetInternalDaqStatus`: the status plus what an operator needs to debug."""

    status: DaqStatusView
    workspace: str
    specification: str
    sources: tuple[SourceRecord, ...]
    receivers: tuple[ReleaseRecord, ...]
    merge_log: str
    attempts: tuple[tuple[str, int], ...]
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True)
class StorageStatus:
    """Disk usage of the workspace file system, in bytes."""

    path: str
    capacity: int
    free: int
    available: int
    timestamp: float
