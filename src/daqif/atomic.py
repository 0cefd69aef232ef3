"""The one atomic-output helper and the one file copy (client and servers alike).

`atomic_output(path)` yields a temporary path beside `path`; whatever the caller makes there (a
written file, an HDF5 file, a hard link, a symlink, an rsync download) becomes `path` by one
rename when the block ends, after an fsync of the file, and the rename is made durable by an
fsync of the directory. If the block raises, the temporary file is removed. After a crash a
reader sees the old `path` or the new one, never a torn file.

`copy_file(source, destination)` copies in the kernel (`copy_file_range`, else `sendfile`, as
`cp` does) and can be stopped between chunks from another thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_COPY_CHUNK = 64 * 1024 * 1024
# copy_file_range refuses some file system pairs (EXDEV on many kernels): sendfile then.
_FALL_BACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class CopyStopped(Exception):
    """`copy_file` saw its `stop` event set and stopped between two chunks."""


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Write the data of `path` (the file a symlink points to, for a symlink) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove the file `path` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: Path, *, temp_name: str | None = None, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory that becomes `path` atomically on success.

    The caller creates the file at the yielded path. `temp_name` fixes its name, so that a
    leftover of a crash can be found and removed by name (it is removed here first); by default
    the name is unique (`.<name>.<random>.tmp`). With `durable`, the file is fsynced before the
    rename and the directory after it. On an exception the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(temp_name or f".{path.name}.{secrets.token_hex(4)}.tmp")
    remove_quietly(tmp)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically; with `durable`, fsync file and directory."""
    with atomic_output(path, durable=durable) as tmp, open(tmp, "xb") as handle:
        handle.write(data)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    """Replace `path` with `obj` as UTF-8 JSON atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), durable=durable)


def copy_file(
    source: Path, destination: Path, *, stop: threading.Event | None = None, durable: bool = True
) -> int:
    """Copy `source` to the new file `destination`; return its size (the bytes of the copy).

    Refuses to overwrite (`FileExistsError`). Raises `CopyStopped` at the next chunk once `stop`
    is set, and `OSError` (EIO) if the source shrank while it was copied. With `durable` the copy
    is fsynced (use it inside `atomic_output`, which does that, with `durable=False`).

    Holes stay holes: only the source's data ranges (``SEEK_DATA``/``SEEK_HOLE``) are copied, and
    the copy is given the source's size. A writer's file written with direct I/O and stopped
    early has its storage allocated for every frame it could have held (docs/writer.md, "Direct
    I/O"): copied byte for byte, the unwritten part would become real zeros on the disk.
    """
    with open(source, "rb") as src, open(destination, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        in_kernel = _copy_file_range
        for start, end in _data_ranges(src.fileno(), size):
            position = start
            while position < end:
                if stop is not None and stop.is_set():
                    raise CopyStopped(f"copy of {source} was stopped")
                count = min(_COPY_CHUNK, end - position)
                try:
                    n = in_kernel(src.fileno(), dst.fileno(), position, count)
                except OSError as exc:
                    if in_kernel is _sendfile or exc.errno not in _FALL_BACK:
                        raise
                    in_kernel = _sendfile
                    continue
                if n == 0:
                    raise OSError(
                        errno.EIO, f"copy of {source} stopped at byte {position} of {size}: it shrank"
                    )
                position += n
        now = os.fstat(src.fileno()).st_size
        if now < size:  # its end was cut off while the ranges were being found
            raise OSError(errno.EIO, f"copy of {source} stopped at byte {now} of {size}: it shrank")
        dst.truncate(size)  # a hole at the end (nothing after it to copy) keeps the size
        if durable:
            os.fsync(dst.fileno())
    return size


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges of `fd` below `size` that hold data; the whole file where the
    file system cannot tell (no ``SEEK_DATA``)."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        position = end


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset, offset)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    os.lseek(dst, offset, os.SEEK_SET)
    return os.sendfile(dst, src, offset, count)
