"""The write journal: the one write in progress, on disk, so a restarted writer can repair its file.

`ProcessDataPath` records a write in the journal before the data path opens its file and clears
it once the write has ended (closed, failed, or repaired after the process died). A journal that
still names a write when a data path starts means the writer was killed with that file open:
the file is repaired (`recovery.repair_file`) before anything else happens. The journal is one
small JSON file replaced atomically (`servers.common.atomic`), so it is never torn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

from servers.common.atomic import atomic_write_json
from servers.writer.datapath.api import WriteJob

log = logging.getLogger(__name__)


class WriteJournal:
    """The journal file at `path` (its directory must exist and belong to this writer)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, seq: int, job: WriteJob) -> None:
        """Remember that write `seq` of `job` is about to open its file."""
        atomic_write_json(self.path, {"seq": seq, "job": dataclasses.asdict(job)})

    def clear(self, seq: int | None = None) -> None:
        """Forget the recorded write (only if it is write `seq`, when given)."""
        if seq is not None:
            entry = self._read()
            if entry is None or entry[0] != seq:
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def pending(self) -> WriteJob | None:
        """The write that never ended, if the journal names one."""
        entry = self._read()
        return entry[1] if entry is not None else None

    def _read(self) -> tuple[int, WriteJob] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(text)
            return int(entry["seq"]), WriteJob(**entry["job"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring the unreadable write journal %s: %s", self.path, exc)
            return None
