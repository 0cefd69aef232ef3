"""What the writer core tells its adapters (REST, gRPC, Redis), and the hub that fans it out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from servers.writer.models import DaqConfig
from servers.writer.status import Acquisition, DaqStats, WriterStatus


@dataclass(frozen=True)
class StatusChanged:
    """The status changed. `significant`: the writer or acquisition state or message changed
    (not only a frame count)."""

    status: WriterStatus
    significant: bool


@dataclass(frozen=True)
class Tick:
    """Once a second: the stats of the last second and the current status."""

    stats: DaqStats
    status: WriterStatus


@dataclass(frozen=True)
class ConfigChanged:
    config: DaqConfig
    config_id: str


@dataclass(frozen=True)
class AcquisitionLogged:
    """A FINISHED acquisition (completed or interrupted) was added to the logs."""

    acquisition: Acquisition


WriterEvent = StatusChanged | Tick | ConfigChanged | AcquisitionLogged


class EventHub:
    """Fan-out of events to subscribers; a slow subscriber loses its oldest events, never blocks
    the writer."""

    def __init__(self, queue_size: int = 256) -> None:
        self._queues: set[asyncio.Queue[WriterEvent]] = set()
        self._queue_size = queue_size

    def publish(self, event: WriterEvent) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[WriterEvent]]:
        queue: asyncio.Queue[WriterEvent] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
