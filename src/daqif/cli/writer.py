"""`daqif writer …`: control a Standard DAQ writer over its std_daq REST API.

    daqif writer status                     writer and last acquisition
    daqif writer write /data/run.h5 100 --sync   record 100 images, with a progress bar
    daqif writer stop                       interrupt a write, reset an UNKNOWN writer
    daqif writer config | set-config FILE | logs [-n N] | stats | deployment
    daqif writer join OUT.h5 FILE…          one virtual dataset over writers that shared a source

`--url` defaults to $STD_DAQ_API_URL, else http://127.0.0.1:5000; `--json` prints the JSON the
REST API returned.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daqif import vds
from daqif.cli._output import console, fail, print_json
from daqif.vds import JoinError, join_writer_files
from daqif.writer_rest import WriterRefused, WriterRestClient, WriterRestError, default_url

POLL_INTERVAL = 0.2

Command = Callable[[argparse.Namespace, WriterRestClient], int]


def _status_table(status: dict[str, Any]) -> Table:
    acquisition = status["acquisition"]
    info, stats = acquisition["info"], acquisition["stats"]
    table = Table(show_header=False, box=None)
    table.add_row("writer", f"[bold]{status['state']}[/]")
    table.add_row("acquisition", f"{acquisition['state']} {acquisition['message']}".strip())
    if info.get("output_file"):
        table.add_row("output_file", str(info["output_file"]))
        table.add_row("run_id", str(info["run_id"]))
        table.add_row("images", f"{stats['n_write_completed']} of {info['n_images']}")
    for key in ("start_time", "stop_time"):
        if stats.get(key) is not None:
            table.add_row(key, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats[key])))
    return table


def _show(args: argparse.Namespace, obj: Any, human: Callable[[Any], None] | None = None) -> None:
    if args.json or human is None:
        print_json(obj)
    else:
        human(obj)


def cmd_status(args: argparse.Namespace, client: WriterRestClient) -> int:
    _show(args, client.get_status(), lambda status: console.print(_status_table(status)))
    return 0


def cmd_config(args: argparse.Namespace, client: WriterRestClient) -> int:
    _show(args, client.get_config())
    return 0


def cmd_set_config(args: argparse.Namespace, client: WriterRestClient) -> int:
    try:
        with open(args.file, encoding="utf-8") as handle:
            update = json.load(handle)
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except json.JSONDecodeError as exc:
        return fail(f"{args.file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    _show(args, client.set_config(update))
    return 0


def cmd_logs(args: argparse.Namespace, client: WriterRestClient) -> int:
    def human(logs: list[dict[str, Any]]) -> None:
        table = Table("stop time", "state", "message", "images", "output_file")
        for entry in logs:
            stop = entry["stats"]["stop_time"]
            table.add_row(
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stop)) if stop else "",
                entry["state"],
                entry["message"],
                f"{entry['stats']['n_write_completed']}/{entry['info']['n_images']}",
                str(entry["info"]["output_file"]),
            )
        console.print(table)

    _show(args, client.get_logs(args.n), human)
    return 0


def cmd_stats(args: argparse.Namespace, client: WriterRestClient) -> int:
    _show(args, client.get_stats())
    return 0


def cmd_deployment(args: argparse.Namespace, client: WriterRestClient) -> int:
    _show(args, client.get_deployment_status())
    return 0


def cmd_stop(args: argparse.Namespace, client: WriterRestClient) -> int:
    _show(args, client.stop_writer(), lambda status: console.print(_status_table(status)))
    return 0


def cmd_write(args: argparse.Namespace, client: WriterRestClient) -> int:
    run_id = time.time_ns()
    request = {"output_file": args.file, "n_images": args.n_images, "run_id": run_id}
    status = client.start_writer_async(request)
    if args.sync:
        status = _follow(client, args.file, run_id, args.n_images, show_progress=not args.json)
    _show(args, status, lambda s: console.print(_status_table(s)))
    if not args.sync:
        return 0
    acquisition = status["acquisition"]
    if acquisition["state"] == "FINISHED" and acquisition["message"] == "Completed.":
        return 0
    return fail(f"the write did not complete: {acquisition['state']} {acquisition['message']}")


def _follow(
    client: WriterRestClient, output_file: str, run_id: int, n_images: int, *, show_progress: bool
) -> dict[str, Any]:
    """Poll the status until our acquisition has ended; Ctrl-C stops the write, naming it, so
    the stop never ends a write another client started after ours ended."""
    columns = (TextColumn("writing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, disable=not show_progress) as progress:
        task = progress.add_task("", total=n_images)
        try:
            while True:
                status = client.get_status()
                acquisition = status["acquisition"]
                ours = acquisition["info"].get("run_id") == run_id
                if ours:
                    progress.update(
                        task,
                        completed=acquisition["stats"]["n_write_completed"],
                        description=acquisition["state"],
                    )
                if not ours or status["state"] != "WRITING":
                    return status
                time.sleep(POLL_INTERVAL)
        except KeyboardInterrupt:
            progress.update(task, description="stopping")
            return client.stop_writer(output_file=output_file)


def cmd_join(args: argparse.Namespace) -> int:
    """Join writer files by image id into a virtual dataset (no REST call involved)."""
    try:
        result = join_writer_files(
            Path(args.output), [Path(f) for f in args.files], detector=args.detector, relative=args.relative
        )
    except JoinError as exc:
        return fail(str(exc))
    summary = {
        "output": str(result.output),
        "detector_name": result.detector_name,
        "n_images": result.n_images,
        "sources": [str(p) for p in result.sources],
        "mappings": result.mappings,
    }
    if args.json:
        print_json(summary)
    else:
        console.print(
            f"joined {result.n_images} frames of {len(result.sources)} files into {result.output} "
            f"(/{result.detector_name}/data, {result.mappings} mappings)",
            highlight=False,
            soft_wrap=True,
        )
    return 0


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        client = WriterRestClient(args.url)
        try:
            return command(args, client)
        except WriterRefused as exc:
            return fail(f"the writer refused: {exc.message}")
        except WriterRestError as exc:
            return fail(exc.message, 3)

    return run


def add_writer_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `daqif writer` and its sub-commands (each sets `func(args) -> int`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=default_url(),
        help="REST base URL of the writer (default: $STD_DAQ_API_URL, else http://127.0.0.1:5000)",
    )
    common.add_argument("--json", action="store_true", help="print the JSON the REST API returned")
    writer = subparsers.add_parser(
        "writer",
        help="control a Standard DAQ writer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = writer.add_subparsers(dest="writer_command", required=True, metavar="COMMAND")
    for name, func, helptext in [
        ("status", cmd_status, "writer status and the last acquisition"),
        ("config", cmd_config, "the DAQ config"),
        ("stats", cmd_stats, "throughput of the last second and frame counters"),
        ("deployment", cmd_deployment, "status of the last config deployment"),
        ("stop", cmd_stop, "stop a write; reset an UNKNOWN writer"),
    ]:
        commands.add_parser(name, parents=[common], help=helptext).set_defaults(func=_run(func))

    set_config = commands.add_parser(
        "set-config", parents=[common], help="apply a (partial) config JSON file"
    )
    set_config.add_argument("file", help="JSON file with the config fields to change")
    set_config.set_defaults(func=_run(cmd_set_config))

    logs = commands.add_parser("logs", parents=[common], help="the last logged acquisitions, newest first")
    logs.add_argument("-n", type=int, default=10, help="how many (default 10)")
    logs.set_defaults(func=_run(cmd_logs))

    write = commands.add_parser("write", parents=[common], help="record images to an HDF5 file")
    write.add_argument("file", help="absolute path of the output file (under the writer's allowed roots)")
    write.add_argument("n_images", type=int, help="number of images to record")
    write.add_argument("--sync", action="store_true", help="wait until written, with a progress bar")
    write.set_defaults(func=_run(cmd_write))

    join = commands.add_parser(
        "join",
        help="join the files of writers that shared one PUSH source into one virtual dataset",
        description=vds.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    join.add_argument("output", help="the joined file to write (a small HDF5 file with a virtual dataset)")
    join.add_argument("files", nargs="+", help="the writers' files")
    join.add_argument("--detector", help="detector group name (default: the one group with a data set)")
    join.add_argument(
        "--relative",
        action="store_true",
        help="store source paths relative to the joined file (to move the set together); "
        "default: absolute, which the DPM can merge",
    )
    join.add_argument("--json", action="store_true", help="print the result as JSON")
    join.set_defaults(func=cmd_join)
