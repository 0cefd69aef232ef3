"""The connection of a `DaqifDetector` to its writer: the gRPC client, the `WatchStatus` task
feeding the soft signals, and the writes this device started (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from event_model import ComposeStreamResourceBundle
from ophyd_async.core import NotConnectedError, PathInfo, WatcherUpdate, soft_signal_r_and_setter

from daqif.errors import DaqException, ErrorCode
from daqif.tls import TlsConfig
from daqif.v1 import writer_pb2
from daqif.writer_client import AsyncWriterClient, acquisition_state_name, writer_state_name

log = logging.getLogger(__name__)

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
        """Stop the current write if it still runs; wait for its end.

        The stop names this write's file, so a writer that moved on to another client's write
        (this write ended, the status stream has not shown it yet) refuses it and stops nothing."""
        write = self.current
        if write is None or write.ended.is_set():
            return
        try:
            await self._client().stop_writer(output_file=str(write.path))
        except DaqException as exc:
            if exc.code is not ErrorCode.FAILED_PRECONDITION:
                raise
            # Another write runs: this one has ended, and its end is on the status stream.
            log.info("not stopping the writer of %s: %s", self.address, exc.message)
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
