"""`daqif serve`: the whole system in one command.

Starts the writer (std_daq REST + gRPC WriterControl, Prometheus `/metrics` on its REST port), the
Data Product Manager (Prometheus metrics on `--dpm-metrics-port`), the status page (`--web-port`,
http://127.0.0.1:8080/) and, with `--simulate`, the detector simulator, as supervised processes
with embedded defaults. A port
already in use stops it before anything starts (exit code 1, naming the port). Once every server
is up it prints one ready line (`daqif-ready serve dpm=... rest=... writer_grpc=... stream=...`).
Each server's output goes to <data-root>/logs/<server>.log and, prefixed, to stdout.

Ctrl-C (SIGINT) or SIGTERM stops them all; a server that dies is reported and restarted on the
same ports (at most `--max-restarts` times, then everything stops with exit code 1). A server
that exits cleanly on its own (`daqif dpm exit`) is reported and not restarted; the others keep
running, and serve exits 0 once every server has exited or on Ctrl-C.
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
        "--dpm-metrics-port",
        type=int,
        default=system.DEFAULT_DPM_METRICS_PORT,
        help="the DPM's Prometheus /metrics port (default %(default)s; the writer's is its REST port)",
    )
    serve.add_argument(
        "--web-port",
        type=int,
        default=system.DEFAULT_WEB_PORT,
        help="port of the status page (default %(default)s)",
    )
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
        help="more directories the writer may write to and the DPM may read sources from (besides "
        "<data-root>/raw); one inside the DPM workspace, the receiver directory, the logs or the "
        "writer's config is refused",
    )
    serve.add_argument(
        "--writers",
        type=int,
        default=1,
        metavar="N",
        help="run a writer group of N data paths on this host (daqif-writer --workers N): every write "
        "is shared among them and its output_file is one virtual dataset over their parts (default 1)",
    )
    serve.add_argument("--max-restarts", type=int, default=3, help="restarts per server before giving up")
    from servers.common.tls import add_tls_arguments

    add_tls_arguments(serve)  # passed to the DPM and the writer's gRPC port
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from daqif.tls import TlsError
    from servers import system
    from servers.common.launch import port_in_use
    from servers.common.ready import ready_line
    from servers.common.tls import tls_from_args
    from servers.supervisor import ChildFailed, Supervisor

    try:
        tls = tls_from_args(args)
        if tls is not None:
            tls.credentials()  # a file that cannot be used stops serve before anything starts
    except TlsError as exc:
        return fail(str(exc))
    config = system.SystemConfig(
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
        tls=tls,
        dpm_metrics_port=args.dpm_metrics_port,
        # Over mutual TLS the page would need a client certificate of its own: run `daqif web` with
        # the --tls-* flags then.
        web_port=None if tls is not None else args.web_port,
        writers=args.writers,
    )
    if tls is not None:
        console.print(
            "note: with TLS the status page is not started; run `daqif web` with --tls-ca/--tls-cert"
        )
    if args.writers < 1:
        return fail(f"--writers must be 1 or more, not {args.writers}")
    try:
        config.check_roles_apart()
    except ValueError as exc:
        return fail(str(exc))
    if config.stream_port == 0 and not args.simulate and not args.stream:
        return fail("--stream-port 0 needs --simulate (without it the writer must know where to connect)")
    # Before anything starts: a second serve must not touch the first one's data root.
    requested = config.requested_ports()
    for what, port in requested.items():
        if port_in_use(config.host, port):
            return fail(
                f"port {port} ({what}) on {config.host} is already in use; is another daqif serve running?"
            )
    if not args.simulate and not args.stream:
        console.print("note: no --simulate and no --stream: the writer listens on " + config.stream)
    config.prepare()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor = Supervisor(output=sys.stdout, log_dir=config.log_dir, max_restarts=args.max_restarts)
    code = 0
    try:
        bound = system.start(config, supervisor)
        # A server that reports another port than the one asked for shares or lost it: not ours.
        got = bound.requested_ports()
        for what, port in requested.items():
            if got.get(what) != port:
                return fail(
                    f"port {port} ({what}) is not bound by daqif serve's own server ({got.get(what)})"
                )
        supervisor.announce(
            ready_line(
                "serve",
                dpm=bound.dpm_address,
                rest=bound.rest_url,
                writer_grpc=bound.writer_grpc_address,
                stream=bound.stream,
                **({"dpm_metrics": bound.dpm_metrics_url} if bound.dpm_metrics_url else {}),
                **({"web": bound.web_url.rstrip("/")} if bound.web_url else {}),
            )
        )
        supervisor.announce(
            f"daqif serve ready: DPM grpc {bound.dpm_address} | writer REST {bound.rest_url} "
            f"grpc {bound.writer_grpc_address} | stream {bound.stream} | data {bound.data_root} "
            f"| logs {bound.log_dir}" + (f" | status page {bound.web_url}" if bound.web_url else "")
        )
        supervisor.run(stop)
        if not stop.is_set():
            console.print("daqif serve: every server has exited cleanly", highlight=False)
    except ChildFailed as exc:
        code = fail(str(exc))
    finally:
        codes = supervisor.stop()
        console.print(
            "stopped: " + ", ".join(f"{name} ({rc})" for name, rc in codes.items()), highlight=False
        )
    return code
