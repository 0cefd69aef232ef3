"""Typed clients of the Data Product Manager (`DpmControl` + `DpmDaqControl`).

    with DpmClient("127.0.0.1:12083") as dpm:
        reply = dpm.queue_daq(spec)              # str (JSON) or dict
        status = dpm.wait_for(reply.id)          # until COMPLETED or ABORTED
        print(status.result)

Every failed call raises `daqif.errors.DaqException` with the server's id, message and code.
`AsyncDpmClient` offers the same calls for asyncio.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from typing import Any

from google.protobuf import empty_pb2

from daqif import defaults
from daqif.errors import DaqException, ErrorCode
from daqif.grpc_client import AsyncGrpcClient, GrpcClient
from daqif.tls import TlsConfig
from daqif.v1 import dpm_pb2, dpm_pb2_grpc

DEFAULT_ADDRESS = defaults.DPM_ADDRESS

DaqStatus = dpm_pb2.DaqStatus
DaqReply = dpm_pb2.DaqReply
InternalDaqStatus = dpm_pb2.InternalDaqStatus
StorageStatus = dpm_pb2.StorageStatus
SubState = dpm_pb2.DaqSubState

FINAL_SUBSTATES: frozenset[int] = frozenset({dpm_pb2.DAQ_SUB_STATE_COMPLETED, dpm_pb2.DAQ_SUB_STATE_ABORTED})


def substate_name(value: int) -> str:
    """`DAQ_SUB_STATE_COLLECTING` → `COLLECTING`."""
    return dpm_pb2.DaqSubState.Name(value).removeprefix("DAQ_SUB_STATE_")


def state_name(value: int) -> str:
    """`DAQ_STATE_MERGING` → `MERGING`."""
    return dpm_pb2.DaqState.Name(value).removeprefix("DAQ_STATE_")


def _specification_text(specification: str | bytes | Mapping[str, Any]) -> str:
    if isinstance(specification, Mapping):
        return json.dumps(specification)
    if isinstance(specification, bytes):
        return specification.decode("utf-8")
    return specification


def _spec_id(text: str) -> str:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # the server explains what is wrong with it
        return ""
    value = document.get("id", "") if isinstance(document, dict) else ""
    return value if isinstance(value, str) else ""


class DpmClient(GrpcClient):
    """Blocking client of one DPM server."""

    server_name = "DPM server"

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = 10.0, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(address, timeout=timeout, tls=tls)
        self._dpm = dpm_pb2_grpc.DpmControlStub(self._channel)
        self._daq = dpm_pb2_grpc.DpmDaqControlStub(self._channel)

    # DpmDaqControl
    def queue_daq(self, specification: str | bytes | Mapping[str, Any]) -> DaqReply:
        """Queue a DAQ; returns once the server has persisted it."""
        text = _specification_text(specification)
        reply: DaqReply = self._call(
            self._daq.QueueDaq, dpm_pb2.QueueDaqRequest(specification=text), _spec_id(text)
        )
        return reply

    def abort_daq(self, id: str) -> DaqReply:
        reply: DaqReply = self._call(self._daq.AbortDaq, dpm_pb2.AbortDaqRequest(id=id), id)
        return reply

    def retry_merge_daq(self, id: str) -> None:
        self._call(self._daq.RetryMergeDaq, dpm_pb2.RetryMergeDaqRequest(id=id), id)

    def get_daq_status(self, id: str, *, include_archived: bool = False) -> DaqStatus:
        """The status of DAQ `id`; with `include_archived`, also the final status of a finished one."""
        request = dpm_pb2.GetDaqStatusRequest(id=id, include_archived=include_archived)
        status: DaqStatus = self._call(self._daq.GetDaqStatus, request, id)
        return status

    def get_active_daqs(self) -> list[DaqStatus]:
        return list(self._call(self._daq.GetActiveDaqs, dpm_pb2.GetActiveDaqsRequest()).daqs)

    def get_internal_daq_status(self, id: str) -> InternalDaqStatus:
        status: InternalDaqStatus = self._call(
            self._daq.GetInternalDaqStatus, dpm_pb2.GetInternalDaqStatusRequest(id=id), id
        )
        return status

    def watch_daq_status(self, id: str = "", *, timeout: float | None = None) -> Iterator[DaqStatus]:
        """Current status of every matching active DAQ, then every change (until cancelled)."""
        yield from self._stream(
            self._daq.WatchDaqStatus(dpm_pb2.WatchDaqStatusRequest(id=id), timeout=timeout), id
        )

    def wait_for(
        self,
        id: str,
        substates: Collection[int] = FINAL_SUBSTATES,
        *,
        timeout: float = 60.0,
        on_status: Callable[[DaqStatus], None] | None = None,
        stop_when: Callable[[DaqStatus], bool] | None = None,
    ) -> DaqStatus:
        """Follow DAQ `id` until its substate is one of `substates`; return that status.

        `on_status` sees every status; `stop_when`, if given, ends the wait early at the first
        status it is true for (e.g. `lambda s: s.error`), which is returned.

        A DAQ that reaches COMPLETED/ABORTED is archived: the last status comes from the stream,
        or, if it finished before the watch began, from `get_daq_status(include_archived=True)`.
        Raises `DaqException` with DEADLINE_EXCEEDED when `timeout` runs out.
        """
        deadline = time.monotonic() + timeout
        try:
            for status in self.watch_daq_status(id, timeout=timeout):
                if on_status is not None:
                    on_status(status)
                if status.substate in substates or (stop_when is not None and stop_when(status)):
                    return status
        except DaqException as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                # Finished (and archived) before the watch began: its final status is kept.
                final = self.get_daq_status(id, include_archived=True)
                if on_status is not None:
                    on_status(final)
                if final.substate in substates:
                    return final
                raise
            if exc.code is not ErrorCode.DEADLINE_EXCEEDED:
                raise
        remaining = max(0.0, deadline - time.monotonic())
        raise DaqException(
            id,
            f"DAQ did not reach the awaited substate within {timeout} s ({remaining:.1f} s left)",
            ErrorCode.DEADLINE_EXCEEDED,
        )

    # DpmControl
    def query_storage_status(self) -> StorageStatus:
        status: StorageStatus = self._call(self._dpm.QueryStorageStatus, dpm_pb2.QueryStorageStatusRequest())
        return status

    def watch_storage_status(self, interval: float = 1.0) -> Iterator[StorageStatus]:
        yield from self._stream(
            self._dpm.WatchStorageStatus(dpm_pb2.WatchStorageStatusRequest(interval=interval))
        )

    def exit(self) -> str:
        """Ask the server to terminate; returns its reply message."""
        return str(self._call(self._dpm.Exit, dpm_pb2.ExitRequest()).message)


class AsyncDpmClient(AsyncGrpcClient):
    """asyncio client of one DPM server (grpc.aio)."""

    server_name = "DPM server"

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = 10.0, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(address, timeout=timeout, tls=tls)
        self._dpm = dpm_pb2_grpc.DpmControlStub(self._channel)
        self._daq = dpm_pb2_grpc.DpmDaqControlStub(self._channel)

    async def queue_daq(self, specification: str | bytes | Mapping[str, Any]) -> DaqReply:
        text = _specification_text(specification)
        reply: DaqReply = await self._call(
            self._daq.QueueDaq, dpm_pb2.QueueDaqRequest(specification=text), _spec_id(text)
        )
        return reply

    async def abort_daq(self, id: str) -> DaqReply:
        reply: DaqReply = await self._call(self._daq.AbortDaq, dpm_pb2.AbortDaqRequest(id=id), id)
        return reply

    async def retry_merge_daq(self, id: str) -> None:
        await self._call(self._daq.RetryMergeDaq, dpm_pb2.RetryMergeDaqRequest(id=id), id)

    async def get_daq_status(self, id: str, *, include_archived: bool = False) -> DaqStatus:
        """The status of DAQ `id` (see `DpmClient.get_daq_status`)."""
        request = dpm_pb2.GetDaqStatusRequest(id=id, include_archived=include_archived)
        status: DaqStatus = await self._call(self._daq.GetDaqStatus, request, id)
        return status

    async def get_active_daqs(self) -> list[DaqStatus]:
        response = await self._call(self._daq.GetActiveDaqs, dpm_pb2.GetActiveDaqsRequest())
        return list(response.daqs)

    async def get_internal_daq_status(self, id: str) -> InternalDaqStatus:
        status: InternalDaqStatus = await self._call(
            self._daq.GetInternalDaqStatus, dpm_pb2.GetInternalDaqStatusRequest(id=id), id
        )
        return status

    async def watch_daq_status(self, id: str = "") -> AsyncIterator[DaqStatus]:
        async for status in self._stream(self._daq.WatchDaqStatus(dpm_pb2.WatchDaqStatusRequest(id=id)), id):
            yield status

    async def wait_for(
        self, id: str, substates: Collection[int] = FINAL_SUBSTATES, *, timeout: float = 60.0
    ) -> DaqStatus:
        """Follow DAQ `id` until its substate is one of `substates` (see `DpmClient.wait_for`)."""
        import asyncio

        async def follow() -> DaqStatus:
            try:
                async for status in self.watch_daq_status(id):
                    if status.substate in substates:
                        return status
            except DaqException as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    raise
                final = await self.get_daq_status(id, include_archived=True)  # finished already
                if final.substate in substates:
                    return final
                raise
            raise DaqException(id, "status stream ended before the awaited substate", ErrorCode.UNAVAILABLE)

        try:
            return await asyncio.wait_for(follow(), timeout)
        except TimeoutError:
            raise DaqException(
                id, f"DAQ did not reach the awaited substate within {timeout} s", ErrorCode.DEADLINE_EXCEEDED
            ) from None

    async def query_storage_status(self) -> StorageStatus:
        status: StorageStatus = await self._call(
            self._dpm.QueryStorageStatus, dpm_pb2.QueryStorageStatusRequest()
        )
        return status

    async def watch_storage_status(self, interval: float = 1.0) -> AsyncIterator[StorageStatus]:
        request = dpm_pb2.WatchStorageStatusRequest(interval=interval)
        async for status in self._stream(self._dpm.WatchStorageStatus(request)):
            yield status

    async def exit(self) -> str:
        response = await self._call(self._dpm.Exit, dpm_pb2.ExitRequest())
        return str(response.message)


__all__ = [
    "DEFAULT_ADDRESS",
    "FINAL_SUBSTATES",
    "AsyncDpmClient",
    "DaqReply",
    "DaqStatus",
    "DpmClient",
    "InternalDaqStatus",
    "StorageStatus",
    "empty_pb2",
    "state_name",
    "substate_name",
]
