"""The writer's control plane: one data path, one acquisition at a time, its logs, stats and config.

Transport-free: the REST (`rest.py`), gRPC (`grpc_service.py`) and Redis (`redis_streams.py`)
adapters call `WriterCore` and subscribe to its events; they only translate. Every refusal is a
`DaqException` raised here, mapped once at each edge (REST: HTTP 200 `status: "error"`; gRPC: a
canonical code with rich details).

The data path runs in its own process behind `DataPathHandle`; its blocking calls run in worker
threads so the asyncio loop that serves REST and gRPC never waits on HDF5 or ZeroMQ.

Every change of the writer's or the acquisition's state goes through `WriterCore._transition`,
checked against the table in `states.py`:
- `start`/`stop`: UNKNOWN → READY once a data path process is up (a restart passes via UNKNOWN);
- `start_write`: READY → WRITING, a new acquisition WAITING_IMAGES once the file is open (or a new
  FAILED one when it cannot be opened);
- `_poll_write`: the acquisition follows the data path's phase (looked at 10 times a second,
  and at once when the data path says a write ended: the end is pushed,
  `DataPathHandle.on_change`), and ends FINISHED ("Completed."/"Interrupted.") or FAILED
  ("ERROR: …") with the writer back to READY, or UNKNOWN when the data path process died;
- `stop`: interrupts a write (FINISHED "Interrupted.") and resets UNKNOWN → READY; given the
  `output_file` of a write, only that write (another client's running write is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from daqif.errors import MAX_QUOTE_CHARS, DaqException, ErrorCode, bounded, quote
from servers.common import roles
from servers.common.atomic import atomic_write_json
from servers.common.paths import PathNotAllowed, confine
from servers.writer.datapath.api import (
    DataPathError,
    DataPathHandle,
    FrameCounters,
    WriteJob,
    WritePhase,
    WriteProgress,
    WriteResult,
)
from servers.writer.events import (
    AcquisitionLogged,
    ConfigChanged,
    EventHub,
    StatusChanged,
    Tick,
    WriterEvent,
)
from servers.writer.models import DaqConfig, UidRange, WriteRequest, owner_uid
from servers.writer.states import AcquisitionState, DeploymentState, WriterState, check_transition
from servers.writer.stats import StatsMeter
from servers.writer.status import (
    MESSAGE_COMPLETED,
    MESSAGE_INTERRUPTED,
    Acquisition,
    DaqStats,
    Deployment,
    WriterStatus,
)

_log = logging.getLogger(__name__)

DEFAULT_SYNC_TIMEOUT = 60.0
DEFAULT_LOG_CAPACITY = 1000
# How often the current write is polled; the status a client sees lags the data path by at most
# this. The end of a write does not wait for the poll: the data path pushes it (`on_change`).
PROGRESS_INTERVAL = 0.1
STATS_INTERVAL = 1.0
# How long to wait for the data path to open or close a file before the writer gives up on it.
DATAPATH_CALL_TIMEOUT = 10.0

_PHASE_TO_STATE = {
    WritePhase.WAITING_IMAGES: AcquisitionState.WAITING_IMAGES,
    WritePhase.ACQUIRING_IMAGES: AcquisitionState.ACQUIRING_IMAGES,
    WritePhase.WRITING: AcquisitionState.WRITING,
    WritePhase.FLUSHING_IMAGES: AcquisitionState.FLUSHING_IMAGES,
}

DataPathFactory = Callable[[DaqConfig], DataPathHandle]
"""Makes an unstarted data path for a config (the core starts it)."""


def _config_id(now: float, last: str | None) -> str:
    """A Redis-stream-like id `<ms>-<seq>`, strictly increasing."""
    ms = int(now * 1000)
    if last is not None:
        last_ms, last_seq = (int(part) for part in last.split("-"))
        if ms <= last_ms:
            return f"{last_ms}-{last_seq + 1}"
    return f"{ms}-0"


class WriterCore:
    """The Standard DAQ writer: one data path process, one acquisition at a time.

    `datapath_factory(config)` makes an unstarted data path for a config; the core starts it and
    replaces it with a new one when it died (on `stop`, or a config change while UNKNOWN).
    """

    def __init__(
        self,
        datapath_factory: DataPathFactory,
        config: DaqConfig,
        *,
        allowed_roots: Sequence[Path],
        allowed_uids: UidRange | None = None,
        private_dirs: Sequence[Path] = (),
        config_file: Path | None = None,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        log_capacity: int = DEFAULT_LOG_CAPACITY,
        hostname: str | None = None,
    ) -> None:
        self._factory = datapath_factory
        self._allowed_uids = allowed_uids
        self._private_dirs = tuple(Path(d).resolve() for d in private_dirs)
        self._refuse_unless_uid_allowed(config)
        self._config = config
        self._allowed_roots = tuple(allowed_roots)
        self._config_file = config_file
        self.sync_timeout = sync_timeout
        self._hostname = hostname or socket.gethostname()
        self._datapath: DataPathHandle | None = None
        self._state = WriterState.UNKNOWN
        self._acquisition = Acquisition()
        self._unknown_reason = "the data path has not started yet"
        self._logs: deque[Acquisition] = deque(maxlen=log_capacity)
        self._lock = asyncio.Lock()
        self._write_ended = asyncio.Event()
        self._write_ended.set()
        self._datapath_changed = asyncio.Event()  # set (from the data path's thread) to poll at once
        self._hub = EventHub()
        self._last_published: WriterStatus | None = None
        self._meter = StatsMeter()
        now = time.time()
        self._deployment = Deployment(
            config_id=_config_id(now, None),
            status=DeploymentState.SUCCESS,
            message="Deployment successful.",
            servers={self._hostname: "Done"},
            start_time=now,
            stop_time=now,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the data path and the background pollers; READY once the data path is up."""
        async with self._lock:
            await self._start_datapath()
        self._tasks = [
            asyncio.create_task(self._progress_loop(), name="writer-progress"),
            asyncio.create_task(self._stats_loop(), name="writer-stats"),
        ]
        self._publish_status()

    async def close(self) -> None:
        """Stop the pollers and the data path, closing an open file as interrupted."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        async with self._lock:
            if self._state is WriterState.WRITING:
                with contextlib.suppress(DaqException):
                    await self._interrupt_write()
            if self._datapath is not None:
                datapath, self._datapath = self._datapath, None
                try:
                    await asyncio.to_thread(datapath.close)
                except Exception:
                    _log.exception("closing the data path failed")

    # ---- queries --------------------------------------------------------------------------

    @property
    def config(self) -> DaqConfig:
        return self._config

    @property
    def config_id(self) -> str:
        return self._deployment.config_id

    def status(self) -> WriterStatus:
        return WriterStatus(self._state, self._acquisition)

    def stats(self) -> DaqStats:
        return self._meter.stats

    def logs(self, n_last: int) -> list[Acquisition]:
        """The last `n_last` logged acquisitions, newest first."""
        if n_last <= 0:
            return []
        return [self._logs[-1 - i] for i in range(min(n_last, len(self._logs)))]

    def deployment(self) -> Deployment:
        return self._deployment

    def subscribe(self) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[WriterEvent]]:
        """A queue of every event from now on (`async with core.subscribe() as events`)."""
        return self._hub.subscribe()

    # ---- commands -------------------------------------------------------------------------

    async def start_write(self, request: WriteRequest) -> WriterStatus:
        """Open the output file and start recording the next `n_images` frames.

        Returns once the file is open. Refused (nothing touched) when the writer is not READY or
        the request is invalid.
        """
        async with self._lock:
            self._refuse_unless_ready()
            output_path = self._validate_path(request.output_file)
            owner = self._owner_of(request)
            run_id = request.run_id if request.run_id is not None else time.time_ns()
            job = WriteJob(
                output_file=str(output_path),
                n_images=request.n_images,
                run_id=str(run_id),
                detector_name=self._config.detector_name,
                height=self._config.image_pixel_height,
                width=self._config.image_pixel_width,
                dtype=self._config.dtype,
                owner_uid=owner,
                detector_type=self._config.detector_type,
            )
            started = Acquisition(
                state=AcquisitionState.WAITING_IMAGES,
                message="",
                n_images=request.n_images,
                output_file=request.output_file,
                run_id=run_id,
                start_time=time.time(),
                writer_user_id=request.writer_user_id,
            )
            datapath = self._require_datapath()
            try:
                await asyncio.to_thread(datapath.open_write, job, DATAPATH_CALL_TIMEOUT)
            except DataPathError as exc:
                failed = replace(
                    started, state=AcquisitionState.FAILED, message=f"ERROR: {exc}", stop_time=time.time()
                )
                if datapath.is_alive():
                    self._transition(acquisition=failed, new_acquisition=True)
                else:
                    self._transition(
                        WriterState.UNKNOWN,
                        failed,
                        new_acquisition=True,
                        reason=f"the data path process died while opening the file: {exc}",
                    )
                self._publish_status()
                raise DaqException.failed_precondition(
                    f"cannot write {quote(request.output_file)}: {bounded(str(exc), 2 * MAX_QUOTE_CHARS)}"
                ) from exc
            self._write_ended = asyncio.Event()
            self._transition(WriterState.WRITING, started, new_acquisition=True)
            self._publish_status()
            _log.info(
                "writing %d images to %s (run_id %s%s)",
                request.n_images,
                request.output_file,
                run_id,
                "" if request.writer_user_id is None else f", as uid {owner or os.geteuid()} for this write",
            )
            return self.status()

    async def write_sync(self, request: WriteRequest, timeout: float | None = None) -> WriterStatus:
        """Start a write and return when it has ended (at most `timeout`, capped by `sync_timeout`).

        A write that failed raises FAILED_PRECONDITION with its "ERROR: …" message; a write still
        running when the wait ends raises DEADLINE_EXCEEDED (and keeps running).
        """
        limit = self.sync_timeout if timeout is None or timeout <= 0 else min(timeout, self.sync_timeout)
        await self.start_write(request)
        ended = self._write_ended
        try:
            await asyncio.wait_for(ended.wait(), limit)
        except TimeoutError:
            raise DaqException(
                "",
                f"the write to {quote(request.output_file)} is still running; the sync call ended after its "
                f"limit of {limit:g} s. Poll the status, call stop, "
                "or use write_async for long acquisitions.",
                ErrorCode.DEADLINE_EXCEEDED,
            ) from None
        status = self.status()
        if status.acquisition.state is AcquisitionState.FAILED:
            raise DaqException.failed_precondition(status.acquisition.message)
        return status

    async def stop(self, output_file: str | None = None) -> WriterStatus:
        """Interrupt a running write, and bring an UNKNOWN writer back to READY (restarting the
        data path process if it died). Always accepted when `output_file` is None (the std_daq stop).

        `output_file` (a daqif extension) names the write to stop, as the status reports it (the
        request's text): a client stops its own write only. While another write runs this is
        refused (FAILED_PRECONDITION naming both) and nothing is stopped; while none runs the named
        write has ended and nothing is done, except resetting UNKNOWN when that write was the last.
        """
        if output_file is not None and not output_file:
            raise DaqException.invalid_argument(
                "the output_file of the write to stop is empty; give the output_file the status shows "
                "for it, or none to stop any write"
            )
        async with self._lock:
            current = self._acquisition
            if output_file is not None and not (current.happened and current.output_file == output_file):
                if self._state is WriterState.WRITING:
                    raise DaqException.failed_precondition(
                        f"writer is writing {quote(current.output_file)}, not {quote(output_file)} "
                        "(which is not running); nothing was stopped"
                    )
                return self.status()
            if self._state is WriterState.WRITING:
                await self._interrupt_write()
            datapath = self._datapath
            if self._state is WriterState.UNKNOWN or datapath is None or not datapath.is_alive():
                await self._restart_datapath()
            self._publish_status()
            return self.status()

    async def set_config(self, update: DaqConfig) -> DaqConfig:
        """Put the fields `update` was given (`model_fields_set`) in force; the others stay.

        Refused while writing. Persisted atomically to the config file, if one was given. The next
        write uses the new frame geometry (each write tells the data path what to expect).
        """
        async with self._lock:
            if self._state is WriterState.WRITING:
                raise DaqException.failed_precondition(
                    f"writer is busy writing {quote(self._acquisition.output_file)}; the config cannot "
                    "change during a write. Wait for it to finish or call stop."
                )
            new_config = self._config.updated(update)
            self._refuse_unless_uid_allowed(new_config)
            started = time.time()
            config_id = _config_id(started, self._deployment.config_id)
            self._deployment = Deployment(
                config_id=config_id,
                status=DeploymentState.RUNNING,
                message="Deployment running.",
                servers={self._hostname: "Running"},
                start_time=started,
                stop_time=None,
            )
            old_config, self._config = self._config, new_config
            try:
                if self._config_file is not None:
                    await asyncio.to_thread(atomic_write_json, self._config_file, new_config.to_json())
                # Each write carries its frame geometry; the receive queue is sized for the new
                # frames (a queue sized for 64 KiB frames would hold gigabytes of 4 MiB ones).
                # A dead data path, or one that cannot resize, is restarted with the new config.
                datapath = self._datapath
                if self._state is WriterState.UNKNOWN or datapath is None:
                    await self._restart_datapath()
                else:
                    try:
                        await asyncio.to_thread(
                            datapath.resize_for, new_config.frame_nbytes, DATAPATH_CALL_TIMEOUT
                        )
                    except DataPathError as exc:
                        _log.warning("resizing the receive queue failed (%s); restarting the data path", exc)
                        await self._restart_datapath()
            except (OSError, DaqException) as exc:
                message = (
                    exc.message if isinstance(exc, DaqException) else f"cannot persist the config: {exc}"
                )
                self._deployment = replace(
                    self._deployment,
                    status=DeploymentState.ERROR,
                    message=f"Deployment failed: {message}",
                    servers={self._hostname: f"Error: {message}"},
                    stop_time=time.time(),
                )
                if isinstance(exc, OSError):
                    self._config = old_config
                raise DaqException.internal(f"config {config_id} not deployed: {message}") from exc
            self._deployment = replace(
                self._deployment,
                status=DeploymentState.SUCCESS,
                message="Deployment successful.",
                servers={self._hostname: "Done"},
                stop_time=time.time(),
            )
            _log.info("config %s in force: %s", config_id, new_config.to_json())
            self._hub.publish(ConfigChanged(new_config, config_id))
            return new_config

    # ---- internals ------------------------------------------------------------------------

    def _refuse_unless_ready(self) -> None:
        if self._state is WriterState.WRITING:
            acq = self._acquisition
            raise DaqException.failed_precondition(
                f"writer is busy writing {quote(acq.output_file)} "
                f"({acq.n_write_completed} of {acq.n_images} images); "
                "wait for it to finish or call stop"
            )
        if self._state is WriterState.UNKNOWN:
            raise DaqException.failed_precondition(
                f"writer is in state UNKNOWN ({self._unknown_reason}); call stop to reset it"
            )

    def _refuse_unless_uid_allowed(self, config: DaqConfig) -> None:
        """A client must not have files given to any uid: only the service user, the uid this
        writer runs as, and the operator's `--allowed-uids` range."""
        self._refuse_unless_owner_allowed(config.owner_uid, "invalid config")

    def _refuse_unless_owner_allowed(self, uid: int | None, what: str) -> None:
        if (
            uid is None
            or uid == os.geteuid()
            or (self._allowed_uids is not None and uid in self._allowed_uids)
        ):
            return
        allowed = "0 (the service user)"
        if os.geteuid() != 0:
            allowed += f", {os.geteuid()} (the uid the writer runs as)"
        if self._allowed_uids is not None:
            allowed += f" and {self._allowed_uids} (--allowed-uids)"
        raise DaqException.invalid_argument(
            f"{what}: writer_user_id: uid {uid} is not allowed; this writer accepts {allowed}"
        )

    def _owner_of(self, request: WriteRequest) -> int | None:
        """The uid `request`'s file is given to: its own `writer_user_id` (a daqif extension,
        checked like the config's), else the config's."""
        if request.writer_user_id is None:
            return self._config.owner_uid
        uid = owner_uid(request.writer_user_id)
        self._refuse_unless_owner_allowed(uid, "invalid write request")
        return uid

    def _validate_path(self, text: str) -> Path:
        """The resolved output path, or INVALID_ARGUMENT saying what is wrong; touches no file.

        Every message quotes at most ~200 characters of the path (`quote`), however long it is.
        """
        if not text:
            raise DaqException.invalid_argument("output_file is empty; give an absolute path to an .h5 file")
        if not os.path.isabs(text):
            raise DaqException.invalid_argument(
                f"output_file {quote(text)} is not an absolute path; "
                "give the full path, e.g. /data/run_001.h5"
            )
        try:
            resolved = confine(text, self._allowed_roots, what="output_file")
            is_dir = text.endswith("/") or resolved.is_dir()
            folder_exists = resolved.parent.is_dir()
        except PathNotAllowed as exc:
            raise DaqException.invalid_argument(bounded(str(exc), 3 * MAX_QUOTE_CHARS)) from None
        except (OSError, ValueError) as exc:  # ENAMETOOLONG, ELOOP, …: a bad path, not a server fault
            raise DaqException.invalid_argument(
                f"output_file {quote(text)} cannot be used: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if any(resolved.is_relative_to(private) for private in self._private_dirs):
            raise DaqException.invalid_argument(
                f"output_file {quote(text)} lies in the writer's own state directory; choose another folder"
            )
        if is_dir:
            raise DaqException.invalid_argument(f"output_file {quote(text)} is a directory, not a file name")
        marked = roles.marked_at_or_above(resolved.parent, roles.WRITER_KEEPS_OUT)
        if marked is not None:  # marked by a DPM after this writer started (servers.common.roles)
            raise DaqException.invalid_argument(
                bounded(
                    f"output_file {quote(text)} lies in {marked.describe()}; the writer never writes there",
                    3 * MAX_QUOTE_CHARS,
                )
            )
        if not folder_exists:
            raise DaqException.invalid_argument(
                f"output_file folder {quote(os.path.dirname(text))} does not exist; create it first"
            )
        return resolved

    def _require_datapath(self) -> DataPathHandle:
        if self._datapath is None:  # only between a failed restart and the next stop
            raise DaqException.failed_precondition("the data path is not running; call stop to restart it")
        return self._datapath

    def _transition(
        self,
        writer: WriterState | None = None,
        acquisition: Acquisition | None = None,
        *,
        new_acquisition: bool = False,
        reason: str = "",
    ) -> None:
        """The one place the writer or its acquisition changes state (`states.check_transition`
        says which changes are allowed). `reason`: why the writer is UNKNOWN."""
        writer = self._state if writer is None else writer
        acquisition = self._acquisition if acquisition is None else acquisition
        check_transition(
            (self._state, writer),
            (self._acquisition.state, acquisition.state),
            new_acquisition=new_acquisition,
        )
        if writer is WriterState.UNKNOWN and reason:
            self._unknown_reason = reason
            _log.error("writer UNKNOWN: %s", reason)
        self._state, self._acquisition = writer, acquisition

    async def _start_datapath(self) -> None:
        datapath = self._factory(self._config)
        loop = asyncio.get_running_loop()
        changed = self._datapath_changed

        def poll_at_once() -> None:  # called from the data path's reader thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the writer is gone
                loop.call_soon_threadsafe(changed.set)

        datapath.on_change(poll_at_once)
        try:
            await asyncio.to_thread(datapath.start)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(datapath.close)
            self._datapath = None
            self._transition(WriterState.UNKNOWN, reason=f"the data path failed to start: {exc}")
            raise DaqException.internal(f"the data path failed to start: {exc}") from exc
        self._datapath = datapath
        self._transition(WriterState.READY)

    async def _restart_datapath(self) -> None:
        if self._state is not WriterState.UNKNOWN:
            self._transition(WriterState.UNKNOWN, reason="the data path is restarting")
        old = self._datapath
        if old is not None:
            self._datapath = None
            self._meter.restarted()
            try:
                await asyncio.to_thread(old.close)
            except Exception:
                _log.exception("closing the old data path failed")
        await self._start_datapath()

    async def _interrupt_write(self) -> None:
        """Stop the running write and record how it ended (lock held)."""
        datapath = self._require_datapath()
        try:
            result = await asyncio.to_thread(datapath.stop_write, DATAPATH_CALL_TIMEOUT)
            if result is None:  # it ended on its own since the last poll
                result = (await asyncio.to_thread(datapath.progress)).result
        except DataPathError as exc:
            self._fail_acquisition(
                f"the data path process failed while stopping the write: {exc}", unknown_reason=str(exc)
            )
            return
        if result is None:
            self._fail_acquisition("the data path lost track of the write")
            return
        self._finish(result)

    def _finish(self, result: WriteResult) -> None:
        """Record the end of the write (lock held, or from the poller)."""
        acquisition = replace(
            self._acquisition,
            n_write_completed=result.n_written,
            n_write_requested=result.n_written,
            start_time=result.start_time,
            stop_time=result.stop_time,
        )
        if result.error is not None:
            ended = replace(acquisition, state=AcquisitionState.FAILED, message=f"ERROR: {result.error}")
        else:
            message = MESSAGE_INTERRUPTED if result.interrupted else MESSAGE_COMPLETED
            ended = replace(acquisition, state=AcquisitionState.FINISHED, message=message)
        self._transition(WriterState.READY, ended)
        if ended.state is AcquisitionState.FINISHED:
            self._logs.append(ended)
            self._hub.publish(AcquisitionLogged(ended))
        self._write_ended.set()
        _log.info("write to %s ended: %s", acquisition.output_file, self._acquisition.message)

    def _fail_acquisition(self, error: str, *, unknown_reason: str = "") -> None:
        """End the running acquisition FAILED; the writer is READY, or UNKNOWN for `unknown_reason`."""
        failed = replace(
            self._acquisition, state=AcquisitionState.FAILED, message=f"ERROR: {error}", stop_time=time.time()
        )
        if unknown_reason:
            self._transition(WriterState.UNKNOWN, failed, reason=unknown_reason)
        else:
            self._transition(WriterState.READY, failed)
        self._write_ended.set()

    async def _poll_write(self) -> None:
        """One look at the data path: follow the write, notice a dead process (lock held)."""
        datapath = self._datapath
        if datapath is None or self._state is WriterState.UNKNOWN:
            return
        progress: WriteProgress | None = None
        if self._state is WriterState.WRITING:
            try:
                progress = await asyncio.to_thread(datapath.progress)
            except DataPathError:
                progress = None
        # Asked after the progress: a process that died just before it (its pipe closed, which
        # wakes this poll at once) is seen dead here too, so a write it failed leaves the writer
        # UNKNOWN in this same poll, never READY in between.
        alive = await asyncio.to_thread(datapath.is_alive)
        if self._state is WriterState.WRITING:
            if progress is not None and progress.phase in (WritePhase.FINISHED, WritePhase.FAILED):
                if progress.result is not None:
                    self._finish(progress.result)
            elif not alive:
                # It died between the two looks: asked again, the progress is the death's result,
                # counted from the repaired file (not the frames last reported, some never flushed).
                try:
                    progress = await asyncio.to_thread(datapath.progress)
                except DataPathError:
                    progress = None
                if progress is not None and progress.result is not None:
                    self._finish(progress.result)
                else:
                    self._fail_acquisition(
                        "the data path process died during the write; the file holds the frames written "
                        "before it died. Call stop to reset the writer."
                    )
            elif progress is not None and progress.phase in _PHASE_TO_STATE:
                self._transition(
                    acquisition=replace(
                        self._acquisition,
                        state=_PHASE_TO_STATE[progress.phase],
                        n_write_completed=progress.n_written,
                        n_write_requested=progress.n_written,
                    )
                )
        if not alive:
            self._transition(WriterState.UNKNOWN, reason="the data path process died")
        self._publish_status()

    async def _progress_loop(self) -> None:
        changed = self._datapath_changed
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancel (close) that comes
            # while the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_INTERVAL):
                    await changed.wait()
            changed.clear()
            try:
                async with self._lock:
                    await self._poll_write()
            except Exception:  # keep polling: a failed poll must not freeze the status
                _log.exception("polling the data path failed")

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                await self._update_stats()
            except Exception:
                _log.exception("collecting stats failed")
            self._hub.publish(Tick(self._meter.stats, self.status()))

    async def _update_stats(self) -> None:
        datapath = self._datapath
        counters: FrameCounters | None = None
        if datapath is not None:
            try:
                counters = await asyncio.to_thread(datapath.counters)
            except DataPathError:
                counters = None
        self._meter.sample(counters, time.monotonic())

    def _publish_status(self) -> None:
        status = self.status()
        last = self._last_published
        if status == last:
            return
        significant = (
            last is None
            or status.state is not last.state
            or status.acquisition.state is not last.acquisition.state
            or status.acquisition.message != last.acquisition.message
            or status.acquisition.output_file != last.acquisition.output_file
        )
        self._last_published = status
        self._hub.publish(StatusChanged(status, significant))
