"""Writeback while a write runs, so the output file is durable soon after its last frame.

A write ends FINISHED only once its file is durable (`make_durable`: the file and its folder
fsync'd). Left to the kernel, the frames of a write stay in the page cache until the final fsync
(or until dirty pages pass ``vm.dirty_background_ratio``, gigabytes on a large host) and that
fsync then writes all of them while the write waits: receiving and writing to disk take turns.
`Writeback` runs beside the receive loop instead: each time `WRITEBACK_BYTES` more were written
the loop calls `kick` (a few instructions), and a thread of the data path (GIL released while the
kernel writes) runs ``fdatasync`` on its own descriptor of the file, so the disk writes what came
while the next frames arrive, and the final fsync has only the tail left. It also bounds the
dirty pages a write leaves in the page cache for the rest of the machine.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Final

from servers.common.atomic import fsync_directory, fsync_file

log = logging.getLogger(__name__)

# Bytes written between two writebacks: large enough that fdatasync's fixed cost (a journal
# commit, a device cache flush) is small beside it, small enough that the disk starts at once.
WRITEBACK_BYTES: Final = 32 << 20


class Writeback:
    """A thread that makes the file at `path` durable up to what was written when `kick`ed."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._kicked = threading.Event()
        self._stopping = False
        self.error: OSError | None = None  # the first failed fdatasync; the final fsync reports it again
        self._thread = threading.Thread(target=self._run, name="daqif-writeback", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Start writing back what was written so far (returns at once)."""
        self._kicked.set()

    def stop(self) -> None:
        """End the thread (after the writeback it is doing) and close its descriptor."""
        self._stopping = True
        self._kicked.set()
        self._thread.join()
        os.close(self._fd)

    def _run(self) -> None:
        while True:
            self._kicked.wait()
            self._kicked.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # the disk failed: say so once; the final fsync fails the write
                if self.error is None:
                    self.error = exc
                    log.error("writing the output file back to disk failed: %s", exc)


def make_durable(path: str) -> None:
    """fsync the file at `path` and the folder holding it (its name is durable too)."""
    fsync_file(Path(path))
    fsync_directory(Path(path).parent)
