"""The writer's control plane: state machine, configuration, logs, stats and deployment status.

Transport-free: the REST (`rest.py`), gRPC (`grpc_service.py`) and Redis (`redis_streams.py`)
adapters call `WriterCore` and subscribe to its events; they only translate. Every refusal is a
`DaqException` raised here, mapped once at each edge (REST: HTTP 200 `status: "error"`; gRPC: a
canonical code with rich details).

The data path runs in its own process behind `DataPathHandle`; its blocking calls run in worker
threads so the asyncio loop that serves REST and gRPC never waits on HDF5 or ZeroMQ.

Where the writer changes state, in one place:
- `start_write`: READY → WRITING (acquisition WAITING_IMAGES) once the file is open;
- `_poll_write`: WAITING_IMAGES → ACQUIRING_IMAGES → WRITING → FLUSHING_IMAGES → FINISHED
  ("Completed."/"Interrupted.") or FAILED ("ERROR: …"), and WRITING/READY → UNKNOWN when the
  data process died;
- `stop`: interrupts a write (FINISHED "Interrupted.") and resets UNKNOWN → READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daqif import defaults
from daqif.errors import DaqException, ErrorCode
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

_log = logging.getLogger(__name__)

DEFAULT_SYNC_TIMEOUT = 60.0
DEFAULT_LOG_CAPACITY = 1000
# How often the current write is polled; the status a client sees lags the data path by at most this.
PROGRESS_INTERVAL = 0.1
STATS_INTERVAL = 1.0
# How long to wait for the data path to open or close a file before the writer gives up on it.
DATAPATH_CALL_TIMEOUT = 10.0

DETECTOR_TYPES = ("eiger", "gigafrost", "jungfrau", "bsread")
BIT_DEPTH_DTYPES = {8: "uint8", 16: "uint16", 32: "uint32"}
INTEGER_FIELDS = (
    "bit_depth",
    "image_pixel_height",
    "image_pixel_width",
    "n_modules",
    "start_udp_port",
    "writer_user_id",
)
CONFIG_FIELDS = (
    "bit_depth",
    "detector_name",
    "detector_type",
    "image_pixel_height",
    "image_pixel_width",
    "n_modules",
    "start_udp_port",
    "writer_user_id",
    "module_positions",
)


class WriterState(enum.StrEnum):
    """The writer's own state (the seed's top-level `state`)."""

    READY = "READY"
    WRITING = "WRITING"
    UNKNOWN = "UNKNOWN"


class AcquisitionState(enum.StrEnum):
    """The state of the current or last acquisition (the seed's `acquisition.state`)."""

    WAITING_IMAGES = "WAITING_IMAGES"
    ACQUIRING_IMAGES = "ACQUIRING_IMAGES"
    WRITING = "WRITING"
    FLUSHING_IMAGES = "FLUSHING_IMAGES"
    FINISHED = "FINISHED"
    FAILED = "FAILED"


MESSAGE_COMPLETED = "Completed."
MESSAGE_INTERRUPTED = "Interrupted."
MESSAGE_NO_ACQUISITION = "No acquisition yet."

_PHASE_TO_STATE = {
    WritePhase.WAITING_IMAGES: AcquisitionState.WAITING_IMAGES,
    WritePhase.ACQUIRING_IMAGES: AcquisitionState.ACQUIRING_IMAGES,
    WritePhase.WRITING: AcquisitionState.WRITING,
    WritePhase.FLUSHING_IMAGES: AcquisitionState.FLUSHING_IMAGES,
}

RunId = int | str


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DaqConfig:
    """The DAQ configuration object of the seed (`/daq/config`, Redis `daq:config`)."""

    bit_depth: int = defaults.BIT_DEPTH
    detector_name: str = defaults.DETECTOR_NAME
    detector_type: str = defaults.DETECTOR_TYPE
    image_pixel_height: int = defaults.IMAGE_PIXEL_HEIGHT
    image_pixel_width: int = defaults.IMAGE_PIXEL_WIDTH
    n_modules: int = 1
    start_udp_port: int = 50000
    writer_user_id: int = 0
    module_positions: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: {"0": (0, 511, 511, 0)})

    @property
    def dtype(self) -> str:
        """The numpy dtype name of a frame pixel."""
        return BIT_DEPTH_DTYPES[self.bit_depth]

    @property
    def owner_uid(self) -> int | None:
        """The uid files are written for; None (< 1) means the user the service runs as."""
        return self.writer_user_id if self.writer_user_id >= 1 else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object with the seed's keys."""
        return {
            "bit_depth": self.bit_depth,
            "detector_name": self.detector_name,
            "detector_type": self.detector_type,
            "image_pixel_height": self.image_pixel_height,
            "image_pixel_width": self.image_pixel_width,
            "n_modules": self.n_modules,
            "start_udp_port": self.start_udp_port,
            "writer_user_id": self.writer_user_id,
            "module_positions": {key: list(value) for key, value in self.module_positions.items()},
        }

    def updated(self, update: Mapping[str, Any], *, source: str = "config") -> DaqConfig:
        """This config with `update` merged in (a partial or full config), validated.

        Raises `DaqException` INVALID_ARGUMENT naming every field that is wrong and why.
        `module_positions`, when given, replaces the whole mapping (as in the seed client).
        """
        if not isinstance(update, Mapping):
            raise DaqException.invalid_argument(
                f"{source} must be a JSON object of config fields, not {type(update).__name__}"
            )
        problems: list[str] = []
        unknown = sorted(str(key) for key in update if key not in CONFIG_FIELDS)
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(CONFIG_FIELDS)})")
        merged: dict[str, Any] = {**self.to_json(), **{k: v for k, v in update.items() if k in CONFIG_FIELDS}}
        for name in INTEGER_FIELDS:
            value = merged[name]
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be an integer, got {json.dumps(value)}")
        if not problems:
            problems.extend(_range_problems(merged))
        if not isinstance(merged["detector_type"], str) or merged["detector_type"] not in DETECTOR_TYPES:
            problems.append(
                f"detector_type must be one of {', '.join(DETECTOR_TYPES)}, "
                f"got {json.dumps(merged['detector_type'])}"
            )
        name = merged["detector_name"]
        if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
            problems.append(
                "detector_name must be a non-empty name without '/' (it names the HDF5 group), "
                f"got {json.dumps(name)}"
            )
        positions, position_problems = _parse_module_positions(merged["module_positions"])
        problems.extend(position_problems)
        if problems:
            raise DaqException.invalid_argument(f"invalid {source}: " + "; ".join(problems))
        return DaqConfig(
            bit_depth=merged["bit_depth"],
            detector_name=name,
            detector_type=merged["detector_type"],
            image_pixel_height=merged["image_pixel_height"],
            image_pixel_width=merged["image_pixel_width"],
            n_modules=merged["n_modules"],
            start_udp_port=merged["start_udp_port"],
            writer_user_id=merged["writer_user_id"],
            module_positions=positions,
        )


def _range_problems(merged: Mapping[str, Any]) -> list[str]:
    problems = []
    if merged["bit_depth"] not in BIT_DEPTH_DTYPES:
        problems.append(f"bit_depth must be one of 8, 16, 32, got {merged['bit_depth']}")
    for name in ("image_pixel_height", "image_pixel_width", "n_modules"):
        if merged[name] < 1:
            problems.append(f"{name} must be > 0, got {merged[name]}")
    if not 0 <= merged["start_udp_port"] <= 65535:
        problems.append(f"start_udp_port must be in 0..65535, got {merged['start_udp_port']}")
    return problems


def _parse_module_positions(value: Any) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    if not isinstance(value, Mapping):
        return {}, [
            f"module_positions must be an object {{module: [start_x, start_y, end_x, end_y]}}, got {value!r}"
        ]
    positions: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for key, coords in value.items():
        ok = (
            isinstance(coords, list | tuple)
            and len(coords) == 4
            and all(isinstance(c, int) and not isinstance(c, bool) for c in coords)
        )
        if not ok:
            problems.append(
                f"module_positions[{key!r}] must be 4 integers [start_x, start_y, end_x, end_y], "
                f"got {coords!r}"
            )
        else:
            positions[str(key)] = tuple(coords)
    return positions, problems


def load_config(path: Path | None) -> DaqConfig:
    """The embedded defaults, with the detector JSON file at `path` (full or partial) merged in."""
    defaults = DaqConfig()
    if path is None:
        return defaults
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DaqException.invalid_argument(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DaqException.invalid_argument(
            f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    return defaults.updated(data, source=f"config file {path}")


# --------------------------------------------------------------------------------------------
# Status objects


@dataclass(frozen=True)
class Acquisition:
    """One acquisition as the seed reports it (`acquisition` of the status, an entry of the logs)."""

    state: AcquisitionState = AcquisitionState.FINISHED
    message: str = MESSAGE_NO_ACQUISITION
    n_images: int = 0
    output_file: str | None = None
    run_id: RunId | None = None
    n_write_completed: int = 0
    n_write_requested: int = 0
    start_time: float | None = None
    stop_time: float | None = None

    @property
    def happened(self) -> bool:
        """False for the placeholder shown before the first acquisition."""
        return self.output_file is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "info": {"n_images": self.n_images, "output_file": self.output_file, "run_id": self.run_id},
            "message": self.message,
            "state": self.state.value,
            "stats": {
                "n_write_completed": self.n_write_completed,
                "n_write_requested": self.n_write_requested,
                "start_time": self.start_time,
                "stop_time": self.stop_time,
            },
        }


@dataclass(frozen=True)
class WriterStatus:
    """The DAQ status object of the seed (`/writer/status`, Redis `daq:status`)."""

    state: WriterState
    acquisition: Acquisition

    def to_json(self) -> dict[str, Any]:
        return {"acquisition": self.acquisition.to_json(), "state": self.state.value}


@dataclass(frozen=True)
class Throughput:
    bytes_per_second: float = 0.0
    images_per_second: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {"bytes_per_second": self.bytes_per_second, "images_per_second": self.images_per_second}


@dataclass(frozen=True)
class DaqStats:
    """Throughput over the last second (`detector` = frames received, `writer` = frames written)
    plus the cumulative frame counters since the writer started."""

    detector: Throughput = Throughput()
    writer: Throughput = Throughput()
    counters: FrameCounters = field(default_factory=FrameCounters)

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector.to_json(),
            "writer": self.writer.to_json(),
            "counters": {
                "received": self.counters.received,
                "written": self.counters.written,
                "discarded": self.counters.discarded,
                "malformed": self.counters.malformed,
            },
        }


class DeploymentState(enum.StrEnum):
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    RUNNING = "RUNNING"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Deployment:
    """The status of the last config deployment (`/daq/deployment`); a single-node deployment."""

    config_id: str
    status: DeploymentState
    message: str
    servers: Mapping[str, str]
    start_time: float | None
    stop_time: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "config_id": self.config_id,
            "message": self.message,
            "servers": dict(self.servers),
            "stats": {"start_time": self.start_time, "stop_time": self.stop_time},
            "status": self.status.value,
        }


@dataclass(frozen=True)
class WriteRequest:
    """A write request after its fields were parsed (types are checked by the adapters)."""

    output_file: str
    n_images: int
    run_id: RunId | None = None


# --------------------------------------------------------------------------------------------
# Events the adapters subscribe to


@dataclass(frozen=True)
class StatusChanged:
    """The status changed. `significant`: the writer or acquisition state or message changed
    (not only a frame count)."""

    status: WriterStatus
    significant: bool


@dataclass(frozen=True)
class Tick:
    """Once a second: the stats of the last second and the current status."""

    stats: DaqStats
    status: WriterStatus


@dataclass(frozen=True)
class ConfigChanged:
    config: DaqConfig
    config_id: str


@dataclass(frozen=True)
class AcquisitionLogged:
    """A FINISHED acquisition (completed or interrupted) was added to the logs."""

    acquisition: Acquisition


WriterEvent = StatusChanged | Tick | ConfigChanged | AcquisitionLogged


class _EventHub:
    """Fan-out of events to subscribers; a slow subscriber loses its oldest events, never blocks
    the writer."""

    def __init__(self, queue_size: int = 256) -> None:
        self._queues: set[asyncio.Queue[WriterEvent]] = set()
        self._queue_size = queue_size

    def publish(self, event: WriterEvent) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[WriterEvent]]:
        queue: asyncio.Queue[WriterEvent] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


DataPathFactory = Callable[[DaqConfig], DataPathHandle]


def _config_id(now: float, last: str | None) -> str:
    """A Redis-stream-like id `<ms>-<seq>`, strictly increasing."""
    ms = int(now * 1000)
    if last is not None:
        last_ms, last_seq = (int(part) for part in last.split("-"))
        if ms <= last_ms:
            return f"{last_ms}-{last_seq + 1}"
    return f"{ms}-0"


# --------------------------------------------------------------------------------------------
# The core


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
        config_file: Path | None = None,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        log_capacity: int = DEFAULT_LOG_CAPACITY,
        hostname: str | None = None,
    ) -> None:
        self._factory = datapath_factory
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
        self._hub = _EventHub()
        self._last_published: WriterStatus | None = None
        self._stats = DaqStats()
        self._counter_base = FrameCounters()
        self._last_counters: FrameCounters | None = None
        self._last_counters_time = 0.0
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
        return self._stats

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
            output_path = self._validate_request(request)
            run_id: RunId = request.run_id if request.run_id is not None else time.time_ns()
            job = WriteJob(
                output_file=str(output_path),
                n_images=request.n_images,
                run_id=str(run_id),
                detector_name=self._config.detector_name,
                height=self._config.image_pixel_height,
                width=self._config.image_pixel_width,
                dtype=self._config.dtype,
                owner_uid=self._config.owner_uid,
            )
            started = Acquisition(
                state=AcquisitionState.WAITING_IMAGES,
                message="",
                n_images=request.n_images,
                output_file=request.output_file,
                run_id=run_id,
                start_time=time.time(),
            )
            datapath = self._require_datapath()
            try:
                await asyncio.to_thread(datapath.open_write, job, DATAPATH_CALL_TIMEOUT)
            except DataPathError as exc:
                failed = replace(
                    started, state=AcquisitionState.FAILED, message=f"ERROR: {exc}", stop_time=time.time()
                )
                self._acquisition = failed
                if not datapath.is_alive():
                    self._become_unknown(f"the data path process died while opening the file: {exc}")
                self._publish_status()
                raise DaqException.failed_precondition(f"cannot write {request.output_file}: {exc}") from exc
            self._acquisition = started
            self._state = WriterState.WRITING
            self._write_ended = asyncio.Event()
            self._publish_status()
            _log.info("writing %d images to %s (run_id %s)", request.n_images, request.output_file, run_id)
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
                f"the write to {request.output_file} is still running; the sync call ended after its "
                f"limit of {limit:g} s. Poll the status, call stop, "
                "or use write_async for long acquisitions.",
                ErrorCode.DEADLINE_EXCEEDED,
            ) from None
        status = self.status()
        if status.acquisition.state is AcquisitionState.FAILED:
            raise DaqException.failed_precondition(status.acquisition.message)
        return status

    async def stop(self) -> WriterStatus:
        """Always accepted: interrupt a running write, and bring an UNKNOWN writer back to READY
        (restarting the data path process if it died)."""
        async with self._lock:
            if self._state is WriterState.WRITING:
                await self._interrupt_write()
            datapath = self._datapath
            if self._state is WriterState.UNKNOWN or datapath is None or not datapath.is_alive():
                await self._restart_datapath()
            self._publish_status()
            return self.status()

    async def set_config(self, update: Mapping[str, Any]) -> DaqConfig:
        """Merge a partial or full config into the current one and put it in force.

        Refused while writing. Persisted atomically to the config file, if one was given. The next
        write uses the new frame geometry (each write tells the data path what to expect).
        """
        async with self._lock:
            if self._state is WriterState.WRITING:
                raise DaqException.failed_precondition(
                    f"writer is busy writing {self._acquisition.output_file}; the config cannot change "
                    "during a write. Wait for it to finish or call stop."
                )
            new_config = self._config.updated(update)
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
                # Each write carries its frame geometry, so a running data path serves the new
                # config as it is; only a dead one is restarted.
                if self._state is WriterState.UNKNOWN:
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
                f"writer is busy writing {acq.output_file} "
                f"({acq.n_write_completed} of {acq.n_images} images); "
                "wait for it to finish or call stop"
            )
        if self._state is WriterState.UNKNOWN:
            raise DaqException.failed_precondition(
                f"writer is in state UNKNOWN ({self._unknown_reason}); call stop to reset it"
            )

    def _validate_request(self, request: WriteRequest) -> Path:
        """The resolved output path, or INVALID_ARGUMENT saying what is wrong; touches no file."""
        if (
            isinstance(request.n_images, bool)
            or not isinstance(request.n_images, int)
            or request.n_images < 1
        ):
            raise DaqException.invalid_argument(f"n_images must be an integer >= 1, got {request.n_images!r}")
        text = request.output_file
        if not text:
            raise DaqException.invalid_argument("output_file is empty; give an absolute path to an .h5 file")
        if not os.path.isabs(text):
            raise DaqException.invalid_argument(
                f"output_file {text!r} is not an absolute path; give the full path, e.g. /data/run_001.h5"
            )
        try:
            resolved = confine(text, self._allowed_roots, what="output_file")
        except PathNotAllowed as exc:
            raise DaqException.invalid_argument(str(exc)) from exc
        if text.endswith("/") or resolved.is_dir():
            raise DaqException.invalid_argument(f"output_file {text!r} is a directory, not a file name")
        folder = os.path.dirname(text)
        if not resolved.parent.is_dir():
            raise DaqException.invalid_argument(
                f"output_file folder {folder!r} does not exist; create it first"
            )
        return resolved

    def _require_datapath(self) -> DataPathHandle:
        if self._datapath is None:  # only between a failed restart and the next stop
            raise DaqException.failed_precondition("the data path is not running; call stop to restart it")
        return self._datapath

    def _become_unknown(self, reason: str) -> None:
        self._state = WriterState.UNKNOWN
        self._unknown_reason = reason
        _log.error("writer UNKNOWN: %s", reason)

    async def _start_datapath(self) -> None:
        datapath = self._factory(self._config)
        try:
            await asyncio.to_thread(datapath.start)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(datapath.close)
            self._datapath = None
            self._become_unknown(f"the data path failed to start: {exc}")
            raise DaqException.internal(f"the data path failed to start: {exc}") from exc
        self._datapath = datapath
        self._last_counters = None
        self._state = WriterState.READY

    async def _restart_datapath(self) -> None:
        old = self._datapath
        if old is not None:
            self._datapath = None
            if self._last_counters is not None:
                self._counter_base = _add_counters(self._counter_base, self._last_counters)
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
            self._fail_acquisition(f"the data path process failed while stopping the write: {exc}")
            self._become_unknown(str(exc))
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
            self._acquisition = replace(
                acquisition, state=AcquisitionState.FAILED, message=f"ERROR: {result.error}"
            )
        else:
            message = MESSAGE_INTERRUPTED if result.interrupted else MESSAGE_COMPLETED
            self._acquisition = replace(acquisition, state=AcquisitionState.FINISHED, message=message)
            self._logs.append(self._acquisition)
            self._hub.publish(AcquisitionLogged(self._acquisition))
        if self._state is WriterState.WRITING:
            self._state = WriterState.READY
        self._write_ended.set()
        _log.info("write to %s ended: %s", acquisition.output_file, self._acquisition.message)

    def _fail_acquisition(self, error: str) -> None:
        self._acquisition = replace(
            self._acquisition, state=AcquisitionState.FAILED, message=f"ERROR: {error}", stop_time=time.time()
        )
        self._write_ended.set()

    async def _poll_write(self) -> None:
        """One look at the data path: follow the write, notice a dead process (lock held)."""
        datapath = self._datapath
        if datapath is None or self._state is WriterState.UNKNOWN:
            return
        alive = await asyncio.to_thread(datapath.is_alive)
        if self._state is WriterState.WRITING:
            try:
                progress: WriteProgress | None = await asyncio.to_thread(datapath.progress)
            except DataPathError:
                progress = None
            if progress is not None and progress.phase in (WritePhase.FINISHED, WritePhase.FAILED):
                if progress.result is not None:
                    self._finish(progress.result)
            elif not alive:
                self._fail_acquisition(
                    "the data path process died during the write; the file holds the frames written "
                    "before it died. Call stop to reset the writer."
                )
            elif progress is not None and progress.phase in _PHASE_TO_STATE:
                self._acquisition = replace(
                    self._acquisition,
                    state=_PHASE_TO_STATE[progress.phase],
                    n_write_completed=progress.n_written,
                    n_write_requested=progress.n_written,
                )
        if not alive:
            self._become_unknown("the data path process died")
        self._publish_status()

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
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
            self._hub.publish(Tick(self._stats, self.status()))

    async def _update_stats(self) -> None:
        datapath = self._datapath
        now = time.monotonic()
        counters: FrameCounters | None = None
        if datapath is not None:
            try:
                counters = await asyncio.to_thread(datapath.counters)
            except DataPathError:
                counters = None
        if counters is None:
            self._stats = DaqStats(
                counters=_add_counters(self._counter_base, self._last_counters or FrameCounters())
            )
            return
        previous, elapsed = self._last_counters, now - self._last_counters_time
        self._last_counters, self._last_counters_time = counters, now
        total = _add_counters(self._counter_base, counters)
        if previous is None or elapsed <= 0 or counters.received < previous.received:
            self._stats = DaqStats(counters=total)
            return
        self._stats = DaqStats(
            detector=Throughput(
                bytes_per_second=(counters.bytes_received - previous.bytes_received) / elapsed,
                images_per_second=(counters.received - previous.received) / elapsed,
            ),
            writer=Throughput(
                bytes_per_second=(counters.bytes_written - previous.bytes_written) / elapsed,
                images_per_second=(counters.written - previous.written) / elapsed,
            ),
            counters=total,
        )

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


def _add_counters(a: FrameCounters, b: FrameCounters) -> FrameCounters:
    return FrameCounters(
        received=a.received + b.received,
        written=a.written + b.written,
        discarded=a.discarded + b.discarded,
        malformed=a.malformed + b.malformed,
        bytes_received=a.bytes_received + b.bytes_received,
        bytes_written=a.bytes_written + b.bytes_written,
    )
