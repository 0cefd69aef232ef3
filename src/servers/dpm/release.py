"""Releasing the product to one receiver, atomically and exactly once.

Local receiver: hard link, else a symlink (only with `options.allowSymlink`), else a copy. Each
is made under the hidden name `.<name>.daqif-tmp` in the receiver directory and renamed into
place, then the directory is fsynced, so a receiver never sees a partial product and holds it
durably before COMPLETED. A link is not fsynced itself (its data is the product's, fsynced by the
merge); a copy is, before the rename. A local release is one hop to a worker thread. A receiver that already
holds the product (same inode, a symlink to it, or same size and checksum) counts as released:
after a crash the release is not repeated. Remote receiver (`host` set): rsync over the remote
shell; rsync itself writes a hidden temporary file and renames it, and `--checksum` makes a
repeated release a no-op.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from servers.common import roles
from servers.common.atomic import atomic_output, copy_file, fsync_directory, remove_quietly
from servers.common.paths import PathNotAllowed, confine
from servers.dpm.transfer import TransferError, rsync, run_stoppable, same_content

TEMP_SUFFIX = ".daqif-tmp"


@dataclass(frozen=True)
class Released:
    outcome: str  # "hardlink", "symlink", "copy" or "rsync"
    path: str


def temp_name(name: str) -> str:
    return f".{name}{TEMP_SUFFIX}"


def confine_receiver(path_text: str, allowed_roots: Sequence[Path]) -> Path:
    try:
        return confine(path_text, allowed_roots, what="receiver path")
    except PathNotAllowed as exc:
        raise TransferError(str(exc)) from None


def remove_stale_temp(path_text: str, name: str, allowed_roots: Sequence[Path]) -> None:
    """Remove our own temporary file left in a local receiver by an interrupted release."""
    try:
        directory = confine(path_text, allowed_roots)
    except PathNotAllowed:
        return
    if directory.is_dir():
        remove_quietly(directory / temp_name(name))


async def release_local(
    product: Path, path_text: str, allow_symlink: bool, allowed_roots: Sequence[Path]
) -> Released:
    """Deliver `product` into the receiver directory `path_text`; raise `TransferError` why not.

    One hop to a worker thread (`release_local_blocking`); a cancellation stops a copy at its
    next chunk.
    """
    return await run_stoppable(
        lambda stop: release_local_blocking(product, path_text, allow_symlink, allowed_roots, stop)
    )


def release_local_blocking(
    product: Path, path_text: str, allow_symlink: bool, allowed_roots: Sequence[Path], stop: threading.Event
) -> Released:
    """`release_local`'s work: checks, our leftover removed, the link (or copy) made durable."""
    directory = confine_receiver(path_text, allowed_roots)
    if not directory.exists():
        raise TransferError(f"receiver directory {path_text} does not exist")
    if not directory.is_dir():
        raise TransferError(f"receiver path {path_text} is not a directory")
    overlap = roles.marked_at_or_above(directory, roles.DPM_KEEPS_OUT)
    if overlap is not None:  # a writer marked it after QueueDaq (servers.common.roles)
        raise TransferError(
            f"receiver directory {path_text} lies in {overlap.describe()}: a writer could overwrite it"
        )
    roles.mark_quietly(directory, roles.Role.RECEIVER, roles.owner_of_this_process("daqif-dpm-server"))
    destination = directory / product.name
    try:
        remove_quietly(directory / temp_name(product.name))  # left by an interrupted release
        already = _already_released(product, destination)
        if already is not None:
            return Released(already, str(destination))
        outcome = _deliver(product, destination, allow_symlink, stop)
    except OSError as exc:
        raise TransferError(f"cannot write into receiver directory {path_text}: {exc.strerror}") from None
    return Released(outcome, str(destination))


def _deliver(product: Path, destination: Path, allow_symlink: bool, stop: threading.Event) -> str:
    """Link, symlink or copy `product` to `destination` atomically and durably; return how.

    A link's data is the product's, fsynced by the merge: only the receiver directory is synced
    after the rename. A copy is fsynced before it.
    """
    with atomic_output(destination, temp_name=temp_name(product.name), durable=False) as tmp:
        outcome = _link_or_symlink(product, tmp, allow_symlink)
        if outcome is None:
            copy_file(product, tmp, stop=stop, durable=True)
            outcome = "copy"
    fsync_directory(destination.parent)
    return outcome


def _link_or_symlink(product: Path, tmp: Path, allow_symlink: bool) -> str | None:
    """Hard link, else symlink if allowed; None when a copy is needed. Other errors raise."""
    try:
        os.link(product, tmp)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    if allow_symlink:
        os.symlink(product, tmp)
        return "symlink"
    return None


def _already_released(product: Path, destination: Path) -> str | None:
    """How `destination` already holds `product`, or None if it does not exist.

    Raises `TransferError` if it exists and is something else: the DPM does not overwrite a
    file it did not make.
    """
    try:
        st = os.lstat(destination)
    except FileNotFoundError:
        return None
    if os.path.islink(destination):
        if os.path.realpath(destination) == os.path.realpath(product):
            return "symlink"
    else:
        prod = os.stat(product)
        if (st.st_dev, st.st_ino) == (prod.st_dev, prod.st_ino):
            return "hardlink"
        if same_content(product, destination):
            return "copy"
    raise TransferError(f"{destination} already exists and is not this product; remove it, then retry")


async def release_remote(
    product: Path, host: str, path_text: str, rsync_command: str, remote_shell: str
) -> Released:
    """Deliver `product` to `host:path_text/<name>` with rsync."""
    target = f"{path_text.rstrip('/')}/{product.name}"
    await rsync(rsync_command, remote_shell, str(product), f"{host}:{target}", f"rsync to {host}:{path_text}")
    return Released("rsync", f"{host}:{target}")
