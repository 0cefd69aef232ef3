"""`daqif serve`: the whole system in one command.

Starts the writer (std_daq REST + gRPC WriterControl), the Data Product Manager and, with
`--simulate`, the detector simulator, as supervised processes with embedded defaults. Ctrl-C
(SIGINT) or SIGTERM stops them all; a server that dies is reported and restarted (at most
`--max-restarts` times, then everything stops with exit code 1).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from daqif.cli._output import console, fail


def add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from servers import system

    serve = subparsers.add_parser(
        "serve",
        help="run the whole system",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--simulate", action="store_true", help="also run the detector simulator")
    serve.add_argument("--data-root", type=Path, default=Path("daqif-data"), help="default ./daqif-data")
    serve.add_argument("--redis-url", help="publish the writer's Redis streams here (default: no Redis)")
    serve.add_argument("--host", default="127.0.0.1", help="interface every server binds (default 127.0.0.1)")
    serve.add_argument("--dpm-port", type=int, default=system.DEFAULT_DPM_PORT)
    serve.add_argument("--rest-port", type=int, default=system.DEFAULT_REST_PORT)
    serve.add_argument("--writer-grpc-port", type=int, default=system.DEFAULT_WRITER_GRPC_PORT)
    serve.add_argument(
        "--stream-port",
        type=int,
        default=system.DEFAULT_STREAM_PORT,
        help="port of the simulator's stream endpoint",
    )
    serve.add_argument(
        "--stream", help="ZeroMQ endpoint of an external detector (instead of the simulator's)"
    )
    serve.add_argument(
        "--sim-rate", type=float, default=100.0, help="simulator frames per second (default 100)"
    )
    serve.add_argument("--sim-header", choices=["stddaq", "daqif"], default="stddaq")
    serve.add_argument("--sim-compress", choices=["none", "bslz4"], default="none")
    serve.add_argument(
        "--allowed-root",
        type=Path,
        action="append",
        default=[],
        help="more directories the servers may read and write (the data root always is)",
    )
    serve.add_argument("--max-restarts", type=int, default=3, help="restarts per server before giving up")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from servers.supervisor import ChildFailed, Supervisor
    from servers.system import SystemConfig, children

    config = SystemConfig(
        data_root=args.data_root.resolve(),
        host=args.host,
        dpm_port=args.dpm_port,
        rest_port=args.rest_port,
        writer_grpc_port=args.writer_grpc_port,
        stream_port=args.stream_port,
        stream_endpoint=args.stream,
        simulate=args.simulate,
        sim_rate=args.sim_rate,
        sim_header=args.sim_header,
        sim_compress=args.sim_compress,
        redis_url=args.redis_url,
        extra_allowed_roots=[p.resolve() for p in args.allowed_root],
    )
    if not args.simulate and not args.stream:
        console.print("note: no --simulate and no --stream: the writer listens on " + config.stream)
    config.prepare()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor = Supervisor(children(config), output=sys.stdout, max_restarts=args.max_restarts)
    try:
        supervisor.start()
    except ChildFailed as exc:
        return fail(str(exc))
    console.print(
        f"daqif serve ready: DPM grpc {config.dpm_address} | writer REST {config.rest_url} "
        f"grpc {config.writer_grpc_address} | stream {config.stream} | data {config.data_root}",
        highlight=False,
    )
    code = 0
    try:
        supervisor.run(stop)
    except ChildFailed as exc:
        code = fail(str(exc))
    finally:
        codes = supervisor.stop()
        console.print(
            "stopped: " + ", ".join(f"{name} ({rc})" for name, rc in codes.items()), highlight=False
        )
    return code
