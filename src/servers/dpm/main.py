"""`daqif-dpm-server`: the Data Product Manager gRPC server.

    daqif-dpm-server --workspace /data/dpm [--host 127.0.0.1] [--port 12083]
                     [--allowed-root DIR ...] [--data-root DIR] [--config FILE]
                     [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--metrics-port P]

Prints one line `daqif-ready dpm grpc=HOST:PORT` on stdout once it serves (with `--port 0`
the port is the one the system picked; served over TLS, `grpc=grpcs://HOST:PORT`). With
`--metrics-port P` (off by default) it also serves Prometheus metrics at `http://HOST:P/metrics`
(`metrics.py`) and the ready line ends `metrics=http://HOST:P`. A certificate
or key that cannot be used stops it with exit code 2 and one line naming the file; a port already
in use, with exit code 2 and one line naming the port, before it touches the workspace.
SIGINT/SIGTERM or the `Exit` call stop it gracefully (exit code 0); every DAQ resumes from its
persisted substate at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from daqif import defaults
from daqif.tls import TlsError, tls_address
from servers.common.grpc_server import (
    PortUnavailable,
    add_health_and_reflection,
    bind,
    mark_serving,
    new_server,
)
from servers.common.process import die_with_parent
from servers.common.ready import ready_line
from servers.common.roles import RolesOverlap
from servers.common.tls import ServerTls, add_tls_arguments, security_of, tls_from_args
from servers.dpm import keyword_check
from servers.dpm.config import ConfigError, DpmConfig, build_config
from servers.dpm.grpc_service import SERVICE_NAMES, add_services
from servers.dpm.lifecycle import DataProductManager
from servers.dpm.store import WorkspaceBusy

if TYPE_CHECKING:
    # prometheus_client and uvicorn (~0.1 s): imported only with --metrics-port.
    from servers.common.metrics import MetricsEndpoint
    from servers.dpm.metrics import DpmMetrics

log = logging.getLogger("daqif-dpm-server")

DEFAULT_HOST = defaults.HOST
DEFAULT_PORT = defaults.DPM_PORT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="daqif-dpm-server",
        description="Data Product Manager: collects, merges and releases the data product of each DAQ.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port; 0 picks a free one (default {DEFAULT_PORT})"
    )
    parser.add_argument("--workspace", type=Path, help="workspace directory (default <data root>/dpm)")
    parser.add_argument(
        "--allowed-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="local sources and receivers must lie under DIR (repeatable; default: the data root)",
    )
    parser.add_argument(
        "--data-root", type=Path, help="data root (default: the workspace's parent, else ./data)"
    )
    parser.add_argument("--config", type=Path, help="JSON settings file (see servers.dpm.config)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics at http://HOST:P/metrics; 0 picks a free port (default: off)",
    )
    add_tls_arguments(parser)
    return parser.parse_args(argv)


async def serve(
    config: DpmConfig, host: str, port: int, tls: ServerTls | None = None, metrics_port: int | None = None
) -> int:
    """Run the server until SIGINT/SIGTERM or Exit (over TLS with `tls`, with Prometheus metrics on
    `metrics_port` unless None); return the exit code."""
    try:
        credentials = tls.credentials() if tls is not None else None
    except TlsError as exc:
        print(f"daqif-dpm-server: {exc}", file=sys.stderr)
        return 2
    dpm = DataProductManager(config)
    metrics: DpmMetrics | None = None
    if metrics_port is not None:
        from servers.dpm.metrics import DpmMetrics

        metrics = DpmMetrics(dpm)
    stop = asyncio.Event()
    server = new_server([metrics.interceptor()] if metrics is not None else [])
    daq_control = add_services(server, dpm, stop)
    health = add_health_and_reflection(server, SERVICE_NAMES)
    # The ports first: a second server on a busy port must leave the first one's workspace alone.
    endpoint: MetricsEndpoint | None = None
    try:
        bound = bind(server, host, port, "DPM gRPC services", credentials)
        if metrics is not None and metrics_port is not None:
            from servers.common.metrics import MetricsEndpoint, bind_metrics_socket

            endpoint = MetricsEndpoint(metrics.registry, bind_metrics_socket(host, metrics_port))
    except PortUnavailable as exc:
        print(f"daqif-dpm-server: {exc}", file=sys.stderr)
        return 2
    # Start-up makes a million objects that stay (50,000 records with their views): the cyclic
    # collector would walk them again and again while they are made, and at every full collection
    # afterwards. Frozen (`gc.freeze`), they are left out of every later collection; they are
    # freed by reference counting as usual.
    gc.disable()
    try:
        await dpm.start()
        daq_control.prepare()  # the first GetActiveDaqs is answered at once too
    except WorkspaceBusy as exc:
        print(f"daqif-dpm-server: {exc}", file=sys.stderr)
        return 1
    except RolesOverlap as exc:
        print(f"daqif-dpm-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"daqif-dpm-server: cannot open workspace {config.workspace}: {exc}", file=sys.stderr)
        return 1
    finally:
        gc.freeze()
        gc.enable()
    if metrics is not None:
        metrics.attach()  # before any await: the resumed DAQs have not moved yet
    await server.start()
    if endpoint is not None:
        await endpoint.start()
    await mark_serving(health, SERVICE_NAMES)
    signalled: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        signalled.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    address = f"{host}:{bound}"
    endpoints = {"grpc": tls_address(address) if tls else address}
    if endpoint is not None:
        endpoints["metrics"] = f"http://{host}:{endpoint.port}"
    print(ready_line("dpm", **endpoints), flush=True)
    # QueueDaq's keyword checks import astropy and numpy (~0.7 s): after SERVING, not before.
    threading.Thread(target=keyword_check.warm_up, name="dpm-warm-up", daemon=True).start()
    log.info(
        "serving on %s (%s), workspace %s, allowed roots %s",
        address,
        security_of(tls),
        config.workspace,
        ", ".join(map(str, config.allowed_roots)),
    )
    await stop.wait()
    # Whoever started us (daqif serve) tells a requested exit from a signal by this line.
    log.info("stopping (%s)", signalled[0] if signalled else "Exit requested")
    await server.stop(grace=2.0)
    if endpoint is not None:
        await endpoint.stop()
    await dpm.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `daqif-dpm-server`."""
    die_with_parent()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = build_config(
            config_file=args.config,
            workspace=args.workspace,
            data_root=args.data_root,
            allowed_roots=args.allowed_root,
        )
        tls = tls_from_args(args)
    except (ConfigError, TlsError) as exc:
        print(f"daqif-dpm-server: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.host, args.port, tls, args.metrics_port))


if __name__ == "__main__":
    sys.exit(main())
