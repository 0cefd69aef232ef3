"""`daqif dpm …`: the Data Product Manager from the command line.

    daqif dpm queue SPEC.json [--wait [--keep-waiting]]   queue a DAQ (and follow it to the end)
    daqif dpm status ID | internal ID | abort ID | retry ID
    daqif dpm active | watch [ID] | storage | exit

Every command takes `--address HOST[:PORT]` (default 127.0.0.1:12083; a HOST alone uses port
12083), `--json` and `--call-timeout`, and for a DPM served over TLS `--tls-ca FILE` (the CA that
signed its certificate) and, for mutual TLS, `--tls-cert FILE --tls-key FILE` (an address written
`grpcs://HOST[:PORT]` also asks for TLS, trusting the system's CAs unless `--tls-ca` is given).
`status ID` also answers for a finished (archived) DAQ with its final status. Followed on a
terminal, a DAQ shows a progress bar; piped, every change is one line (and `--json` with
`watch` one JSON document per line).

Exit codes:
    0  done (`queue --wait`: the DAQ is COMPLETED)
    1  the call failed: refused by the DPM (the code, the id and its message on stderr),
       DPM unreachable (or the TLS handshake refused), unreadable or invalid specification or
       certificate file, `--timeout` of `--wait` reached
    2  wrong command line
    3  `queue --wait`: the DAQ ended ABORTED
    4  `queue --wait`: the DAQ raised an ERROR alert (printed) and waits for `daqif dpm retry ID`
       or an abort; `--keep-waiting` follows it on instead
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daqif import defaults
from daqif.cli._output import console, fail, print_json, to_dict
from daqif.cli._tls import add_client_tls_arguments, client_tls_from_args
from daqif.dpm_client import DEFAULT_ADDRESS, DaqStatus, DpmClient, state_name, substate_name
from daqif.errors import DaqException
from daqif.spec import SpecificationError, load_specification
from daqif.tls import TLS_SCHEME, TlsError, split_address
from daqif.v1 import dpm_pb2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ABORTED = 3
EXIT_DAQ_ERROR = 4

# The DPM lifecycle as progress steps.
STEPS = ["SCHEDULED", "COLLECTING", "MERGING", "RELEASING", "COMPLETED"]


def with_default_port(address: str, port: int = defaults.DPM_PORT) -> str:
    """`HOST` → `HOST:port`; `[v6]` → `[v6]:port`; an address with a port is kept (a `grpcs://`
    prefix too)."""
    host_port, tls = split_address(address)
    if host_port.startswith("["):
        host_port = host_port if "]:" in host_port else f"{host_port}:{port}"
    elif ":" not in host_port:
        host_port = f"{host_port}:{port}"
    return TLS_SCHEME + host_port if tls else host_port


def _severity(alert: dpm_pb2.DaqAlert) -> str:
    return dpm_pb2.AlertSeverity.Name(alert.severity).removeprefix("ALERT_SEVERITY_")


def product_of(status: DaqStatus) -> str:
    """The product path of a COMPLETED DAQ; empty otherwise (an aborted DAQ's is removed)."""
    return status.result if status.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED else ""


def describe(status: DaqStatus) -> str:
    """One line: id, substate, the product of a completed DAQ, the alerts."""
    line = f"{status.id} {substate_name(status.substate)}"
    if product_of(status):
        line += f" → {product_of(status)}"
    alerts = "; ".join(f"{_severity(a)} {a.id}: {a.description}" for a in status.alerts)
    if alerts:
        line += f"  [{alerts}]"
    return line


def _status_table(statuses: list[DaqStatus]) -> Table:
    table = Table("id", "state", "substate", "error", "alerts", "product", "updated")
    for s in statuses:
        table.add_row(
            s.id,
            state_name(s.state),
            substate_name(s.substate),
            "yes" if s.error else "",
            "\n".join(f"{_severity(a)} {a.id}: {a.description}" for a in s.alerts),
            product_of(s),
            time.strftime("%H:%M:%S", time.localtime(s.timestamp)) if s.timestamp else "",
        )
    return table


class LinePrinter:
    """Piped output: one unwrapped line per change, a line equal to the previous one skipped."""

    def __init__(self) -> None:
        self._last = ""

    def __call__(self, status: DaqStatus) -> None:
        line = describe(status)
        if line != self._last:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self._last = line


def follow_daq(
    client: DpmClient,
    daq_id: str,
    timeout: float,
    as_json: bool = False,
    seen: list[DaqStatus] | None = None,
    stop_when: Callable[[DaqStatus], bool] | None = None,
) -> DaqStatus:
    """Follow a DAQ to COMPLETED/ABORTED (or `stop_when`); a progress bar on a terminal, one line
    per change otherwise, nothing with `as_json`. Every status received is appended to `seen`."""
    collected = seen if seen is not None else []

    def wait(show: Callable[[DaqStatus], None] | None) -> DaqStatus:
        def on_status(status: DaqStatus) -> None:
            collected.append(status)
            if show is not None:
                show(status)

        return client.wait_for(daq_id, timeout=timeout, on_status=on_status, stop_when=stop_when)

    if as_json:
        return wait(None)
    if not console.is_terminal:
        return wait(LinePrinter())
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[substate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[alerts]}"),
        console=console,
    ) as progress:
        task = progress.add_task(daq_id, total=len(STEPS) - 1, substate="", alerts="")

        def show(status: DaqStatus) -> None:
            name = substate_name(status.substate)
            step = STEPS.index(name) if name in STEPS else 0
            alerts = ", ".join(f"{a.id}: {a.description}" for a in status.alerts)
            progress.update(task, completed=step, substate=name, alerts=alerts)

        return wait(show)


def is_error(alert: dpm_pb2.DaqAlert) -> bool:
    return alert.severity == dpm_pb2.ALERT_SEVERITY_ERROR


def has_error_alert(status: DaqStatus) -> bool:
    return any(is_error(a) for a in status.alerts)


def cmd_queue(args: argparse.Namespace, client: DpmClient) -> int:
    try:
        text = Path(args.spec).read_text("utf-8")
    except OSError as exc:
        return fail(f"cannot read specification {args.spec}: {exc.strerror}")
    try:
        load_specification(text)  # the server checks again; this catches typos before a round trip
    except SpecificationError as exc:
        return fail(f"{args.spec}: {exc}")
    reply = client.queue_daq(text)
    if not args.wait:
        if args.json:
            print_json(to_dict(reply))
        else:
            console.print(f"queued {reply.id}")
        return EXIT_OK
    stop_when = None if args.keep_waiting else has_error_alert
    final = follow_daq(client, reply.id, args.timeout, args.json, stop_when=stop_when)
    if args.json:
        print_json(to_dict(final))
    elif console.is_terminal:
        console.print(describe(final), highlight=False, soft_wrap=True)  # piped: already printed
    if final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED:
        return EXIT_OK
    if final.substate == dpm_pb2.DAQ_SUB_STATE_ABORTED:
        return EXIT_ABORTED
    errors = "; ".join(f"{a.id}: {a.description}" for a in final.alerts if is_error(a))
    return fail(
        f"DAQ {final.id} is waiting in {substate_name(final.substate)} after an ERROR alert ({errors}); "
        f"fix the cause, then `daqif dpm retry {final.id}` (or abort it)",
        EXIT_DAQ_ERROR,
    )


def cmd_status(args: argparse.Namespace, client: DpmClient) -> int:
    # Always with include_archived: a finished DAQ's final status is what a user asks for.
    status = client.get_daq_status(args.id, include_archived=True)
    if args.json:
        print_json(to_dict(status))
    else:
        sys.stdout.write("".join(f"{key}: {value}\n" for key, value in status_fields(status)))
    return EXIT_OK


def status_fields(status: DaqStatus) -> list[tuple[str, str]]:
    """One DAQ's status as `key: value` lines (unwrapped, so paths stay whole when piped)."""
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.timestamp)) if status.timestamp else ""
    fields = [
        ("id", status.id),
        ("state", state_name(status.state)),
        ("substate", substate_name(status.substate)),
        ("error", "yes" if status.error else "no"),
        ("product", product_of(status)),
        ("message", status.message),
        ("updated", updated),
    ]
    fields += [("alert", f"{_severity(a)} {a.id}: {a.description}") for a in status.alerts]
    return fields


def cmd_active(args: argparse.Namespace, client: DpmClient) -> int:
    daqs = client.get_active_daqs()
    if args.json:
        print_json([to_dict(s) for s in daqs])
    else:
        console.print(_status_table(daqs) if daqs else "no active DAQs")
    return 0


def cmd_internal(args: argparse.Namespace, client: DpmClient) -> int:
    status = client.get_internal_daq_status(args.id)
    if args.json:
        print_json(to_dict(status))
        return 0
    console.print(_status_table([status.status]))
    console.print(f"workspace: {status.workspace}\nmerge log: {status.merge_log}")
    sources = Table("source", "location", "local path", "bytes", "outcome")
    for src in status.sources:
        sources.add_row(src.source_name, src.location, src.local_path, str(src.bytes), src.outcome)
    console.print(sources)
    receivers = Table("receiver", "path", "host", "released", "outcome")
    for rec in status.receivers:
        receivers.add_row(str(rec.index), rec.path, rec.host, rec.released_path, rec.outcome)
    console.print(receivers)
    history = Table("substate", "time", "message")
    for change in status.history:
        history.add_row(substate_name(change.substate), f"{change.timestamp:.3f}", change.message)
    console.print(history)
    return 0


def cmd_abort(args: argparse.Namespace, client: DpmClient) -> int:
    reply = client.abort_daq(args.id)
    if args.json:
        print_json(to_dict(reply))
    else:
        console.print(f"aborted {reply.id}")
    return 0


def cmd_retry(args: argparse.Namespace, client: DpmClient) -> int:
    client.retry_merge_daq(args.id)
    if args.json:
        print_json({"id": args.id, "retried": True})
    else:
        console.print(f"retrying {args.id}")
    return 0


def cmd_watch(args: argparse.Namespace, client: DpmClient) -> int:
    show: Callable[[DaqStatus], None]
    if args.json:
        show = _print_json_line
    elif console.is_terminal:
        show = _print_rich
    else:
        show = LinePrinter()
    try:
        for status in client.watch_daq_status(args.id or ""):
            show(status)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _print_json_line(status: DaqStatus) -> None:
    sys.stdout.write(json.dumps(to_dict(status)) + "\n")
    sys.stdout.flush()


def _print_rich(status: DaqStatus) -> None:
    console.print(describe(status), highlight=False)


def cmd_storage(args: argparse.Namespace, client: DpmClient) -> int:
    status = client.query_storage_status()
    if args.json:
        print_json(to_dict(status))
    else:
        gib = 1024**3
        console.print(
            f"{status.path}: {status.available / gib:.1f} GiB available, {status.free / gib:.1f} GiB free "
            f"of {status.capacity / gib:.1f} GiB"
        )
    return 0


def cmd_exit(args: argparse.Namespace, client: DpmClient) -> int:
    message = client.exit()
    if args.json:
        print_json({"message": message})
    else:
        console.print(message)
    return 0


def _run(command: Callable[[argparse.Namespace, DpmClient], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            tls = client_tls_from_args(args)
        except ValueError as exc:
            return fail(str(exc), 2)
        try:
            client = DpmClient(with_default_port(args.address), timeout=args.call_timeout, tls=tls)
        except TlsError as exc:
            return fail(str(exc), EXIT_FAILED)
        with client:
            try:
                return command(args, client)
            except DaqException as exc:
                where = f" [{exc.id}]" if exc.id else ""
                return fail(f"{exc.code.name}{where}: {exc.message}", EXIT_FAILED)

    return run


def add_dpm_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `daqif dpm` and its sub-commands (each `--help` shows every default)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", default=DEFAULT_ADDRESS, help="DPM HOST[:PORT]; a HOST alone uses the default port"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--call-timeout", type=float, default=10.0, help="seconds per call")
    add_client_tls_arguments(common)
    dpm = subparsers.add_parser(
        "dpm",
        help="control a Data Product Manager",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = dpm.add_subparsers(dest="dpm_command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=helptext,
            description=helptext,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )

    queue = command("queue", "queue a DAQ from a specification file")
    queue.add_argument("spec", help="Data Product Specification (JSON file)")
    queue.add_argument("--wait", action="store_true", help="follow the DAQ until it is completed or aborted")
    queue.add_argument(
        "--keep-waiting",
        action="store_true",
        help="with --wait: follow on after an ERROR alert (else print it and exit 4)",
    )
    queue.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow with --wait")
    queue.set_defaults(func=_run(cmd_queue))

    for name, func, helptext in [
        ("status", cmd_status, "status of one DAQ, also the final status of a finished one"),
        ("internal", cmd_internal, "internal status of one active DAQ (workspace, sources, history)"),
        ("abort", cmd_abort, "abort a DAQ"),
        ("retry", cmd_retry, "retry the failed step of a DAQ"),
    ]:
        sub = command(name, helptext)
        sub.add_argument("id", help="DAQ id")
        sub.set_defaults(func=_run(func))

    watch = command("watch", "print every status change (Ctrl-C stops)")
    watch.add_argument("id", nargs="?", default="", help="only this active DAQ (default: every DAQ)")
    watch.set_defaults(func=_run(cmd_watch))
    for name, func, helptext in [
        ("active", cmd_active, "list the active DAQs"),
        ("storage", cmd_storage, "workspace storage status"),
        ("exit", cmd_exit, "terminate the DPM server"),
    ]:
        command(name, helptext).set_defaults(func=_run(func))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: daqif dpm …")
