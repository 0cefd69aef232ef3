"""The status page's feeds: the DPM's and the writer's gRPC watch streams into the `StatusBoard`.

Read-only: the feeds call only Get/Watch/Query methods. Each feed runs until cancelled. When its
server cannot be reached, or a stream ends (the server stopped or restarted), the board says so
(`link`: what the page waits for) and the feed connects again every `RETRY_S` seconds; once back it
takes the whole state afresh (the DPM's active DAQs, and the final status of those that ended
meanwhile), so the page is whole again without a reload.

- DPM: `GetActiveDaqs` then `WatchDaqStatus` (every change of every DAQ) and
  `WatchStorageStatus` (the workspace file system, every `STORAGE_INTERVAL_S`); `GetActiveDaqs`
  again every `RECONCILE_S` (a DAQ that ended between the first one and the watch's start);
- writer: `WatchStatus` (every change of its state and acquisition) and `GetStats` once a second
  for the frames/s and bytes/s of the plot (the writer computes them over its last second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from daqif.dpm_client import AsyncDpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.tls import TlsConfig
from daqif.writer_client import AsyncWriterClient
from servers.web.board import StatusBoard
from servers.web.model import daq_card, storage_card, writer_card

log = logging.getLogger(__name__)

RETRY_S = 1.0
STORAGE_INTERVAL_S = 2.0
STATS_INTERVAL_S = 1.0
RECONCILE_S = 30.0


class StreamEnded(Exception):
    """A watch stream ended without an error: its server is stopping."""


async def _until_one_ends(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines until the first ends; re-raise its error (or `StreamEnded`)."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    for task in done:
        error = task.exception()
        if error is not None:
            raise error
    raise StreamEnded("the stream ended")


def _why(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, DaqException) else str(exc) or type(exc).__name__
    return text.splitlines()[0][:200] if text else type(exc).__name__


async def follow_dpm(board: StatusBoard, address: str, tls: TlsConfig | None = None) -> None:
    """Keep the board's DAQs and storage following the DPM at `address`, until cancelled."""
    while True:
        try:
            async with AsyncDpmClient(address, timeout=10.0, tls=tls) as client:
                await _reconcile(board, client)
                board.link("dpm", True, f"connected to the DPM at {address}")
                await _until_one_ends(
                    _watch_daqs(board, client),
                    _watch_storage(board, client),
                    _reconcile_now_and_then(board, client),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            board.link("dpm", False, f"waiting for the DPM at {address} ({_why(exc)}); reconnecting")
        await asyncio.sleep(RETRY_S)


async def _reconcile(board: StatusBoard, client: AsyncDpmClient) -> None:
    """Take the DPM's active DAQs, and the final status of each DAQ shown active that is not."""
    active = [daq_card(s) for s in await client.get_active_daqs()]
    now_active = {card.id for card in active}
    ended, gone = [], []
    for daq_id in [i for i in board.active if i not in now_active]:  # ended while we were away
        try:
            card = daq_card(await client.get_daq_status(daq_id, include_archived=True))
        except DaqException as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            log.info("DAQ %s is no longer known to the DPM", daq_id)
            gone.append(daq_id)
            continue
        if card.final:
            ended.append(card)
        else:
            active.append(card)  # queued after the GetActiveDaqs reply
    board.daqs(active, ended, gone)


async def _reconcile_now_and_then(board: StatusBoard, client: AsyncDpmClient) -> None:
    # The watch stream starts after the first reconciliation: a DAQ that ended in between would stay
    # shown as active. Reconciling again now and then puts that right (one GetActiveDaqs per period).
    while True:
        await asyncio.sleep(RECONCILE_S)
        await _reconcile(board, client)


async def _watch_daqs(board: StatusBoard, client: AsyncDpmClient) -> None:
    async for status in client.watch_daq_status():
        board.daq(daq_card(status))


async def _watch_storage(board: StatusBoard, client: AsyncDpmClient) -> None:
    async for storage in client.watch_storage_status(STORAGE_INTERVAL_S):
        board.storage_status(storage_card(storage))


async def follow_writer(board: StatusBoard, address: str, tls: TlsConfig | None = None) -> None:
    """Keep the board's writer status and rates following the writer at `address`, until cancelled."""
    while True:
        try:
            async with AsyncWriterClient(address, timeout=10.0, tls=tls) as client:
                board.writer_status(writer_card(await client.get_status()))
                board.link("writer", True, f"connected to the writer at {address}")
                await _until_one_ends(_watch_writer(board, client), _sample_rates(board, client))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            board.link("writer", False, f"waiting for the writer at {address} ({_why(exc)}); reconnecting")
        await asyncio.sleep(RETRY_S)


async def _watch_writer(board: StatusBoard, client: AsyncWriterClient) -> None:
    async for status in client.watch_status():
        board.writer_status(writer_card(status))


async def _sample_rates(board: StatusBoard, client: AsyncWriterClient) -> None:
    while True:
        stats = await client.get_stats()
        board.rate(stats.detector.images_per_second, stats.detector.bytes_per_second)
        await asyncio.sleep(STATS_INTERVAL_S)
