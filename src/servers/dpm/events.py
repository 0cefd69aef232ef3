"""The status bus behind `WatchDaqStatus`: every status change, in order, to every watcher.

Publishing never waits: each watcher has a bounded buffer, and a watcher that falls that far
behind is dropped (with a log line) instead of slowing the DPM down. The watcher then sees
`WatcherDropped` and its stream ends; the client reconnects and gets the current statuses again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from servers.dpm.model import DaqStatusView

log = logging.getLogger(__name__)


class WatcherDropped(Exception):
    """The watcher fell too far behind and was dropped."""


class StatusWatcher:
    """One subscriber: `initial` statuses first, then every published change for its DAQ(s)."""

    def __init__(self, bus: StatusBus, daq_id: str, limit: int, initial: list[DaqStatusView]) -> None:
        self.daq_id = daq_id
        self._bus = bus
        self._limit = limit
        self._initial = deque(initial)
        self._items: deque[DaqStatusView] = deque()
        self._ready = asyncio.Event()
        self.dropped = False

    def _offer(self, view: DaqStatusView) -> bool:
        if self.daq_id and view.id != self.daq_id:
            return True
        if len(self._items) >= self._limit:
            self.dropped = True
            self._ready.set()
            return False
        self._items.append(view)
        self._ready.set()
        return True

    async def next(self) -> DaqStatusView:
        """The next status; raises `WatcherDropped` once the watcher overflowed."""
        if self._initial:
            return self._initial.popleft()
        while True:
            if self.dropped:
                raise WatcherDropped(f"watcher fell more than {self._limit} status changes behind")
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class StatusBus:
    """Fan-out of status changes to watchers."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._watchers: set[StatusWatcher] = set()
        self._observers: list[Callable[[DaqStatusView], None]] = []

    def observe(self, observer: Callable[[DaqStatusView], None]) -> None:
        """Call `observer` with every status published from now on, synchronously, in order.

        For in-process adapters that must see every change and cannot fall behind (the metrics);
        `observer` must be quick and must not raise (an exception is logged and ignored).
        """
        self._observers.append(observer)

    def subscribe(self, daq_id: str, current: list[DaqStatusView]) -> StatusWatcher:
        """Subscribe; `current` (the statuses at this instant) is delivered first.

        The caller takes `current` and subscribes without awaiting in between, so no change
        is missed or delivered twice.
        """
        watcher = StatusWatcher(self, daq_id, self._limit, current)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: StatusWatcher) -> None:
        self._watchers.discard(watcher)

    def publish(self, view: DaqStatusView) -> None:
        for observer in self._observers:
            try:
                observer(view)
            except Exception:
                log.exception("a status observer failed on DAQ %s", view.id)
        for watcher in list(self._watchers):
            if not watcher._offer(view):
                log.warning(
                    "dropping a WatchDaqStatus watcher (filter %r): more than %d changes not read",
                    watcher.daq_id,
                    self._limit,
                )
                self._watchers.discard(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)
