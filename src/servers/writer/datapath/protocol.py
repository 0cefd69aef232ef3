"""What crosses the data path's process boundary: pipe messages and the shared counter page.

Commands (`Open`, `Stop`, `Close`, `Resize`) go down a ``multiprocessing`` pipe and each gets one `Reply`;
the process also sends `Ready` once connected and `Ended` when a write ends on its own. Counters
and the current write's phase live in one page of shared memory (`Slot` indexes its int64s), so
the control plane reads them without waiting for the process.
"""

from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from typing import Final, Literal

from servers.writer.datapath.api import WriteJob, WritePhase, WriteResult

SocketKind = Literal["pull", "sub"]  # "pull" for a PUSH source, "sub" for a PUB source
# How uncompressed frames reach the file: "direct" past the page cache where the file system and
# the frame size allow it (`datapath.direct`), "page-cache" always through it.
FrameIO = Literal["direct", "page-cache"]

DEFAULT_RCVHWM: Final = 1000  # messages; see handle.rcvhwm_for_frames for a memory-bounded value
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
# Nice levels the data path runs ahead of the control plane: a control plane busy answering many
# status pollers then cannot take the CPU the frames need (docs/writer.md, "Status polling").
DEFAULT_PRIORITY_BOOST: Final = 10


class Slot(enum.IntEnum):
    """The int64s of the shared page, written by the process only."""

    RECEIVED = 0
    WRITTEN = 1
    DISCARDED = 2
    MALFORMED = 3
    BYTES_RECEIVED = 4
    BYTES_WRITTEN = 5
    WRITE_SEQ = 6  # number of writes opened so far; identifies the current/last write
    PHASE = 7  # index into PHASES
    N_WRITTEN = 8  # frames written by the current/last write


N_SLOTS: Final = len(Slot)
SHARED_BYTES: Final = N_SLOTS * 8
PHASES: Final[tuple[WritePhase | None, ...]] = (None, *WritePhase)
PHASE_CODE: Final = {phase: code for code, phase in enumerate(PHASES)}
ACTIVE_PHASES: Final = frozenset(
    {WritePhase.WAITING_IMAGES, WritePhase.ACQUIRING_IMAGES, WritePhase.WRITING, WritePhase.FLUSHING_IMAGES}
)


@dataclass(frozen=True)
class Open:
    job: WriteJob


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Resize:
    """Size the receive queue for other frames (between writes): the socket reconnects with
    these options, so the queue of the new connection holds at most `rcvhwm` messages."""

    rcvhwm: int
    max_message_bytes: int


Command = Open | Stop | Close | Resize


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Reply:
    seq: int = 0  # the write the result belongs to
    result: WriteResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class Ended:
    """Sent by the process when a write ends on its own (complete or failed)."""

    seq: int
    result: WriteResult


def anonymous_shared_file(size: int) -> int:
    """A file descriptor of `size` zero bytes of memory that a child process can map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("daqif-datapath-counters")
    else:  # not Linux: an unlinked temporary file
        fd, name = tempfile.mkstemp(prefix="daqif-datapath-")
        os.unlink(name)
    os.ftruncate(fd, size)
    return fd
