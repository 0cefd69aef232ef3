"""Typed clients of the writer's gRPC `WriterControl` (the std_daq operations over gRPC).

    with WriterClient("127.0.0.1:12084") as writer:
        writer.start_writer_async("/data/run_001.h5", n_images=100)
        status = writer.wait_until_ready()       # READY again: the write ended
        print(status.acquisition.message)        # "Completed."

Every failed call raises `daqif.errors.DaqException` with the server's message and code
(FAILED_PRECONDITION: writer busy/unknown; INVALID_ARGUMENT: bad request or path).
`AsyncWriterClient` offers the same calls for asyncio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from daqif import defaults
from daqif.errors import DaqException, ErrorCode
from daqif.grpc_client import AsyncGrpcClient, GrpcClient
from daqif.tls import TlsConfig
from daqif.v1 import writer_pb2, writer_pb2_grpc

DEFAULT_ADDRESS = defaults.WRITER_GRPC_ADDRESS

WriterStatus = writer_pb2.WriterStatus
DaqConfig = writer_pb2.DaqConfig
DaqStats = writer_pb2.DaqStats
DeploymentStatus = writer_pb2.DeploymentStatus
Acquisition = writer_pb2.Acquisition


def writer_state_name(value: int) -> str:
    """`WRITER_STATE_READY` → `READY`."""
    return writer_pb2.WriterState.Name(value).removeprefix("WRITER_STATE_")


def acquisition_state_name(value: int) -> str:
    """`ACQUISITION_STATE_FINISHED` → `FINISHED` (`UNDEFINED`: no acquisition yet)."""
    return writer_pb2.AcquisitionState.Name(value).removeprefix("ACQUISITION_STATE_")


def config_message(config: Mapping[str, Any] | DaqConfig) -> DaqConfig:
    """A `DaqConfig` message from a (partial) std_daq config dict; only the given fields are set.

    A field that does not exist or has the wrong type raises `DaqException` (INVALID_ARGUMENT)."""
    if isinstance(config, writer_pb2.DaqConfig):
        return config
    fields = dict(config)
    positions = fields.pop("module_positions", None)
    try:
        message = writer_pb2.DaqConfig(**fields)
        for key, coordinates in (positions or {}).items():
            message.module_positions[str(key)].coordinates.extend(coordinates)
    except (TypeError, ValueError) as exc:
        raise DaqException.invalid_argument(f"invalid config: {exc}") from None
    return message


def _start_request(
    output_file: str, n_images: int, run_id: str | int | None, writer_user_id: int | None
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "output_file": output_file,
        "n_images": n_images,
        "run_id": "" if run_id is None else str(run_id),
    }
    if writer_user_id is not None:  # daqif extension: this write's file is created as that uid
        request["writer_user_id"] = writer_user_id
    return request


def _stop_request(output_file: str | None) -> writer_pb2.StopWriterRequest:
    if output_file is None:  # the std_daq stop: whatever write runs
        return writer_pb2.StopWriterRequest()
    return writer_pb2.StopWriterRequest(output_file=output_file)


class WriterClient(GrpcClient):
    """Blocking client of one writer's `WriterControl`."""

    server_name = "writer"

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        tls: TlsConfig | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        """`keepalive_s`: ping the writer while a call is open (`daqif.grpc_client.keepalive_options`)."""
        super().__init__(address, timeout=timeout, tls=tls, keepalive_s=keepalive_s)
        self._stub = writer_pb2_grpc.WriterControlStub(self._channel)

    def get_status(self) -> WriterStatus:
        status: WriterStatus = self._call(self._stub.GetStatus, writer_pb2.GetStatusRequest())
        return status

    def get_config(self) -> DaqConfig:
        config: DaqConfig = self._call(self._stub.GetConfig, writer_pb2.GetConfigRequest())
        return config

    def set_config(self, config: Mapping[str, Any] | DaqConfig) -> DaqConfig:
        """Apply a partial or full config; returns the config now in force."""
        request = writer_pb2.SetConfigRequest(config=config_message(config))
        applied: DaqConfig = self._call(self._stub.SetConfig, request, timeout=max(self.timeout or 0, 60.0))
        return applied

    def get_logs(self, n_last_logs: int) -> Sequence[Acquisition]:
        """The last logged acquisitions, newest first."""
        return list(self._call(self._stub.GetLogs, writer_pb2.GetLogsRequest(n_last_logs=n_last_logs)).logs)

    def get_stats(self) -> DaqStats:
        stats: DaqStats = self._call(self._stub.GetStats, writer_pb2.GetStatsRequest())
        return stats

    def get_deployment_status(self) -> DeploymentStatus:
        status: DeploymentStatus = self._call(
            self._stub.GetDeploymentStatus, writer_pb2.GetDeploymentStatusRequest()
        )
        return status

    def start_writer_async(
        self,
        output_file: str,
        n_images: int,
        run_id: str | int | None = None,
        *,
        writer_user_id: int | None = None,
    ) -> WriterStatus:
        """Start a write; returns once the output file is open. `writer_user_id` (a daqif
        extension): the uid this write's file is created as, within the writer's allowed uids."""
        request = writer_pb2.StartWriterAsyncRequest(
            **_start_request(output_file, n_images, run_id, writer_user_id)
        )
        status: WriterStatus = self._call(self._stub.StartWriterAsync, request)
        return status

    def start_writer_sync(
        self,
        output_file: str,
        n_images: int,
        run_id: str | int | None = None,
        *,
        timeout: float = 0.0,
        writer_user_id: int | None = None,
    ) -> WriterStatus:
        """Write and return when the write has ended (server cap: `timeout` if smaller, 0 = the cap)."""
        request = writer_pb2.StartWriterSyncRequest(
            **_start_request(output_file, n_images, run_id, writer_user_id), timeout=timeout
        )
        call_timeout = None if self.timeout is None else (timeout or 3600.0) + self.timeout
        status: WriterStatus = self._call(self._stub.StartWriterSync, request, timeout=call_timeout)
        return status

    def stop_writer(self, output_file: str | None = None) -> WriterStatus:
        """Stop a write; resets an UNKNOWN writer to READY.

        `output_file` (a daqif extension): stop only the write to that file (as the status shows
        it); refused with FAILED_PRECONDITION, nothing stopped, while another write runs."""
        status: WriterStatus = self._call(self._stub.StopWriter, _stop_request(output_file))
        return status

    def watch_status(self, *, timeout: float | None = None) -> Iterator[WriterStatus]:
        """The current status, then every change (at least once a second while writing)."""
        yield from self._stream(self._stub.WatchStatus(writer_pb2.WatchStatusRequest(), timeout=timeout))

    def wait_until_ready(self, timeout: float = 60.0) -> WriterStatus:
        """Follow the status until the writer is no longer WRITING; return that status."""
        deadline = time.monotonic() + timeout
        try:
            for status in self.watch_status(timeout=timeout):
                if status.state != writer_pb2.WRITER_STATE_WRITING:
                    return status
        except DaqException as exc:
            if exc.code is not ErrorCode.DEADLINE_EXCEEDED:
                raise
        left = max(0.0, deadline - time.monotonic())
        raise DaqException(
            "",
            f"the writer was still writing after {timeout} s ({left:.1f} s left)",
            ErrorCode.DEADLINE_EXCEEDED,
        )


class AsyncWriterClient(AsyncGrpcClient):
    """asyncio client of one writer's `WriterControl` (grpc.aio)."""

    server_name = "writer"

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = 30.0, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(address, timeout=timeout, tls=tls)
        self._stub = writer_pb2_grpc.WriterControlStub(self._channel)

    async def get_status(self) -> WriterStatus:
        status: WriterStatus = await self._call(self._stub.GetStatus, writer_pb2.GetStatusRequest())
        return status

    async def get_config(self) -> DaqConfig:
        config: DaqConfig = await self._call(self._stub.GetConfig, writer_pb2.GetConfigRequest())
        return config

    async def set_config(self, config: Mapping[str, Any] | DaqConfig) -> DaqConfig:
        request = writer_pb2.SetConfigRequest(config=config_message(config))
        applied: DaqConfig = await self._call(
            self._stub.SetConfig, request, timeout=max(self.timeout or 0, 60.0)
        )
        return applied

    async def get_logs(self, n_last_logs: int) -> Sequence[Acquisition]:
        response = await self._call(self._stub.GetLogs, writer_pb2.GetLogsRequest(n_last_logs=n_last_logs))
        return list(response.logs)

    async def get_stats(self) -> DaqStats:
        stats: DaqStats = await self._call(self._stub.GetStats, writer_pb2.GetStatsRequest())
        return stats

    async def get_deployment_status(self) -> DeploymentStatus:
        status: DeploymentStatus = await self._call(
            self._stub.GetDeploymentStatus, writer_pb2.GetDeploymentStatusRequest()
        )
        return status

    async def start_writer_async(
        self,
        output_file: str,
        n_images: int,
        run_id: str | int | None = None,
        *,
        writer_user_id: int | None = None,
    ) -> WriterStatus:
        request = writer_pb2.StartWriterAsyncRequest(
            **_start_request(output_file, n_images, run_id, writer_user_id)
        )
        status: WriterStatus = await self._call(self._stub.StartWriterAsync, request)
        return status

    async def start_writer_sync(
        self,
        output_file: str,
        n_images: int,
        run_id: str | int | None = None,
        *,
        timeout: float = 0.0,
        writer_user_id: int | None = None,
    ) -> WriterStatus:
        request = writer_pb2.StartWriterSyncRequest(
            **_start_request(output_file, n_images, run_id, writer_user_id), timeout=timeout
        )
        call_timeout = None if self.timeout is None else (timeout or 3600.0) + self.timeout
        status: WriterStatus = await self._call(self._stub.StartWriterSync, request, timeout=call_timeout)
        return status

    async def stop_writer(self, output_file: str | None = None) -> WriterStatus:
        """As `WriterClient.stop_writer`."""
        status: WriterStatus = await self._call(self._stub.StopWriter, _stop_request(output_file))
        return status

    async def watch_status(self) -> AsyncIterator[WriterStatus]:
        """The current status, then every change (at least once a second while writing)."""
        async for status in self._stream(self._stub.WatchStatus(writer_pb2.WatchStatusRequest())):
            yield status
