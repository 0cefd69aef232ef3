"""The DPM workspace on disk: one directory per DAQ, written atomically, rebuilt at start-up.

Layout (under the workspace directory):

    .lock                         held (flock) by the server using the workspace
    queue-journal.<n>             DAQs queued since the last checkpoint (one JSON line each)
    daqs/<id>/daq.json            status + specification + queue position (one atomic file)
    daqs/<id>/sources/<name>.h5   collected sources
    daqs/<id>/specification.json  the specification handed to the merge program
    daqs/<id>/logs/merge.log      output of every merge attempt
    products/<id>/.<fileId>.h5.part   the product being built by the merge
    products/<id>/<fileId>.h5     the merged product (the DAQ's `result`), released from here
    archive/<id>/                 completed and aborted DAQs (daq.json, logs; sources removed)

The product lives outside the DAQ directory so that archiving (a rename of the DAQ directory)
never moves a file a receiver may hold a symlink to.

Durability. QueueDaq must not reply before the DAQ is durable, and must be fast: the new DAQ is
appended to the queue journal with one `fdatasync` (an append to an open file: no new inode, no
directory to sync) and its `daq.json` is written atomically but without syncing. Every later
change replaces `daq.json` with the one atomic-write helper (temp, fsync, rename, fsync of the
directory; the first one also syncs `daqs/`). A checkpoint thread makes the DAQs of a full
journal durable one by one and then deletes that journal; at start-up every journal is replayed
(a DAQ whose `daq.json` is missing is rebuilt from its line) and removed. All writes go through
one writer thread, so the writes of one DAQ land in the order they were made and the event loop
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from servers.common.atomic import atomic_write_bytes, fsync_directory
from servers.dpm.model import DaqRecord

log = logging.getLogger(__name__)

STATUS_FILE = "daq.json"
LOCK_FILE = ".lock"
JOURNAL_PREFIX = "queue-journal."
JOURNAL_CHECKPOINT_LINES = 1000


class WorkspaceBusy(RuntimeError):
    """Another server holds the workspace."""


def checked_dir_name(daq_id: str) -> str:
    """`daq_id` as a directory name; the specification pattern already guarantees this holds."""
    if not daq_id or "/" in daq_id or "\x00" in daq_id or daq_id.startswith("."):
        raise ValueError(f"DAQ id {daq_id!r} cannot be used as a directory name")
    return daq_id


@dataclass
class LoadedWorkspace:
    """What start-up finds: active records (queue order), and every id already used."""

    active: list[DaqRecord]
    archived: set[str]
    next_seq: int


class Workspace:
    """Persistence of DAQ records in the workspace directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.daqs = self.root / "daqs"
        self.archive_dir = self.root / "archive"
        self.products = self.root / "products"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpm-store")
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpm-checkpoint")
        self._lock_fd: int | None = None
        # Owned by the writer thread:
        self._journal_fd: int | None = None
        self._journal_number = 0
        self._journal_ids: list[str] = []
        self._unsettled: set[str] = set()  # DAQ directories whose entry in daqs/ is not synced

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock(self) -> None:
        """Take the workspace for this process; raise `WorkspaceBusy` if another server has it.

        An advisory `flock`, released by the kernel when the process dies (even by `kill -9`).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkspaceBusy(
                f"workspace {self.root} is in use by another daqif-dpm-server (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    # -- paths -------------------------------------------------------------------------------

    def daq_dir(self, daq_id: str) -> Path:
        return self.daqs / checked_dir_name(daq_id)

    def archived_dir(self, daq_id: str) -> Path:
        return self.archive_dir / checked_dir_name(daq_id)

    def product_dir(self, daq_id: str) -> Path:
        return self.products / checked_dir_name(daq_id)

    def sources_dir(self, daq_id: str) -> Path:
        return self.daq_dir(daq_id) / "sources"

    def merge_log(self, daq_id: str) -> Path:
        return self.daq_dir(daq_id) / "logs" / "merge.log"

    def read_archived(self, daq_id: str) -> DaqRecord:
        """The final record of an archived DAQ (`archive/<id>/daq.json`)."""
        raw = (self.archived_dir(daq_id) / STATUS_FILE).read_bytes()
        return DaqRecord.from_json(json.loads(raw))

    # -- start-up ----------------------------------------------------------------------------

    def load(self) -> LoadedWorkspace:
        """Create the layout if needed and read every DAQ; archived ones by name only."""
        self.lock()
        for directory in (self.daqs, self.archive_dir, self.products):
            directory.mkdir(parents=True, exist_ok=True)
        archived = set(os.listdir(self.archive_dir))
        active: list[DaqRecord] = []
        with os.scandir(self.daqs) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                record = self._read(Path(entry.path))
                if record is None:
                    continue
                if record.id in archived:
                    # Crashed between the final status write and the archive rename's
                    # cleanup: the archived copy is the truth.
                    shutil.rmtree(entry.path, ignore_errors=True)
                    continue
                active.append(record)
        known = {r.id for r in active} | archived
        for record in self._replay_journals(known):
            active.append(record)
        active.sort(key=lambda r: r.seq)
        next_seq = max((r.seq for r in active), default=0) + 1
        # Archived DAQs' sequence numbers are not needed: seq only orders the active queue.
        return LoadedWorkspace(active=active, archived=archived, next_seq=next_seq)

    def _read(self, directory: Path) -> DaqRecord | None:
        path = directory / STATUS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            # Queueing was interrupted: if QueueDaq replied, the journal rebuilds the DAQ.
            log.warning("removing %s: it has no %s", directory, STATUS_FILE)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        try:
            return DaqRecord.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            # Cannot happen with atomic writes unless someone edited the file; keep it for
            # the operator and move it aside so start-up is not blocked.
            aside = directory.with_name(f".unreadable-{directory.name}")
            log.error("cannot read %s (%s); moved aside to %s", path, exc, aside)
            os.replace(directory, aside)
            return None

    # -- writes (all on the writer thread) -----------------------------------------------------

    async def create(self, record: DaqRecord) -> None:
        """Make a new DAQ durable (journal line), and write its directory and status file."""
        data = _encode(record)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._create_sync, record.id, data)

    def _create_sync(self, daq_id: str, data: bytes) -> None:
        assert self._journal_fd is not None, "load() opens the journal"
        journal_end = os.lseek(self._journal_fd, 0, os.SEEK_END)
        directory = self.daq_dir(daq_id)
        try:
            written = os.write(self._journal_fd, data + b"\n")
            if written != len(data) + 1:
                raise OSError(errno.ENOSPC, "the queue journal line was written only in part")
            os.fdatasync(self._journal_fd)
            directory.mkdir()
            atomic_write_bytes(directory / STATUS_FILE, data, durable=False)
        except OSError:
            # A refused QueueDaq leaves nothing behind: neither a directory that would block
            # the id nor a journal line a restart would resurrect.
            os.ftruncate(self._journal_fd, journal_end)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._unsettled.add(daq_id)
        self._journal_ids.append(daq_id)
        if len(self._journal_ids) >= JOURNAL_CHECKPOINT_LINES:
            self._rotate_journal()

    async def save(self, record: DaqRecord) -> None:
        """Replace the DAQ's status file with the record as it is now (durably)."""
        data = _encode(record)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._save_sync, record.id, data)

    def _save_sync(self, daq_id: str, data: bytes) -> None:
        atomic_write_bytes(self.daq_dir(daq_id) / STATUS_FILE, data)
        if daq_id in self._unsettled:
            fsync_directory(self.daqs)
            self._unsettled.discard(daq_id)

    # -- the queue journal ---------------------------------------------------------------------

    def _journal_path(self, number: int) -> Path:
        return self.root / f"{JOURNAL_PREFIX}{number}"

    def _open_journal(self, number: int) -> None:
        self._journal_number = number
        self._journal_fd = os.open(self._journal_path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_directory(self.root)
        self._journal_ids = []

    def _rotate_journal(self) -> None:
        """Start a new journal; the checkpoint thread settles the old one's DAQs, then deletes it."""
        assert self._journal_fd is not None
        os.close(self._journal_fd)
        old_path, old_ids = self._journal_path(self._journal_number), self._journal_ids
        self._open_journal(self._journal_number + 1)
        self._unsettled.difference_update(old_ids)
        self._checkpointer.submit(self._checkpoint, old_path, old_ids)

    def _checkpoint(self, journal: Path, ids: list[str]) -> None:
        for daq_id in ids:
            directory = self.daq_dir(daq_id)
            try:
                fd = os.open(directory / STATUS_FILE, os.O_RDONLY)
            except FileNotFoundError:
                continue  # archived meanwhile: archiving is durable on its own
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                fsync_directory(directory)
        fsync_directory(self.daqs)
        os.unlink(journal)
        fsync_directory(self.root)

    def _replay_journals(self, known: set[str]) -> list[DaqRecord]:
        """DAQs of the journals that have no directory (yet); makes them durable, removes journals."""
        journals = sorted(
            (int(p.name.removeprefix(JOURNAL_PREFIX)), p)
            for p in self.root.glob(f"{JOURNAL_PREFIX}*")
            if p.name.removeprefix(JOURNAL_PREFIX).isdigit()
        )
        rebuilt: list[DaqRecord] = []
        for _, path in journals:
            for line in path.read_bytes().split(b"\n"):
                try:
                    record = DaqRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # the torn last line of a crash during an append: never acknowledged
                if record.id in known:
                    continue
                directory = self.daq_dir(record.id)
                directory.mkdir(exist_ok=True)
                atomic_write_bytes(directory / STATUS_FILE, line)
                known.add(record.id)
                rebuilt.append(record)
        if journals:
            fsync_directory(self.daqs)
            for _, path in journals:
                path.unlink()
        self._open_journal(journals[-1][0] + 1 if journals else 1)
        return rebuilt

    async def archive(self, record: DaqRecord) -> Path:
        """Move a final DAQ's directory to the archive (collected sources removed first)."""
        data = _encode(record)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._archive_sync, record.id, data)

    def _archive_sync(self, daq_id: str, data: bytes) -> Path:
        directory = self.daq_dir(daq_id)
        atomic_write_bytes(directory / STATUS_FILE, data)
        shutil.rmtree(directory / "sources", ignore_errors=True)
        target = self.archived_dir(daq_id)
        os.replace(directory, target)
        fsync_directory(self.archive_dir)
        fsync_directory(self.daqs)
        return target


def _encode(record: DaqRecord) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()
