"""The writer's state table: every allowed change passes, every other one is an INTERNAL error."""

from __future__ import annotations

import itertools

import pytest

from daqif.errors import DaqException, ErrorCode
from servers.writer.states import (
    ACQUISITION_STARTS,
    ACQUISITION_TRANSITIONS,
    WRITER_TRANSITIONS,
    AcquisitionState,
    WriterState,
    check_transition,
)

A = AcquisitionState
W = WriterState


def _writer_for(acquisition: AcquisitionState) -> WriterState:
    return W.WRITING if acquisition.is_running else W.READY


@pytest.mark.parametrize(
    ("old", "new"),
    [(old, new) for old, targets in ACQUISITION_TRANSITIONS.items() for new in sorted(targets)],
)
def test_every_allowed_acquisition_change_passes(old: AcquisitionState, new: AcquisitionState) -> None:
    check_transition((_writer_for(old), _writer_for(new)), (old, new))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (old, new)
        for old, new in itertools.product(AcquisitionState, AcquisitionState)
        if new is not old and new not in ACQUISITION_TRANSITIONS[old]
    ],
)
def test_an_acquisition_never_goes_back_nor_changes_after_it_ended(
    old: AcquisitionState, new: AcquisitionState
) -> None:
    with pytest.raises(DaqException) as info:
        check_transition((_writer_for(old), _writer_for(new)), (old, new))
    assert info.value.code is ErrorCode.INTERNAL
    assert f"the acquisition cannot change from {old} to {new}" in info.value.message


@pytest.mark.parametrize(("old", "new"), list(itertools.product(WriterState, WriterState)))
def test_writer_changes_follow_the_table(old: WriterState, new: WriterState) -> None:
    # The acquisition moves along as it must for the writer's change: a write starts or ends.
    previous = A.WAITING_IMAGES if old is W.WRITING else A.FINISHED
    acquisition = A.WAITING_IMAGES if new is W.WRITING else A.FINISHED
    starts = not previous.is_running and acquisition.is_running
    if new is old or new in WRITER_TRANSITIONS[old]:
        check_transition((old, new), (previous, acquisition), new_acquisition=starts)
    else:
        with pytest.raises(DaqException, match=f"the writer cannot change from {old} to {new}"):
            check_transition((old, new), (previous, acquisition), new_acquisition=starts)


def test_an_unknown_writer_cannot_start_writing() -> None:
    with pytest.raises(DaqException, match="cannot change from UNKNOWN to WRITING"):
        check_transition((W.UNKNOWN, W.WRITING), (A.FINISHED, A.WAITING_IMAGES), new_acquisition=True)


@pytest.mark.parametrize("first", sorted(ACQUISITION_STARTS))
@pytest.mark.parametrize("last", [A.FINISHED, A.FAILED])
def test_a_new_acquisition_starts_waiting_or_failed_after_the_last_ended(
    first: AcquisitionState, last: AcquisitionState
) -> None:
    check_transition((W.READY, _writer_for(first)), (last, first), new_acquisition=True)


@pytest.mark.parametrize("running", [a for a in AcquisitionState if a.is_running])
def test_no_new_acquisition_while_one_runs(running: AcquisitionState) -> None:
    with pytest.raises(DaqException, match=f"cannot start while the last one is {running}"):
        check_transition((W.WRITING, W.WRITING), (running, A.WAITING_IMAGES), new_acquisition=True)


@pytest.mark.parametrize("first", [a for a in AcquisitionState if a not in ACQUISITION_STARTS])
def test_a_new_acquisition_cannot_start_further_on(first: AcquisitionState) -> None:
    with pytest.raises(DaqException, match=f"a new acquisition cannot start in {first}"):
        check_transition((W.READY, _writer_for(first)), (A.FINISHED, first), new_acquisition=True)


@pytest.mark.parametrize(
    ("writer", "acquisition"),
    [(W.WRITING, A.FINISHED), (W.WRITING, A.FAILED), (W.READY, A.WRITING), (W.UNKNOWN, A.ACQUIRING_IMAGES)],
)
def test_the_writer_is_writing_exactly_while_its_acquisition_runs(
    writer: WriterState, acquisition: AcquisitionState
) -> None:
    old_acquisition = A.WAITING_IMAGES if acquisition.is_running else acquisition
    old_writer = W.WRITING if writer is W.WRITING and not acquisition.is_running else writer
    with pytest.raises(DaqException, match=f"the writer cannot be {writer} while its acquisition is"):
        check_transition((old_writer, writer), (old_acquisition, acquisition))
