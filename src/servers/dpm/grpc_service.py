"""The gRPC edge of the DPM: `DpmControl` and `DpmDaqControl` over grpc.aio.

Thin: each method calls the core (`lifecycle.DataProductManager`) and maps its dataclasses to
`daqif.v1` messages. Every refusal is a `DaqException` from the core, turned into a status with
rich details by `abort_with`, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
from google.protobuf import empty_pb2

from daqif.errors import DaqException, ErrorCode
from daqif.v1 import dpm_pb2, dpm_pb2_grpc
from servers.common.grpc_server import abort_with, edge, stream_edge
from servers.dpm.events import WatcherDropped
from servers.dpm.lifecycle import DataProductManager
from servers.dpm.model import Alert, DaqStatusView, InternalStatus, StorageStatus, SubState

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    dpm_pb2.DESCRIPTOR.services_by_name["DpmControl"].full_name,
    dpm_pb2.DESCRIPTOR.services_by_name["DpmDaqControl"].full_name,
)

# The generated enums are ints at run time; cast so mypy sees the enum types the stubs expect.
_SUBSTATE = cast(
    dict[str, dpm_pb2.DaqSubState],
    {name.removeprefix("DAQ_SUB_STATE_"): value for name, value in dpm_pb2.DaqSubState.items()},
)
_STATE = cast(
    dict[str, dpm_pb2.DaqState],
    {name.removeprefix("DAQ_STATE_"): value for name, value in dpm_pb2.DaqState.items()},
)
_SEVERITY = cast(
    dict[str, dpm_pb2.AlertSeverity],
    {name.removeprefix("ALERT_SEVERITY_"): value for name, value in dpm_pb2.AlertSeverity.items()},
)


def alert_message(alert: Alert) -> dpm_pb2.DaqAlert:
    return dpm_pb2.DaqAlert(
        id=alert.id,
        severity=_SEVERITY[alert.severity.value],
        description=alert.description,
        timestamp=alert.timestamp,
    )


_STATES = {s: (_STATE[s.state.value], _SUBSTATE[s.value]) for s in SubState}


def status_message(view: DaqStatusView) -> dpm_pb2.DaqStatus:
    """The `DaqStatus` of `view` (fields at their default left out: 50,000 of these at start-up)."""
    state, substate = _STATES[view.substate]
    fields: dict[str, Any] = {}
    if view.alerts or view.result:
        fields = {
            "error": view.error,
            "alerts": [alert_message(a) for a in view.alerts],
            "result": view.result,
        }
    return dpm_pb2.DaqStatus(
        id=view.id,
        file_id=view.file_id,
        state=state,
        substate=substate,
        message=view.message,
        timestamp=view.timestamp,
        **fields,
    )


class StatusMessages:
    """`DaqStatus` messages of status views, built once per view, and the GetActiveDaqs reply.

    The reply is encoded once per change of any active DAQ's status (`changed` observes the status
    bus) and answered as bytes: at 50,000 DAQs a GetActiveDaqs is then a look-up, and a rebuild
    after a change re-encodes only the changed views. Each view's entry (field 1 of
    `GetActiveDaqsResponse`, encoded by the library as a response listing that view alone) is kept,
    and the reply is their concatenation, which is the encoding of the response listing them all
    (protobuf merges repeated fields of concatenated messages; `tests/servers/dpm/
    test_grpc_service.py` checks it against the library's encoding of the whole response).
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[DaqStatusView, dpm_pb2.DaqStatus]] = {}
        self._entries: dict[str, tuple[DaqStatusView, bytes]] = {}
        self._reply: bytes | None = None

    def __call__(self, view: DaqStatusView) -> dpm_pb2.DaqStatus:
        hit = self._cache.get(view.id)
        if hit is not None and hit[0] is view:
            return hit[1]
        message = status_message(view)
        if view.substate.is_final:
            self._cache.pop(view.id, None)
        else:
            self._cache[view.id] = (view, message)
        return message

    def changed(self, view: DaqStatusView) -> None:
        """A status was published: its entry is encoded now (a few microseconds), the reply joined
        again at the next GetActiveDaqs (so no GetActiveDaqs encodes thousands of entries)."""
        self._reply = None
        if view.substate.is_final:
            self._entries.pop(view.id, None)
        else:
            self._entries[view.id] = (view, _entry(view))

    def active_reply(self, active: Callable[[], list[DaqStatusView]]) -> bytes:
        """The encoded `GetActiveDaqsResponse` listing the views `active()` returns."""
        if self._reply is None:
            self._reply = self.encoded_entries(active())
        return self._reply

    def encoded_entries(self, views: list[DaqStatusView]) -> bytes:
        """The encoded `GetActiveDaqsResponse` listing `views`."""
        entries = self._entries
        if len(entries) > len(views):
            for gone in entries.keys() - {v.id for v in views}:
                del entries[gone]
        parts = []
        for view in views:
            hit = entries.get(view.id)
            if hit is None or hit[0] is not view:
                hit = entries[view.id] = (view, _entry(view))
            parts.append(hit[1])
        return b"".join(parts)


def _entry(view: DaqStatusView) -> bytes:
    """`view` as one entry of `GetActiveDaqsResponse.daqs`: the encoding of a response listing it
    alone (tag, length, encoded `DaqStatus`), so the concatenation of entries encodes them all."""
    return dpm_pb2.GetActiveDaqsResponse(daqs=[status_message(view)]).SerializeToString()


def internal_message(internal: InternalStatus, status: dpm_pb2.DaqStatus) -> dpm_pb2.InternalDaqStatus:
    return dpm_pb2.InternalDaqStatus(
        status=status,
        workspace=internal.workspace,
        specification=internal.specification,
        sources=[
            dpm_pb2.SourceRecord(
                source_name=s.source_name,
                location=s.location,
                local_path=s.local_path,
                bytes=s.bytes,
                outcome=s.outcome,
                timestamp=s.timestamp,
            )
            for s in internal.sources
        ],
        receivers=[
            dpm_pb2.ReleaseRecord(
                index=r.index,
                path=r.path,
                host=r.host,
                released_path=r.released_path,
                outcome=r.outcome,
                timestamp=r.timestamp,
            )
            for r in internal.receivers
        ],
        merge_log=internal.merge_log,
        attempts=[dpm_pb2.AttemptCounter(step=step, attempts=n) for step, n in internal.attempts],
        history=[
            dpm_pb2.SubStateChange(
                substate=_SUBSTATE[h.substate.value], timestamp=h.timestamp, message=h.message
            )
            for h in internal.history
        ],
    )


def storage_message(storage: StorageStatus) -> dpm_pb2.StorageStatus:
    return dpm_pb2.StorageStatus(
        path=storage.path,
        capacity=storage.capacity,
        free=storage.free,
        available=storage.available,
        timestamp=storage.timestamp,
    )


class DpmDaqControlService(dpm_pb2_grpc.DpmDaqControlServicer):
    """`daqif.v1.DpmDaqControl` on the core."""

    def __init__(self, dpm: DataProductManager) -> None:
        self._dpm = dpm
        self._status = StatusMessages()
        dpm.bus.observe(self._status.changed)

    def prepare(self) -> None:
        """Encode the GetActiveDaqs reply now (at start-up, before SERVING), not at the first call."""
        self._status.active_reply(self._dpm.active)

    @edge
    async def QueueDaq(
        self, request: dpm_pb2.QueueDaqRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.DaqReply:
        return dpm_pb2.DaqReply(id=await self._dpm.queue(request.specification), error=False)

    @edge
    async def AbortDaq(
        self, request: dpm_pb2.AbortDaqRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.DaqReply:
        await self._dpm.abort(request.id)
        return dpm_pb2.DaqReply(id=request.id, error=False)

    @edge
    async def RetryMergeDaq(
        self, request: dpm_pb2.RetryMergeDaqRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._dpm.retry(request.id)
        return empty_pb2.Empty()

    @edge
    async def GetDaqStatus(
        self, request: dpm_pb2.GetDaqStatusRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.DaqStatus:
        return self._status(self._dpm.status(request.id, include_archived=request.include_archived))

    @edge
    async def GetActiveDaqs(
        self, request: dpm_pb2.GetActiveDaqsRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.GetActiveDaqsResponse:
        # Already encoded (see `StatusMessages.encoded_entries`; `add_services` passes bytes through).
        return self._status.active_reply(self._dpm.active)  # type: ignore[return-value]

    @edge
    async def GetInternalDaqStatus(
        self, request: dpm_pb2.GetInternalDaqStatusRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.InternalDaqStatus:
        internal = self._dpm.internal(request.id)
        return internal_message(internal, self._status(internal.status))

    @stream_edge
    async def WatchDaqStatus(
        self,
        request: dpm_pb2.WatchDaqStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[dpm_pb2.DaqStatus]:
        watcher = self._dpm.watch(request.id)
        try:
            while True:
                try:
                    view = await watcher.next()
                except WatcherDropped as exc:
                    await abort_with(
                        context, DaqException(request.id, f"{exc}; watch again", ErrorCode.UNAVAILABLE)
                    )
                yield self._status(view)
        finally:
            watcher.close()


class DpmControlService(dpm_pb2_grpc.DpmControlServicer):
    """`daqif.v1.DpmControl`: storage status and Exit."""

    def __init__(self, dpm: DataProductManager, exit_requested: asyncio.Event) -> None:
        self._dpm = dpm
        self._exit_requested = exit_requested

    @edge
    async def QueryStorageStatus(
        self, request: dpm_pb2.QueryStorageStatusRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.StorageStatus:
        return storage_message(await asyncio.to_thread(self._dpm.storage))

    @stream_edge
    async def WatchStorageStatus(
        self,
        request: dpm_pb2.WatchStorageStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[dpm_pb2.StorageStatus]:
        if request.interval < 0:
            raise DaqException.invalid_argument(f"interval {request.interval} is negative")
        # At most 100 reports a second: a watcher must not be able to keep the server busy.
        interval = max(request.interval or self._dpm.config.storage_report_interval_s, 0.01)
        while True:
            try:
                storage = await asyncio.to_thread(self._dpm.storage)
            except OSError as exc:
                raise DaqException.internal(f"cannot query the workspace file system: {exc}") from exc
            yield storage_message(storage)
            await asyncio.sleep(interval)

    @edge
    async def Exit(
        self, request: dpm_pb2.ExitRequest, context: grpc.aio.ServicerContext
    ) -> dpm_pb2.ExitResponse:
        # The reply goes out first; main() stops the server when it sees the event.
        asyncio.get_running_loop().call_later(0.05, self._exit_requested.set)
        return dpm_pb2.ExitResponse(message="daqif-dpm-server exiting")


class _Registration:
    """Catches what a generated `add_*Servicer_to_server` registers, to adjust it before the server."""

    def __init__(self) -> None:
        self.generic: Any = ()
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic = handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, handlers


def _encoded_or_message(response: Any) -> bytes:
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def add_services(
    server: grpc.aio.Server, dpm: DataProductManager, exit_requested: asyncio.Event
) -> DpmDaqControlService:
    """Add `DpmControl` and `DpmDaqControl` on `dpm` to `server`; return the latter."""
    registration = _Registration()
    daq_control = DpmDaqControlService(dpm)
    dpm_pb2_grpc.add_DpmDaqControlServicer_to_server(daq_control, registration)
    # GetActiveDaqs answers with bytes already encoded; the generic handler shares this dict.
    active = registration.handlers["GetActiveDaqs"]
    registration.handlers["GetActiveDaqs"] = active._replace(response_serializer=_encoded_or_message)
    server.add_generic_rpc_handlers(registration.generic)
    server.add_registered_method_handlers(registration.service, registration.handlers)
    dpm_pb2_grpc.add_DpmControlServicer_to_server(DpmControlService(dpm, exit_requested), server)
    return daq_control


__all__ = ["SERVICE_NAMES", "DpmControlService", "DpmDaqControlService", "add_services"]
