"""Role markers: each server marks the directories it writes into, and the others keep out.

The writer writes under its allowed roots; the DPM writes into its workspace and its local
receiver directories. Started by hand (not under `daqif serve`, which checks its own layout in
`SystemConfig.check_roles_apart`), neither knows the other's configuration, so each marks what it
owns with a small file holding its owner (`daqif-dpm-server pid 123 on host`):

    <workspace>/.daqif-dpm-workspace     written by the DPM at start
    <receiver dir>/.daqif-receiver       written by the DPM at QueueDaq and at each release
    <allowed root>/.daqif-writer-root    written by the writer at start

and refuses a directory of its own that lies inside, or contains, one the other marked: the
writer an allowed root (at start: exit code 2, one line naming both paths) and any output file
that would land in a marked directory (at each write: a directory marked after the writer
started); the DPM its workspace (at start, exit code 2) and a receiver (at QueueDaq
INVALID_ARGUMENT, at release an ERROR `releasing:<index>`). A marker stays when its server stops:
the directory keeps its role until the operator removes the marker.

Looking for a marker above a path stats one file per parent directory. Looking below a directory
walks its subdirectories (symlinks not followed), at most `MAX_SCANNED_ENTRIES` entries: past
that the rest is not searched (a warning says so), and the write-time check still protects; a
directory already marked by its own server is not searched below again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from servers.common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_SCANNED_ENTRIES = 200_000
MAX_OWNER_CHARS = 200


class Role(StrEnum):
    """A directory one server writes into; the value names the marker file."""

    DPM_WORKSPACE = ".daqif-dpm-workspace"
    RECEIVER = ".daqif-receiver"
    WRITER_ROOT = ".daqif-writer-root"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Role.DPM_WORKSPACE: "the DPM workspace",
    Role.RECEIVER: "a DPM receiver directory",
    Role.WRITER_ROOT: "a writer's allowed root",
}

WRITER_KEEPS_OUT = (Role.DPM_WORKSPACE, Role.RECEIVER)
"""Directories the writer never writes into."""
DPM_KEEPS_OUT = (Role.WRITER_ROOT,)
"""Directories the DPM never makes its workspace or a receiver."""


class RolesOverlap(ValueError):
    """A directory of one server lies inside, or contains, one another server marked."""


@dataclass(frozen=True)
class Marked:
    """A directory marked with `role`, by `owner`."""

    directory: Path
    role: Role
    owner: str

    def describe(self) -> str:
        return f"{self.directory}, {self.role.description} of {self.owner}"


def owner_of_this_process(program: str) -> str:
    return f"{program} pid {os.getpid()} on {socket.gethostname()}"


def mark(directory: Path, role: Role, owner: str) -> None:
    """Mark `directory` as `role` of `owner` (atomically; kept if it already says so)."""
    marker = Path(directory) / role.value
    data = f"{owner}\n".encode()
    try:
        if marker.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(marker, data)


def mark_quietly(directory: Path, role: Role, owner: str) -> None:
    """`mark`, logging instead of raising when the marker cannot be written."""
    try:
        mark(directory, role, owner)
    except OSError as exc:
        log.warning("cannot mark %s as %s: %s", directory, role.description, exc.strerror or exc)


def marked_at_or_above(path: Path, roles: Iterable[Role]) -> Marked | None:
    """The nearest directory at or above `path` (resolved) marked with one of `roles`."""
    roles = tuple(roles)
    for directory in (path, *path.parents):
        for role in roles:
            found = _marked(directory, role)
            if found is not None:
                return found
    return None


def marked_below(directory: Path, roles: Iterable[Role]) -> Marked | None:
    """A directory strictly below `directory` marked with one of `roles` (bounded walk)."""
    names = {role.value: role for role in roles}
    pending = [directory]
    seen = 0
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_SCANNED_ENTRIES:
                        log.warning(
                            "looked for role markers in the first %d entries below %s only",
                            MAX_SCANNED_ENTRIES,
                            directory,
                        )
                        return None
                    role = names.get(entry.name)
                    if role is not None and current != directory:
                        found = _marked(Path(current), role)
                        if found is not None:
                            return found
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
        except OSError:
            continue  # unreadable or gone: nothing of ours can be written there either
    return None


def refuse_overlap(directory: Path, what: str, own: Role, consequence: str) -> None:
    """Raise `RolesOverlap` (one line naming both) if `directory`, to be marked `own`, lies inside
    or contains a directory the other server marked.

    A directory already marked `own` is not searched below: a marker made inside it since was
    refused by the server that tried (it found this one above).
    """
    keep_out = WRITER_KEEPS_OUT if own is Role.WRITER_ROOT else DPM_KEEPS_OUT
    directory = Path(directory).resolve()
    above = marked_at_or_above(directory, keep_out)
    if above is not None:
        where = "is" if above.directory == directory else "lies inside"
        raise RolesOverlap(f"{what} {directory} {where} {above.describe()}: {consequence}")
    if _marked(directory, own) is not None:
        return
    below = marked_below(directory, keep_out)
    if below is not None:
        raise RolesOverlap(f"{what} {directory} contains {below.describe()}: {consequence}")


def _marked(directory: Path, role: Role) -> Marked | None:
    try:
        with open(directory / role.value, "rb") as handle:
            head = handle.read(4 * MAX_OWNER_CHARS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return Marked(directory, role, "an unknown server (the marker cannot be read)")
    owner = head.decode("utf-8", "replace").splitlines()[0] if head.strip() else "an unknown server"
    return Marked(directory, role, owner[:MAX_OWNER_CHARS])
