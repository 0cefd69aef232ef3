"""The status page's model in-process: what a browser that connects gets, and what it is sent after."""

from __future__ import annotations

import asyncio

from servers.web.board import RECENT_FINISHED, StatusBoard
from servers.web.model import AlertCard, DaqCard, StorageCard


def card(daq_id: str, substate: str = "COLLECTING", **fields: object) -> DaqCard:
    final = substate in ("COMPLETED", "ABORTED")
    values: dict[str, object] = {
        "id": daq_id,
        "substate": substate,
        "final": final,
        "error": False,
        "alerts": (),
        "result": "",
        "message": "",
        "timestamp": 1.0,
    }
    return DaqCard.model_validate({**values, **fields})


def test_a_browser_gets_the_snapshot_first_then_each_change() -> None:
    async def scenario() -> list[tuple[str, object]]:
        board = StatusBoard()
        board.daq(card("A"))
        async with board.subscribe() as events:
            alert = AlertCard(id="collecting:det1", severity="ERROR", description="missing")
            board.daq(card("A", error=True, alerts=(alert,)))
            board.daq(card("A", "COMPLETED", result="/p/A.h5"))
            board.link("dpm", False, "waiting for the DPM")
            board.link("dpm", False, "waiting for the DPM")  # no change: not sent again
            return [events.get_nowait() for _ in range(events.qsize())]

    kinds = asyncio.run(scenario())
    assert [kind for kind, _ in kinds] == ["snapshot", "daq", "daq", "link"]
    snapshot = kinds[0][1]
    assert isinstance(snapshot, dict)
    assert [d["id"] for d in snapshot["active"]] == ["A"] and snapshot["finished"] == []
    assert snapshot["preview"] is None  # no --writer-preview: no preview
    assert kinds[3][1] == {"dpm": {"up": False, "message": "waiting for the DPM"}}


def test_a_finished_daq_leaves_the_active_ones_and_only_the_most_recent_are_kept() -> None:
    board = StatusBoard()
    for i in range(RECENT_FINISHED + 5):
        board.daq(card(f"D{i}"))
        board.daq(card(f"D{i}", "COMPLETED"))
        board.daq(card(f"D{i}", "COMPLETED"))  # a repeated final status is listed once
    assert board.active == {}
    assert [d.id for d in board.finished][:2] == [f"D{RECENT_FINISHED + 4}", f"D{RECENT_FINISHED + 3}"]
    assert len(board.finished) == RECENT_FINISHED


def test_after_a_reconnect_the_active_set_is_replaced_and_those_that_ended_are_finished() -> None:
    board = StatusBoard()
    board.daq(card("GONE"))
    board.daq(card("STAYS"))
    board.daqs([card("STAYS", "MERGING"), card("NEW")], [card("GONE", "ABORTED")])
    assert sorted(board.active) == ["NEW", "STAYS"] and board.active["STAYS"].substate == "MERGING"
    assert [(d.id, d.substate) for d in board.finished] == [("GONE", "ABORTED")]
    board.storage_status(StorageCard(path="/w", capacity=10, free=5, available=4))
    assert board.snapshot()["storage"] == {"path": "/w", "capacity": 10, "free": 5, "available": 4}


def test_a_reconciliation_never_puts_back_an_older_status_than_the_watch_stream_told() -> None:
    board = StatusBoard()
    board.daq(card("A", "RELEASING", timestamp=5.0))
    board.daq(card("B", "COMPLETED", timestamp=5.0))
    board.daq(card("C"))
    # GetActiveDaqs answered before the stream's newer statuses arrived:
    board.daqs([card("A", "MERGING", timestamp=4.0), card("B", "RELEASING", timestamp=4.0)], [], ["C"])
    assert board.active["A"].substate == "RELEASING"
    assert "B" not in board.active and [d.id for d in board.finished] == ["B"]
    assert "C" not in board.active  # no longer known to the DPM
