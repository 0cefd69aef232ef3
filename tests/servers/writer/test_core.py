"""`WriterCore` in-process against a fake data path: every state change the core makes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daqif.errors import DaqException, ErrorCode
from servers.writer.core import WriterCore, _config_id
from servers.writer.datapath.api import (
    DataPathError,
    FrameCounters,
    WriteJob,
    WritePhase,
    WriteProgress,
    WriteResult,
)
from servers.writer.events import AcquisitionLogged, WriterEvent
from servers.writer.models import DaqConfig, UidRange, WriteRequest, parse_config
from servers.writer.states import AcquisitionState, WriterState
from servers.writer.status import Acquisition, WriterStatus

T = TypeVar("T")
WAIT_S = 10.0


class FakeDataPath:
    """A data path in this process; the test plays the frames (`write_frames`, `end`, `die`)."""

    def __init__(self, *, fail_start: bool = False) -> None:
        self.fail_start = fail_start
        self.alive = False
        self.open_error: str | None = None
        self.job: WriteJob | None = None
        self.phase: WritePhase | None = None
        self.n_written = 0
        self.result: WriteResult | None = None
        self.opened_at = 0.0
        self.frame_counters = FrameCounters()
        self.sized_for: list[int] = []  # frame sizes the receive queue was resized for
        self.listeners: list[Callable[[], None]] = []

    def start(self) -> None:
        if self.fail_start:
            raise DataPathError("cannot connect to tcp://127.0.0.1:1")
        self.alive = True

    def close(self) -> None:
        self.alive = False

    def is_alive(self) -> bool:
        return self.alive

    def open_write(self, job: WriteJob, timeout: float = 10.0) -> None:
        if self.open_error is not None:
            raise DataPathError(self.open_error)
        self.job, self.phase, self.n_written, self.result = job, WritePhase.WAITING_IMAGES, 0, None
        self.opened_at = time.time()

    def stop_write(self, timeout: float = 10.0) -> WriteResult | None:
        if not self.alive:
            raise DataPathError("the data path process is not running")
        if self.phase not in (WritePhase.WAITING_IMAGES, WritePhase.ACQUIRING_IMAGES, WritePhase.WRITING):
            return None
        return self.end(interrupted=True)

    def progress(self) -> WriteProgress:
        return WriteProgress(phase=self.phase, n_written=self.n_written, result=self.result)

    def on_change(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    def counters(self) -> FrameCounters:
        return self.frame_counters

    def resize_for(self, frame_nbytes: int, timeout: float = 10.0) -> None:
        self.sized_for.append(frame_nbytes)

    # -- what the test makes happen -----------------------------------------------------------

    def write_frames(self, n: int) -> None:
        self.phase, self.n_written = WritePhase.WRITING, self.n_written + n

    def end(self, *, interrupted: bool = False, error: str | None = None) -> WriteResult:
        assert self.job is not None
        self.result = WriteResult(
            output_file=self.job.output_file,
            n_images=self.job.n_images,
            n_written=self.n_written,
            interrupted=interrupted,
            error=error,
            start_time=self.opened_at,
            stop_time=time.time(),
        )
        self.phase = WritePhase.FAILED if error else WritePhase.FINISHED
        for callback in self.listeners:
            callback()
        return self.result

    def die(self) -> None:
        self.alive = False
        for callback in self.listeners:
            callback()


class Harness:
    """A started `WriterCore` whose data paths are fakes (a new one per start)."""

    def __init__(
        self, tmp_path: Path, *, fail_start: bool = False, allowed_uids: UidRange | None = None
    ) -> None:
        self.root = tmp_path
        self.datapaths: list[FakeDataPath] = []
        self.fail_start = fail_start
        config = DaqConfig(detector_name="FAKE", image_pixel_height=6, image_pixel_width=4)
        self.core = WriterCore(
            self._make, config, allowed_roots=[tmp_path], allowed_uids=allowed_uids, hostname="test-host"
        )

    def _make(self, config: DaqConfig) -> FakeDataPath:
        datapath = FakeDataPath(fail_start=self.fail_start)
        self.datapaths.append(datapath)
        return datapath

    @property
    def datapath(self) -> FakeDataPath:
        return self.datapaths[-1]

    def request(self, name: str = "run.h5", n_images: int = 5, run_id: int | None = 7) -> WriteRequest:
        return WriteRequest(output_file=str(self.root / name), n_images=n_images, run_id=run_id)

    async def status_where(self, predicate: Callable[[WriterStatus], bool]) -> WriterStatus:
        """The first status (now or later) for which `predicate` holds; fails after WAIT_S."""
        async with self.core.subscribe() as events, asyncio.timeout(WAIT_S):
            while not predicate(status := self.core.status()):
                await events.get()
            return status


def run_with_core(
    tmp_path: Path,
    scenario: Callable[[Harness], Awaitable[T]],
    *,
    fail_start: bool = False,
    allowed_uids: UidRange | None = None,
) -> T:
    async def main() -> T:
        harness = Harness(tmp_path, fail_start=fail_start, allowed_uids=allowed_uids)
        try:
            await harness.core.start()
        except DaqException:
            if not fail_start:
                raise
        try:
            return await scenario(harness)
        finally:
            await harness.core.close()

    coroutine: Coroutine[Any, Any, T] = main()
    return asyncio.run(coroutine)


def acquisition_state(state: AcquisitionState) -> Callable[[WriterStatus], bool]:
    return lambda status: status.acquisition.state is state


def test_start_makes_the_writer_ready_with_no_acquisition_yet(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        status = h.core.status()
        assert status.state is WriterState.READY
        assert status.acquisition == Acquisition()
        assert status.acquisition.message == "No acquisition yet."

    run_with_core(tmp_path, scenario)


def test_a_data_path_that_cannot_start_leaves_the_writer_unknown_saying_why(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        assert h.core.status().state is WriterState.UNKNOWN
        with pytest.raises(DaqException) as info:
            await h.core.start_write(h.request())
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        assert "UNKNOWN (the data path failed to start: cannot connect" in info.value.message
        h.fail_start = False
        assert (await h.core.stop()).state is WriterState.READY

    run_with_core(tmp_path, scenario, fail_start=True)


def test_start_write_opens_the_file_and_writes_waiting_for_images(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        status = await h.core.start_write(h.request(n_images=5, run_id=42))
        assert status.state is WriterState.WRITING
        assert status.acquisition.state is AcquisitionState.WAITING_IMAGES
        assert (status.acquisition.message, status.acquisition.run_id) == ("", 42)
        job = h.datapath.job
        assert job is not None
        assert (job.height, job.width, job.dtype, job.detector_name) == (6, 4, "uint16", "FAKE")
        assert (job.n_images, job.run_id) == (5, "42")

    run_with_core(tmp_path, scenario)


def test_the_acquisition_follows_the_data_path_and_completes(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        async with h.core.subscribe() as events:
            await h.core.start_write(h.request(n_images=5))
            h.datapath.write_frames(3)
            status = await h.status_where(acquisition_state(AcquisitionState.WRITING))
            assert status.acquisition.n_write_completed == 3
            h.datapath.write_frames(2)
            h.datapath.end()
            status = await h.status_where(acquisition_state(AcquisitionState.FINISHED))
            assert status.state is WriterState.READY
            assert (status.acquisition.message, status.acquisition.n_write_completed) == ("Completed.", 5)
            assert h.core.logs(10) == [status.acquisition]
            logged = [event async for event in _drain(events) if isinstance(event, AcquisitionLogged)]
            assert [event.acquisition for event in logged] == [status.acquisition]

    run_with_core(tmp_path, scenario)


def test_the_end_of_a_write_is_pushed_by_the_data_path_not_found_by_the_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import servers.writer.core

    monkeypatch.setattr(servers.writer.core, "PROGRESS_INTERVAL", 3600.0)  # the poll never comes

    async def scenario(h: Harness) -> None:
        await h.core.start_write(h.request(n_images=2))
        await asyncio.sleep(0)  # the progress loop is waiting for its (hour-long) interval now
        h.datapath.write_frames(2)
        h.datapath.end()
        status = await h.status_where(acquisition_state(AcquisitionState.FINISHED))
        assert (status.state, status.acquisition.n_write_completed) == (WriterState.READY, 2)

    run_with_core(tmp_path, scenario)


def test_a_write_that_fails_in_the_data_path_is_failed_and_not_logged(tmp_path: Path) -> None:
    problem = "frames are 512x512 uint16, the detector config says 6x4 uint16"

    async def scenario(h: Harness) -> None:
        await h.core.start_write(h.request())
        h.datapath.end(interrupted=True, error=problem)
        status = await h.status_where(acquisition_state(AcquisitionState.FAILED))
        assert status.state is WriterState.READY
        assert status.acquisition.message == f"ERROR: {problem}"
        assert h.core.logs(10) == []
        assert (await h.core.start_write(h.request("next.h5"))).state is WriterState.WRITING

    run_with_core(tmp_path, scenario)


def test_stop_interrupts_a_running_write_and_logs_it(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.core.start_write(h.request(n_images=100))
        h.datapath.write_frames(4)
        status = await h.core.stop()
        assert status.state is WriterState.READY
        assert status.acquisition.state is AcquisitionState.FINISHED
        assert (status.acquisition.message, status.acquisition.n_write_completed) == ("Interrupted.", 4)
        assert h.core.logs(1) == [status.acquisition]

    run_with_core(tmp_path, scenario)


def test_a_file_that_cannot_be_opened_is_a_new_failed_acquisition(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.datapath.open_error = "no permission to create files in folder '/x'"
        with pytest.raises(DaqException) as info:
            await h.core.start_write(h.request())
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        assert "no permission" in info.value.message
        status = h.core.status()
        assert status.state is WriterState.READY
        assert status.acquisition.state is AcquisitionState.FAILED
        assert status.acquisition.message == "ERROR: no permission to create files in folder '/x'"

    run_with_core(tmp_path, scenario)


def test_a_data_path_that_dies_opening_the_file_makes_the_writer_unknown(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.datapath.open_error = "the data path process died"
        h.datapath.die()
        with pytest.raises(DaqException):
            await h.core.start_write(h.request())
        assert h.core.status().state is WriterState.UNKNOWN
        assert h.core.status().acquisition.state is AcquisitionState.FAILED

    run_with_core(tmp_path, scenario)


def test_a_data_path_that_dies_mid_write_fails_the_write_and_stop_recovers(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.core.start_write(h.request(n_images=100))
        h.datapath.write_frames(2)
        h.datapath.die()
        status = await h.status_where(lambda s: s.state is WriterState.UNKNOWN)
        assert status.acquisition.state is AcquisitionState.FAILED
        assert status.acquisition.message.startswith("ERROR: the data path process died during the write")
        with pytest.raises(DaqException, match=r"UNKNOWN \(the data path process died\); call stop"):
            await h.core.start_write(h.request("again.h5"))
        assert (await h.core.stop()).state is WriterState.READY
        assert len(h.datapaths) == 2 and h.datapath.alive
        assert (await h.core.start_write(h.request("again.h5"))).state is WriterState.WRITING

    run_with_core(tmp_path, scenario)


def test_a_data_path_that_dies_while_idle_makes_the_writer_unknown_until_stop(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.datapath.die()
        status = await h.status_where(lambda s: s.state is WriterState.UNKNOWN)
        assert status.acquisition == Acquisition(), "no acquisition was running"
        assert (await h.core.stop()).state is WriterState.READY

    run_with_core(tmp_path, scenario)


def test_a_second_write_and_a_config_change_are_refused_while_writing(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.core.start_write(h.request("first.h5", n_images=10))
        with pytest.raises(DaqException, match=r"writer is busy writing '.*first.h5' \(0 of 10 images\)"):
            await h.core.start_write(h.request("second.h5"))
        with pytest.raises(DaqException, match="the config cannot change during a write"):
            await h.core.set_config(parse_config({"bit_depth": 32}))
        assert h.core.status().acquisition.output_file == str(tmp_path / "first.h5")

    run_with_core(tmp_path, scenario)


def test_a_config_change_sets_only_the_fields_given_and_the_next_write_uses_it(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        config = await h.core.set_config(parse_config({"bit_depth": 32, "image_pixel_width": 9}))
        assert (config.bit_depth, config.image_pixel_width, config.image_pixel_height) == (32, 9, 6)
        assert config.detector_name == "FAKE"
        await h.core.start_write(h.request())
        job = h.datapath.job
        assert job is not None and (job.height, job.width, job.dtype) == (6, 9, "uint32")
        assert h.datapath.sized_for == [6 * 9 * 4]  # the receive queue was sized for the new frames
        assert len(h.datapaths) == 1  # without a restart

    run_with_core(tmp_path, scenario)


def test_a_sync_write_that_fails_raises_its_error_message(tmp_path: Path) -> None:
    problem = "frames are 1x1 uint8, the detector config says 6x4 uint16"

    async def scenario(h: Harness) -> None:
        async def fail_soon() -> None:
            await h.status_where(acquisition_state(AcquisitionState.WAITING_IMAGES))
            h.datapath.end(interrupted=True, error=problem)

        failing = asyncio.create_task(fail_soon())
        with pytest.raises(DaqException) as info:
            await h.core.write_sync(h.request())
        await failing
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        assert info.value.message == f"ERROR: {problem}"

    run_with_core(tmp_path, scenario)


@pytest.mark.parametrize(
    ("output_file", "expected"),
    [
        ("run.h5", "is not an absolute path"),
        ("/elsewhere/run.h5", "outside the allowed roots"),
        ("{root}/missing/run.h5", "does not exist; create it first"),
        ("{root}", "is a directory"),
    ],
)
def test_a_bad_output_path_is_refused_before_the_data_path_is_asked(
    tmp_path: Path, output_file: str, expected: str
) -> None:
    async def scenario(h: Harness) -> None:
        request = WriteRequest(output_file=output_file.format(root=tmp_path), n_images=1)
        with pytest.raises(DaqException, match=expected) as info:
            await h.core.start_write(request)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert h.datapath.job is None
        assert h.core.status().state is WriterState.READY

    run_with_core(tmp_path, scenario)


def test_a_change_the_state_table_does_not_allow_is_an_internal_error(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        with pytest.raises(DaqException) as info:
            h.core._transition(WriterState.WRITING)  # WRITING without a running acquisition
        assert info.value.code is ErrorCode.INTERNAL
        assert "the writer cannot be WRITING while its acquisition is FINISHED" in info.value.message
        assert h.core.status().state is WriterState.READY, "nothing changed"

    run_with_core(tmp_path, scenario)


def test_config_ids_increase_like_redis_stream_ids() -> None:
    first = _config_id(1000.0, None)
    assert first == "1000000-0"
    assert _config_id(1000.0, first) == "1000000-1"
    assert _config_id(999.0, "1000000-1") == "1000000-2"
    assert _config_id(1001.0, "1000000-2") == "1001000-0"


async def _drain(events: asyncio.Queue[WriterEvent]) -> Any:
    while not events.empty():
        yield events.get_nowait()


def test_a_write_request_writer_user_id_owns_that_write_only(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        asked = WriteRequest(output_file=str(h.root / "a.h5"), n_images=1, writer_user_id=12345)
        status = await h.core.start_write(asked)
        assert status.acquisition.writer_user_id == 12345
        assert h.datapath.job is not None and h.datapath.job.owner_uid == 12345
        h.datapath.end()
        await h.status_where(lambda s: s.state is WriterState.READY)
        with pytest.raises(DaqException) as refused:
            await h.core.start_write(
                WriteRequest(output_file=str(h.root / "b.h5"), n_images=1, writer_user_id=99)
            )
        assert refused.value.code is ErrorCode.INVALID_ARGUMENT
        assert "invalid write request: writer_user_id: uid 99 is not allowed" in refused.value.message
        assert "12000-12999 (--allowed-uids)" in refused.value.message
        assert h.core.status().acquisition.output_file == str(h.root / "a.h5")  # no acquisition for it
        status = await h.core.start_write(h.request("c.h5"))
        assert status.acquisition.writer_user_id is None
        assert h.datapath.job is not None and h.datapath.job.owner_uid is None  # the config's, as before
        assert h.core.config.writer_user_id == 0

    run_with_core(tmp_path, scenario, allowed_uids=UidRange(first=12000, last=12999))
