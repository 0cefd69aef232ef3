"""The DAQ lifecycle: the one place where a DAQ changes substate.

    SCHEDULED → COLLECTING → MERGING → RELEASING → COMPLETED      (then archived)
    any of the non-final ones → ABORTING → ABORTED                (then archived)

Each active DAQ has one driver task (`_drive`) that runs the step of its current substate and
moves it on with `_transition`. A failed step raises an ERROR alert (`collecting:<sourceName>`,
`merging`, `releasing:<receiverIndex>`), gives back its active slot and waits for
`RetryMergeDaq`, which runs the step again; the alert is cleared when the step succeeds.
WARNING alerts do not stop a DAQ: `storage` (waiting in SCHEDULED for the free-space reserve, or
in MERGING until the product, as large as the collected sources, fits above it; the DAQ goes on
by itself when space returns) and `modified:<sourceName>` (a source changed after it was collected).

Resource limits are semaphores: active DAQs (`max_active_daqs`, taken in queue order when a
DAQ leaves SCHEDULED), transfers and merges. Every change is persisted (`store.Workspace`)
before it is published, so after a crash each DAQ resumes from its persisted substate:
COLLECTING and MERGING collect every source afresh (collected copies are not fsynced, so one
made before the crash is not trusted), MERGING discards any partial product and merges again,
RELEASING skips receivers already released (records are persisted after each release but the
last, which is persisted with COMPLETED, and a receiver already holding the product counts as
released).

Abort (`abort`) is fail-fast: the driver is cancelled (killing a running merge or rsync), the
DAQ goes to ABORTING, its workspace files are cleaned up and it ends ABORTED. If the cleanup
fails the DAQ stays ABORTING with an ERROR alert `aborting`, and AbortDaq may be called again.
Completed and aborted DAQs are archived: their ids answer NOT_FOUND to every call (AbortDaq of
an archived id included), and QueueDaq of such an id answers ALREADY_EXISTS.

SCHEDULED DAQs resumed at start-up (up to 50,000) wait in a backlog without a driver task each:
`_admit` takes an active slot for the next one at a time and starts its driver, and a DAQ
queued while the backlog is not empty joins it, so queue order holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from daqif.errors import DaqException, ErrorCode
from daqif.spec import (
    FitsFileSource,
    Hdf5FileSource,
    Specification,
    SpecificationError,
    load_specification,
)
from servers.common import roles
from servers.common.paths import PathNotAllowed, confine, resolve_roots
from servers.dpm import keyword_check, transfer
from servers.dpm.config import DpmConfig
from servers.dpm.events import StatusBus, StatusWatcher
from servers.dpm.merge_runner import LauncherMergeRunner, MergeRunner
from servers.dpm.model import (
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
from servers.dpm.phases import ActiveDaq, Phases
from servers.dpm.store import Workspace

log = logging.getLogger(__name__)

S = SubState
TRANSITIONS: dict[SubState, frozenset[SubState]] = {
    S.SCHEDULED: frozenset({S.COLLECTING, S.ABORTING}),
    S.COLLECTING: frozenset({S.MERGING, S.ABORTING}),
    S.MERGING: frozenset({S.RELEASING, S.ABORTING}),
    S.RELEASING: frozenset({S.COMPLETED, S.ABORTING}),
    S.ABORTING: frozenset({S.ABORTED}),
    S.COMPLETED: frozenset(),
    S.ABORTED: frozenset(),
}
"""The allowed substate changes; `check_transition` refuses every other."""

ABORTING_ALERT = "aborting"
OWNER = roles.owner_of_this_process("daqif-dpm-server")
_APART = "a writer could overwrite what the DPM makes there; give directories apart"
INTERNAL_ALERT = "internal"


def check_transition(daq_id: str, old: SubState, new: SubState) -> None:
    """Raise INTERNAL unless `TRANSITIONS` allows `old` → `new` (a bug if it does not)."""
    if new not in TRANSITIONS[old]:
        raise DaqException.internal(f"DAQ {daq_id}: no transition from {old.value} to {new.value}", id=daq_id)


class DataProductManager:
    """The transport-free DPM core: queue, lifecycle, status, storage."""

    def __init__(self, config: DpmConfig, merge_runner: MergeRunner | None = None) -> None:
        self.config = config
        self.workspace = Workspace(config.workspace)
        self.bus = StatusBus(config.watch_queue_size)
        self._roots = resolve_roots(config.allowed_roots)
        self._workspace_resolved = Path(config.workspace).resolve()
        self._receivers_apart: set[Path] = set()  # receiver directories marked by this run
        self._receiver_paths_marked: set[str] = set()  # their paths as QueueDaq got them
        self._active: dict[str, ActiveDaq] = {}
        self._archived: set[str] = set()
        self._reserved: set[str] = set()
        self._seq = itertools.count(1)
        self._slots = asyncio.Semaphore(config.max_active_daqs)
        # Resumed SCHEDULED DAQs waiting for an active slot, in queue order, without a driver task
        # each (50,000 tasks cost ~1 s of the event loop at start-up); `_admit` starts them.
        self._backlog: collections.deque[ActiveDaq] = collections.deque()
        self._admitter: asyncio.Task[None] | None = None
        self._runner = merge_runner if merge_runner is not None else LauncherMergeRunner()
        self._phases = Phases(config, self.workspace, self._roots, self._runner, self._commit)

    # -- start / stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the index from the workspace and resume every active DAQ."""
        loaded = await asyncio.to_thread(self.workspace.load)  # takes the workspace lock
        # A writer started by hand marked its roots: refuse a workspace it could overwrite.
        roles.refuse_overlap(self._workspace_resolved, "workspace", roles.Role.DPM_WORKSPACE, _APART)
        roles.mark_quietly(self._workspace_resolved, roles.Role.DPM_WORKSPACE, OWNER)  # a full disk too
        # Children of a server that died by kill -9 (rsync's own children outlive its death
        # signal) must not keep writing into the workspace we now own.
        for pid in transfer.kill_leftovers(self.workspace.root.resolve()):
            log.warning("killed pid %d, left running by the previous server on this workspace", pid)
        transfer.mark_children(self.workspace.root.resolve())
        # The merge launcher imports h5py & co. once, in the background (this only spawns it).
        self._runner.warm_up()
        self._archived = loaded.archived
        self._seq = itertools.count(loaded.next_seq)
        for record in loaded.active:
            daq = ActiveDaq(record)
            self._active[record.id] = daq
            if record.substate is S.SCHEDULED:
                self._backlog.append(daq)
            else:
                self._start_driver(daq)
        if self._backlog:
            self._admitter = asyncio.create_task(self._admit(), name="dpm-admit")
        log.info(
            "workspace %s: %d active DAQs resumed, %d archived",
            self.workspace.root,
            len(loaded.active),
            len(loaded.archived),
        )

    async def stop(self) -> None:
        """Stop every driver (their state is persisted; they resume at the next start)."""
        tasks = [d.task for d in self._active.values() if d.task is not None and not d.task.done()]
        if self._admitter is not None and not self._admitter.done():
            tasks.append(self._admitter)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._runner.close()
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
        keyword_check.check_cards(spec)
        if spec.keyword_dictionaries:  # files are read: off the event loop
            await asyncio.to_thread(keyword_check.check_keywords, spec, self.config.dictionary_dirs)
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
            sources=[SourceRecord(s.source_name, str(s.location)) for s in spec.file_sources],
            receivers=[ReleaseRecord(i, r.path, r.host or "") for i, r in enumerate(spec.receivers)],
            history=[HistoryEntry(S.SCHEDULED, now, "queued")],
        )
        self._reserved.add(spec.id)
        try:
            await self.workspace.create(record)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DaqException(
                    spec.id,
                    f"cannot persist DAQ {spec.id}: the workspace {self.workspace.root} is full; queue it "
                    "again when there is space",
                    ErrorCode.RESOURCE_EXHAUSTED,
                ) from None
            raise DaqException.internal(f"cannot persist DAQ {spec.id}: {exc}", id=spec.id) from None
        finally:
            self._reserved.discard(spec.id)
        self._mark_receivers(spec)
        daq = ActiveDaq(record, spec)
        self._active[spec.id] = daq
        self.bus.publish(daq.view)
        if self._backlog:
            self._backlog.append(daq)  # behind the resumed DAQs still waiting: queue order
        else:
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
            self._release_slot(daq)  # a driver cancelled before its first step never released it
            if daq.record.substate is not S.ABORTING:
                # The failed steps will not run again: their conditions end with the abort.
                daq.record.alerts.clear()
                await self._transition(daq, S.ABORTING, "abort requested")
            await self._finish_abort(daq)

    async def retry(self, daq_id: str) -> None:
        """Run the failed step of a DAQ again; FAILED_PRECONDITION says why if none failed.

        The step's ERROR alerts are cleared now (the DAQ is no longer in error while the step
        runs again) and raised again if it fails again. A retry asked for between the alert and
        the moment the DAQ parks (the alert is published first) is kept, not refused.
        """
        daq = self._get(daq_id)
        substate = daq.record.substate
        failed = daq.waiting_for_retry or (daq.record.has_error and substate is not S.ABORTING)
        if not failed:
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
            r.clear_alert(alert.id)
        r.message = f"retrying {r.substate.value}"
        r.timestamp = time.time()
        daq.retry.set()
        await self._commit(daq)

    # -- queries -------------------------------------------------------------------------------

    def status(self, daq_id: str, include_archived: bool = False) -> DaqStatusView:
        """The status of an active DAQ; with `include_archived`, also the final one of an archived DAQ."""
        if include_archived and daq_id not in self._active and daq_id in self._archived:
            try:
                record = self.workspace.read_archived(daq_id)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DaqException.internal(
                    f"cannot read the archived status of DAQ {daq_id}: {exc}", id=daq_id
                ) from None
            return record.view()
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
        """Subscribe to status changes; the current status of every matching active DAQ first.

        Watching one DAQ that is not active (never queued, or archived) raises NOT_FOUND at once.
        """
        current = [self._get(daq_id).view] if daq_id else [d.view for d in self._active.values()]
        return self.bus.subscribe(daq_id, current)

    def storage(self) -> StorageStatus:
        return self._phases.storage()

    def knows(self, daq_id: str) -> bool:
        return daq_id in self._active or daq_id in self._archived

    def _get(self, daq_id: str) -> ActiveDaq:
        daq = self._active.get(daq_id)
        if daq is not None:
            return daq
        if daq_id in self._archived:
            raise DaqException.not_found(f"DAQ {daq_id} is archived (completed or aborted)", id=daq_id)
        raise DaqException.not_found(f"no DAQ with id {daq_id!r} was queued", id=daq_id)

    # -- validation at QueueDaq ------------------------------------------------------------------

    def _check_paths(self, spec: Specification) -> None:
        """Local source and receiver paths must lie under the allowed roots, outside the workspace;
        receiver directories apart from every writer root (`servers.common.roles`)."""
        for where, path in self._local_paths(spec):
            try:
                resolved = confine(path, self._roots, what="path")
            except PathNotAllowed as exc:
                raise DaqException.invalid_argument(f"{where}: {exc}", id=spec.id) from None
            if resolved == self._workspace_resolved or resolved.is_relative_to(self._workspace_resolved):
                raise DaqException.invalid_argument(
                    f"{where}: {path!r} lies inside the DPM workspace {self._workspace_resolved}", id=spec.id
                )
            if where.startswith("receivers[") and resolved not in self._receivers_apart:
                try:
                    roles.refuse_overlap(resolved, "receiver directory", roles.Role.RECEIVER, _APART)
                except roles.RolesOverlap as exc:
                    raise DaqException.invalid_argument(f"{where}: {exc}", id=spec.id) from None

    def _mark_receivers(self, spec: Specification) -> None:
        """Mark the local receiver directories of an accepted DAQ, so that a writer started later
        refuses them (`servers.common.roles`); once per directory and server run."""
        for receiver in spec.receivers:
            if receiver.host is not None or receiver.path in self._receiver_paths_marked:
                continue  # a path already marked: not resolved again (each release marks it too)
            directory = Path(receiver.path).resolve()
            if directory not in self._receivers_apart and directory.is_dir():
                roles.mark_quietly(directory, roles.Role.RECEIVER, OWNER)
                self._receivers_apart.add(directory)
            if directory in self._receivers_apart:
                self._receiver_paths_marked.add(receiver.path)

    @staticmethod
    def _local_paths(spec: Specification) -> Iterator[tuple[str, str]]:
        if spec.target_source is not None and not spec.target_source.location.is_remote:
            yield "target.source.location", spec.target_source.location.path
        for i, source in enumerate(spec.sources):
            if isinstance(source, (Hdf5FileSource, FitsFileSource)) and not source.location.is_remote:
                yield f"sources[{i}].location", source.location.path
        for i, receiver in enumerate(spec.receivers):
            if receiver.host is None:
                yield f"receivers[{i}].path", receiver.path

    # -- the substate machine --------------------------------------------------------------------

    async def _transition(self, daq: ActiveDaq, new: SubState, message: str) -> None:
        """Move `daq` to `new`: record it, persist it, then publish it. The only substate change."""
        r = daq.record
        check_transition(r.id, r.substate, new)
        now = time.time()
        r.substate = new
        r.message = message
        r.timestamp = now
        r.history.append(HistoryEntry(new, now, message))
        if new.is_final:
            # One INFO line per DAQ, with the time spent in each substate (the history, which the
            # archived record keeps too); the steps in between are DEBUG: a line per step is a
            # write per step on the event loop (see README "Cost per DAQ").
            log.info("DAQ %s: %s (%s); %s", r.id, new.value, message, _durations(r.history))
            await self._archive(daq)
            return
        log.debug("DAQ %s: %s (%s)", r.id, new.value, message)
        await self._commit(daq)

    async def _commit(self, daq: ActiveDaq) -> None:
        """Persist the record, then publish the status if it changed."""
        try:
            await self.workspace.save(daq.record)
        except OSError as exc:
            raise DaqException.internal(
                f"cannot persist DAQ {daq.record.id}: {exc}", id=daq.record.id
            ) from None
        self._publish(daq)

    def _publish(self, daq: ActiveDaq) -> None:
        view = daq.record.view()
        if view != daq.view:
            daq.view = view
            self.bus.publish(view)

    async def _archive(self, daq: ActiveDaq) -> None:
        r = daq.record
        try:
            await self.workspace.archive(r)
        except OSError as exc:
            raise _persist_error(daq, exc) from None
        self._archived.add(r.id)
        self._active.pop(r.id, None)
        self._publish(daq)

    # -- drivers ---------------------------------------------------------------------------------

    def _start_driver(self, daq: ActiveDaq) -> None:
        daq.task = asyncio.create_task(self._drive(daq), name=f"dpm-daq-{daq.record.id}")

    async def _drive(self, daq: ActiveDaq) -> None:
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
                    daq.set_alert(INTERNAL_ALERT, Severity.ERROR, description)
                    with contextlib.suppress(Exception):
                        await self._commit(daq)
                    await self._wait_for_retry(daq)
        finally:
            self._release_slot(daq)

    async def _run_lifecycle(self, daq: ActiveDaq) -> None:
        r = daq.record
        r.clear_alert(INTERNAL_ALERT)  # the step runs again: its outcome decides
        if r.substate is S.ABORTING:
            with contextlib.suppress(DaqException):
                await self._finish_abort(daq)
            return
        if r.substate.is_final:
            await self._archive(daq)
            return
        if r.substate is S.SCHEDULED:
            await self._phases.debug_delay(S.SCHEDULED)
        await self._acquire_slot(daq)
        while not r.substate.is_final:
            if r.substate is S.SCHEDULED:
                await self._phases.wait_for_storage(daq)
                await self._transition(daq, S.COLLECTING, f"collecting {len(r.sources)} sources")
            elif r.substate is S.COLLECTING:
                if await self._phases.collect(daq):
                    await self._transition(daq, S.MERGING, "sources collected; merging")
                else:
                    await self._wait_for_retry(daq)
            elif r.substate is S.MERGING:
                if await self._phases.merge(daq):
                    await self._transition(daq, S.RELEASING, f"merged {r.result}; releasing")
                else:
                    await self._wait_for_retry(daq)
            elif r.substate is S.RELEASING:
                if await self._phases.release(daq):
                    await self._transition(daq, S.COMPLETED, f"released to {len(r.receivers)} receivers")
                else:
                    await self._wait_for_retry(daq)
            else:  # pragma: no cover - ABORTING is only entered by abort(), which stops this task
                return

    async def _admit(self) -> None:
        """Start the drivers of the backlog's DAQs one active slot at a time, in queue order.

        The slot is taken here and handed to the driver (`has_slot`); a DAQ aborted while it
        waited is skipped.
        """
        while self._backlog:
            await self._slots.acquire()
            while self._backlog:
                daq = self._backlog.popleft()
                r = daq.record
                if r.id in self._active and r.substate is S.SCHEDULED and daq.task is None:
                    daq.has_slot = True
                    self._start_driver(daq)
                    break
            else:
                self._slots.release()
        self._admitter = None

    async def _acquire_slot(self, daq: ActiveDaq) -> None:
        if not daq.has_slot:
            await self._slots.acquire()
            daq.has_slot = True

    def _release_slot(self, daq: ActiveDaq) -> None:
        if daq.has_slot:
            daq.has_slot = False
            self._slots.release()

    async def _wait_for_retry(self, daq: ActiveDaq) -> None:
        # A DAQ waiting for an operator must not block the queue behind it.
        self._release_slot(daq)
        daq.waiting_for_retry = True
        try:
            await daq.retry.wait()
        finally:
            daq.waiting_for_retry = False
        daq.retry.clear()
        await self._acquire_slot(daq)

    # -- ABORTING ---------------------------------------------------------------------------------

    async def _finish_abort(self, daq: ActiveDaq) -> None:
        try:
            await asyncio.to_thread(self._phases.abort_cleanup, daq.record)
        except OSError as exc:
            message = f"abort cleanup failed: {exc}; call AbortDaq again to retry"
            daq.set_alert(ABORTING_ALERT, Severity.ERROR, message)
            await self._commit(daq)
            raise DaqException.internal(message, id=daq.record.id) from None
        daq.record.clear_alert(ABORTING_ALERT)
        await self._transition(daq, S.ABORTED, "aborted")


def _persist_error(daq: ActiveDaq, exc: OSError) -> DaqException:
    return DaqException.internal(f"cannot persist DAQ {daq.record.id}: {exc}", id=daq.record.id)


def _id_of(text: str) -> str:
    """The `id` of a specification that failed validation, if it has one (for the error)."""
    try:
        doc = json.loads(text)
    except (ValueError, TypeError, RecursionError):  # a document nested too deeply to parse has no id
        return ""
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""


def _durations(history: list[HistoryEntry]) -> str:
    """`SCHEDULED 0.002 s, COLLECTING 0.004 s, …`: the time spent in each substate of `history`."""
    return ", ".join(
        f"{a.substate.value} {b.timestamp - a.timestamp:.3f} s" for a, b in itertools.pairwise(history)
    )
