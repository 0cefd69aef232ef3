"""A Prometheus `/metrics` HTTP endpoint served inside a server's own asyncio loop.

prometheus_client's `start_http_server` answers from a thread of its own; a collector that reads
a core owned by the asyncio loop (the DPM's active DAQs) would then read it while the loop
changes it. This endpoint is prometheus_client's ASGI app run by uvicorn in the loop itself, so
a scrape runs between two steps of the core, never during one. The writer needs none of this: it
serves `/metrics` on its REST app (`servers.writer.rest`).

The socket is bound first (`bind_metrics_socket`), with the server's other ports, so that a busy
port is a one-line error naming it before anything else starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app

from servers.common.grpc_server import PortUnavailable, cannot_bind


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handling of its own: the server's main loop handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_http_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening socket for an HTTP endpoint (`what` it serves, for the error): `PortUnavailable`
    naming the port if it is busy."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(cannot_bind(what, host, port, str(exc.strerror))) from None
    sock.setblocking(False)
    return sock


def bind_metrics_socket(host: str, port: int) -> socket.socket:
    """The listening socket of a `/metrics` endpoint (`bind_http_socket`)."""
    return bind_http_socket(host, port, "Prometheus metrics")


class MetricsEndpoint:
    """`GET /metrics` of `registry` on `sock`, served by the running asyncio loop."""

    def __init__(self, registry: CollectorRegistry, sock: socket.socket) -> None:
        self._socket = sock
        self.port: int = sock.getsockname()[1]
        self._server = _QuietServer(
            uvicorn.Config(
                make_asgi_app(registry),
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve; returns once the endpoint accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="metrics")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises why it did not start

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        self._socket.close()
