"""Collecting one HDF5 source into the DAQ's workspace (`<daqdir>/sources/<sourceName>.h5`).

A local source is confined to the allowed roots (again at collection time: a symlink may have
changed since QueueDaq), then hard-linked if it is on the workspace's file system, else copied
(`atomic_output`: a temporary name, fsync, rename). A `host:/path` source is fetched with rsync over the
configured remote shell, also to a temporary name first. Either way the collected file appears
under its final name only when complete.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daqif.spec import Location
from servers.common.atomic import atomic_output, copy_file, remove_quietly
from servers.common.paths import PathNotAllowed, confine
from servers.dpm.transfer import TransferError, rsync_argv, run_process, run_stoppable


@dataclass(frozen=True)
class Collected:
    """Outcome of collecting one source. `size`/`mtime_ns` are the original's (-1 if remote)."""

    outcome: str  # "linked", "copied" or "rsync"
    local_path: Path
    bytes: int
    size: int
    mtime_ns: int


def collected_path(sources_dir: Path, source_name: str) -> Path:
    return sources_dir / f"{source_name}.h5"


def temp_path(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.daqif-tmp")


def remove_stale_temps(sources_dir: Path) -> None:
    """Remove temporary files of an interrupted collection (after a restart)."""
    if not sources_dir.is_dir():
        return
    for entry in os.scandir(sources_dir):
        if entry.name.startswith("."):
            remove_quietly(Path(entry.path))


async def collect_source(
    location: Location,
    destination: Path,
    *,
    allowed_roots: Sequence[Path],
    rsync_command: str,
    remote_shell: str,
) -> Collected:
    """Collect `location` to `destination`; raise `TransferError` saying why it failed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if location.is_remote:
        return await _collect_remote(location, destination, rsync_command, remote_shell)
    return await _collect_local(location.path, destination, allowed_roots)


async def _collect_local(path_text: str, destination: Path, allowed_roots: Sequence[Path]) -> Collected:
    try:
        source = confine(path_text, allowed_roots, what="source")
    except PathNotAllowed as exc:
        raise TransferError(str(exc)) from None
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise TransferError(f"source {path_text} does not exist") from None
    except OSError as exc:
        raise TransferError(f"cannot read source {path_text}: {exc.strerror}") from None
    if not os.path.isfile(source):
        raise TransferError(f"source {path_text} is not a regular file")

    try:
        existing = os.stat(destination)
    except FileNotFoundError:
        existing = None
    if existing is not None and (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
        return Collected("linked", destination, st.st_size, st.st_size, st.st_mtime_ns)

    try:
        outcome, nbytes = await run_stoppable(
            lambda stop: _link_or_copy(source, destination, path_text, stop)
        )
    except OSError as exc:  # the fsync or the rename
        raise TransferError(f"cannot collect source {path_text} into {destination}: {exc.strerror}") from None
    return Collected(outcome, destination, nbytes, st.st_size, st.st_mtime_ns)


def _link_or_copy(source: Path, destination: Path, path_text: str, stop: threading.Event) -> tuple[str, int]:
    """Hard-link `source` to `destination`, else copy it (across file systems); atomically."""
    with atomic_output(destination, temp_name=temp_path(destination).name) as tmp:
        try:
            os.link(source, tmp)
            return "linked", os.stat(tmp).st_size
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise TransferError(f"cannot link source {path_text}: {exc.strerror}") from None
        try:
            return "copied", copy_file(source, tmp, stop=stop, durable=False)
        except OSError as exc:
            raise TransferError(f"cannot copy source {path_text}: {exc.strerror}") from None


async def _collect_remote(
    location: Location, destination: Path, rsync_command: str, remote_shell: str
) -> Collected:
    # Not fsynced on the event loop: a restart re-checks a collected source's size, and the
    # merge reads it soon after through the page cache.
    with atomic_output(destination, temp_name=temp_path(destination).name, durable=False) as tmp:
        argv = rsync_argv(rsync_command, remote_shell, str(location), str(tmp))
        try:
            result = await run_process(argv)
        except OSError as exc:
            raise TransferError(f"cannot run rsync ({argv[0]}): {exc.strerror}") from None
        if result.returncode != 0:
            why = result.rsync_reason or f"exit code {result.returncode}"
            raise TransferError(f"rsync of {location} failed: {why}")
    size = os.stat(destination).st_size
    return Collected("rsync", destination, size, -1, -1)


def source_changed(path_text: str, size: int, mtime_ns: int) -> str | None:
    """How a local source changed since it was collected, or None if it did not."""
    try:
        st = os.stat(path_text)
    except OSError:
        return f"source {path_text} disappeared after it was collected"
    if st.st_size != size:
        return f"source {path_text} changed size after it was collected ({size} -> {st.st_size} bytes)"
    if st.st_mtime_ns != mtime_ns:
        return f"source {path_text} was modified after it was collected"
    return None


__all__ = [
    "Collected",
    "TransferError",
    "collect_source",
    "collected_path",
    "remove_stale_temps",
    "source_changed",
]
