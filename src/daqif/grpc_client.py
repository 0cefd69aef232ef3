"""What every daqif gRPC client shares: the channel, closing it, and mapping errors.

Each failed call raises `daqif.errors.DaqException` with the server's id, message and code; a
stream ends quietly when the caller cancels it. With `tls` (a `daqif.tls.TlsConfig`), or an address
written `grpcs://HOST:PORT`, the channel is TLS; a server that refuses the client's certificate (or
a client that does not trust the server's) shows as UNAVAILABLE on the first call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Self

import grpc

from daqif.errors import DaqException, ErrorCode
from daqif.grpc_errors import from_rpc_error
from daqif.tls import TlsConfig, split_address


def _credentials(address: str, tls: TlsConfig | None) -> tuple[str, grpc.ChannelCredentials | None]:
    """The gRPC target and the channel credentials (`None`: plain text) for `address`."""
    target, by_scheme = split_address(address)
    if tls is None and by_scheme:
        tls = TlsConfig()
    return target, tls.channel_credentials() if tls is not None else None


# A status list of many DAQs (GetActiveDaqs with 10,000, each alert bounded) exceeds gRPC's
# default 4 MiB receive limit; the servers send what they have.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)


def keepalive_options(seconds: float) -> tuple[tuple[str, int], ...]:
    """Channel options that ping the server every `seconds` while a call is open and fail the call
    (UNAVAILABLE) when a ping is not answered within `seconds`: a server that went silent without
    closing the connection (a stopped process, a network partition) ends a stream within about
    2 x `seconds`. daqif servers accept such pings from 4 s (`servers.common.grpc_server`)."""
    ms = max(4000, int(seconds * 1000))
    return (
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        ("grpc.http2.max_pings_without_data", 0),  # a server stream: the client sends no data
        ("grpc.http2.min_time_between_pings_ms", ms),
        ("grpc.http2.ping_timeout_ms", ms),  # else gRPC waits 1 min for the ack of any ping
    )


class GrpcClient:
    """Blocking base client: one channel to `address`, `timeout` seconds per call by default, TLS
    with `tls` (`daqif.tls.TlsError` naming a file that cannot be used)."""

    server_name = "server"

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None,
        tls: TlsConfig | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        target, credentials = _credentials(address, tls)
        self.tls = credentials is not None
        """The channel is TLS."""
        options = CHANNEL_OPTIONS + (keepalive_options(keepalive_s) if keepalive_s else ())
        self._channel = (
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_for_server(self, timeout: float = 10.0) -> None:
        """Block until the server accepts connections; raise `DaqException` (UNAVAILABLE) if not."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise DaqException(
                "", f"no {self.server_name} answers at {self.address}", ErrorCode.UNAVAILABLE
            ) from None

    def _call(
        self, method: Callable[..., Any], request: Any, id: str = "", timeout: float | None = None
    ) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error, id) from None

    def _stream(self, call: Any, id: str = "") -> Iterator[Any]:
        """The messages of a server stream; cancelled when the caller stops iterating."""
        try:
            yield from call
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(error, id) from None
        finally:
            call.cancel()


class AsyncGrpcClient:
    """asyncio base client (grpc.aio), the counterpart of `GrpcClient`."""

    server_name = "server"

    def __init__(self, address: str, *, timeout: float | None, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.timeout = timeout
        target, credentials = _credentials(address, tls)
        self.tls = credentials is not None
        """The channel is TLS."""
        self._channel = (
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self, method: Callable[..., Any], request: Any, id: str = "", timeout: float | None = None
    ) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error, id) from None

    async def _stream(self, call: Any, id: str = "") -> AsyncIterator[Any]:
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(error, id) from None
        finally:
            call.cancel()
