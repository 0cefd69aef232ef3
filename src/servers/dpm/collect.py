"""Collecting one HDF5 source into the DAQ's workspace (`<daqdir>/sources/<sourceName>.h5`).

A local source is confined to the allowed roots (again at collection time: a symlink may have
changed since QueueDaq), then hard-linked if it is on the workspace's file system, else copied
to a temporary name and renamed. A `host:/path` source is fetched with rsync over the
configured remote shell, also to a temporary name first. Either way the collected file appears
under its final name only when complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daqif.spec import Location
from servers.common.paths import PathNotAllowed, confine
from servers.dpm.transfer import TransferError, copy_in_thread, remove_quietly, rsync_argv, run_process


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

    tmp = temp_path(destination)
    remove_quietly(tmp)
    try:
        os.link(source, tmp)
        outcome, nbytes = "linked", st.st_size
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise TransferError(f"cannot link source {path_text}: {exc.strerror}") from None
        try:
            nbytes = await copy_in_thread(source, tmp)
        except OSError as copy_exc:
            remove_quietly(tmp)
            raise TransferError(f"cannot copy source {path_text}: {copy_exc.strerror}") from None
        outcome = "copied"
    os.replace(tmp, destination)
    return Collected(outcome, destination, nbytes, st.st_size, st.st_mtime_ns)


async def _collect_remote(
    location: Location, destination: Path, rsync_command: str, remote_shell: str
) -> Collected:
    tmp = temp_path(destination)
    remove_quietly(tmp)
    argv = rsync_argv(rsync_command, remote_shell, str(location), str(tmp))
    try:
        result = await run_process(argv)
    except OSError as exc:
        raise TransferError(f"cannot run rsync ({argv[0]}): {exc.strerror}") from None
    if result.returncode != 0:
        remove_quietly(tmp)
        why = result.rsync_reason or f"exit code {result.returncode}"
        raise TransferError(f"rsync of {location} failed: {why}")
    os.replace(tmp, destination)
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
