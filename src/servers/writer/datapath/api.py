"""The seam between the writer's control plane and its data path process.

The data path (`servers.writer.datapath.worker`) is a separate process that is connected to the frame
stream all the time, counts every frame, and records the next `n_images` good frames into an
HDF5 file when a write is open. The control plane (state machine, REST, gRPC, Redis) drives it
only through `DataPathHandle`; nothing else crosses the process boundary, and no image bytes
ever reach the control plane.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class WritePhase(enum.StrEnum):
    """Where the current write is, as the data path sees it (maps to the seed's acquisition states)."""

    WAITING_IMAGES = "WAITING_IMAGES"  # file open, no frame received since
    ACQUIRING_IMAGES = "ACQUIRING_IMAGES"  # frames arrive, none written yet
    WRITING = "WRITING"  # at least one frame written
    FLUSHING_IMAGES = "FLUSHING_IMAGES"  # all frames in, closing/shrinking the file
    FINISHED = "FINISHED"  # file closed; see WriteResult
    FAILED = "FAILED"  # the write failed; see WriteResult.error


@dataclass(frozen=True)
class WriteJob:
    """One write request as the data path needs it (already validated by the control plane)."""

    output_file: str  # absolute, confined, parent exists
    n_images: int  # >= 1
    run_id: str  # as text; the control plane keeps the caller's original type
    detector_name: str
    height: int  # expected frame shape and dtype (from the DAQ config)
    width: int
    dtype: str  # numpy dtype name, e.g. "uint16"
    owner_uid: int | None = None  # chown the file to this uid when possible
    detector_type: str = ""  # from the DAQ config, for /entry/instrument/<detector> (daqif.nexus)


@dataclass(frozen=True)
class WriteResult:
    """How a write ended."""

    output_file: str
    n_images: int
    n_written: int
    interrupted: bool  # stopped before n_images were written
    error: str | None  # None on success; else why the write failed
    start_time: float  # Unix seconds: file opened
    stop_time: float  # Unix seconds: file closed


@dataclass(frozen=True)
class WriteProgress:
    """A snapshot of the current (or last) write."""

    phase: WritePhase | None  # None: no write since the data path started
    n_written: int
    result: WriteResult | None  # set once phase is FINISHED or FAILED


@dataclass(frozen=True)
class FrameCounters:
    """Cumulative counters since the data path started."""

    received: int = 0  # every message received
    written: int = 0  # frames written to a file
    discarded: int = 0  # good frames received while no write was open
    malformed: int = 0  # unreadable header, wrong size, unknown dtype, empty message, other shape/dtype
    bytes_received: int = 0
    bytes_written: int = 0


class DataPathError(RuntimeError):
    """A write could not be opened (the message is shown to the user), or the process is gone."""


class DataPathHandle(Protocol):
    """What the control plane may do with the data path process. Methods block; they are
    called from a worker thread (`asyncio.to_thread`) by the asyncio control plane."""

    def start(self) -> None:
        """Spawn the process; returns once it is connected to the stream."""

    def close(self) -> None:
        """Stop the process (closing an open file as interrupted)."""

    def is_alive(self) -> bool:
        """False once the process died (crash, kill -9)."""

    def open_write(self, job: WriteJob, timeout: float = 10.0) -> None:
        """Open the output file for `job`; return once it is open. Raise `DataPathError`
        with a user-facing message if it cannot be created (nothing is left behind then)."""

    def stop_write(self, timeout: float = 10.0) -> WriteResult | None:
        """Interrupt the open write: shrink datasets to the frames written, close the file,
        return its result. None when no write was open."""

    def progress(self) -> WriteProgress:
        """The phase and frame count of the current or last write (cheap; polled at ~10 Hz)."""

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from any thread, so it must only schedule work) when a write ended
        on its own or the process died: the end of a write is pushed, not found by the poll."""

    def counters(self) -> FrameCounters:
        """Cumulative frame counters (cheap; polled at ~1 Hz for stats)."""

    def resize_for(self, frame_nbytes: int, timeout: float = 10.0) -> None:
        """Size the receive queue and the message size limit for frames of `frame_nbytes`
        (uncompressed), so queued frames stay within the memory budget whatever the config
        (between writes; `DataPathError` if the process cannot)."""
