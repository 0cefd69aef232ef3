"""`daqif web`: the live status page of a DPM and a writer (see `servers.web.main`)."""

from __future__ import annotations

import argparse


def add_web_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from servers.web import main as web

    parser = subparsers.add_parser(
        "web",
        help="serve the live status page",
        description=web.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    web.add_arguments(parser)
    parser.set_defaults(func=web.run)
