"""Collecting one file source into the DAQ's workspace (`<daqdir>/sources/<sourceName>.h5|.fits`).

A collected source is a snapshot: the merge reads the bytes collected, whatever happens to the
original later. A local source is confined to the allowed roots (again at collection time: a
symlink may have changed since QueueDaq) and copied (`copy_file`: `copy_file_range`, which
file systems with reflinks such as XFS and btrfs turn into a shared-extent clone; ext4 copies).
It is never hard-linked: a writer that rewrites a file in place would rewrite the collected
"copy" too. A `host:/path` source is fetched with rsync over the configured remote shell.
Either way it is written to a temporary name first and appears under its final name only
when complete. Nothing collected is fsynced: the merge of this server run reads it through the
page cache, and the product is made durable by the merge; after a restart every source is
collected afresh (`phases.ActiveDaq.collected_here`), so a copy a crash may have torn is never
read. A local source is collected in one hop to a worker thread (`collect_local`).

Then every file the collected source refers to (virtual dataset sources, external raw storage,
external links; `references.py`) is resolved against the original's location and confined to
the allowed roots, outside the workspace. Files whose data the merge reads (virtual and
external) are collected beside it into `sources/<sourceName>.refs/`, and the manifest
`sources/<sourceName>.refs.json` (stored name → collected copy) is written last: a source is
collected when its manifest exists. A reference leading out is a `TransferError` naming the
dataset and the file. A FITS source refers to no files (its manifest is empty).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from daqif.spec import Location
from servers.common.atomic import atomic_output, atomic_write_bytes, copy_file, remove_quietly
from servers.common.paths import PathNotAllowed, confine
from servers.dpm.transfer import TransferError, rsync, run_stoppable


@dataclass(frozen=True)
class Collected:
    """Outcome of collecting one source. `size`/`mtime_ns` are the original's (-1 if remote).

    `references` files it refers to were collected with it, `reference_bytes` in all.
    `stored_bytes`: the disk space the copies take (`stored_bytes_of`), which a hole does not.
    """

    outcome: str  # "copied" or "rsync"
    local_path: Path
    bytes: int
    size: int
    mtime_ns: int
    references: int = 0
    reference_bytes: int = 0
    stored_bytes: int = -1


def stored_bytes_of(paths: Iterable[Path]) -> int:
    """The disk space the files `paths` take: per file its allocated blocks, at most its size.

    A writer's file written with direct I/O and stopped early has the size of every frame it
    could have held and the blocks of the frames it holds (docs/writer.md, "Direct I/O"); the
    copies keep the holes, and so does the product. At most the size: a file system may count
    blocks allocated ahead of the end (XFS's speculative preallocation) that a copy does not get.
    """
    total = 0
    for path in paths:
        st = os.stat(path)
        total += min(st.st_size, st.st_blocks * 512)
    return total


@dataclass(frozen=True)
class Confinement:
    """Where collected files may come from: the allowed roots, never the DPM workspace."""

    roots: Sequence[Path]
    workspace: Path

    def check(self, path_text: str, what: str) -> Path:
        try:
            resolved = confine(path_text, self.roots, what=what)
        except PathNotAllowed as exc:
            raise TransferError(str(exc)) from None
        if resolved.is_relative_to(self.workspace):
            raise TransferError(f"{what} {path_text!r} lies inside the DPM workspace {self.workspace}")
        return resolved


def collected_path(sources_dir: Path, source_name: str, suffix: str = ".h5") -> Path:
    """`sources/<sourceName>.h5` (or `.fits`: `suffix` is the product format's)."""
    return sources_dir / f"{source_name}{suffix}"


def temp_path(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.daqif-tmp")


def is_collected(destination: Path, size: int) -> bool:
    """A complete collection of `destination` (of `size` bytes): the file and its manifest."""
    from servers.dpm import references  # h5py: imported on first use, not at server start

    try:
        return os.stat(destination).st_size == size and references.manifest_path(destination).is_file()
    except OSError:
        return False


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
    confinement: Confinement,
    rsync_command: str,
    remote_shell: str,
) -> Collected:
    """Collect `location` and the files it refers to; raise `TransferError` saying why not.

    A local source is collected in one hop to a worker thread (`collect_local`: the copies, the
    references and the manifest); a cancellation stops its copy at the next chunk.
    """
    if not location.is_remote:
        return await run_stoppable(lambda stop: collect_local(location, destination, confinement, stop))
    from servers.dpm import references

    await asyncio.to_thread(_prepare, destination)
    done = await _collect_remote(location, destination, rsync_command, remote_shell)
    files, extra = await _collect_remote_references(location, destination, rsync_command, remote_shell)
    data = references.manifest_bytes(str(location), files)
    await asyncio.to_thread(atomic_write_bytes, references.manifest_path(destination), data, durable=False)
    stored = await asyncio.to_thread(stored_bytes_of, {destination, *files.values()})
    return Collected("rsync", destination, done.bytes, -1, -1, len(files), extra, stored)


def _prepare(destination: Path) -> None:
    """Make `destination`'s directory; forget an earlier collection (its manifest first)."""
    from servers.dpm import references

    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_quietly(references.manifest_path(destination))  # not collected until it is written again
    shutil.rmtree(references.references_dir(destination), ignore_errors=True)


def collect_local(
    location: Location, destination: Path, confinement: Confinement, stop: threading.Event
) -> Collected:
    """Collect the local source `location` and the files it refers to (blocking; a worker thread).

    Nothing is fsynced: a collected copy is read by this server run's merge (through the page
    cache) and trusted by no other; a restart collects every source afresh (`phases.Phases.merge`).
    """
    from servers.dpm import references

    _prepare(destination)
    path_text = location.path
    source = confinement.check(path_text, "source")
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise TransferError(f"source {path_text} does not exist") from None
    except OSError as exc:
        raise TransferError(f"cannot read source {path_text}: {exc.strerror}") from None
    if not os.path.isfile(source):
        raise TransferError(f"source {path_text} is not a regular file")
    nbytes = _copy(source, destination, path_text, stop)
    try:
        found = references.find_references(destination)
    except references.ReferenceError as exc:
        raise TransferError(str(exc)) from None
    original = Path(path_text)
    files: dict[str, Path] = {}
    total = 0
    refs_dir = references.references_dir(destination)
    for ref in found:
        resolved = references.resolve(ref.name, original)
        try:
            confinement.check(str(resolved), "the file")
        except TransferError as exc:
            raise TransferError(f"source {location}: {ref.describe()}: {exc}") from None
        if ref.name == ".":
            files["."] = destination  # a virtual dataset mapping from its own file: the snapshot
            continue
        if not ref.is_read_by_merge or ref.name in files:
            continue  # an external link is kept as a link: the merge never opens its file
        real = confinement.check(str(resolved), "the file")
        if not real.is_file():
            raise TransferError(f"source {location}: {ref.describe()}, which is not a file at {resolved}")
        copy = refs_dir / f"{len(files)}-{resolved.name}"
        refs_dir.mkdir(exist_ok=True)
        total += _copy(real, copy, str(resolved), stop)
        files[ref.name] = copy
    data = references.manifest_bytes(str(location), files)
    try:
        atomic_write_bytes(references.manifest_path(destination), data, durable=False)
    except OSError as exc:
        raise TransferError(f"cannot collect {path_text} into {destination}: {exc.strerror}") from None
    stored = stored_bytes_of({destination, *files.values()})
    return Collected("copied", destination, nbytes, st.st_size, st.st_mtime_ns, len(files), total, stored)


def _copy(source: Path, destination: Path, path_text: str, stop: threading.Event) -> int:
    """Copy `source` to `destination` atomically (reflinked where the file system can), not fsynced."""
    try:
        with atomic_output(destination, temp_name=temp_path(destination).name, durable=False) as tmp:
            try:
                return copy_file(source, tmp, stop=stop, durable=False)
            except OSError as exc:
                raise TransferError(f"cannot copy {path_text}: {exc.strerror}") from None
    except OSError as exc:  # the rename
        raise TransferError(f"cannot collect {path_text} into {destination}: {exc.strerror}") from None


async def _collect_remote_references(
    location: Location,
    destination: Path,
    rsync_command: str,
    remote_shell: str,
) -> tuple[dict[str, Path], int]:
    """Fetch every file the remote source `destination` refers to that the merge reads.

    Returns stored name → collected copy, and the bytes collected. Remote names are not confined
    locally (they reach what the remote shell account reaches).
    """
    from servers.dpm import references

    try:
        found = await asyncio.to_thread(references.find_references, destination)
    except references.ReferenceError as exc:
        raise TransferError(str(exc)) from None
    original = Path(location.path)
    files: dict[str, Path] = {}
    total = 0
    refs_dir = references.references_dir(destination)
    for ref in found:
        if ref.name == ".":
            files["."] = destination
            continue
        if not ref.is_read_by_merge or ref.name in files:
            continue
        resolved = references.resolve(ref.name, original)
        copy = refs_dir / f"{len(files)}-{resolved.name}"
        refs_dir.mkdir(exist_ok=True)
        remote = Location(host=location.host, path=str(resolved))
        total += (await _collect_remote(remote, copy, rsync_command, remote_shell)).bytes
        files[ref.name] = copy
    return files, total


async def _collect_remote(
    location: Location, destination: Path, rsync_command: str, remote_shell: str
) -> Collected:
    # Not fsynced on the event loop: a restart re-checks a collected source's size, and the
    # merge reads it soon after through the page cache.
    with atomic_output(destination, temp_name=temp_path(destination).name, durable=False) as tmp:
        await rsync(rsync_command, remote_shell, str(location), str(tmp), f"rsync of {location}")
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
    "Confinement",
    "TransferError",
    "collect_source",
    "collected_path",
    "is_collected",
    "remove_stale_temps",
    "source_changed",
]
