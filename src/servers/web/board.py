"""What the status page shows, kept in one place, and the fan-out of its changes to the browsers.

`StatusBoard` is fed by the feeds (`feeds.py`: the DPM's and the writer's gRPC watch streams) and
read by the server-sent events of `app.py`. It holds the cards of `model.py`; every change is
published as one event `(kind, JSON-ready data)` to every subscribed browser:

- `daq`: one DAQ's status (active or just finished); `daqs`: the whole list (after a reconnect);
- `writer`: the writer's status; `rate`: one point of frames/s and bytes/s (about once a second);
- `storage`: the DPM workspace's file system; `link`: whether the page reaches the DPM and the
  writer, and if not, what it is waiting for.

A browser that connects gets `snapshot` (everything) first. A browser too slow to read its events
loses the oldest ones, never slows the feeds; the next snapshot (on its reconnect) is whole again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from servers.web.model import DaqCard, Link, RatePoint, StorageCard, WriterCard

RECENT_FINISHED = 20
"""Finished DAQs the page keeps showing."""
RATE_HISTORY_S = 300
"""Seconds of frames/s and bytes/s the plot shows."""
QUEUE_SIZE = 1000

Event = tuple[str, Any]


class StatusBoard:
    """The page's model and its subscribers."""

    def __init__(self) -> None:
        self.active: dict[str, DaqCard] = {}
        self.finished: deque[DaqCard] = deque(maxlen=RECENT_FINISHED)
        self.writer: WriterCard | None = None
        self.rates: deque[RatePoint] = deque(maxlen=RATE_HISTORY_S)
        self.storage: StorageCard | None = None
        self.preview: str | None = None
        """URL of the writer's live preview (its `GET /daq/live` MJPEG stream, `daqif web
        --writer-preview URL`); None: the page shows none."""
        self.links: dict[str, Link] = {
            "dpm": Link(up=False, message="connecting"),
            "writer": Link(up=False, message="connecting"),
        }
        self._subscribers: set[asyncio.Queue[Event]] = set()

    # -- what the feeds tell ----------------------------------------------------------------

    def daq(self, card: DaqCard) -> None:
        """A DAQ's new status; a final one moves it from the active DAQs to the finished ones."""
        if card.final:
            self.active.pop(card.id, None)
            self._add_finished(card)
        else:
            self.active[card.id] = card
        self._publish("daq", card.model_dump())

    def daqs(self, active: list[DaqCard], ended: list[DaqCard], gone: Sequence[str] = ()) -> None:
        """A reconciliation with the DPM (on connecting, and now and then): `active` as it answered,
        `ended` the final statuses of DAQs that ended unseen, `gone` ids it no longer knows.

        The watch stream may have told newer statuses meanwhile: a card older than the one shown, or
        of a DAQ already finished, changes nothing.
        """
        for card in active:
            shown = self.active.get(card.id)
            if self._is_finished(card.id) or (shown is not None and shown.timestamp > card.timestamp):
                continue
            self.active[card.id] = card
        for card in ended:
            self.active.pop(card.id, None)
            self._add_finished(card)
        for daq_id in gone:
            self.active.pop(daq_id, None)
        self._publish("daqs", self._daqs())

    def _is_finished(self, daq_id: str) -> bool:
        return any(done.id == daq_id for done in self.finished)

    def _add_finished(self, card: DaqCard) -> None:
        if not self._is_finished(card.id):
            self.finished.appendleft(card)

    def writer_status(self, card: WriterCard) -> None:
        if card != self.writer:
            self.writer = card
            self._publish("writer", card.model_dump())

    def rate(self, frames_per_second: float, bytes_per_second: float, now: float | None = None) -> None:
        point = RatePoint(t=time.time() if now is None else now, fps=frames_per_second, bps=bytes_per_second)
        self.rates.append(point)
        self._publish("rate", point.model_dump())

    def storage_status(self, card: StorageCard) -> None:
        if card != self.storage:
            self.storage = card
            self._publish("storage", card.model_dump())

    def link(self, name: str, up: bool, message: str) -> None:
        """Whether the feed `name` (`dpm`, `writer`) is connected; `message` says what it waits for."""
        new = Link(up=up, message=message)
        if self.links.get(name) != new:
            self.links[name] = new
            self._publish("link", {name: new.model_dump()})

    # -- what the browsers read ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            **self._daqs(),
            "writer": self.writer.model_dump() if self.writer else None,
            "rates": [point.model_dump() for point in self.rates],
            "storage": self.storage.model_dump() if self.storage else None,
            "preview": self.preview,
            "links": {name: link.model_dump() for name, link in self.links.items()},
        }

    def _daqs(self) -> dict[str, Any]:
        return {
            "active": [card.model_dump() for card in self.active.values()],
            "finished": [card.model_dump() for card in self.finished],
        }

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        """A queue of events, the snapshot first."""
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        queue.put_nowait(("snapshot", self.snapshot()))
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def _publish(self, kind: str, data: Any) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((kind, data))
