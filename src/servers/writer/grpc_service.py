"""`daqif.v1.WriterControl` over gRPC (grpc.aio): the std_daq operations plus `WatchStatus`.

Thin: converts messages to and from the core's objects; a `DaqException` from the core ends the
call with its canonical code and a `daqif.v1.DaqException` in the rich status details.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from daqif.v1 import writer_pb2, writer_pb2_grpc
from servers.common.grpc_server import edge, stream_edge
from servers.writer.core import WriterCore
from servers.writer.events import StatusChanged, Tick
from servers.writer.models import DaqConfig, WriteRequest, parse_config, parse_write_request
from servers.writer.states import AcquisitionState, DeploymentState, WriterState
from servers.writer.status import Acquisition, DaqStats, Deployment, WriterStatus

SERVICE_NAME = writer_pb2.DESCRIPTOR.services_by_name["WriterControl"].full_name

_WRITER_STATES = {
    WriterState.READY: writer_pb2.WRITER_STATE_READY,
    WriterState.WRITING: writer_pb2.WRITER_STATE_WRITING,
    WriterState.UNKNOWN: writer_pb2.WRITER_STATE_UNKNOWN,
}
_ACQUISITION_STATES = {
    AcquisitionState.FINISHED: writer_pb2.ACQUISITION_STATE_FINISHED,
    AcquisitionState.FAILED: writer_pb2.ACQUISITION_STATE_FAILED,
    AcquisitionState.WRITING: writer_pb2.ACQUISITION_STATE_WRITING,
    AcquisitionState.WAITING_IMAGES: writer_pb2.ACQUISITION_STATE_WAITING_IMAGES,
    AcquisitionState.ACQUIRING_IMAGES: writer_pb2.ACQUISITION_STATE_ACQUIRING_IMAGES,
    AcquisitionState.FLUSHING_IMAGES: writer_pb2.ACQUISITION_STATE_FLUSHING_IMAGES,
}
_DEPLOYMENT_STATES = {
    DeploymentState.SUCCESS: writer_pb2.DEPLOYMENT_STATE_SUCCESS,
    DeploymentState.ERROR: writer_pb2.DEPLOYMENT_STATE_ERROR,
    DeploymentState.RUNNING: writer_pb2.DEPLOYMENT_STATE_RUNNING,
    DeploymentState.UNKNOWN: writer_pb2.DEPLOYMENT_STATE_UNKNOWN,
}
_CONFIG_SCALARS = tuple(name for name in DaqConfig.model_fields if name != "module_positions")
_INTEGER = re.compile(r"-?[0-9]+")


def acquisition_to_pb(acquisition: Acquisition) -> writer_pb2.Acquisition:
    stats = writer_pb2.AcquisitionStats(
        n_write_completed=acquisition.n_write_completed, n_write_requested=acquisition.n_write_requested
    )
    if acquisition.start_time is not None:
        stats.start_time = acquisition.start_time
    if acquisition.stop_time is not None:
        stats.stop_time = acquisition.stop_time
    return writer_pb2.Acquisition(
        info=writer_pb2.AcquisitionInfo(
            n_images=acquisition.n_images,
            output_file=acquisition.output_file or "",
            run_id="" if acquisition.run_id is None else str(acquisition.run_id),
            writer_user_id=acquisition.writer_user_id,
        ),
        state=_ACQUISITION_STATES[acquisition.state]
        if acquisition.happened
        else writer_pb2.ACQUISITION_STATE_UNDEFINED,
        message=acquisition.message,
        stats=stats,
    )


def status_to_pb(status: WriterStatus) -> writer_pb2.WriterStatus:
    return writer_pb2.WriterStatus(
        state=_WRITER_STATES[status.state], acquisition=acquisition_to_pb(status.acquisition)
    )


def config_to_pb(config: DaqConfig) -> writer_pb2.DaqConfig:
    message = writer_pb2.DaqConfig(**{name: getattr(config, name) for name in _CONFIG_SCALARS})
    for key, coordinates in config.module_positions.items():
        message.module_positions[key].coordinates.extend(coordinates)
    return message


def config_update_from_pb(message: writer_pb2.DaqConfig) -> DaqConfig:
    """The partial update a `SetConfig` carries: the fields that are set (a non-empty
    `module_positions` replaces the whole mapping); INVALID_ARGUMENT naming a bad field."""
    update: dict[str, Any] = {
        name: getattr(message, name) for name in _CONFIG_SCALARS if message.HasField(name)
    }
    if message.module_positions:
        update["module_positions"] = {
            key: list(position.coordinates) for key, position in message.module_positions.items()
        }
    return parse_config(update)


def stats_to_pb(stats: DaqStats) -> writer_pb2.DaqStats:
    counters = stats.counters
    return writer_pb2.DaqStats(
        detector=writer_pb2.Throughput(**stats.detector.to_json()),
        writer=writer_pb2.Throughput(**stats.writer.to_json()),
        counters=writer_pb2.FrameCounters(
            received=counters.received,
            written=counters.written,
            discarded=counters.discarded,
            malformed=counters.malformed,
        ),
    )


def deployment_to_pb(deployment: Deployment) -> writer_pb2.DeploymentStatus:
    stats = writer_pb2.DeploymentStats()
    if deployment.start_time is not None:
        stats.start_time = deployment.start_time
    if deployment.stop_time is not None:
        stats.stop_time = deployment.stop_time
    return writer_pb2.DeploymentStatus(
        config_id=deployment.config_id,
        message=deployment.message,
        servers=dict(deployment.servers),
        stats=stats,
        status=_DEPLOYMENT_STATES[deployment.status],
    )


def _write_request(
    message: writer_pb2.StartWriterAsyncRequest | writer_pb2.StartWriterSyncRequest,
) -> WriteRequest:
    """The request of a StartWriter call; `run_id` is text on the wire, an integer in the model
    ("" = not given), so "g-1" is refused as over REST."""
    request: dict[str, Any] = {"output_file": message.output_file, "n_images": message.n_images}
    if message.run_id:
        request["run_id"] = int(message.run_id) if _INTEGER.fullmatch(message.run_id) else message.run_id
    if message.HasField("writer_user_id"):
        request["writer_user_id"] = message.writer_user_id
    return parse_write_request(request)


Context: TypeAlias = grpc.aio.ServicerContext


class WriterControlService(writer_pb2_grpc.WriterControlServicer):
    """The gRPC face of a `WriterCore`."""

    def __init__(self, core: WriterCore) -> None:
        self._core = core

    @edge
    async def GetStatus(
        self, request: writer_pb2.GetStatusRequest, context: Context
    ) -> writer_pb2.WriterStatus:
        return status_to_pb(self._core.status())

    @edge
    async def GetConfig(self, request: writer_pb2.GetConfigRequest, context: Context) -> writer_pb2.DaqConfig:
        return config_to_pb(self._core.config)

    @edge
    async def SetConfig(self, request: writer_pb2.SetConfigRequest, context: Context) -> writer_pb2.DaqConfig:
        config = await self._core.set_config(config_update_from_pb(request.config))
        return config_to_pb(config)

    @edge
    async def GetLogs(
        self, request: writer_pb2.GetLogsRequest, context: Context
    ) -> writer_pb2.GetLogsResponse:
        return writer_pb2.GetLogsResponse(
            logs=[acquisition_to_pb(entry) for entry in self._core.logs(request.n_last_logs)]
        )

    @edge
    async def GetStats(self, request: writer_pb2.GetStatsRequest, context: Context) -> writer_pb2.DaqStats:
        return stats_to_pb(self._core.stats())

    @edge
    async def GetDeploymentStatus(
        self, request: writer_pb2.GetDeploymentStatusRequest, context: Context
    ) -> writer_pb2.DeploymentStatus:
        return deployment_to_pb(self._core.deployment())

    @edge
    async def StartWriterAsync(
        self, request: writer_pb2.StartWriterAsyncRequest, context: Context
    ) -> writer_pb2.WriterStatus:
        status = await self._core.start_write(_write_request(request))
        return status_to_pb(status)

    @edge
    async def StartWriterSync(
        self, request: writer_pb2.StartWriterSyncRequest, context: Context
    ) -> writer_pb2.WriterStatus:
        status = await self._core.write_sync(_write_request(request), timeout=request.timeout)
        return status_to_pb(status)

    @edge
    async def StopWriter(
        self, request: writer_pb2.StopWriterRequest, context: Context
    ) -> writer_pb2.WriterStatus:
        output_file = request.output_file if request.HasField("output_file") else None
        status = await self._core.stop(output_file)
        return status_to_pb(status)

    @stream_edge
    async def WatchStatus(
        self, request: writer_pb2.WatchStatusRequest, context: Context
    ) -> AsyncIterator[writer_pb2.WriterStatus]:
        async with self._core.subscribe() as events:
            yield status_to_pb(self._core.status())
            while True:
                event = await events.get()
                periodic = isinstance(event, Tick) and event.status.state is WriterState.WRITING
                if isinstance(event, StatusChanged | Tick) and (periodic or isinstance(event, StatusChanged)):
                    yield status_to_pb(event.status)
