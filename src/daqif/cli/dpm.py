"""`daqif dpm …`: the Data Product Manager from the command line.

    daqif dpm queue SPEC.json [--wait]   queue a DAQ (and follow it to the end with a progress display)
    daqif dpm status ID | internal ID | abort ID | retry ID
    daqif dpm active | watch [ID] | storage | exit

Every command takes `--address HOST:PORT` (default 127.0.0.1:12083) and `--json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daqif.cli._output import console, fail, print_json, to_dict
from daqif.dpm_client import DEFAULT_ADDRESS, DaqStatus, DpmClient, state_name, substate_name
from daqif.errors import DaqException
from daqif.spec import SpecificationError, load_specification
from daqif.v1 import dpm_pb2

# The DPM lifecycle as progress steps.
STEPS = ["SCHEDULED", "COLLECTING", "MERGING", "RELEASING", "COMPLETED"]


def describe(status: DaqStatus) -> str:
    alerts = "; ".join(
        f"{dpm_pb2.AlertSeverity.Name(a.severity).removeprefix('ALERT_SEVERITY_')} {a.id}: {a.description}"
        for a in status.alerts
    )
    line = f"{status.id} {substate_name(status.substate)}"
    if status.result:
        line += f" → {status.result}"
    if alerts:
        line += f"  [{alerts}]"
    return line


def _status_table(statuses: list[DaqStatus]) -> Table:
    table = Table("id", "state", "substate", "error", "alerts", "result", "updated")
    for s in statuses:
        table.add_row(
            s.id,
            state_name(s.state),
            substate_name(s.substate),
            "yes" if s.error else "",
            "\n".join(f"{a.id}: {a.description}" for a in s.alerts),
            s.result,
            time.strftime("%H:%M:%S", time.localtime(s.timestamp)) if s.timestamp else "",
        )
    return table


def follow_daq(
    client: DpmClient,
    daq_id: str,
    timeout: float,
    as_json: bool = False,
    seen: list[DaqStatus] | None = None,
) -> DaqStatus:
    """Follow a DAQ to COMPLETED/ABORTED; a progress bar on a terminal, one line per change otherwise.
    Every status received is appended to `seen` when given."""
    collected = seen if seen is not None else []
    if as_json:
        return client.wait_for(daq_id, timeout=timeout, on_status=collected.append)
    if not console.is_terminal:

        def print_line(status: DaqStatus) -> None:
            collected.append(status)
            console.print(describe(status), highlight=False)

        return client.wait_for(daq_id, timeout=timeout, on_status=print_line)
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
            collected.append(status)
            name = substate_name(status.substate)
            step = STEPS.index(name) if name in STEPS else 0
            alerts = ", ".join(f"{a.id}: {a.description}" for a in status.alerts)
            progress.update(task, completed=step, substate=name, alerts=alerts)

        return client.wait_for(daq_id, timeout=timeout, on_status=show)


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
        return 0
    final = follow_daq(client, reply.id, args.timeout, args.json)
    if args.json:
        print_json(to_dict(final))
    else:
        console.print(describe(final))
    return 0 if final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED else 3


def cmd_status(args: argparse.Namespace, client: DpmClient) -> int:
    status = client.get_daq_status(args.id)
    if args.json:
        print_json(to_dict(status))
    else:
        console.print(_status_table([status]))
    return 0


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
    try:
        for status in client.watch_daq_status(args.id or ""):
            if args.json:
                print_json(to_dict(status))
            else:
                console.print(describe(status))
    except KeyboardInterrupt:
        pass
    return 0


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
        with DpmClient(args.address, timeout=args.call_timeout) as client:
            try:
                return command(args, client)
            except DaqException as exc:
                where = f" [{exc.id}]" if exc.id else ""
                return fail(f"{exc.code.name}{where}: {exc.message}")

    return run


def add_dpm_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `daqif dpm` and its sub-commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"DPM HOST:PORT (default {DEFAULT_ADDRESS})"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--call-timeout", type=float, default=10.0, help="seconds per call (default 10)")
    dpm = subparsers.add_parser(
        "dpm",
        help="control a Data Product Manager",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = dpm.add_subparsers(dest="dpm_command", required=True, metavar="COMMAND")

    queue = commands.add_parser("queue", parents=[common], help="queue a DAQ from a specification file")
    queue.add_argument("spec", help="Data Product Specification (JSON file)")
    queue.add_argument("--wait", action="store_true", help="follow the DAQ until it is completed or aborted")
    queue.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow with --wait")
    queue.set_defaults(func=_run(cmd_queue))

    for name, func, helptext in [
        ("status", cmd_status, "status of one DAQ"),
        ("internal", cmd_internal, "internal status of one DAQ (workspace, sources, history)"),
        ("abort", cmd_abort, "abort a DAQ"),
        ("retry", cmd_retry, "retry the failed step of a DAQ"),
    ]:
        sub = commands.add_parser(name, parents=[common], help=helptext)
        sub.add_argument("id", help="DAQ id")
        sub.set_defaults(func=_run(func))

    watch = commands.add_parser("watch", parents=[common], help="print every status change (Ctrl-C stops)")
    watch.add_argument("id", nargs="?", default="", help="only this DAQ")
    watch.set_defaults(func=_run(cmd_watch))
    for name, func, helptext in [
        ("active", cmd_active, "list the active DAQs"),
        ("storage", cmd_storage, "workspace storage status"),
        ("exit", cmd_exit, "terminate the DPM server"),
    ]:
        commands.add_parser(name, parents=[common], help=helptext).set_defaults(func=_run(func))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: daqif dpm …")
