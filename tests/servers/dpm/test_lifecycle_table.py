"""Every substate transition of the DPM core, in-process, with a fake merge runner (no processes).

The real workspace, collection (copies) and release run on tmp_path; only the merge program
is replaced (`FakeMergeRunner`), so each test takes milliseconds. The end-to-end behaviour through
a real server and the real merge is in test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from daqif.errors import DaqException, ErrorCode
from servers.dpm.config import build_config
from servers.dpm.events import StatusWatcher
from servers.dpm.lifecycle import TRANSITIONS, DataProductManager, check_transition
from servers.dpm.merge_launcher import MergeSetup
from servers.dpm.model import DaqStatusView, Severity, SubState
from servers.dpm.transfer import ProcessResult

from .dpm_helpers import visible_files

S = SubState
FAKE_ERROR = "daqif-dpm-merge: error: the fake merge failed"


class FakeMergeRunner:
    """Writes a small product at `--outfile`, or fails with the next queued exit code.

    `gate`, when set, holds every merge until it is set (a merge "in progress").
    """

    def __init__(self, exit_codes: Sequence[int] = ()) -> None:
        self.exit_codes = deque(exit_codes)
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.runs = 0
        self.warmed = False
        self.closed = False
        self.crash: Exception | None = None

    def warm_up(self) -> None:
        self.warmed = True

    def close(self) -> None:
        self.closed = True

    async def run(
        self, argv: Sequence[str], log_path: Path, setup: MergeSetup | None = None
    ) -> ProcessResult:
        self.runs += 1
        if setup is not None:  # the files the merge process makes before merging
            setup.apply(str(log_path))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.crash is not None:
            crash, self.crash = self.crash, None
            raise crash
        code = self.exit_codes.popleft() if self.exit_codes else 0
        if code != 0:
            return ProcessResult(code, (FAKE_ERROR,))
        outfile = Path(argv[list(argv).index("--outfile") + 1])
        outfile.write_bytes(b"a merged product")
        return ProcessResult(0, ())


class World:
    """The data root of one test: a raw directory with sources and a receiver directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.raw = self.data / "raw"
        self.receiver = self.data / "olas"
        self.raw.mkdir(parents=True)
        self.receiver.mkdir()
        self._ids = itertools.count(1)

    def source(self, name: str = "det") -> Path:
        path = self.raw / f"{name}.h5"
        path.write_bytes(b"frames of " + name.encode())
        return path

    def spec(self, source: Path, receiver: Path | None = None) -> str:
        daq_id = f"TABLE.{next(self._ids)}"
        return json.dumps(
            {
                "id": daq_id,
                "target": {"fileId": daq_id},
                "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
                "receivers": [{"type": "olasReceiver", "path": str(receiver or self.receiver)}],
            }
        )


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await test()

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def running_dpm(
    world: World, runner: FakeMergeRunner, **settings: Any
) -> AsyncIterator[DataProductManager]:
    config = build_config(workspace=world.base / "workspace", data_root=world.data, overrides=settings)
    dpm = DataProductManager(config, merge_runner=runner)
    await dpm.start()
    try:
        yield dpm
    finally:
        await dpm.stop()


class Follower:
    """Every status of one DAQ as the core publishes it."""

    def __init__(self, watcher: StatusWatcher) -> None:
        self._watcher = watcher
        self.seen: list[DaqStatusView] = []

    async def until(self, predicate: Callable[[DaqStatusView], bool]) -> DaqStatusView:
        while True:
            view = await self._watcher.next()
            self.seen.append(view)
            if predicate(view):
                return view

    async def until_substate(self, substate: SubState) -> DaqStatusView:
        return await self.until(lambda v: v.substate is substate)

    async def until_alert(self, alert_id: str) -> DaqStatusView:
        return await self.until(lambda v: any(a.id == alert_id for a in v.alerts))

    @property
    def substates(self) -> list[SubState]:
        """The substates seen, each once, in order."""
        return [k for k, _ in itertools.groupby(v.substate for v in self.seen)]


async def queue_and_follow(dpm: DataProductManager, spec: str) -> tuple[str, Follower]:
    daq_id = await dpm.queue(spec)
    return daq_id, Follower(dpm.watch(daq_id))


# -- the table -----------------------------------------------------------------------------------


@pytest.mark.parametrize("old", list(S))
@pytest.mark.parametrize("new", list(S))
def test_check_transition_allows_exactly_the_table(old: SubState, new: SubState) -> None:
    if new in TRANSITIONS[old]:
        check_transition("D", old, new)
        return
    with pytest.raises(DaqException) as refused:
        check_transition("D", old, new)
    assert refused.value.code is ErrorCode.INTERNAL
    assert refused.value.message == f"DAQ D: no transition from {old.value} to {new.value}"


def test_the_table_leads_every_substate_to_a_final_one() -> None:
    assert set(TRANSITIONS) == set(S)
    for substate in S:
        assert (TRANSITIONS[substate] == frozenset()) is substate.is_final
        if not substate.is_final:
            assert S.ABORTING in TRANSITIONS[substate] or substate is S.ABORTING


# -- success ---------------------------------------------------------------------------------------


def test_a_daq_goes_scheduled_collecting_merging_releasing_completed(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(world.source()))
            final = await follow.until_substate(S.COMPLETED)
            assert follow.substates == [S.SCHEDULED, S.COLLECTING, S.MERGING, S.RELEASING, S.COMPLETED]
            assert final.alerts == () and final.result.endswith(f"products/{daq_id}/{daq_id}.h5")
            assert (world.receiver / f"{daq_id}.h5").read_bytes() == b"a merged product"
            assert runner.warmed and runner.runs == 1
            assert dpm.active() == []
            with pytest.raises(DaqException) as archived:
                dpm.status(daq_id)
            assert archived.value.code is ErrorCode.NOT_FOUND
            assert dpm.status(daq_id, include_archived=True).substate is S.COMPLETED

    run(test)


# -- failure and retry in each step ----------------------------------------------------------------


def test_a_failed_collection_waits_in_collecting_and_retry_collects(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()
    missing = world.raw / "det.h5"

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(missing))
            failed = await follow.until_alert("collecting:det")
            assert failed.substate is S.COLLECTING and failed.error
            assert failed.alerts[0].description == f"source {missing} does not exist"
            world.source()
            await dpm.retry(daq_id)
            await follow.until_substate(S.COMPLETED)
            assert follow.substates == [S.SCHEDULED, S.COLLECTING, S.MERGING, S.RELEASING, S.COMPLETED]
            assert dpm.workspace.read_archived(daq_id).attempts["collect"] == 2

    run(test)


def test_a_failed_merge_raises_merging_and_retry_merges_again(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner(exit_codes=[1, 0])

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(world.source()))
            failed = await follow.until_alert("merging")
            assert failed.substate is S.MERGING
            (alert,) = failed.alerts
            assert alert.severity is Severity.ERROR
            assert alert.description.startswith(f"merge failed: {FAKE_ERROR} (log: ")
            await dpm.retry(daq_id)
            final = await follow.until_substate(S.COMPLETED)
            assert final.alerts == () and runner.runs == 2
            assert S.MERGING in follow.substates and follow.substates[-2:] == [S.RELEASING, S.COMPLETED]

    run(test)


def test_a_failed_release_waits_in_releasing_and_retry_releases(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()
    later = world.data / "later"

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(world.source(), later))
            failed = await follow.until_alert("releasing:0")
            assert failed.substate is S.RELEASING
            assert failed.alerts[0].description == f"receiver directory {later} does not exist"
            later.mkdir()
            await dpm.retry(daq_id)
            await follow.until_substate(S.COMPLETED)
            assert (later / f"{daq_id}.h5").is_file()
            assert runner.runs == 1  # the product is not merged again to release it

    run(test)


def test_an_unexpected_failure_raises_internal_and_retry_runs_the_step_again(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()
    runner.crash = RuntimeError("a bug")

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(world.source()))
            failed = await follow.until_alert("internal")
            assert failed.substate is S.MERGING
            assert failed.alerts[-1].description == "unexpected failure in MERGING: a bug; see the server log"
            await dpm.retry(daq_id)
            await follow.until_substate(S.COMPLETED)

    run(test)


# -- abort in each phase -------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [S.SCHEDULED, S.COLLECTING, S.MERGING, S.RELEASING])
def test_abort_while_a_step_runs_goes_aborting_then_aborted(tmp_path: Path, phase: SubState) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()
    settings: dict[str, Any] = {}
    if phase is S.SCHEDULED:
        settings["max_active_daqs"] = 0
    elif phase is S.MERGING:
        runner.gate = asyncio.Event()
    else:
        settings["debug_delays"] = {phase.value: 600}

    async def test() -> None:
        async with running_dpm(world, runner, **settings) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(world.source()))
            await follow.until_substate(phase)
            if phase is S.MERGING:
                await runner.started.wait()
            await dpm.abort(daq_id)
            await follow.until_substate(S.ABORTED)
            assert follow.substates[-3:] == [phase, S.ABORTING, S.ABORTED]
            _assert_cleaned_up(dpm, world, daq_id)

    run(test)


@pytest.mark.parametrize(
    ("phase", "alert"),
    [(S.COLLECTING, "collecting:det"), (S.MERGING, "merging"), (S.RELEASING, "releasing:0")],
)
def test_abort_of_a_daq_waiting_for_retry_clears_its_alert_and_ends_aborted(
    tmp_path: Path, phase: SubState, alert: str
) -> None:
    world, runner = World(tmp_path), FakeMergeRunner(exit_codes=[1] if phase is S.MERGING else [])
    source = world.raw / "det.h5" if phase is S.COLLECTING else world.source()
    receiver = world.data / "nowhere" if phase is S.RELEASING else None

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            daq_id, follow = await queue_and_follow(dpm, world.spec(source, receiver))
            await follow.until_alert(alert)
            await dpm.abort(daq_id)
            final = await follow.until_substate(S.ABORTED)
            assert final.alerts == () and follow.substates[-3:] == [phase, S.ABORTING, S.ABORTED]
            _assert_cleaned_up(dpm, world, daq_id)

    run(test)


# -- refused commands ----------------------------------------------------------------------------


def test_retry_is_refused_unless_a_step_failed_and_says_why(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()
    gate = runner.gate = asyncio.Event()

    async def test() -> None:
        async with running_dpm(world, runner, max_active_daqs=1) as dpm:
            merging, follow = await queue_and_follow(dpm, world.spec(world.source()))
            await follow.until_substate(S.MERGING)
            scheduled = await dpm.queue(world.spec(world.source("det2")))
            for daq_id, why in [
                (scheduled, "SCHEDULED and has not started collecting yet"),
                (merging, "MERGING and has no failed step to retry"),
            ]:
                with pytest.raises(DaqException) as refused:
                    await dpm.retry(daq_id)
                assert refused.value.code is ErrorCode.FAILED_PRECONDITION
                assert refused.value.message == f"DAQ {daq_id} is {why}"
            gate.set()

    run(test)


def test_an_archived_daq_refuses_abort_retry_and_a_second_queue(tmp_path: Path) -> None:
    world, runner = World(tmp_path), FakeMergeRunner()

    async def test() -> None:
        async with running_dpm(world, runner) as dpm:
            spec = world.spec(world.source())
            daq_id, follow = await queue_and_follow(dpm, spec)
            await follow.until_substate(S.COMPLETED)
            for command in (dpm.abort, dpm.retry):
                with pytest.raises(DaqException) as gone:
                    await command(daq_id)
                assert gone.value.code is ErrorCode.NOT_FOUND
                assert gone.value.message == f"DAQ {daq_id} is archived (completed or aborted)"
            with pytest.raises(DaqException) as again:
                await dpm.queue(spec)
            assert again.value.code is ErrorCode.ALREADY_EXISTS
            with pytest.raises(DaqException) as unknown:
                dpm.watch("NEVER.QUEUED")
            assert unknown.value.code is ErrorCode.NOT_FOUND

    run(test)


# -- helpers ---------------------------------------------------------------------------------------


def _assert_cleaned_up(dpm: DataProductManager, world: World, daq_id: str) -> None:
    assert dpm.status(daq_id, include_archived=True).substate is S.ABORTED
    assert not (dpm.workspace.archived_dir(daq_id) / "sources").exists()
    assert not dpm.workspace.product_dir(daq_id).exists()
    assert visible_files(world.receiver) == []


# -- resumed SCHEDULED DAQs: a backlog admitted in queue order ------------------------------------


def test_resumed_scheduled_daqs_get_their_slot_in_queue_order_behind_none_queued_later(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)

    async def test() -> None:
        held = FakeMergeRunner()
        held.gate = asyncio.Event()  # A holds the one active slot, merging, until the restart
        async with running_dpm(world, held, max_active_daqs=1) as dpm:
            a, follow_a = await queue_and_follow(dpm, world.spec(world.source("a")))
            b = await dpm.queue(world.spec(world.source("b")))
            c = await dpm.queue(world.spec(world.source("c")))
            await follow_a.until_substate(S.MERGING)
        runner = FakeMergeRunner()
        runner.gate = asyncio.Event()
        async with running_dpm(world, runner, max_active_daqs=1) as dpm:
            everything = Follower(dpm.watch())
            assert [v.substate for v in dpm.active()] == [S.MERGING, S.SCHEDULED, S.SCHEDULED]
            d = await dpm.queue(world.spec(world.source("d")))
            await dpm.abort(c)  # it waits in the backlog, without a driver
            runner.gate.set()
            finished: list[tuple[str, SubState]] = []
            while len(finished) < 4:
                view = await everything.until(lambda v: v.substate.is_final)
                finished.append((view.id, view.substate))
            assert finished == [(c, S.ABORTED), (a, S.COMPLETED), (b, S.COMPLETED), (d, S.COMPLETED)]
            assert dpm.active() == []

    run(test)
