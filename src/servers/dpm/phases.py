"""What a DAQ does in each substate: wait for storage, collect, merge, release, clean up.

Each phase does the work, records its outcome on the DAQ's record (per source, per receiver,
alerts, attempts) and persists it through the `commit` it was given; it answers whether the
step succeeded. It never changes the substate: `lifecycle.py` does, from the answer.

Alert ids: `storage` (WARNING, waiting in SCHEDULED for the free-space reserve, or in MERGING for
the product to fit above it), `collecting:<sourceName>`,
`merging`, `releasing:<receiverIndex>` (ERROR, the step failed) and `modified:<sourceName>`
(WARNING, a source changed after it was collected).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from daqif.spec import Location, Specification, load_specification
from servers.dpm import collect, release
from servers.dpm.config import DpmConfig
from servers.dpm.merge_launcher import MergeSetup
from servers.dpm.merge_runner import MergeRunner
from servers.dpm.model import DaqRecord, DaqStatusView, Severity, SourceRecord, StorageStatus, SubState
from servers.dpm.store import Workspace
from servers.dpm.transfer import TransferError

log = logging.getLogger(__name__)

STORAGE_ALERT = "storage"
MERGING_ALERT = "merging"


def collecting_alert(source_name: str) -> str:
    return f"collecting:{source_name}"


def modified_alert(source_name: str) -> str:
    return f"modified:{source_name}"


def releasing_alert(index: int) -> str:
    return f"releasing:{index}"


class ActiveDaq:
    """Runtime companion of an active DAQ's record: its driver, retry signal and caches."""

    def __init__(self, record: DaqRecord, spec: Specification | None = None) -> None:
        self.record = record
        self._spec = spec
        self.view: DaqStatusView = record.view()
        self.task: asyncio.Task[None] | None = None
        self.retry = asyncio.Event()
        self.waiting_for_retry = False
        self.has_slot = False
        self.abort_lock = asyncio.Lock()
        self.collected_here: set[str] = set()
        """Sources collected by this server run: the only collected copies a merge trusts."""

    @property
    def spec(self) -> Specification:
        # Parsed lazily: start-up with thousands of queued DAQs must not validate them all.
        if self._spec is None:
            self._spec = load_specification(self.record.specification)
        return self._spec

    def set_alert(self, alert_id: str, severity: Severity, description: str) -> None:
        self.record.set_alert(alert_id, severity, description)
        if severity is Severity.ERROR:
            log.warning("DAQ %s: %s: %s", self.record.id, alert_id, description)


Commit = Callable[[ActiveDaq], Awaitable[None]]


class Phases:
    """The work of SCHEDULED, COLLECTING, MERGING, RELEASING and ABORTING for one DPM."""

    def __init__(
        self,
        config: DpmConfig,
        workspace: Workspace,
        allowed_roots: Sequence[Path],
        runner: MergeRunner,
        commit: Commit,
    ) -> None:
        self.config = config
        self.workspace = workspace
        self._roots = allowed_roots
        self._confinement = collect.Confinement(allowed_roots, Path(workspace.root).resolve())
        self._runner = runner
        self._commit = commit
        self._transfers = asyncio.Semaphore(config.max_transfers)
        self._merges = asyncio.Semaphore(config.max_merges)

    def storage(self) -> StorageStatus:
        st = os.statvfs(self.workspace.root)
        return StorageStatus(
            path=str(self.workspace.root),
            capacity=st.f_blocks * st.f_frsize,
            free=st.f_bfree * st.f_frsize,
            available=st.f_bavail * st.f_frsize,
            timestamp=time.time(),
        )

    async def debug_delay(self, substate: SubState) -> None:
        seconds = self.config.debug_delay(substate)
        if seconds > 0:
            await asyncio.sleep(seconds)

    # -- SCHEDULED: the free-space reserve ---------------------------------------------------------

    async def wait_for_storage(self, daq: ActiveDaq, needed: int = 0) -> None:
        """Wait, with a WARNING `storage` alert, until `needed` bytes fit above the reserve.

        SCHEDULED waits for the reserve alone (`needed` 0); MERGING for the product
        (`needed` = the collected bytes, `product_bytes`). The alert is cleared when it fits.
        """
        reserve = self.config.free_space_reserve_bytes
        while True:
            available = self.storage().available  # one statvfs: not worth a thread hop
            if available - needed >= reserve:
                break
            if STORAGE_ALERT not in daq.record.alerts:
                what = f"the product may need {needed} bytes, " if needed else ""
                daq.set_alert(
                    STORAGE_ALERT,
                    Severity.WARNING,
                    f"waiting for free space: {what}{available} bytes available in {self.workspace.root}, "
                    f"reserve is {reserve} bytes",
                )
                await self._commit(daq)
            await asyncio.sleep(self.config.storage_report_interval_s)
        if STORAGE_ALERT in daq.record.alerts:
            daq.record.clear_alert(STORAGE_ALERT)
            await self._commit(daq)

    # -- COLLECTING ---------------------------------------------------------------------------------

    async def collect(self, daq: ActiveDaq) -> bool:
        """Collect every source not yet collected; True when all are."""
        r = daq.record
        await self.debug_delay(SubState.COLLECTING)
        collect.remove_stale_temps(self.workspace.sources_dir(r.id))  # a scandir of a small directory
        r.count_attempt("collect")
        locations = {s.source_name: s.location for s in daq.spec.file_sources}
        # A copy made by an earlier server run is never trusted (it was not fsynced): collect again.
        todo = [s for s in r.sources if not (s.source_name in daq.collected_here and _still_there(s))]
        persist = len(todo) > 1  # one source: its outcome is persisted with the move to MERGING
        results = await asyncio.gather(
            *(self._collect_one(daq, s, locations[s.source_name], persist) for s in todo)
        )
        return all(results)

    async def _collect_one(
        self, daq: ActiveDaq, source: SourceRecord, location: Location, persist: bool = True
    ) -> bool:
        """Collect one source; its outcome is persisted (with `persist`) so a restart can see it.

        A local source an earlier server run collected is collected again (its copy was not
        fsynced), and must still be what that run collected (same size and modification time):
        a collected source is a snapshot, so a source rewritten before the crash stops the DAQ
        with an ERROR alert instead of reaching the product. RetryMergeDaq then takes it as it is.
        """
        earlier = (
            (source.size, source.mtime_ns)
            if source.collected and source.size >= 0 and source.source_name not in daq.collected_here
            else None
        )
        destination = collect.collected_path(
            self.workspace.sources_dir(daq.record.id), source.source_name, daq.spec.product_format.suffix
        )
        async with self._transfers:
            try:
                done = await collect.collect_source(
                    location,
                    destination,
                    confinement=self._confinement,
                    rsync_command=self.config.rsync_command,
                    remote_shell=self.config.rsync_remote_shell,
                )
            except TransferError as exc:
                source.outcome = f"failed: {exc}"
                source.timestamp = time.time()
                daq.set_alert(collecting_alert(source.source_name), Severity.ERROR, str(exc))
                await self._commit(daq)
                return False
        if earlier is not None and earlier != (done.size, done.mtime_ns):
            change = collect.source_changed(location.path, *earlier) or f"source {location} changed"
            message = (
                f"{change}, before the server restarted: the product would not hold the bytes "
                "collected; RetryMergeDaq merges the source as it is now"
            )
            source.outcome = "failed: changed after it was collected"
            source.timestamp = time.time()
            daq.set_alert(collecting_alert(source.source_name), Severity.ERROR, message)
            await self._commit(daq)
            return False
        source.local_path = str(done.local_path)
        source.bytes = done.bytes
        source.outcome = done.outcome
        source.size = done.size
        source.mtime_ns = done.mtime_ns
        source.references = done.references
        source.reference_bytes = done.reference_bytes
        source.stored_bytes = done.stored_bytes
        source.timestamp = time.time()
        daq.record.clear_alert(collecting_alert(source.source_name))
        daq.collected_here.add(source.source_name)
        if persist:
            await self._commit(daq)
        return True

    # -- MERGING ------------------------------------------------------------------------------------

    def product_path(self, daq: ActiveDaq) -> Path:
        """Where the merge writes the product (`products/<id>/<fileId>.h5|.fits`), released from there."""
        return self.workspace.product_dir(daq.record.id) / daq.spec.product_name

    async def merge(self, daq: ActiveDaq) -> bool:
        """Merge the collected sources into the product; on success `record.result` is its path."""
        r = daq.record
        await self.debug_delay(SubState.MERGING)
        # A retry takes the sources as they are now; so does a restart, since collected copies are
        # not fsynced (those of an earlier server run may not hold what was collected).
        again = r.attempts.get("merge", 0) > 0 or any(
            s.source_name not in daq.collected_here for s in r.sources
        )
        if again:
            if not await self._collect_again(daq, persist=len(r.sources) > 1):
                return False
            # What a merge cut short by a crash left takes space the check below counts.
            await asyncio.to_thread(self._discard_partial_product, r)
        self._check_modified(daq)
        # Outside the merge slot: a product that does not fit must not hold up the others.
        await self.wait_for_storage(daq, product_bytes(r))
        daq_dir = self.workspace.daq_dir(r.id)
        product = self.product_path(daq)
        log_path = self.workspace.merge_log(r.id)
        spec_path = daq_dir / "specification.json"
        report = daq_dir / "merge-report.json"
        async with self._merges:
            r.count_attempt("merge")
            await self._commit(daq)  # the attempt is persisted (one cut short by a crash still counts)
            argv = [
                str(spec_path),
                "--root",
                str(daq_dir),
                "--outfile",
                str(product),
                "--report",
                str(report),
                # Collected copies are this attempt's own: every other attempt collects afresh.
                "--consume-collected",
                # Snapshots only: an original is never read by the merge (it may have changed).
                "--collected-only",
            ]
            argv += [f"--dictionary-dir={d}" for d in self.config.dictionary_dirs]
            # The attempt's files are made by the merge process before it merges (no hop to a
            # worker thread here: README "Cost per DAQ"): `products/<id>/` afresh, the
            # specification, the earlier report removed, the log header.
            setup = MergeSetup(
                output_dir=str(product.parent),
                spec_path=str(spec_path),
                specification=r.specification,
                header=f"=== merge attempt {r.attempts['merge']} at {_utc_now()} ===",
                remove=(str(report),),
            )
            failure = self._lacks_space_for_product(r)  # one statvfs: on the event loop
            if failure is None:
                failure = await self._run_merge(argv, log_path, setup)
        if failure is None and not product.is_file():  # one stat: on the event loop
            failure = f"the merge program exited 0 but did not write {product}"
        if failure is not None:
            # The merge removes its part file; one killed at the timeout cannot. Nothing half
            # written stays to take the space a retry needs.
            await asyncio.to_thread(self._discard_partial_product, r)
            daq.set_alert(MERGING_ALERT, Severity.ERROR, f"merge failed: {failure} (log: {log_path})")
            await self._commit(daq)
            return False
        r.result = str(product)
        r.clear_alert(MERGING_ALERT)
        for alert, message in _merge_alerts(report).items():  # a small file, just written: no hop
            daq.set_alert(alert, Severity.WARNING, message)  # e.g. unmerged:<sourceName>
        return True

    async def _run_merge(self, argv: list[str], log_path: Path, setup: MergeSetup) -> str | None:
        """Run the merge program within `merge_timeout_s`; None, or why it failed."""
        timeout = self.config.merge_timeout_s
        try:
            # At the timeout the run is cancelled, which kills the merge process.
            result = await asyncio.wait_for(self._runner.run(argv, log_path, setup), timeout)
        except TimeoutError:
            return f"timed out after {timeout:g} s (merge_timeout_s); the merge process was killed"
        except OSError as exc:
            return f"cannot start the merge program: {exc}"
        if result.returncode != 0:
            return result.last_error_line or f"exit {result.returncode}"
        return None

    def _lacks_space_for_product(self, record: DaqRecord) -> str | None:
        """Why the product no longer fits above the free-space reserve, or None.

        `merge` waited until it fitted; this is the check again inside the merge slot, for the
        space another merge or program took meanwhile (then ERROR `merging`). No partial product
        of this DAQ takes space then: a failed attempt's is discarded, and so is one a crash left.
        """
        needed = product_bytes(record)
        available = self.storage().available
        reserve = self.config.free_space_reserve_bytes
        if available - needed >= reserve:
            return None
        return (
            f"not enough space for the product: it may need {needed} bytes, {available} bytes are "
            f"available in {self.workspace.root} and the reserve is {reserve} bytes"
        )

    async def _collect_again(self, daq: ActiveDaq, persist: bool = True) -> bool:
        """Before a merge is retried (RetryMergeDaq, or a restart): collect every source afresh.

        A failed merge is often a source that was not ready; the retry takes it as it is now.
        """
        locations = {s.source_name: s.location for s in daq.spec.file_sources}
        for source in daq.record.sources:
            daq.record.clear_alert(modified_alert(source.source_name))
        results = await asyncio.gather(
            *(self._collect_one(daq, s, locations[s.source_name], persist) for s in daq.record.sources)
        )
        return all(results)

    def _check_modified(self, daq: ActiveDaq) -> None:
        for source in daq.record.sources:
            if not source.collected or source.size < 0:
                continue  # remote sources are not re-checked
            change = collect.source_changed(source.location, source.size, source.mtime_ns)
            if change is not None and modified_alert(source.source_name) not in daq.record.alerts:
                daq.set_alert(modified_alert(source.source_name), Severity.WARNING, change)

    def _discard_partial_product(self, record: DaqRecord) -> None:
        """Remove what an interrupted merge may have left: the product and its part file."""
        shutil.rmtree(self.workspace.product_dir(record.id), ignore_errors=True)

    # -- RELEASING ----------------------------------------------------------------------------------

    async def release(self, daq: ActiveDaq) -> bool:
        """Deliver the product to every receiver not yet released; True when all have it."""
        r = daq.record
        await self.debug_delay(SubState.RELEASING)
        product = Path(r.result)
        r.count_attempt("release")
        ok = True
        pending = [receiver for receiver in r.receivers if not receiver.released]
        for receiver in pending:
            spec_receiver = daq.spec.receivers[receiver.index]
            try:
                async with self._transfers:
                    if spec_receiver.host is None:
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
                daq.set_alert(releasing_alert(receiver.index), Severity.ERROR, str(exc))
                await self._commit(daq)
                continue
            receiver.outcome = done.outcome
            receiver.released_path = done.path
            receiver.timestamp = time.time()
            r.clear_alert(releasing_alert(receiver.index))
            if receiver is not pending[-1] or not ok:
                await self._commit(daq)  # persisted before the next receiver: never released twice
            # The last one, all released: persisted with COMPLETED (a restart before it finds the
            # receiver holding the product, which counts as released).
        return ok

    # -- ABORTING -----------------------------------------------------------------------------------

    def abort_cleanup(self, record: DaqRecord) -> None:
        """Remove collected sources, partial products and our temporary files in receivers.

        Receivers that already got the product keep it (it is complete); the workspace product
        is kept when a receiver holds a symlink to it. Raises `OSError` if a removal fails.
        """
        sources = self.workspace.sources_dir(record.id)
        if sources.exists():
            shutil.rmtree(sources)
        if not any(rr.outcome == "symlink" for rr in record.receivers):
            self._discard_partial_product(record)
        name = load_specification(record.specification).product_name
        for receiver in record.receivers:
            if not receiver.host:
                release.remove_stale_temp(receiver.path, name, self._roots)


def _merge_alerts(report: Path) -> dict[str, str]:
    """The WARNING alerts a successful merge reported (`daqif-dpm-merge --report`)."""
    try:
        alerts = json.loads(report.read_text("utf-8")).get("alerts", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in alerts.items()} if isinstance(alerts, dict) else {}


def product_bytes(record: DaqRecord) -> int:
    """The disk space the product is expected to take: that of the collected copies (sources and
    the files they refer to, `SourceRecord.stored_bytes`).

    The merge copies what was collected and unallocated storage stays unallocated, so this
    bounds the product, except where virtual datasets map the same data more than once (the
    merge then writes it once per mapping; a disk that fills during the merge is ERROR `merging`).
    A stopped direct-I/O write of a million frames is a file of a million frames' size with the
    blocks of the frames written: the product needs those blocks, not its size.
    """
    return sum(s.stored_bytes if s.stored_bytes >= 0 else s.bytes + s.reference_bytes for s in record.sources)


def _still_there(source: SourceRecord) -> bool:
    return collect.is_collected(Path(source.local_path), source.bytes)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
