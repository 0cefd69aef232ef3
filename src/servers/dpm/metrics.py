"""The DPM's Prometheus metrics (`daqif-dpm-server --metrics-port P`, HTTP `GET /metrics`).

An adapter: it reads the core and holds no rules. One `CollectorRegistry` per server, never the
global one. Two kinds of figures:

- read from the core at each scrape (`DpmCollector`): active DAQs by substate, active alerts by
  severity, DAQs in error, storage capacity/free/available. These are the core's own state, so
  after a restart they are what the server rebuilt from its workspace, nothing else;
- recorded as the lifecycle publishes each status change (`DpmMetrics.on_status`, an observer of
  the `StatusBus`, called synchronously so none is missed): how long each collect, merge and
  release step took (histograms), bytes merged and released, DAQs that ended, by substate.

A step's duration runs from the status that started it (the substate change, or the
`retrying …` status of RetryMergeDaq) to the substate change that ends it, so the time an
operator took to retry is not counted. A step that was under way when the server started is not
timed (its start is unknown), but its bytes are counted once it ends. Counters count since the
server started, as Prometheus counters do.

QueueDaq latency is measured by a gRPC interceptor around the method (`QueueLatency`): the time
from the request's arrival to the reply, validation and the durable write included.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from servers.dpm.lifecycle import DataProductManager
from servers.dpm.model import DaqStatusView, Severity, SubState

log = logging.getLogger(__name__)

QUEUE_METHOD = "/daqif.v1.DpmDaqControl/QueueDaq"
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_TIMED = {SubState.COLLECTING: "collect", SubState.MERGING: "merge", SubState.RELEASING: "release"}
_ACTIVE = [s for s in SubState if not s.is_final]


class DpmCollector(Collector):
    """The core's current state, read at each scrape (in the server's loop: `common.metrics`)."""

    def __init__(self, dpm: DataProductManager) -> None:
        self._dpm = dpm

    def collect(self) -> Iterable[Metric]:
        views = self._dpm.active()
        by_substate = dict.fromkeys(_ACTIVE, 0)
        by_severity = dict.fromkeys(Severity, 0)
        in_error = 0
        for view in views:
            by_substate[view.substate] += 1
            for alert in view.alerts:
                by_severity[alert.severity] += 1
            in_error += view.error
        daqs = GaugeMetricFamily("daqif_dpm_daqs", "Active DAQs by substate.", labels=["substate"])
        for substate, count in by_substate.items():
            daqs.add_metric([substate.value], count)
        yield daqs
        alerts = GaugeMetricFamily(
            "daqif_dpm_alerts", "Active alerts of active DAQs, by severity.", labels=["severity"]
        )
        for severity, count in by_severity.items():
            alerts.add_metric([severity.value], count)
        yield alerts
        yield GaugeMetricFamily(
            "daqif_dpm_daqs_in_error",
            "Active DAQs with an ERROR alert (waiting for retry or abort).",
            in_error,
        )
        try:
            storage = self._dpm.storage()
        except OSError as exc:
            log.warning("metrics: cannot query the workspace file system: %s", exc)
            return
        for name, value, documentation in (
            ("capacity", storage.capacity, "Size of the workspace file system."),
            ("free", storage.free, "Free bytes of the workspace file system."),
            ("available", storage.available, "Bytes of the workspace file system available to the DPM."),
        ):
            yield GaugeMetricFamily(f"daqif_dpm_storage_{name}_bytes", documentation, value=value)


@dataclass
class _Followed:
    """What the metrics remember of one active DAQ."""

    substate: SubState
    since: float | None  # when its current step started; None: before this server started
    receivers: int  # receivers it has yet to release to


class DpmMetrics:
    """The DPM's registry and the observer recording step durations and bytes."""

    def __init__(self, dpm: DataProductManager) -> None:
        self._dpm = dpm
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(DpmCollector(dpm))
        self.queue_latency = Histogram(
            "daqif_dpm_queue_daq_seconds",
            "QueueDaq latency: request received to reply sent (validation and durable write included).",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.steps = {
            step: Histogram(
                f"daqif_dpm_{step}_seconds",
                f"Duration of each successful {step} step.",
                buckets=STEP_BUCKETS,
                registry=self.registry,
            )
            for step in _TIMED.values()
        }
        self.merged_bytes = Counter(
            "daqif_dpm_merged_bytes", "Bytes of the data products merged.", registry=self.registry
        )
        self.released_bytes = Counter(
            "daqif_dpm_released_bytes",
            "Bytes delivered to receivers (product size times the receivers it went to).",
            registry=self.registry,
        )
        self.finished = Counter(
            "daqif_dpm_daqs_finished",
            "DAQs that ended (and were archived), by final substate.",
            ["substate"],
            registry=self.registry,
        )
        for substate in (SubState.COMPLETED, SubState.ABORTED):
            self.finished.labels(substate.value)
        self._followed: dict[str, _Followed] = {}

    def attach(self) -> None:
        """Follow the DPM from now on: call once its workspace is loaded (`dpm.start()`), before it serves."""
        for view in self._dpm.active():  # resumed DAQs: their current step started before us
            self._followed[view.id] = _Followed(view.substate, None, self._receivers_to_go(view.id))
        self._dpm.bus.observe(self.on_status)

    def _receivers_to_go(self, daq_id: str) -> int:
        return sum(not r.released for r in self._dpm.internal(daq_id).receivers)

    def on_status(self, view: DaqStatusView) -> None:
        """One published status change (synchronous, from the lifecycle's publish)."""
        followed = self._followed.get(view.id)
        if followed is None:
            if view.substate.is_final:
                return
            followed = _Followed(view.substate, view.timestamp, self._receivers_to_go(view.id))
            self._followed[view.id] = followed
        if view.substate is followed.substate:
            if view.message.startswith("retrying"):
                followed.since = view.timestamp  # RetryMergeDaq: the step runs again from now
            return
        step = _TIMED.get(followed.substate)
        if step is not None and followed.since is not None and view.substate is not SubState.ABORTING:
            self.steps[step].observe(max(0.0, view.timestamp - followed.since))
        if followed.substate is SubState.MERGING and view.substate is SubState.RELEASING:
            self.merged_bytes.inc(_size(view.result))
        if followed.substate is SubState.RELEASING and view.substate is SubState.COMPLETED:
            self.released_bytes.inc(_size(view.result) * followed.receivers)
        followed.substate, followed.since = view.substate, view.timestamp
        if view.substate.is_final:
            self.finished.labels(view.substate.value).inc()
            del self._followed[view.id]

    def interceptor(self) -> QueueLatency:
        return QueueLatency(self.queue_latency)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


class QueueLatency(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Times every QueueDaq call into `histogram`; other methods pass untouched."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != QUEUE_METHOD or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        histogram = self._histogram

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                histogram.observe(time.perf_counter() - started)

        return handler._replace(unary_unary=timed)
