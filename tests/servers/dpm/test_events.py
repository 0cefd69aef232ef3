"""The status bus: ordered delivery, per-DAQ filters, and slow watchers dropped, never waited for."""

from __future__ import annotations

import asyncio

import pytest

from servers.dpm.events import StatusBus, WatcherDropped
from servers.dpm.model import DaqStatusView, SubState


def view(daq_id: str, substate: SubState) -> DaqStatusView:
    return DaqStatusView(daq_id, daq_id, substate, (), "", "", 0.0)


def test_watcher_gets_current_statuses_then_changes_in_order_for_its_daq() -> None:
    async def run() -> list[tuple[str, SubState]]:
        bus = StatusBus(limit=10)
        watcher = bus.subscribe("A", [view("A", SubState.SCHEDULED)])
        bus.publish(view("B", SubState.COLLECTING))
        bus.publish(view("A", SubState.COLLECTING))
        bus.publish(view("A", SubState.MERGING))
        return [(v.id, v.substate) for v in [await watcher.next() for _ in range(3)]]

    assert asyncio.run(run()) == [
        ("A", SubState.SCHEDULED),
        ("A", SubState.COLLECTING),
        ("A", SubState.MERGING),
    ]


def test_watcher_that_falls_behind_is_dropped_and_the_others_keep_receiving() -> None:
    async def run() -> None:
        bus = StatusBus(limit=2)
        slow = bus.subscribe("", [])
        fast = bus.subscribe("", [])
        for substate in (SubState.COLLECTING, SubState.MERGING):
            bus.publish(view("A", substate))
            assert (await fast.next()).substate is substate
        bus.publish(view("A", SubState.RELEASING))  # publishing never waits for `slow`
        assert slow.dropped and bus.watcher_count == 1
        with pytest.raises(WatcherDropped, match="more than 2"):
            await slow.next()
        assert (await fast.next()).substate is SubState.RELEASING

    asyncio.run(run())
