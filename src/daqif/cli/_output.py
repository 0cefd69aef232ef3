"""Output helpers shared by the `daqif` sub-commands: JSON for scripts, rich text for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

console = Console()
error_console = Console(stderr=True)


def to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a dict with the proto field names and enum names, defaults included."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(obj: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> int:
    """Report an error on stderr in one line and return the exit code."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return code
