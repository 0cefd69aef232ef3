"""The DAQ lifecycle: the one place where a DAQ changes substate.

    SCHEDULED → COLLECTING → MERGING → RELEASING → COMPLETED      (then archived)
    any of the non-final ones → ABORTING → ABORTED                (then archived)

Each active DAQ has one driver task (`_drive`) that runs the step of its current substate and
moves it on with `_transition`. A failed step raises an ERROR alert (`collecting:<sourceName>`,
`merging`, `releasing:<receiverIndex>`), gives back its active slot and waits for
`RetryMergeDaq`, which runs the step again; the alert is cleared when the step succeeds.
WARNING alerts do not stop a DAQ: `storage` (waiting in SCHEDULED for the free-space reserve)
and `modified:<sourceName>` (a source changed after it was collected).

Resource limits are semaphores: active DAQs (`max_active_daqs`, taken in queue order when a
DAQ leaves SCHEDULED), transfers and merges. Every change is persisted (`store.Workspace`)
before it is published, so after a crash each DAQ resumes from its persisted substate:
COLLECTING re-checks what was collected, MERGING discards any partial product and merges
again, RELEASING skips receivers already released (records are persisted after each release,
and a receiver already holding the product counts as released).

Abort (`abort`) is fail-fast: the driver is cancelled (killing a running merge or rsync), the
DAQ goes to ABORTING, its workspace files are cleaned up and it ends ABORTED. If the cleanup
fails the DAQ stays ABORTING with an ERROR alert `aborting`, and AbortDaq may be called again.
Completed and aborted DAQs are archived: their ids answer NOT_FOUND to every call (AbortDaq of
an archived id included), and QueueDaq of such an id answers ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from daqif.errors import DaqException
from daqif.spec import Hdf5FileSource, Location, Specification, SpecificationError, load_specification
from servers.common.atomic import fsync_directory
from servers.common.paths import PathNotAllowed, confine, resolve_roots
from servers.dpm import collect, merge_runner, release
from servers.dpm.config import DpmConfig
from servers.dpm.events import StatusBus, StatusWatcher
from servers.dpm.model import (
    Alert,
    DaqRecord,
    DaqStatusView,
    HistoryEntry,
    InternalStatus,
    ReleaseRecord,
    Severity,
    SourceRecord,
    StorageStatus,
    SubState,
)
from servers.dpm.store import Workspace
from servers.dpm.transfer import TransferError

log = logging.getLogger(__name__)

S = SubState
_NEXT: dict[SubState, frozenset[SubState]] = {
    S.SCHEDULED: frozenset({S.COLLECTING, S.ABORTING}),
    S.COLLECTING: frozenset({S.MERGING, S.ABORTING}),
    S.MERGING: frozenset({S.RELEASING, S.ABORTING}),
    S.RELEASING: frozenset({S.COMPLETED, S.ABORTING}),
    S.ABORTING: frozenset({S.ABORTED}),
    S.COMPLETED: frozenset(),
    S.ABORTED: frozenset(),
}

STORAGE_ALERT = "storage"
MERGING_ALERT = "merging"
ABORTING_ALERT = "aborting"
INTERNAL_ALERT = "internal"


def collecting_alert(source_name: str) -> str:
    return f"collecting:{source_name}"


def modified_alert(source_name: str) -> str:
    return f"modified:{source_name}"


def releasing_alert(index: int) -> str:
    return f"releasing:{index}"


class _Daq:
    """Runtime companion of an active DAQ's record: its driver, retry signal and caches."""

    def __init__(self, record: DaqRecord, spec: Specification | None = None) -> None:
        self.record = record
        self._spec = spec
        self.view = record.view()
        self.task: asyncio.Task[None] | None = None
        self.retry = asyncio.Event()
        self.waiting_for_retry = False
        self.has_slot = False
        self.abort_lock = asyncio.Lock()

    @property
    def spec(self) -> Specification:
        # Parsed lazily: start-up with thousands of queued DAQs must not validate them all.
        if self._spec is None:
            self._spec = load_specification(self.record.specification)
        return self._spec


class DataProductManager:
    """The transport-free DPM core: queue, lifecycle, status, storage."""

    def __init__(self, config: DpmConfig) -> None:
        self.config = config
        self.workspace = Workspace(config.workspace)
        self.bus = StatusBus(config.watch_queue_size)
        self._roots = resolve_roots(config.allowed_roots)
        self._workspace_resolved = Path(config.workspace).resolve()
        self._active: dict[str, _Daq] = {}
        self._archived: set[str] = set()
        self._reserved: set[str] = set()
        self._seq = itertools.count(1)
        self._slots = asyncio.Semaphore(config.max_active_daqs)
        self._transfers = asyncio.Semaphore(config.max_transfers)
        self._merges = asyncio.Semaphore(config.max_merges)

    # -- start / stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the index from the workspace and resume every active DAQ."""
        loaded = await asyncio.to_thread(self.workspace.load)
        # The merge fork server imports h5py & co. once, in the background (this only spawns it).
        merge_runner.warm_up()
        self._archived = loaded.archived
        self._seq = itertools.count(loaded.next_seq)
        for record in loaded.active:
            daq = _Daq(record)
            self._active[record.id] = daq
            self._start_driver(daq)
        log.info(
            "workspace %s: %d active DAQs resumed, %d archived",
            self.workspace.root,
            len(loaded.active),
            len(loaded.archived),
        )

    async def stop(self) -> None:
        """Stop every driver (their state is persisted; they resume at the next start)."""
        tasks = [d.task for d in self._active.values() if d.task is not None and not d.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.workspace.close()

    # -- commands ------------------------------------------------------------------------------

    async def queue(self, text: str) -> str:
        """Validate, persist durably, then schedule a DAQ; return its id."""
        try:
            spec = load_specification(text)
        except SpecificationError as exc:
            raise DaqException.invalid_argument(str(exc), id=_id_of(text)) from None
        except RecursionError:
            raise DaqException.invalid_argument("the specification is nested too deeply") from None
        self._check_paths(spec)
        if spec.id in self._active or spec.id in self._archived or spec.id in self._reserved:
            where = "is archived" if spec.id in self._archived else "is active"
            raise DaqException.already_exists(f"DAQ {spec.id} was queued before ({where})", id=spec.id)
        now = time.time()
        record = DaqRecord(
            id=spec.id,
            file_id=spec.file_id,
            seq=next(self._seq),
            specification=text,
            timestamp=now,
            sources=[SourceRecord(s.source_name, str(s.location)) for s in spec.hdf5_sources],
            receivers=[ReleaseRecord(i, r.path, r.host or "") for i, r in enumerate(spec.receivers)],
            history=[HistoryEntry(S.SCHEDULED, now, "queued")],
        )
        self._reserved.add(spec.id)
        try:
            await self.workspace.create(record)
        except OSError as exc:
            raise DaqException.internal(f"cannot persist DAQ {spec.id}: {exc}", id=spec.id) from None
        finally:
            self._reserved.discard(spec.id)
        daq = _Daq(record, spec)
        self._active[spec.id] = daq
        self.bus.publish(daq.view)
        self._start_driver(daq)
        return spec.id

    async def abort(self, daq_id: str) -> None:
        """Abort an active DAQ (fail-fast: raises INTERNAL and stays ABORTING if cleanup fails)."""
        daq = self._get(daq_id)
        async with daq.abort_lock:
            daq = self._get(daq_id)  # it may have been archived while we waited
            if daq.record.substate.is_final:
                raise DaqException.failed_precondition(
                    f"DAQ {daq_id} is already {daq.record.substate.value}", id=daq_id
                )
            task = daq.task
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait({task})
            if daq.record.substate is not S.ABORTING:
                # The failed steps will not run again: their conditions end with the abort.
                daq.record.alerts.clear()
                await self._transition(daq, S.ABORTING, "abort requested")
            await self._finish_abort(daq)

    async def retry(self, daq_id: str) -> None:
        """Unblock a DAQ waiting after a failed step; FAILED_PRECONDITION says why if it is not.

        The step's ERROR alerts are cleared now (the DAQ is no longer in error while the step
        runs again) and raised again if it fails again.
        """
        daq = self._get(daq_id)
        if not daq.waiting_for_retry:
            substate = daq.record.substate
            if substate is S.SCHEDULED:
                why = "has not started collecting yet"
            elif substate is S.ABORTING:
                why = "is being aborted; call AbortDaq again to retry the abort"
            else:
                why = "has no failed step to retry"
            raise DaqException.failed_precondition(f"DAQ {daq_id} is {substate.value} and {why}", id=daq_id)
        daq.waiting_for_retry = False
        r = daq.record
        for alert in [a for a in r.alerts.values() if a.severity is Severity.ERROR]:
            self._clear_alert(daq, alert.id)
        r.message = f"retrying {r.substate.value}"
        r.timestamp = time.time()
        daq.retry.set()
        await self._commit(daq)

    # -- queries -------------------------------------------------------------------------------

    def status(self, daq_id: str) -> DaqStatusView:
        return self._get(daq_id).view

    def active(self) -> list[DaqStatusView]:
        return [d.view for d in self._active.values()]

    def internal(self, daq_id: str) -> InternalStatus:
        daq = self._get(daq_id)
        r = daq.record
        return InternalStatus(
            status=daq.view,
            workspace=str(self.workspace.daq_dir(daq_id)),
            specification=r.specification,
            sources=tuple(r.sources),
            receivers=tuple(r.receivers),
            merge_log=str(self.workspace.merge_log(daq_id)),
            attempts=tuple(sorted(r.attempts.items())),
            history=tuple(r.history),
        )

    def watch(self, daq_id: str = "") -> StatusWatcher:
        """Subscribe to status changes; the current status of every matching active DAQ first."""
        if daq_id:
            current = [self._active[daq_id].view] if daq_id in self._active else []
        else:
            current = [d.view for d in self._active.values()]
        return self.bus.subscribe(daq_id, current)

    def storage(self) -> StorageStatus:
        st = os.statvfs(self.workspace.root)
        return StorageStatus(
            path=str(self.workspace.root),
            capacity=st.f_blocks * st.f_frsize,
            free=st.f_bfree * st.f_frsize,
            available=st.f_bavail * st.f_frsize,
            timestamp=time.time(),
        )

    def knows(self, daq_id: str) -> bool:
        return daq_id in self._active or daq_id in self._archived

    def _get(self, daq_id: str) -> _Daq:
        daq = self._active.get(daq_id)
        if daq is not None:
            return daq
        if daq_id in self._archived:
            raise DaqException.not_found(f"DAQ {daq_id} is archived (completed or aborted)", id=daq_id)
        raise DaqException.not_found(f"no DAQ with id {daq_id!r} was queued", id=daq_id)

    # -- validation at QueueDaq ------------------------------------------------------------------

    def _check_paths(self, spec: Specification) -> None:
        """Local source and receiver paths must lie under the allowed roots, outside the workspace."""
        for where, path in self._local_paths(spec):
            try:
                resolved = confine(path, self._roots, what="path")
            except PathNotAllowed as exc:
                raise DaqException.invalid_argument(f"{where}: {exc}", id=spec.id) from None
            if resolved == self._workspace_resolved or resolved.is_relative_to(self._workspace_resolved):
                raise DaqException.invalid_argument(
                    f"{where}: {path!r} lies inside the DPM workspace {self._workspace_resolved}", id=spec.id
                )

    @staticmethod
    def _local_paths(spec: Specification) -> Iterator[tuple[str, str]]:
        if spec.target_source is not None and not spec.target_source.location.is_remote:
            yield "target.source.location", spec.target_source.location.path
        for i, source in enumerate(spec.sources):
            if isinstance(source, Hdf5FileSource) and not source.location.is_remote:
                yield f"sources[{i}].location", source.location.path
        for i, receiver in enumerate(spec.receivers):
            if receiver.host is None:
                yield f"receivers[{i}].path", receiver.path

    # -- the substate machine --------------------------------------------------------------------

    async def _transition(self, daq: _Daq, new: SubState, message: str) -> None:
        """Move `daq` to `new`: record it, persist it, then publish it. The only substate change."""
        r = daq.record
        if new not in _NEXT[r.substate]:
            raise DaqException.internal(
                f"DAQ {r.id}: no transition from {r.substate.value} to {new.value}", id=r.id
            )
        now = time.time()
        r.substate = new
        r.message = message
        r.timestamp = now
        r.history.append(HistoryEntry(new, now, message))
        log.info("DAQ %s: %s (%s)", r.id, new.value, message)
        if new.is_final:
            await self._archive(daq)
        else:
            await self._commit(daq)

    async def _commit(self, daq: _Daq) -> None:
        """Persist the record, then publish the status if it changed."""
        try:
            await self.workspace.save(daq.record)
        except OSError as exc:
            raise DaqException.internal(
                f"cannot persist DAQ {daq.record.id}: {exc}", id=daq.record.id
            ) from None
        self._publish(daq)

    def _publish(self, daq: _Daq) -> None:
        view = daq.record.view()
        if view != daq.view:
            daq.view = view
            self.bus.publish(view)

    async def _archive(self, daq: _Daq) -> None:
        r = daq.record
        try:
            await self.workspace.archive(r)
        except OSError as exc:
            raise _persist_error(daq, exc) from None
        self._archived.add(r.id)
        self._active.pop(r.id, None)
        self._publish(daq)

    def _set_alert(self, daq: _Daq, alert_id: str, severity: Severity, description: str) -> None:
        r = daq.record
        r.alerts[alert_id] = Alert(alert_id, severity, description, time.time())
        r.timestamp = time.time()
        r.message = description
        if severity is Severity.ERROR:
            log.warning("DAQ %s: %s: %s", r.id, alert_id, description)

    def _clear_alert(self, daq: _Daq, alert_id: str) -> None:
        daq.record.alerts.pop(alert_id, None)

    def _count_attempt(self, daq: _Daq, step: str) -> None:
        daq.record.attempts[step] = daq.record.attempts.get(step, 0) + 1

    # -- drivers ---------------------------------------------------------------------------------

    def _start_driver(self, daq: _Daq) -> None:
        daq.task = asyncio.create_task(self._drive(daq), name=f"dpm-daq-{daq.record.id}")

    async def _drive(self, daq: _Daq) -> None:
        try:
            while True:
                try:
                    await self._run_lifecycle(daq)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A bug or a broken disk must neither go unnoticed nor kill the server:
                    # the DAQ waits with an alert, and RetryMergeDaq runs its step again.
                    log.exception(
                        "DAQ %s: unexpected failure in %s", daq.record.id, daq.record.substate.value
                    )
                    description = (
                        f"unexpected failure in {daq.record.substate.value}: {exc}; see the server log"
                    )
                    self._set_alert(daq, INTERNAL_ALERT, Severity.ERROR, description)
                    with contextlib.suppress(Exception):
                        await self._commit(daq)
                    await self._wait_for_retry(daq)
        finally:
            self._release_slot(daq)

    async def _run_lifecycle(self, daq: _Daq) -> None:
        r = daq.record
        self._clear_alert(daq, INTERNAL_ALERT)  # the step runs again: its outcome decides
        if r.substate is S.ABORTING:
            with contextlib.suppress(DaqException):
                await self._finish_abort(daq)
            return
        if r.substate.is_final:
            await self._archive(daq)
            return
        if r.substate is S.SCHEDULED:
            await self._debug_delay(S.SCHEDULED)
        await self._acquire_slot(daq)
        while not r.substate.is_final:
            if r.substate is S.SCHEDULED:
                await self._wait_for_storage(daq)
                await self._transition(daq, S.COLLECTING, f"collecting {len(r.sources)} sources")
            elif r.substate is S.COLLECTING:
                if await self._collect(daq):
                    await self._transition(daq, S.MERGING, "sources collected; merging")
                else:
                    await self._wait_for_retry(daq)
            elif r.substate is S.MERGING:
                if await self._merge(daq):
                    await self._transition(daq, S.RELEASING, f"merged {r.result}; releasing")
                else:
                    await self._wait_for_retry(daq)
            elif r.substate is S.RELEASING:
                if await self._release(daq):
                    await self._transition(daq, S.COMPLETED, f"released to {len(r.receivers)} receivers")
                else:
                    await self._wait_for_retry(daq)
            else:  # pragma: no cover - ABORTING is only entered by abort(), which stops this task
                return

    async def _acquire_slot(self, daq: _Daq) -> None:
        if not daq.has_slot:
            await self._slots.acquire()
            daq.has_slot = True

    def _release_slot(self, daq: _Daq) -> None:
        if daq.has_slot:
            daq.has_slot = False
            self._slots.release()

    async def _wait_for_retry(self, daq: _Daq) -> None:
        # A DAQ waiting for an operator must not block the queue behind it.
        self._release_slot(daq)
        daq.waiting_for_retry = True
        try:
            await daq.retry.wait()
        finally:
            daq.waiting_for_retry = False
        daq.retry.clear()
        await self._acquire_slot(daq)

    async def _debug_delay(self, substate: SubState) -> None:
        seconds = self.config.debug_delay(substate.value)
        if seconds > 0:
            await asyncio.sleep(seconds)

    # -- SCHEDULED: free-space reserve --------------------------------------------------------------

    async def _wait_for_storage(self, daq: _Daq) -> None:
        reserve = self.config.free_space_reserve_bytes
        while True:
            available = (await asyncio.to_thread(self.storage)).available
            if available >= reserve:
                break
            if STORAGE_ALERT not in daq.record.alerts:
                self._set_alert(
                    daq,
                    STORAGE_ALERT,
                    Severity.WARNING,
                    f"waiting for free space: {available} bytes available in {self.workspace.root}, "
                    f"reserve is {reserve} bytes",
                )
                await self._commit(daq)
            await asyncio.sleep(self.config.storage_report_interval_s)
        self._clear_alert(daq, STORAGE_ALERT)

    # -- COLLECTING -------------------------------------------------------------------------------

    async def _collect(self, daq: _Daq) -> bool:
        """Collect every source not yet collected; True when all are."""
        r = daq.record
        await self._debug_delay(S.COLLECTING)
        sources_dir = self.workspace.sources_dir(r.id)
        await asyncio.to_thread(collect.remove_stale_temps, sources_dir)
        self._count_attempt(daq, "collect")
        locations = {s.source_name: s.location for s in daq.spec.hdf5_sources}
        todo = [s for s in r.sources if not (s.collected and _still_there(s))]
        results = await asyncio.gather(*(self._collect_one(daq, s, locations[s.source_name]) for s in todo))
        return all(results)

    async def _collect_one(self, daq: _Daq, source: SourceRecord, location: Location) -> bool:
        destination = collect.collected_path(self.workspace.sources_dir(daq.record.id), source.source_name)
        async with self._transfers:
            try:
                done = await collect.collect_source(
                    location,
                    destination,
                    allowed_roots=self._roots,
                    rsync_command=self.config.rsync_command,
                    remote_shell=self.config.rsync_remote_shell,
                )
            except TransferError as exc:
                source.outcome = f"failed: {exc}"
                source.timestamp = time.time()
                self._set_alert(daq, collecting_alert(source.source_name), Severity.ERROR, str(exc))
                await self._commit(daq)
                return False
        source.local_path = str(done.local_path)
        source.bytes = done.bytes
        source.outcome = done.outcome
        source.size = done.size
        source.mtime_ns = done.mtime_ns
        source.timestamp = time.time()
        self._clear_alert(daq, collecting_alert(source.source_name))
        await self._commit(daq)
        return True

    # -- MERGING ----------------------------------------------------------------------------------

    async def _merge(self, daq: _Daq) -> bool:
        r = daq.record
        await self._debug_delay(S.MERGING)
        self._check_modified(daq)
        daq_dir = self.workspace.daq_dir(r.id)
        product = daq_dir / f"{r.file_id}.h5"
        log_path = self.workspace.merge_log(r.id)
        async with self._merges:
            await asyncio.to_thread(self._discard_partial_product, daq)
            self._count_attempt(daq, "merge")
            await self._commit(daq)  # an attempt cut short by a crash still counts
            spec_path = daq_dir / "specification.json"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(spec_path.write_text, r.specification, "utf-8")
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(f"=== merge attempt {r.attempts['merge']} at {_utc_now()} ===\n")
            argv = [str(spec_path), "--root", str(daq_dir), "--outfile", str(product)]
            failure: str | None = None
            try:
                result = await merge_runner.run_merge(argv, log_path)
            except OSError as exc:
                failure = f"cannot start the merge program: {exc}"
            else:
                failure = (
                    None
                    if result.returncode == 0
                    else (result.last_error_line or f"exit {result.returncode}")
                )
        if failure is None and not product.is_file():
            failure = f"the merge program exited 0 but did not write {product}"
        if failure is not None:
            self._set_alert(daq, MERGING_ALERT, Severity.ERROR, f"merge failed: {failure} (log: {log_path})")
            await self._commit(daq)
            return False
        r.result = await asyncio.to_thread(self._publish_product, r.id, product)
        self._clear_alert(daq, MERGING_ALERT)
        return True

    def _check_modified(self, daq: _Daq) -> None:
        for source in daq.record.sources:
            if not source.collected or source.size < 0:
                continue  # remote sources are not re-checked
            change = collect.source_changed(source.location, source.size, source.mtime_ns)
            if change is not None and modified_alert(source.source_name) not in daq.record.alerts:
                self._set_alert(daq, modified_alert(source.source_name), Severity.WARNING, change)

    def _discard_partial_product(self, daq: _Daq) -> None:
        """Remove what an interrupted merge may have left: the product and its temporary files."""
        r = daq.record
        name = f"{r.file_id}.h5"
        for entry in os.scandir(self.workspace.daq_dir(r.id)):
            if entry.name == name or entry.name.startswith(f".{name}"):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        shutil.rmtree(self.workspace.product_dir(r.id), ignore_errors=True)

    def _publish_product(self, daq_id: str, built: Path) -> str:
        target_dir = self.workspace.product_dir(daq_id)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / built.name
        os.replace(built, target)
        fsync_directory(target_dir)
        return str(target)

    # -- RELEASING --------------------------------------------------------------------------------

    async def _release(self, daq: _Daq) -> bool:
        r = daq.record
        await self._debug_delay(S.RELEASING)
        product = Path(r.result)
        self._count_attempt(daq, "release")
        ok = True
        for receiver in r.receivers:
            if receiver.released:
                continue
            spec_receiver = daq.spec.receivers[receiver.index]
            try:
                async with self._transfers:
                    if spec_receiver.host is None:
                        await asyncio.to_thread(
                            release.remove_stale_temp, receiver.path, product.name, self._roots
                        )
                        done = await release.release_local(
                            product, receiver.path, spec_receiver.allow_symlink, self._roots
                        )
                    else:
                        done = await release.release_remote(
                            product,
                            spec_receiver.host,
                            receiver.path,
                            self.config.rsync_command,
                            self.config.rsync_remote_shell,
                        )
            except TransferError as exc:
                ok = False
                receiver.outcome = f"failed: {exc}"
                receiver.timestamp = time.time()
                self._set_alert(daq, releasing_alert(receiver.index), Severity.ERROR, str(exc))
                await self._commit(daq)
                continue
            receiver.outcome = done.outcome
            receiver.released_path = done.path
            receiver.timestamp = time.time()
            self._clear_alert(daq, releasing_alert(receiver.index))
            await self._commit(daq)  # persisted before the next receiver: never released twice
        return ok

    # -- ABORTING ---------------------------------------------------------------------------------

    async def _finish_abort(self, daq: _Daq) -> None:
        try:
            await asyncio.to_thread(self._abort_cleanup, daq)
        except OSError as exc:
            message = f"abort cleanup failed: {exc}; call AbortDaq again to retry"
            self._set_alert(daq, ABORTING_ALERT, Severity.ERROR, message)
            await self._commit(daq)
            raise DaqException.internal(message, id=daq.record.id) from None
        self._clear_alert(daq, ABORTING_ALERT)
        await self._transition(daq, S.ABORTED, "aborted")

    def _abort_cleanup(self, daq: _Daq) -> None:
        """Remove collected sources, partial products and our temporary files in receivers.

        Receivers that already got the product keep it (it is complete); the workspace product
        is kept when a receiver holds a symlink to it.
        """
        r = daq.record
        daq_dir = self.workspace.daq_dir(r.id)
        if daq_dir.is_dir():
            if (daq_dir / "sources").exists():
                shutil.rmtree(daq_dir / "sources")
            self._discard_partial_product_keeping_links(daq)
        name = f"{r.file_id}.h5"
        for receiver in r.receivers:
            if not receiver.host:
                release.remove_stale_temp(receiver.path, name, self._roots)

    def _discard_partial_product_keeping_links(self, daq: _Daq) -> None:
        r = daq.record
        if any(rr.outcome == "symlink" for rr in r.receivers):
            return
        self._discard_partial_product(daq)


def _persist_error(daq: _Daq, exc: OSError) -> DaqException:
    return DaqException.internal(f"cannot persist DAQ {daq.record.id}: {exc}", id=daq.record.id)


def _still_there(source: SourceRecord) -> bool:
    try:
        return os.stat(source.local_path).st_size == source.bytes
    except OSError:
        return False


def _id_of(text: str) -> str:
    """The `id` of a specification that failed validation, if it has one (for the error)."""
    try:
        doc = json.loads(text)
    except (ValueError, TypeError):
        return ""
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
