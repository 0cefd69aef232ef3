"""What every daqif gRPC server has: one port of its own, health checking, reflection, and the error
edge."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daqif.errors import DaqException
from daqif.grpc_errors import to_rpc_status

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound=StreamHandler)


SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
]
"""gRPC turns SO_REUSEPORT on by default, so a second server on a busy port would bind it too and
share the connections with the first; a daqif port is owned by one server. Keepalive pings every
4 s or more are accepted on a quiet stream (gRPC's default, 5 min, would answer a client's
keepalive with GOAWAY): a writer group's coordinator pings each member's status stream
(`daqif.grpc_client.keepalive_options`) to notice a member that went silent without a reset."""


class PortUnavailable(OSError):
    """A server cannot bind its port (in use, or not a local address); the message names it."""


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """An asyncio gRPC server that cannot share its port with another process, whose methods see an
    undecodable request as `Undecodable` (answered INVALID_ARGUMENT by `edge`) instead of gRPC's UNKNOWN.

    `interceptors` come after that one (e.g. the DPM's metrics timing QueueDaq)."""
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[_DecodeErrorsReachTheEdge(), *interceptors])


@dataclass(frozen=True)
class Undecodable:
    """What a method receives instead of a request its message type cannot parse."""

    method: str
    problem: str

    def error(self) -> DaqException:
        hint = " (a string field must be valid UTF-8)" if "UTF-8" in self.problem else ""
        return DaqException.invalid_argument(
            f"{self.method}: the request is not a valid message: {self.problem}{hint}"
        )


class _DecodeErrorsReachTheEdge(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """gRPC answers a request that fails to parse (invalid UTF-8 in a string field, truncated bytes)
    with UNKNOWN before any handler runs; hand it to the handler as `Undecodable` so the one error
    edge answers INVALID_ARGUMENT naming the method and the problem."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        parse = getattr(handler, "request_deserializer", None)
        if handler is None or parse is None or not handler_call_details.method.startswith("/daqif."):
            return handler  # the health and reflection services keep gRPC's own handling
        method = str(handler_call_details.method).rsplit("/", 1)[-1]

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return Undecodable(method, str(exc).split(": ", 1)[-1])

        return handler._replace(request_deserializer=tolerant)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind `server` to `host:port` (0: any free port); return the bound port.

    With `credentials` (`servers.common.tls.ServerTls.credentials()`) the port serves TLS only.
    Raises `PortUnavailable` with one line naming `what` and the port, the line every daqif server
    prints before it exits non-zero.
    """
    # gRPC's core logs a failed bind on stderr itself, in several lines of its own: hold what it
    # writes, and pass it on only if the bind worked (it was then about something else).
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            address = f"{host}:{port}"
            if credentials is None:
                bound = int(server.add_insecure_port(address))
            else:
                bound = int(server.add_secure_port(address, credentials))
        except RuntimeError:
            bound = 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if bound == 0:
            raise PortUnavailable(cannot_bind(what, host, port, "address in use or not a local address"))
        held.seek(0)
        os.write(2, held.read())
    return bound


def cannot_bind(what: str, host: str, port: int, why: str) -> str:
    """The one wording of a port a server cannot bind (gRPC and REST alike)."""
    return f"cannot bind the {what} to {host}:{port}: {why}"


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Register `grpc.health.v1` (every service SERVING) and server reflection on `server`."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def mark_serving(servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    """Set the overall status ("") and every named service to SERVING."""
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def abort_with(context: grpc.aio.ServicerContext, exc: DaqException) -> NoReturn:
    """End the call with the status and rich details that carry `exc`."""
    await context.abort_with_status(to_rpc_status(exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _abort_for(context: grpc.aio.ServicerContext, name: str, exc: Exception) -> NoReturn:
    """End the call for what handler `name` raised: a `DaqException` as it is, anything else as INTERNAL."""
    if not isinstance(exc, DaqException):
        log.exception("%s failed", name)
        exc = DaqException.internal(f"{name}: {type(exc).__name__}: {exc}")
    await abort_with(context, exc)


def edge(handler: H) -> H:
    """The error edge of a unary gRPC method, shared by every daqif service.

    A `DaqException` becomes its status with rich details; anything unexpected is logged and becomes
    INTERNAL naming the method, so a client never sees a bare UNKNOWN.
    """

    @functools.wraps(handler)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, handler.__name__, exc)

    return guarded  # type: ignore[return-value]


def stream_edge(handler: S) -> S:
    """`edge` for a server-streaming method (an async generator)."""

    @functools.wraps(handler)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            async for message in handler(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, handler.__name__, exc)

    return guarded  # type: ignore[return-value]
