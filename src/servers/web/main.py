"""`daqif web` (and `python -m servers.web.main`): the live status page of one DPM and one writer.

    daqif web --dpm HOST:PORT --writer HOST:PORT [--host 127.0.0.1] [--port 8080]
              [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]

`--dpm` is the DPM's gRPC address, `--writer` the writer's gRPC WriterControl address (what
`daqif serve` prints as `dpm=` and `writer_grpc=`); `grpcs://` or the TLS flags for TLS. The page
is at `http://HOST:PORT/`; it only reads (Get/Watch calls). Prints
`daqif-ready web http=http://HOST:PORT` once it serves; a busy port is a one-line error (exit 2).
SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

import uvicorn

from daqif import defaults
from daqif.cli._tls import add_client_tls_arguments, client_tls_from_args
from daqif.tls import TlsConfig
from servers.common.grpc_server import PortUnavailable
from servers.common.metrics import bind_http_socket
from servers.common.process import die_with_parent
from servers.common.ready import ready_line
from servers.web.app import create_app
from servers.web.board import StatusBoard
from servers.web.feeds import follow_dpm, follow_writer

log = logging.getLogger("daqif-web")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dpm", default=defaults.DPM_ADDRESS, help="DPM gRPC address (default %(default)s)")
    parser.add_argument(
        "--writer",
        default=defaults.WRITER_GRPC_ADDRESS,
        help="writer gRPC WriterControl address (default %(default)s)",
    )
    parser.add_argument(
        "--writer-preview",
        metavar="URL",
        help="the writer's REST URL (http://HOST:PORT): the page shows its live preview (GET /daq/live, "
        "a writer started with --live-stream); default: no preview",
    )
    parser.add_argument("--host", default=defaults.HOST, help="interface to serve on (default %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.WEB_PORT,
        help="port of the page; 0 = any free (default %(default)s)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    add_client_tls_arguments(parser)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    dpm: str,
    writer: str,
    host: str,
    port: int,
    tls: TlsConfig | None = None,
    writer_preview: str | None = None,
) -> int:
    """Serve the page until SIGINT/SIGTERM; return the exit code. `writer_preview`: the writer's
    REST URL, whose `/daq/live` (MJPEG) the page shows."""
    try:
        sock = bind_http_socket(host, port, "status page")
    except PortUnavailable as exc:
        print(f"daqif web: {exc}", file=sys.stderr)
        return 2
    board = StatusBoard()
    if writer_preview:
        board.preview = writer_preview.rstrip("/") + "/daq/live"
    server = _Uvicorn(
        uvicorn.Config(
            create_app(board),
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    feeds = [
        asyncio.create_task(follow_dpm(board, dpm, tls), name="dpm-feed"),
        asyncio.create_task(follow_writer(board, writer, tls), name="writer-feed"),
    ]
    http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    while not server.started and not http.done():
        await asyncio.sleep(0.01)
    if http.done():
        http.result()
        return 1
    print(ready_line("web", http=f"http://{host}:{sock.getsockname()[1]}"), flush=True)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({stopping, http}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    for task in feeds:
        task.cancel()
    for task in (*feeds, http):
        with contextlib.suppress(BaseException):
            await task
    stopping.cancel()
    sock.close()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        tls = client_tls_from_args(args)
    except ValueError as exc:
        print(f"daqif web: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(serve(args.dpm, args.writer, args.host, args.port, tls, args.writer_preview))


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="daqif web", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
