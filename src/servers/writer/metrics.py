"""The writer's Prometheus metrics, served at `GET /metrics` on its REST port (`rest.py`).

An adapter like REST and Redis: it reads what the core already tracks and holds no rules. One
`CollectorRegistry` per writer (never prometheus_client's global one, so two writers in one
process, or a test, never share figures). Frame counters and the current write are read from the
core when Prometheus scrapes (`WriterCollector`, a custom collector: the values already exist in
`core.stats()` and `core.status()`); only what exists nowhere else, the distribution of write
durations and the count of writes by outcome, is recorded here from the core's events
(`WriterMetrics.run`).

Frame counters come from the stats meter, sampled once a second (`core.STATS_INTERVAL`): a
scrape lags the data path by at most that. They count since the writer started, across data path
restarts (`stats.StatsMeter`), and restart from zero with the writer process, as Prometheus
counters do. The metric names and their meaning are tabled in the README ("Metrics").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from servers.writer.core import WriterCore
from servers.writer.events import StatusChanged
from servers.writer.states import AcquisitionState, WriterState
from servers.writer.status import MESSAGE_INTERRUPTED, Acquisition

WRITE_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds; a write lasts from a fraction of a second (tests) to an hour (a long scan)."""

_ENDED = (AcquisitionState.FINISHED, AcquisitionState.FAILED)


class RedisLink(Protocol):
    """What the metrics need of the Redis publisher (`redis_streams.RedisStreams`)."""

    @property
    def connected(self) -> bool: ...


def outcome_of(acquisition: Acquisition) -> str:
    """`completed`, `interrupted` or `failed`: the `outcome` label of a write that ended."""
    if acquisition.state is AcquisitionState.FAILED:
        return "failed"
    return "interrupted" if acquisition.message == MESSAGE_INTERRUPTED else "completed"


class WriterCollector(Collector):
    """The figures the core holds, read at each scrape."""

    def __init__(self, core: WriterCore, redis: RedisLink | None = None) -> None:
        self._core = core
        self._redis = redis

    def collect(self) -> Iterable[Metric]:
        counters = self._core.stats().counters
        for name, value, documentation in (
            ("frames_received", counters.received, "Messages received from the frame stream."),
            ("frames_written", counters.written, "Frames written to an output file."),
            ("frames_discarded", counters.discarded, "Good frames received while no write was open."),
            (
                "frames_malformed",
                counters.malformed,
                "Messages refused: unreadable header, wrong size or shape, unknown dtype.",
            ),
            ("received_bytes", counters.bytes_received, "Bytes received (headers and data)."),
            ("written_bytes", counters.bytes_written, "Frame data bytes written to output files."),
        ):
            yield CounterMetricFamily(f"daqif_writer_{name}", documentation, value=value)
        status = self._core.status()
        state = GaugeMetricFamily("daqif_writer_state", "1 for the writer's current state.", labels=["state"])
        for each in WriterState:
            state.add_metric([each.value], 1.0 if status.state is each else 0.0)
        yield state
        acquisition = status.acquisition
        writing = status.state is WriterState.WRITING
        yield GaugeMetricFamily(
            "daqif_writer_write_images_requested",
            "Images the current (or last) write records.",
            value=acquisition.n_images,
        )
        yield GaugeMetricFamily(
            "daqif_writer_write_images_written",
            "Images the current (or last) write has written.",
            value=acquisition.n_write_completed,
        )
        yield GaugeMetricFamily(
            "daqif_writer_write_active", "1 while a write is open.", value=1.0 if writing else 0.0
        )
        # The core's poller (10 Hz) marks the writer UNKNOWN as soon as the data path process is
        # gone, and while it restarts; any other state means it was alive at the last poll.
        yield GaugeMetricFamily(
            "daqif_writer_datapath_up",
            "1 while the data path process runs (as of the core's last poll, at most 0.1 s ago).",
            value=0.0 if status.state is WriterState.UNKNOWN else 1.0,
        )
        if self._redis is not None:
            yield GaugeMetricFamily(
                "daqif_writer_redis_connected",
                "1 while the Redis server of --redis-url accepts the writer's streams.",
                value=1.0 if self._redis.connected else 0.0,
            )


class WriterMetrics:
    """The writer's registry: the collector above plus what is recorded from the core's events."""

    def __init__(self, core: WriterCore, redis: RedisLink | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._core = core
        self.registry.register(WriterCollector(core, redis))
        self.write_duration = Histogram(
            "daqif_writer_write_duration_seconds",
            "Duration of each write that ended, from the file opening to its closing.",
            buckets=WRITE_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.writes = Counter(
            "daqif_writer_writes",
            "Writes that ended, by outcome (completed, interrupted, failed).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("completed", "interrupted", "failed"):
            self.writes.labels(outcome)  # present at 0 before the first write ends
        self._last_ended: Acquisition | None = None

    def observe(self, acquisition: Acquisition) -> None:
        """Record a write that ended (once: the status repeats it until the next write)."""
        if acquisition.state not in _ENDED or not acquisition.happened or acquisition == self._last_ended:
            return
        self._last_ended = acquisition
        self.writes.labels(outcome_of(acquisition)).inc()
        if acquisition.start_time is not None and acquisition.stop_time is not None:
            self.write_duration.observe(max(0.0, acquisition.stop_time - acquisition.start_time))

    async def run(self) -> None:
        """Follow the core's events until cancelled."""
        # The acquisition shown at start-up ended before this writer ran: not one of its writes.
        self._last_ended = self._core.status().acquisition
        async with self._core.subscribe() as events:
            while True:
                event = await events.get()
                if isinstance(event, StatusChanged) and event.significant:
                    self.observe(event.status.acquisition)


def start_metrics(
    core: WriterCore, redis: RedisLink | None = None
) -> tuple[WriterMetrics, asyncio.Task[None]]:
    """The writer's metrics and the task recording them (cancel it at shutdown)."""
    metrics = WriterMetrics(core, redis)
    return metrics, asyncio.create_task(metrics.run(), name="writer-metrics")
