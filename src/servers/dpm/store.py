"""The DPM workspace on disk: one directory per DAQ, a journal of every change, rebuilt at start-up.

Layout (under the workspace directory):

    .lock                         held (flock) by the server using the workspace
    journal.<n>                   every record change since the last checkpoint (one JSON line each)
    snapshot                      every active DAQ's record (status + specification + queue
                                  position) as of the last checkpoint: a header line, one line each
    .snapshot.tmp                 the snapshot being written (a leftover of a crash is ignored)
    daqs/<id>/sources/<name>.h5   collected sources
    daqs/<id>/specification.json  the specification handed to the merge program
    daqs/<id>/logs/merge.log      output of every merge attempt
    products/<id>/.<fileId>.h5.part   the product being built by the merge
    products/<id>/<fileId>.h5     the merged product (the DAQ's `result`), released from here
    archive/<id>/                 completed and aborted DAQs (daq.json, logs; sources removed)

The product lives outside the DAQ directory so that archiving (a rename of the DAQ directory)
never moves a file a receiver may hold a symlink to.

Durability: group commit. No change is acknowledged (QueueDaq reply, published status) before
it is durable, and a change costs no fsync of its own: every change (create, save, archive) is
the whole record as one line of the journal. One writer thread takes every change queued
meanwhile, appends them in one `write` and makes them durable with one `fdatasync` (an append to
an open file: no new inode, no directory to sync), answers the batch's other changes, then moves
archived directories (a rename, not synced: the journal holds the state) and answers the
archives; each answer is one wake-up of the caller's event loop for the whole batch (`_answer`),
never one per change. Under load a batch holds the changes of many DAQs, so the cost per DAQ
falls as the load rises. An active DAQ has no status file of its own (a rename over an existing
file makes ext4 flush it at once, and start-up would read 50,000 small files): the checkpoint
writes every active record into one snapshot. An archived DAQ's final `daq.json` is written when
it is archived (as a new file), so `read_archived` reads it at once. A new DAQ's directory is
created before its line: a full disk refuses the QueueDaq alone (the journal is truncated back,
the directory removed), and a directory that neither the snapshot nor a journal names (a crash
before the line was durable) is removed at start-up.

Checkpoint: when a journal holds `JOURNAL_CHECKPOINT_LINES` lines, a new one is started, and a
checkpoint thread writes the snapshot: the latest durable line of every active DAQ (the store
keeps them, `_latest`), under a header naming the newest journal it holds (`{"snapshot_of_
journals_up_to": n, "records": N}`), as `.snapshot.tmp`, fsync'd, renamed over `snapshot`, the
directory fsync'd. It then makes the archived DAQs that journal names durable in their files
(one `syncfs` of the workspace's file system, per-file fsyncs where there is none) and deletes
the journals up to n. The journals stay the truth until then: a crash (`kill -9`, power cut) at
any point leaves the old snapshot with every journal after it, or the new one; a record in the
snapshot may be newer than journal n (its line is in a newer journal, replayed after it: the
last line of a DAQ wins either way). Memory: the lines of the active DAQs (~550 bytes each,
27 MB at 50,000).

Start-up (`load`): one sequential read of the snapshot (one `orjson` parse of all its lines),
then the journals after it replayed in order (the last line of a DAQ is its state: a final one
is moved to `archive/`), and the journals handed to the checkpoint thread, so start-up waits for
no fsync; journals that hold no complete line are deleted. Directory names are compared as sets
(`daqs/`, `archive/`). A workspace of an earlier version (no snapshot, one `daqs/<id>/daq.json`
per active DAQ) is read from its status files once; the first checkpoint writes the snapshot and
deletes them. A snapshot that does not read as the checkpoint writes it (someone edited it)
stops the start (`SnapshotUnreadable`, naming the file): it is left for the operator. An archive
move that fails after its line is durable (a full disk) is tried again at every batch; journals
are not rotated until it succeeds, so the journal keeps the state meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from servers.common.atomic import atomic_output, fsync_directory, fsync_file
from servers.dpm.model import DaqRecord

log = logging.getLogger(__name__)

STATUS_FILE = "daq.json"
SNAPSHOT_FILE = "snapshot"
SNAPSHOT_TEMP = ".snapshot.tmp"
LOCK_FILE = ".lock"
JOURNAL_PREFIX = "journal."
JOURNAL_CHECKPOINT_LINES = 4096
_READERS = 16
_LIBC = ctypes.CDLL(None, use_errno=True)


class WorkspaceBusy(RuntimeError):
    """Another server holds the workspace."""


class SnapshotUnreadable(OSError):
    """The snapshot file cannot be read as the checkpoint writes it (someone changed it)."""


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


@dataclass
class StoreCounters:
    """What the store did to the disk (read by tests and `tools/bench_dpm.py`)."""

    changes: int = 0
    """Record changes made durable (creates, saves, archives)."""
    batches: int = 0
    """Group commits: one journal append and one `fdatasync` each."""
    fsyncs: int = 0
    """`fsync`/`fdatasync` calls on the event path (checkpoints not counted: see `checkpoint_fsyncs`)."""
    renames: int = 0
    """Renames of status files and directories."""
    checkpoint_fsyncs: int = 0
    """`fsync` calls of the checkpoint thread (in the background)."""


@dataclass
class _Snapshot:
    journal: int
    """The snapshot holds every change of the journals numbered up to this one."""
    records: dict[str, tuple[bytes, dict[str, Any]]]
    """Each active DAQ's record: its line, parsed."""


@dataclass
class _Change:
    daq_id: str
    data: bytes
    kind: str  # "create", "save" or "archive"
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]  # of `loop`: answered there (`_resolve`)
    error: BaseException | None = None
    answered: bool = False  # handed to `_answer` (writer thread only)

    def fail(self, error: BaseException) -> None:
        self.error = error


class Workspace:
    """Persistence of DAQ records in the workspace directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.daqs = self.root / "daqs"
        self.archive_dir = self.root / "archive"
        self.products = self.root / "products"
        self.counters = StoreCounters()
        self._changes: queue.SimpleQueue[_Change | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpm-checkpoint")
        self._lock_fd: int | None = None
        # Owned by the writer thread:
        self._journal_fd: int | None = None
        self._journal_number = 0
        self._journal_lines = 0
        self._journal_ids: set[str] = set()
        self._stale: dict[str, _Change] = {}  # durable archives whose move is not done yet
        self._latest: dict[str, bytes] = {}  # active DAQ -> its latest durable record (the snapshot's source)
        self._status_files: list[Path] = []  # status files of active DAQs, read once if there is no snapshot
        self._files_lock = threading.Lock()  # the writer's archive moves vs the checkpoint's writes

    def close(self) -> None:
        if self._writer is not None:
            self._changes.put(None)
            self._writer.join()
            self._writer = None
        self._checkpointer.shutdown(wait=True)
        c = self.counters
        log.info(
            "store: %d changes in %d group commits (fdatasync); %d renames; %d checkpoint fsyncs",
            c.changes,
            c.batches,
            c.renames,
            c.checkpoint_fsyncs,
        )
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
        """Create the layout if needed, read the snapshot (archived DAQs by name only), replay the journals.

        A workspace without a snapshot (made by an earlier version) is read from its status files.
        """
        self.lock()
        for directory in (self.daqs, self.archive_dir, self.products):
            directory.mkdir(parents=True, exist_ok=True)
        snapshot = self._read_snapshot()
        journals = self._journals()
        covered = [p for n, p in journals if snapshot is not None and n <= snapshot.journal]
        journals = [(n, p) for n, p in journals if snapshot is None or n > snapshot.journal]
        last = _last_lines(journals)
        archived = set(os.listdir(self.archive_dir))
        known = snapshot.records if snapshot is not None else {}
        # Set operations on the names (50,000 at scale), not a Python loop over directory entries.
        present = {name for name in os.listdir(self.daqs) if not name.startswith(".")}
        unknown = present - last.keys() - known.keys()
        # Crashed between the final status write and the archive rename's cleanup: the archived
        # copy is the truth.
        for name in unknown & archived:
            shutil.rmtree(self.daqs / name, ignore_errors=True)
        unknown -= archived
        directories = [self.daqs / name for name in sorted(unknown)]
        if snapshot is not None:
            # Neither in the snapshot nor in a newer journal: its QueueDaq never became durable.
            for directory in directories:
                log.warning("removing %s: no durable record names it", directory)
                shutil.rmtree(directory, ignore_errors=True)
        active: dict[str, DaqRecord] = {}
        if snapshot is not None:
            for daq_id, (line, raw) in known.items():
                if daq_id in last or daq_id in archived:
                    continue  # a journal holds a newer state
                if daq_id not in present:
                    self.daq_dir(daq_id).mkdir()
                active[daq_id] = DaqRecord.from_json(raw)
                self._latest[daq_id] = line
        else:
            # Many reads in flight: a cold page cache answers them together, not one by one.
            with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="dpm-load") as readers:
                for loaded in readers.map(self._read, directories):
                    if loaded is not None:
                        active[loaded.id] = loaded
                        self._latest[loaded.id] = _encode(loaded)
                        self._status_files.append(self.daq_dir(loaded.id) / STATUS_FILE)
        self._replay(last, active, archived, present)
        number = journals[-1][0] + 1 if journals else (snapshot.journal + 1 if snapshot is not None else 1)
        self._open_journal(number)
        if last or covered or self._status_files:
            replayed = covered + [p for _, p in journals]
            self._checkpointer.submit(self._checkpoint, replayed, set(last), number - 1)
        else:
            for _, path in journals:  # empty, or a torn line never acknowledged: nothing to keep
                os.unlink(path)
        ordered = sorted(active.values(), key=lambda r: r.seq)
        next_seq = max((r.seq for r in ordered), default=0) + 1
        # Archived DAQs' sequence numbers are not needed: seq only orders the active queue.
        self._writer = threading.Thread(target=self._write_loop, name="dpm-store", daemon=True)
        self._writer.start()
        return LoadedWorkspace(active=ordered, archived=archived, next_seq=next_seq)

    def _read_snapshot(self) -> _Snapshot | None:
        """The snapshot file, if there is one: the last complete state the checkpoint wrote."""
        try:
            data = (self.root / SNAPSHOT_FILE).read_bytes()
        except FileNotFoundError:
            return None
        header, _, body = data.partition(b"\n")
        try:
            meta = json.loads(header)
            journal, count = int(meta["snapshot_of_journals_up_to"]), int(meta["records"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotUnreadable(f"{self.root / SNAPSHOT_FILE}: header {header[:200]!r}: {exc}") from None
        lines = body.split(b"\n") if body else []
        try:
            parsed = orjson.loads(b"[" + b",".join(lines) + b"]")
            if len(parsed) != count:
                raise ValueError(f"the header says {count} records, the file holds {len(parsed)}")
            records = {str(raw["id"]): (line, raw) for line, raw in zip(lines, parsed, strict=True)}
        except (ValueError, KeyError, TypeError) as exc:
            # Written whole, fsync'd, then renamed: only someone editing it makes it unreadable.
            raise SnapshotUnreadable(f"{self.root / SNAPSHOT_FILE}: {exc}") from None
        return _Snapshot(journal, records)

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

    def _journals(self) -> list[tuple[int, Path]]:
        return sorted(
            (int(p.name.removeprefix(JOURNAL_PREFIX)), p)
            for p in self.root.glob(f"{JOURNAL_PREFIX}*")
            if p.name.removeprefix(JOURNAL_PREFIX).isdigit()
        )

    def _replay(
        self,
        last: dict[str, tuple[bytes, dict[str, Any]]],
        active: dict[str, DaqRecord],
        archived: set[str],
        present: set[str],
    ) -> None:
        """Apply the last journal line of each DAQ: archive the final ones, others wait for the checkpoint."""
        for daq_id, (line, parsed) in last.items():
            record = DaqRecord.from_json(parsed)
            if record.substate.is_final:
                active.pop(daq_id, None)
                self._archive_files(daq_id, line)
                archived.add(daq_id)
            else:
                if daq_id not in present:
                    self.daq_dir(daq_id).mkdir()
                self._latest[daq_id] = line  # its status file is written by the checkpoint
                active[daq_id] = record

    # -- writes: group commit on the writer thread ---------------------------------------------

    async def create(self, record: DaqRecord) -> None:
        """Make a new DAQ durable (its journal line) and create its directory."""
        await self._submit(record.id, _encode(record), "create")

    async def save(self, record: DaqRecord) -> None:
        """Make the record as it is now durable (its status file follows at the next checkpoint)."""
        await self._submit(record.id, _encode(record), "save")

    async def archive(self, record: DaqRecord) -> Path:
        """Make a final record durable; move the DAQ's directory to the archive (sources removed)."""
        await self._submit(record.id, _encode(record), "archive")
        return self.archived_dir(record.id)

    async def _submit(self, daq_id: str, data: bytes, kind: str) -> None:
        loop = asyncio.get_running_loop()
        change = _Change(daq_id, data, kind, loop, loop.create_future())
        self._changes.put(change)
        await change.future

    @staticmethod
    def _answer(changes: list[_Change]) -> None:
        """Answer `changes` (writer thread): one wake-up of each caller's loop for all of them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Change]] = {}
        for change in changes:
            if not change.answered:
                change.answered = True
                by_loop.setdefault(change.loop, []).append(change)
        for loop, answered in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, answered)

    def _write_loop(self) -> None:
        while True:
            first = self._changes.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while not stopping:
                try:
                    change = self._changes.get_nowait()
                except queue.Empty:
                    break
                if change is None:
                    stopping = True
                else:
                    batch.append(change)
            try:
                self._commit(batch)
            except BaseException as exc:  # never leave a caller waiting
                for change in batch:
                    if not change.answered and change.error is None:
                        change.fail(exc)
                log.exception("store writer: unexpected failure")
            self._answer(batch)  # those not answered yet
            if stopping:
                return

    def _commit(self, batch: list[_Change]) -> None:
        """One group commit: new directories, one journal append + fdatasync, then the archive moves."""
        ready = [c for c in batch if c.kind != "create" or self._prepare_create(c)]
        if not ready:
            return
        assert self._journal_fd is not None, "load() opens the journal"
        journal_end = os.lseek(self._journal_fd, 0, os.SEEK_END)
        payload = b"".join(c.data + b"\n" for c in ready)
        try:
            written = os.write(self._journal_fd, payload)
            if written != len(payload):
                raise OSError(errno.ENOSPC, "the journal lines were written only in part")
            os.fdatasync(self._journal_fd)
        except OSError as exc:
            # Refused changes leave nothing behind: neither a line a restart would resurrect nor a
            # new directory that would block the id.
            os.ftruncate(self._journal_fd, journal_end)
            for change in ready:
                if change.kind == "create":
                    shutil.rmtree(self.daq_dir(change.daq_id), ignore_errors=True)
                change.fail(exc)
            return
        self.counters.batches += 1
        self.counters.fsyncs += 1
        self.counters.changes += len(ready)
        self._journal_lines += len(ready)
        with self._files_lock:
            for change in ready:
                self._journal_ids.add(change.daq_id)
                if change.kind == "archive":
                    self._latest.pop(change.daq_id, None)
                    self._stale[change.daq_id] = change
                else:
                    self._latest[change.daq_id] = change.data
        # Durable: answered now, not after the archive moves below (an archive is answered once
        # its directory is in `archive/`, where `read_archived` finds it).
        self._answer([c for c in ready if c.kind != "archive"])
        with self._files_lock:
            for change in list(self._stale.values()):
                try:
                    self.counters.renames += self._archive_files(change.daq_id, change.data)
                    del self._stale[change.daq_id]
                except OSError as exc:
                    log.warning("DAQ %s: not archived yet (%s); the journal holds it", change.daq_id, exc)
        self._answer(ready)
        if self._journal_lines >= JOURNAL_CHECKPOINT_LINES and not self._stale:
            self._rotate_journal()

    def _prepare_create(self, change: _Change) -> bool:
        """Create a new DAQ's directory before its line is written; False (and answered) if refused."""
        try:
            self.daq_dir(change.daq_id).mkdir()
        except OSError as exc:
            change.fail(exc)
            return False
        return True

    def _archive_files(self, daq_id: str, data: bytes) -> int:
        """Put a final record's directory in the archive (idempotent); return the renames made.

        The final status file is written as a new file (not renamed over the old one, which
        ext4 would flush at once): the journal holds it until the checkpoint syncs it.
        """
        directory, target = self.daq_dir(daq_id), self.archived_dir(daq_id)
        if directory.is_dir() and not target.exists():
            shutil.rmtree(directory / "sources", ignore_errors=True)
            _write_new(directory / STATUS_FILE, data)
            os.replace(directory, target)
            return 1
        target.mkdir(exist_ok=True)
        _write_new(target / STATUS_FILE, data)
        shutil.rmtree(directory, ignore_errors=True)
        return 0

    # -- the journal and its checkpoint ----------------------------------------------------------

    def _journal_path(self, number: int) -> Path:
        return self.root / f"{JOURNAL_PREFIX}{number}"

    def _open_journal(self, number: int) -> None:
        self._journal_number = number
        self._journal_fd = os.open(self._journal_path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_directory(self.root)
        self._journal_lines = 0
        self._journal_ids = set()

    def _rotate_journal(self) -> None:
        """Start a new journal; the checkpoint thread writes the old one's DAQs durably, then deletes it."""
        assert self._journal_fd is not None
        os.close(self._journal_fd)
        old_number, old_ids = self._journal_number, self._journal_ids
        self._open_journal(old_number + 1)
        self._checkpointer.submit(self._checkpoint, [self._journal_path(old_number)], old_ids, old_number)

    def _checkpoint(self, journals: list[Path], ids: set[str], up_to: int) -> None:
        """Write the snapshot (every active DAQ's latest durable record), make the archived DAQs named
        in `journals` durable in their files, then delete `journals` (numbered up to `up_to`).

        The snapshot may hold states newer than journal `up_to` (they are durable in a newer journal,
        which start-up replays after it: the last line of a DAQ wins either way). It is written as
        `.snapshot.tmp`, fsync'd and renamed over the old one: a crash at any point leaves the old
        snapshot and every journal it does not hold, or the new one.
        """
        with self._files_lock:  # the writer changes `_latest` under it
            lines = list(self._latest.values())
            archived = [self.archived_dir(daq_id) for daq_id in ids if daq_id not in self._latest]
        header = json.dumps({"snapshot_of_journals_up_to": up_to, "records": len(lines)}).encode()
        with atomic_output(self.root / SNAPSHOT_FILE, temp_name=SNAPSHOT_TEMP) as tmp, open(tmp, "xb") as out:
            out.write(b"\n".join([header, *lines]))
        self.counters.checkpoint_fsyncs += 2
        if not archived:
            pass  # nothing but the snapshot to make durable
        elif _syncfs(self.root):  # one call for thousands of small files (and their directories)
            self.counters.checkpoint_fsyncs += 1
        else:
            for directory in archived:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    # Not archived after all (a move still to be tried): its state is in the snapshot.
                    fsync_file(directory / STATUS_FILE)
                    fsync_directory(directory)
                    self.counters.checkpoint_fsyncs += 2
            fsync_directory(self.archive_dir)
            fsync_directory(self.daqs)
        for journal in journals:
            os.unlink(journal)
        fsync_directory(self.root)
        self.counters.checkpoint_fsyncs += 1
        # A workspace of an earlier version: its active DAQs' status files are stale from now on.
        status_files, self._status_files = self._status_files, []
        for path in status_files:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)


def _resolve(changes: list[_Change]) -> None:
    """On the callers' loop: settle each change's future (unless its caller gave up waiting)."""
    for change in changes:
        if change.future.done():
            continue
        if change.error is not None:
            change.future.set_exception(change.error)
        else:
            change.future.set_result(None)


def _last_lines(journals: list[tuple[int, Path]]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """The last complete line of each DAQ in `journals` (read in order), and its parsed record."""
    last: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for _, path in journals:
        for line in path.read_bytes().split(b"\n"):
            # A torn last line (a crash during an append) was never acknowledged.
            with contextlib.suppress(ValueError, KeyError, TypeError):
                parsed = orjson.loads(line)
                last[str(parsed["id"])] = (line, parsed)
    return last


def _syncfs(directory: Path) -> bool:
    """`syncfs(2)` of the file system holding `directory`: True if it is done (Linux)."""
    syncfs = getattr(_LIBC, "syncfs", None)
    if syncfs is None:
        return False
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(syncfs(fd) == 0)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    """Write `path` afresh (removed first): a new inode, no rename over an existing file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(path, "xb") as handle:
        handle.write(data)


def _encode(record: DaqRecord) -> bytes:
    """`record` as one journal line: the bytes of `json.dumps(..., separators=(",", ":"))`.

    Made by orjson (~15 µs against ~55 µs for a small DAQ's record, six times per DAQ on the event
    loop), which writes the same bytes for ASCII text and for the records' numbers (ints, and
    floats that are 0.0 or `time.time()` values: both write the shortest repr); text that json
    escapes and orjson does not (non-ASCII, DEL) goes through json, so the lines stay as they were.
    """
    data = orjson.dumps(record.to_json())
    if data.isascii() and b"\x7f" not in data:
        return data
    return json.dumps(record.to_json(), separators=(",", ":")).encode()
