"""`daqif`: one command for the daqif system.

daqif dpm …       control a Data Product Manager (gRPC)
daqif writer …    control a Standard DAQ writer (REST)
daqif serve       run the whole system (DPM, writer, optional simulator)
daqif demo        record frames and build a verified data product, end to end
daqif web         serve the live status page of a DPM and a writer
"""

from __future__ import annotations

import argparse
import sys

from daqif import __version__
from daqif.cli.demo import add_demo_parser
from daqif.cli.dpm import add_dpm_parser
from daqif.cli.serve import add_serve_parser
from daqif.cli.web import add_web_parser
from daqif.cli.writer import add_writer_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqif", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"daqif {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_dpm_parser(subparsers)
    add_writer_parser(subparsers)
    add_serve_parser(subparsers)
    add_demo_parser(subparsers)
    add_web_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
