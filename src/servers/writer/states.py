"""The writer's states and the one table of the changes allowed between them.

    writer:       UNKNOWN → READY ⇄ WRITING;  READY, WRITING → UNKNOWN (the data path died)
    acquisition:  WAITING_IMAGES → ACQUIRING_IMAGES → WRITING → FLUSHING_IMAGES → FINISHED | FAILED

The status a client polls lags the data path (`WriterCore` looks ~10 times a second), so an
acquisition may skip states forwards, never go back. A new acquisition starts (WAITING_IMAGES,
or FAILED when its file could not be opened) only after the last one ended (FINISHED or FAILED).
The writer is WRITING exactly while its acquisition is running. `check_transition` enforces all
of this; `WriterCore._transition` calls it for every change, so a change the table does not
allow is a bug, reported as an INTERNAL error naming both states.
"""

from __future__ import annotations

import enum
from typing import Final

from daqif.errors import DaqException


class WriterState(enum.StrEnum):
    """The writer's own state (the Standard DAQ's top-level `state`)."""

    READY = "READY"
    WRITING = "WRITING"
    UNKNOWN = "UNKNOWN"


class AcquisitionState(enum.StrEnum):
    """The state of the current or last acquisition (the Standard DAQ's `acquisition.state`)."""

    WAITING_IMAGES = "WAITING_IMAGES"
    ACQUIRING_IMAGES = "ACQUIRING_IMAGES"
    WRITING = "WRITING"
    FLUSHING_IMAGES = "FLUSHING_IMAGES"
    FINISHED = "FINISHED"
    FAILED = "FAILED"

    @property
    def is_running(self) -> bool:
        """Neither FINISHED nor FAILED."""
        return self not in _ENDED


class DeploymentState(enum.StrEnum):
    """The state of the last config deployment (`/daq/deployment`)."""

    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    RUNNING = "RUNNING"
    UNKNOWN = "UNKNOWN"


W = WriterState
A = AcquisitionState

WRITER_TRANSITIONS: Final[dict[WriterState, frozenset[WriterState]]] = {
    W.UNKNOWN: frozenset({W.READY}),
    W.READY: frozenset({W.WRITING, W.UNKNOWN}),
    W.WRITING: frozenset({W.READY, W.UNKNOWN}),
}
"""Writer state → the states it may change to. Staying in a state is no change (a new UNKNOWN
reason, new frame counts) and always allowed."""

ACQUISITION_TRANSITIONS: Final[dict[AcquisitionState, frozenset[AcquisitionState]]] = {
    A.WAITING_IMAGES: frozenset({A.ACQUIRING_IMAGES, A.WRITING, A.FLUSHING_IMAGES, A.FINISHED, A.FAILED}),
    A.ACQUIRING_IMAGES: frozenset({A.WRITING, A.FLUSHING_IMAGES, A.FINISHED, A.FAILED}),
    A.WRITING: frozenset({A.FLUSHING_IMAGES, A.FINISHED, A.FAILED}),
    A.FLUSHING_IMAGES: frozenset({A.FINISHED, A.FAILED}),
    A.FINISHED: frozenset(),
    A.FAILED: frozenset(),
}
"""Acquisition state → the states the same acquisition may change to (staying is no change)."""

ACQUISITION_STARTS: Final = frozenset({A.WAITING_IMAGES, A.FAILED})
"""The states a new acquisition starts in (FAILED: its file could not be opened)."""

_ENDED: Final = frozenset({A.FINISHED, A.FAILED})


def check_transition(
    writer: tuple[WriterState, WriterState],
    acquisition: tuple[AcquisitionState, AcquisitionState],
    *,
    new_acquisition: bool = False,
) -> None:
    """Raise INTERNAL unless the table allows `writer` (old, new) together with `acquisition`
    (old, new); `new_acquisition`: the acquisition is a new one, not the old one moving on."""
    (old_w, new_w), (old_a, new_a) = writer, acquisition
    if new_w is not old_w and new_w not in WRITER_TRANSITIONS[old_w]:
        _refuse(f"the writer cannot change from {old_w} to {new_w}")
    if new_acquisition:
        if old_a.is_running:
            _refuse(f"a new acquisition cannot start while the last one is {old_a}")
        if new_a not in ACQUISITION_STARTS:
            _refuse(f"a new acquisition cannot start in {new_a}")
    elif new_a is not old_a and new_a not in ACQUISITION_TRANSITIONS[old_a]:
        _refuse(f"the acquisition cannot change from {old_a} to {new_a}")
    if (new_w is W.WRITING) != new_a.is_running:
        _refuse(f"the writer cannot be {new_w} while its acquisition is {new_a}")


def _refuse(what: str) -> None:
    raise DaqException.internal(f"illegal state change: {what} (a bug in the writer; see its log)")
