"""Redis streams of the Standard DAQ (DESIGN §5), published when `--redis-url` is given.

- `daq:status`: the status object, once a second and on every state change;
- `daq:config`: the config, on change (entry id = the config id, `<ms>-<seq>`);
- `daq:log`: each logged (FINISHED) acquisition;
- `daq:stat`: the stats, once a second.

Each entry has one field, `json`, with the object as UTF-8 JSON. Streams are trimmed with
`MAXLEN ~ maxlen` (Redis trims whole stream nodes, so a stream may hold up to one node,
`stream-node-max-entries`, more than `maxlen`). Redis being down never stops the writer: the
failure is logged once per outage, periodic entries are simply skipped, and config and log
entries are kept (bounded) and sent once Redis is back.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from servers.writer.core import WriterCore
from servers.writer.events import AcquisitionLogged, ConfigChanged, StatusChanged, Tick

_log = logging.getLogger(__name__)

STATUS_STREAM = "daq:status"
CONFIG_STREAM = "daq:config"
LOG_STREAM = "daq:log"
STAT_STREAM = "daq:stat"
DEFAULT_MAXLEN = 1000
# Entries (config, logs) kept while Redis is unreachable; older ones are dropped.
PENDING_LIMIT = 1000


def encode(obj: Any) -> dict[str, bytes]:
    """The fields of a stream entry carrying `obj`."""
    return {"json": json.dumps(obj).encode("utf-8")}


class RedisStreams:
    """Publishes the writer's events to Redis streams until cancelled."""

    def __init__(self, core: WriterCore, url: str, *, maxlen: int = DEFAULT_MAXLEN) -> None:
        if maxlen < 1:
            raise ValueError(f"redis maxlen must be >= 1, got {maxlen}")
        self._core = core
        self._url = url
        self._maxlen = maxlen
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
        # (stream, entry id or "*", fields) not yet accepted by Redis
        self._pending: deque[tuple[str, str, dict[str, bytes]]] = deque(maxlen=PENDING_LIMIT)
        self._down = False
        self._reached = False

    @property
    def connected(self) -> bool:
        """Whether the last entry sent reached Redis (False before the first one)."""
        return self._reached and not self._down

    async def run(self) -> None:
        """Publish the current config and status, then every event; returns only when cancelled."""
        async with self._core.subscribe() as events:
            self._pending.append((CONFIG_STREAM, self._core.config_id, encode(self._core.config.to_json())))
            await self._flush_pending()
            await self._add(STATUS_STREAM, self._core.status().to_json())
            while True:
                event = await events.get()
                if isinstance(event, Tick):
                    await self._flush_pending()
                    await self._add(STATUS_STREAM, event.status.to_json())
                    await self._add(STAT_STREAM, event.stats.to_json())
                elif isinstance(event, StatusChanged) and event.significant:
                    await self._add(STATUS_STREAM, event.status.to_json())
                elif isinstance(event, ConfigChanged):
                    self._pending.append((CONFIG_STREAM, event.config_id, encode(event.config.to_json())))
                    await self._flush_pending()
                elif isinstance(event, AcquisitionLogged):
                    self._pending.append((LOG_STREAM, "*", encode(event.acquisition.to_json())))
                    await self._flush_pending()

    async def close(self) -> None:
        await self._redis.aclose()

    async def _add(self, stream: str, obj: Any) -> bool:
        return await self._xadd(stream, "*", encode(obj))

    async def _flush_pending(self) -> None:
        while self._pending:
            stream, entry_id, fields = self._pending[0]
            if not await self._xadd(stream, entry_id, fields):
                return
            self._pending.popleft()

    async def _xadd(self, stream: str, entry_id: str, fields: dict[str, bytes]) -> bool:
        try:
            try:
                await self._redis.xadd(stream, fields, id=entry_id, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
            except ResponseError as exc:
                if entry_id == "*":
                    raise
                # The stream already holds a newer id (e.g. a writer with a faster clock ran before):
                # keep the entry, let Redis choose its id.
                _log.warning("redis refused id %s on %s (%s); adding with a new id", entry_id, stream, exc)
                await self._redis.xadd(stream, fields, id="*", maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
        except (RedisError, OSError) as exc:
            if not self._down:
                _log.error(
                    "redis at %s unreachable (%s); will retry, the writer keeps running", self._url, exc
                )
                self._down = True
            return False
        if self._down:
            _log.info("redis at %s reachable again", self._url)
            self._down = False
        self._reached = True
        return True
