"""The nine `std_cli_*` tools of the Standard DAQ client, against the std_daq REST API.

Same commands and arguments as the published `std_daq_client.cli`, plus `-b`/`--url_base`
(default `STD_DAQ_API_URL`, else http://127.0.0.1:5000). Each prints the JSON answer; on an error
it prints one line to stderr and exits with 1 (the writer refused) or 3 (the writer could not
be reached or the request failed); 2 is a usage error.

Also runnable as `python -m daqif.stdcli <command> [args]` (`get_status` or `std_cli_get_status`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from daqif.writer_rest import WriterRefused, WriterRestClient, WriterRestError, default_url

EXIT_REFUSED = 1
EXIT_FAILED = 3


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "-b",
        "--url_base",
        default=default_url(),
        help="base URL of the REST endpoint (default: $STD_DAQ_API_URL, else http://127.0.0.1:5000)",
    )
    return parser


def _run(args: argparse.Namespace, call: Callable[[WriterRestClient], Any], prog: str) -> int:
    try:
        result = call(WriterRestClient(args.url_base))
    except WriterRestError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(exc, WriterRefused) else EXIT_FAILED
    print(json.dumps(result, indent=2))
    return 0


def get_status(argv: Sequence[str] | None = None) -> int:
    """`std_cli_get_status`: the writer status."""
    parser = _parser("Get std_daq status")
    return _run(parser.parse_args(argv), lambda c: c.get_status(), "std_cli_get_status")


def get_config(argv: Sequence[str] | None = None) -> int:
    """`std_cli_get_config`: the DAQ config."""
    parser = _parser("Get std_daq config")
    return _run(parser.parse_args(argv), lambda c: c.get_config(), "std_cli_get_config")


def set_config(argv: Sequence[str] | None = None) -> int:
    """`std_cli_set_config FILE`: apply a (partial) config from a JSON file."""
    parser = _parser("Set std_daq config")
    parser.add_argument("config_file", help="File to load the config from.")
    args = parser.parse_args(argv)
    try:
        with open(args.config_file, encoding="utf-8") as handle:
            daq_config = json.load(handle)
    except OSError as exc:
        print(f"std_cli_set_config: cannot read {args.config_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except json.JSONDecodeError as exc:
        print(
            f"std_cli_set_config: {args.config_file} is not valid JSON: {exc.msg} at line {exc.lineno}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return _run(args, lambda c: c.set_config(daq_config), "std_cli_set_config")


def get_logs(argv: Sequence[str] | None = None) -> int:
    """`std_cli_get_logs [-n N]`: the last N logged acquisitions, newest first."""
    parser = _parser("Get std_daq logs")
    parser.add_argument("-n", type=int, default=1, help="Number of last logs to return")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error(f"-n {args.n}: must be >= 0")
    return _run(args, lambda c: c.get_logs(args.n), "std_cli_get_logs")


def get_stats(argv: Sequence[str] | None = None) -> int:
    """`std_cli_get_stats`: throughput of the last second."""
    parser = _parser("Get std_daq stats")
    return _run(parser.parse_args(argv), lambda c: c.get_stats(), "std_cli_get_stats")


def get_deploy_status(argv: Sequence[str] | None = None) -> int:
    """`std_cli_get_deploy_status`: the status of the last config deployment."""
    parser = _parser("Get std_daq deployment status")
    return _run(parser.parse_args(argv), lambda c: c.get_deployment_status(), "std_cli_get_deploy_status")


def _write_parser(description: str) -> argparse.ArgumentParser:
    parser = _parser(description)
    parser.add_argument("output_file", help="Absolute path filename to write the data to.")
    parser.add_argument("n_images", type=int, help="Number of images to write.")
    return parser


def write_sync(argv: Sequence[str] | None = None) -> int:
    """`std_cli_write_sync FILE N`: write N images and return when done."""
    args = _write_parser("Start std_daq sync write").parse_args(argv)
    request = {"output_file": args.output_file, "n_images": args.n_images}
    return _run(args, lambda c: c.start_writer_sync(request), "std_cli_write_sync")


def write_async(argv: Sequence[str] | None = None) -> int:
    """`std_cli_write_async FILE N`: start writing N images and return once the file is open."""
    args = _write_parser("Start std_daq async write").parse_args(argv)
    request = {"output_file": args.output_file, "n_images": args.n_images}
    return _run(args, lambda c: c.start_writer_async(request), "std_cli_write_async")


def write_stop(argv: Sequence[str] | None = None) -> int:
    """`std_cli_write_stop`: stop a write, reset an UNKNOWN writer."""
    parser = _parser("std_daq stop writer")
    return _run(parser.parse_args(argv), lambda c: c.stop_writer(), "std_cli_write_stop")


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "get_status": get_status,
    "get_config": get_config,
    "set_config": set_config,
    "get_logs": get_logs,
    "get_stats": get_stats,
    "get_deploy_status": get_deploy_status,
    "write_async": write_async,
    "write_sync": write_sync,
    "write_stop": write_stop,
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m daqif.stdcli COMMAND [args]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(COMMANDS)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: python -m daqif.stdcli COMMAND [args]\ncommands: {names}", file=sys.stderr)
        return 0 if args else 2
    name = args[0].removeprefix("std_cli_")
    command = COMMANDS.get(name)
    if command is None:
        print(f"daqif.stdcli: unknown command {args[0]!r}; commands: {names}", file=sys.stderr)
        return 2
    sys.argv[0] = f"std_cli_{name}"
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
