"""`DaqifDetector` and the three ophyd-async seams it is composed of (see the package docstring)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bluesky.protocols import StreamAsset
from event_model import ComposeStreamResource, ComposeStreamResourceBundle, DataKey, StreamRange
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    Device,
    DeviceConnector,
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
)

from daqif.bluesky._link import FrameFormat, Write, WriterLink
from daqif.tls import TlsConfig

MIMETYPE = "application/x-hdf5"


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
