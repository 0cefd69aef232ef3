"""`daqif.bluesky`: a daqif writer as an ophyd-async detector (the extra `daqif[bluesky]`).

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd_async.core import init_devices
    from daqif.bluesky import DaqifDetector

    RE = RunEngine()
    with init_devices():
        det = DaqifDetector("127.0.0.1:12084", "/data/raw")     # named "det" by init_devices
    RE(count([det], num=5))

`DaqifDetector` is an ophyd-async `StandardDetector` composed of the three seams ophyd-async
defines, each a small class here:

- `DaqifTriggerLogic`: internally timed exposures only (the detector sends what it sends; the
  writer records the next N frames); remembers how many frames a start must record
  (`TriggerInfo.number_of_exposures`: events times collections per event).
- `DaqifAcquireLogic`: a start is one `StartWriterAsync` of that many frames; the end of a write
  is waited for on the `WatchStatus` stream; `unstage` (and a stopped plan) sends `StopWriter`
  for a write this device started, and only for one.
- `DaqifDataLogic`: the `StreamResource`/`StreamDatum` documents of `/<detector_name>/data`
  (`application/x-hdf5`, chunk shape one frame, SWMR) and `/<detector_name>/image_id`.

All three share one `WriterLink`: the gRPC client and one task that consumes `WatchStatus` and
feeds soft signals (`writer_state`, `acquisition_state`, `n_write_completed`, `message`): progress
is pushed by the writer, never polled.

**One write per start.** A detector's frames reach the writer whether or not anyone triggered, and
the writer records the next `n_images` frames of a write into one new file (docs/writer.md). So each
start (each `trigger()` of a step scan, each `kickoff()` of a fly scan) is one write of
`number_of_exposures` frames into its own file `<filename>_<k:06d>.h5` (k counts the writes since
`prepare`, `<filename>` comes from the path provider), and each file gets its own `StreamResource`
for each dataset. `count([det], num=3)` writes three files of one frame; a fly scan prepared for
N events writes one file of N frames, followed as it fills. bluesky's consumers and tiled's
`TiledWriter` join the resources of one data key in order (event-model allows several resources
per data key).

A write the writer refuses (busy, output outside its allowed roots, …) fails `trigger()`/`kickoff()`
with the writer's message (`daqif.errors.DaqException`); a write that ends FAILED, or that someone
else stopped before it had all its frames, fails the waiting `trigger()`/`complete()` at once with
`WriteFailed` carrying the writer's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.protocols import StreamAsset
from event_model import ComposeStreamResource, ComposeStreamResourceBundle, DataKey, StreamRange
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    Device,
    DeviceConnector,
    NotConnectedError,
    PathInfo,
    PathProvider,
    SignalR,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    TriggerInfo,
    UUIDFilenameProvider,
    WatchableAsyncStatus,
    WatcherUpdate,
    soft_signal_r_and_setter,
)

from daqif.errors import DaqException
from daqif.tls import TlsConfig
from daqif.v1 import writer_pb2
from daqif.writer_client import AsyncWriterClient, acquisition_state_name, writer_state_name

log = logging.getLogger(__name__)

MIMETYPE = "application/x-hdf5"
STOP_TIMEOUT_S = 30.0  # how long unstage waits for a stopped write to end
_ENDED = (writer_pb2.ACQUISITION_STATE_FINISHED, writer_pb2.ACQUISITION_STATE_FAILED)


class WriteFailed(RuntimeError):
    """A write of this detector ended without all its frames; the text is the writer's message."""


@dataclass(frozen=True)
class FrameFormat:
    """What the writer's config says a frame is, and where the file keeps the frames."""

    detector_name: str
    height: int
    width: int
    dtype: str  # numpy, little-endian: "<u2"

    @classmethod
    def from_config(cls, config: writer_pb2.DaqConfig) -> FrameFormat:
        return cls(
            detector_name=config.detector_name,
            height=config.image_pixel_height,
            width=config.image_pixel_width,
            dtype=np.dtype(f"<u{config.bit_depth // 8}").str,
        )


@dataclass
class Write:
    """One write this device started: its file and how far the writer got."""

    path: Path
    uri: str
    run_id: str
    n_images: int
    first_frame: int  # frames of the series written before this one
    chunk: int  # the image_id/status chunk length the writer uses for this write
    n_written: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    final: writer_pb2.Acquisition | None = None
    emitted: int = 0  # frames already announced in StreamDatum documents
    bundles: list[ComposeStreamResourceBundle] = field(default_factory=list)

    @property
    def failure(self) -> str | None:
        """The writer's message if the write ended without all its frames, else None."""
        final = self.final
        if final is None:
            return None
        if final.state == writer_pb2.ACQUISITION_STATE_FAILED or self.n_written < self.n_images:
            return (
                f"the write of {self.path} ended after {self.n_written} of {self.n_images} frames: "
                f"{final.message}"
            )
        return None


class WriterLink:
    """The connection to one writer shared by the logics: client, status stream, the writes."""

    def __init__(self, address: str, tls: TlsConfig | None) -> None:
        self.address = address
        self.tls = tls
        self.client: AsyncWriterClient | None = None
        self.format: FrameFormat | None = None
        self.writes: list[Write] = []
        self.n_exposures = 1  # frames per start, from the trigger logic's prepare
        self.writer_state, self._set_writer_state = soft_signal_r_and_setter(str, "UNDEFINED")
        self.acquisition_state, self._set_acquisition_state = soft_signal_r_and_setter(str, "UNDEFINED")
        self.message, self._set_message = soft_signal_r_and_setter(str, "")
        self.n_write_completed, self._set_n_write_completed = soft_signal_r_and_setter(int, 0)
        self.collections_written, self._set_collections_written = soft_signal_r_and_setter(int, 0)
        self.detector_name, self._set_detector_name = soft_signal_r_and_setter(str, "")
        self.bit_depth, self._set_bit_depth = soft_signal_r_and_setter(int, 0)
        self._watch: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self._first_status = asyncio.Event()

    # -- connection ------------------------------------------------------------------------

    async def connect(self, timeout: float) -> None:
        """Open the channel, read the frame format and follow `WatchStatus` (first status in hand)."""
        if self.client is None:
            self.client = AsyncWriterClient(self.address, timeout=timeout, tls=self.tls)
        try:
            await self.refresh_format()
        except DaqException as exc:
            raise NotConnectedError(f"no daqif writer answers at {self.address}: {exc.message}") from None
        if self._watch is None or self._watch.done():
            self._first_status = asyncio.Event()
            self._watch = asyncio.create_task(self._follow_status(), name=f"daqif watch {self.address}")
        await asyncio.wait_for(self._first_status.wait(), timeout)

    async def close(self) -> None:
        """Stop following the status and close the channel."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def refresh_format(self) -> FrameFormat:
        config = await self._client().get_config()
        self.format = FrameFormat.from_config(config)
        self._set_detector_name(config.detector_name)
        self._set_bit_depth(config.bit_depth)
        return self.format

    def _client(self) -> AsyncWriterClient:
        if self.client is None:
            raise RuntimeError(
                f"the detector of writer {self.address} is not connected to it "
                "(init_devices() without mock=True connects it)"
            )
        return self.client

    async def _follow_status(self) -> None:
        """Feed the soft signals from the status stream; reconnect (1 s apart) when it breaks."""
        while True:
            try:
                async for status in self._client().watch_status():
                    self._on_status(status)
                    self._first_status.set()
            except DaqException as exc:
                self._set_message(f"status stream of {self.address} lost: {exc.message}")
            except Exception as exc:  # the task must outlive anything a broken stream raises
                log.exception("status stream of %s failed", self.address)
                self._set_message(f"status stream of {self.address} failed: {exc}")
            await asyncio.sleep(1.0)

    def _on_status(self, status: writer_pb2.WriterStatus) -> None:
        acquisition = status.acquisition
        self._set_writer_state(writer_state_name(status.state))
        self._set_acquisition_state(acquisition_state_name(acquisition.state))
        self._set_message(acquisition.message)
        write = self.current
        if write is None or write.ended.is_set() or acquisition.info.run_id != write.run_id:
            return
        if acquisition.info.output_file != str(write.path):
            return
        if acquisition.stats.n_write_completed != write.n_written:
            # Only on a change: the writer repeats its status every second while it waits for frames,
            # and ophyd-async's exposure_timeout must see a detector that sends nothing.
            write.n_written = acquisition.stats.n_write_completed
            self._set_n_write_completed(write.n_written)
            self._set_collections_written(write.first_frame + write.n_written)
        if acquisition.state in _ENDED:
            write.final = acquisition
            write.ended.set()
            if write.failure is not None:
                self._failed.set()

    # -- writes ----------------------------------------------------------------------------

    @property
    def current(self) -> Write | None:
        return self.writes[-1] if self.writes else None

    def new_series(self) -> None:
        """A new `prepare`: frames are counted from 0 and files numbered from 0 again."""
        self.writes = []
        self._failed.clear()
        self._set_collections_written(0)
        self._set_n_write_completed(0)

    async def start_write(self, path_info: PathInfo) -> Write:
        """Start one write of `n_exposures` frames into the next file of the series."""
        if (write := self.current) is not None and not write.ended.is_set():
            raise RuntimeError(f"a write of {self.address} into {write.path} is still running")
        filename = f"{path_info.filename}_{len(self.writes):06d}.h5"
        path = Path(path_info.directory_path) / filename
        write = Write(
            path=path,
            uri=f"{path_info.directory_uri}{filename}",
            run_id=str(time.time_ns()),
            n_images=self.n_exposures,
            first_frame=self.collections_written_now(),
            # The writer's rule for the image_id/status chunks (servers/writer/datapath/output.py):
            # the client may not see the file, so it is not read back.
            chunk=min(self.n_exposures, 4096),
        )
        self.writes.append(write)
        try:
            await self._client().start_writer_async(str(path), write.n_images, run_id=write.run_id)
        except BaseException:
            self.writes.pop()
            raise
        return write

    def collections_written_now(self) -> int:
        return sum(w.n_written for w in self.writes)

    async def wait_for_end(self) -> None:
        """Wait until the current write ended; raise `WriteFailed` if it lacks frames."""
        write = self.current
        if write is None:
            return
        await write.ended.wait()
        if (failure := write.failure) is not None:
            raise WriteFailed(failure)

    async def stop_own_write(self) -> None:
        """Stop the current write if it is this device's and still runs; wait for its end."""
        write = self.current
        if write is None or write.ended.is_set():
            return
        await self._client().stop_writer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(write.ended.wait(), STOP_TIMEOUT_S)

    async def until_a_write_fails(
        self, updates: AsyncGenerator[WatcherUpdate[int]]
    ) -> AsyncIterator[WatcherUpdate[int]]:
        """Pass `updates` on; raise `WriteFailed` as soon as a write of this series fails."""
        failed = asyncio.create_task(self._failed.wait())
        step: asyncio.Future[WatcherUpdate[int]] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(updates))
                await asyncio.wait({step, failed}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    failures = [w.failure for w in self.writes if w.failure is not None]
                    raise WriteFailed(failures[-1] if failures else "a write failed")
                try:
                    update = step.result()
                except StopAsyncIteration:
                    return
                yield update
        finally:
            # Also when the status is cancelled (a plan aborted): nothing of the wait is left running.
            failed.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
            await updates.aclose()


class DaqifTriggerLogic(DetectorTriggerLogic):
    """Internally timed exposures: the detector's own timing; the writer counts frames."""

    def __init__(self, link: WriterLink) -> None:
        self.link = link

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        if livetime or deadtime:
            raise ValueError(
                f"livetime {livetime} and deadtime {deadtime}: the daqif writer records the frames the "
                "detector sends and cannot set their timing; use 0 (what the detector is set to)"
            )
        if num < 1:
            raise ValueError(f"number_of_exposures {num}: a daqif write needs at least 1 frame")
        self.link.n_exposures = num

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class DaqifAcquireLogic(DetectorAcquireLogic):
    """A start is one write; idle is the write's end; stopped is this device's write stopped."""

    def __init__(self, link: WriterLink, data_logic: DaqifDataLogic) -> None:
        self.link = link
        self.data_logic = data_logic

    async def start_acquiring(self) -> None:
        await self.link.start_write(self.data_logic.path_info())

    async def wait_for_idle(self) -> None:
        await self.link.wait_for_end()

    async def ensure_stopped(self) -> None:
        await self.link.stop_own_write()


class DaqifDataLogic(DetectorDataLogic):
    """The documents of the files the writes make: `/<detector>/data` and `/<detector>/image_id`."""

    def __init__(self, link: WriterLink, path_provider: PathProvider) -> None:
        self.link = link
        self.path_provider = path_provider
        self._path_info: PathInfo | None = None

    def path_info(self) -> PathInfo:
        if self._path_info is None:
            raise RuntimeError("the detector was not prepared")
        return self._path_info

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        self._path_info = self.path_provider(datakey_name)
        frame = await self.link.refresh_format()
        self.link.new_series()
        return WriteFilesProvider(self.link, datakey_name, frame)

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class WriteFilesProvider(StreamableDataProvider):
    """`StreamResource` per file and dataset, `StreamDatum` for the frames each file holds."""

    def __init__(self, link: WriterLink, datakey_name: str, frame: FrameFormat) -> None:
        self.link = link
        self.frame = frame
        self.data_key = datakey_name
        self.image_id_key = f"{datakey_name}-image_id"
        self.collections_written_signal: SignalR[int] = link.collections_written
        self._compose = ComposeStreamResource()

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        source = f"daqif://{self.link.address}/{self.frame.detector_name}"
        shape: list[int | None] = [collections_per_event, self.frame.height, self.frame.width]
        return {
            self.data_key: DataKey(
                source=f"{source}/data",
                shape=shape,
                dtype="array",
                dtype_numpy=self.frame.dtype,
                external="STREAM:",
            ),
            self.image_id_key: DataKey(
                source=f"{source}/image_id",
                shape=[collections_per_event],
                dtype="array" if collections_per_event > 1 else "number",
                dtype_numpy="<u8",
                external="STREAM:",
            ),
        }

    def _resources(self, write: Write) -> list[ComposeStreamResourceBundle]:
        group = f"/{self.frame.detector_name}"
        frame_shape = (1, self.frame.height, self.frame.width)
        return [
            self._compose(
                mimetype=MIMETYPE,
                uri=write.uri,
                data_key=key,
                parameters={"dataset": f"{group}/{dataset}", "chunk_shape": chunks, "swmr": True},
                validate=True,
            )
            for key, dataset, chunks in (
                (self.data_key, "data", frame_shape),
                (self.image_id_key, "image_id", (write.chunk,)),
            )
        ]

    async def make_stream_docs(
        self, collections_written: int, collections_per_event: int
    ) -> AsyncIterator[StreamAsset]:
        for write in self.link.writes:
            # Whole events only, and never past what this file holds.
            stop = min(collections_written, write.first_frame + write.n_written) - write.first_frame
            stop -= stop % collections_per_event
            if stop <= write.emitted:
                continue
            if not write.bundles:
                write.bundles = self._resources(write)
                for bundle in write.bundles:
                    yield "stream_resource", bundle.stream_resource_doc
            indices = StreamRange(
                start=write.emitted // collections_per_event, stop=stop // collections_per_event
            )
            write.emitted = stop
            for bundle in write.bundles:
                yield "stream_datum", bundle.compose_stream_datum(indices)


class _WriterConnector(DeviceConnector):
    """Connects the soft signals, then the writer: its config and its status stream."""

    def __init__(self, link: WriterLink) -> None:
        self.link = link

    async def connect_real(self, device: Device, timeout: float, force_reconnect: bool) -> None:
        await super().connect_real(device, timeout, force_reconnect)
        await self.link.connect(timeout)


class DaqifDetector(StandardDetector):
    """A daqif writer (`writer_address`: its gRPC `HOST:PORT`) as an ophyd-async HDF5 detector.

    Files go to `output_dir` (which the writer must accept: under one of its allowed roots), named
    by `path_provider` (default: a UUID per `prepare`) as `<filename>_<k:06d>.h5`, one per write.
    """

    def __init__(
        self,
        writer_address: str,
        output_dir: str | Path,
        name: str = "",
        *,
        path_provider: PathProvider | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.link = WriterLink(writer_address, tls)
        self.writer_state = self.link.writer_state
        self.acquisition_state = self.link.acquisition_state
        self.n_write_completed = self.link.n_write_completed
        self.message = self.link.message
        self.detector_name = self.link.detector_name
        self.bit_depth = self.link.bit_depth
        provider = path_provider or StaticPathProvider(UUIDFilenameProvider(), Path(output_dir))
        data_logic = DaqifDataLogic(self.link, provider)
        self.add_detector_logics(
            DaqifTriggerLogic(self.link), DaqifAcquireLogic(self.link, data_logic), data_logic
        )
        self.add_config_signals(self.detector_name, self.bit_depth)
        super().__init__(name=name, connector=_WriterConnector(self.link))

    @WatchableAsyncStatus.wrap
    async def trigger(self) -> AsyncIterator[WatcherUpdate[int]]:
        async for update in self.link.until_a_write_fails(_unwrapped(StandardDetector.trigger)(self)):
            yield update

    @WatchableAsyncStatus.wrap
    async def complete(self) -> AsyncIterator[WatcherUpdate[int]]:
        async for update in self.link.until_a_write_fails(_unwrapped(StandardDetector.complete)(self)):
            yield update

    async def close(self) -> None:
        """Stop following the writer's status and close the channel (the writer is not touched)."""
        await self.link.close()


def _unwrapped(method: Any) -> Any:
    """The async generator behind a `WatchableAsyncStatus.wrap`ped method (functools.wraps)."""
    return method.__wrapped__
