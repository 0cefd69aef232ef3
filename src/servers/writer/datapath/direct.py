"""Uncompressed frames written to their chunks with direct I/O (``O_DIRECT``), past the page cache.

Why (issue 12, measured on the 2-core reference VM, `tools/bench_writer.py`): writing a frame
through the page cache costs the kernel a copy plus the page cache's own work (allocating,
dirtying, writing back) on the cores the receive loop and the detector need; a direct write is
a DMA from memory the process owns. ZeroMQ's receive buffers have no alignment, so each frame is
copied once, in this process, into a page-aligned batch buffer; whole batches go to the disk on
a thread of their own (GIL released while the kernel writes) while the next batch fills.

It needs a layout where each frame's bytes have a known, aligned place in the file: the data
dataset is created with its storage allocated at once (``H5D_ALLOC_TIME_EARLY``, no fill values
written, no filter, fixed extent: HDF5's *implicit* chunk index, where chunk ``i`` lies at
``base + i * frame_bytes``) and aligned (`align_storage`). `check_layout` verifies that before
the first frame; anything else (a compressed write, a write larger than the free space
(`fits_on_disk`), a file system refusing ``O_DIRECT``) is written through the page cache as before
(`output.OutputFile`). Any frame size: the frames are one stream of bytes from an aligned `base`,
written in whole blocks (`DirectFrames`), so a frame need not start on a block (an Eiger 500k frame
is 1030 x 514 x 2 = 1,058,840 bytes, 8 times an odd number).

Tried and left (session 9): frames of such sizes written in batches into this layout through the
page cache (`pwritev` of the received buffers, or a copy into the batch buffers first) ran at
0.54-0.73x the speed of HDF5 appending each frame's chunk to a dataset that grows (1030 x 514 x 2
and 64,512-byte frames, `tools/bench_writer.py --also-page-cache`, 3 interleaved rounds). The cause
is the layout, not the batching: one synchronous `pwrite` per frame into it ran at 0.67 GB/s
against HDF5's 0.99. Buffered writes into the holes of a file that already has its full size cost
ext4 more than writes that extend a file; written directly, the same frames are fast.

Readers see the same file: HDF5 reads the chunks at the addresses its index gives, which are the
ones written here. A SWMR reader learns of frames from ``image_id``, and `OutputFile.flush`
extends it only after `DirectFrames.sync` (every batch so far on the disk).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from typing import Any, Final

from servers.writer.datapath.api import DataPathError

ALIGN: Final = 4096  # file offsets, lengths and buffer addresses of direct writes (>= any logical block)
BATCH_BYTES: Final = 4 << 20  # bytes per direct write, at least one frame
DEPTH: Final = 3  # batch buffers: one filling, up to two on their way to the disk


MAX_FILE_BYTES: Final = 8 << 40
"""The largest file the direct layout makes (8 TiB): ext4's largest file is 16 TiB, and HDF5 does
not recover from a write past it (`File too large`) when it flushes its metadata."""


def fits_on_disk(path: str, n_frames: int, frame_bytes: int) -> bool:
    """Whether all `n_frames` frames fit in the free space of the file system `path` goes to
    (and in `MAX_FILE_BYTES`).

    The direct layout gives the file the size of every frame of the write at once (the storage
    is allocated, the blocks come only with the frames). A write larger than the free space could
    never be completed, so it is one meant to be stopped (std_daq's "n_images as large as you
    like"): it goes through the page cache, whose file grows with the frames, instead of leaving a
    file of a size no disk here holds (up to the file system's limit: 20 TB is ext4's EFBIG).
    A file system that reports no size at all (ramfs: zero blocks, zero free) gives no such
    bound: only `MAX_FILE_BYTES` applies there.
    """
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False  # the folder is not there: creating the file says so
    free = st.f_bavail * st.f_frsize if st.f_blocks else MAX_FILE_BYTES
    return n_frames * frame_bytes <= min(free, MAX_FILE_BYTES)


def batch_frames(frame_bytes: int) -> int:
    """Frames per direct write: `BATCH_BYTES` of them, at least one."""
    return max(1, BATCH_BYTES // frame_bytes)


def batch_capacity(frame_bytes: int) -> int:
    """Bytes of one batch buffer: a batch of frames after the bytes carried from the one before
    (less than `ALIGN`), in whole blocks."""
    return -(-(batch_frames(frame_bytes) * frame_bytes + ALIGN - 1) // ALIGN) * ALIGN


def buffer_bytes(frame_bytes: int) -> int:
    """The memory of one write's batch buffers (part of the data path's memory budget)."""
    return DEPTH * batch_capacity(frame_bytes)


def align_storage(n_frames: int, frame_bytes: int) -> dict[str, int]:
    """h5py.File keywords aligning the one allocation as large as the data (the implicit index
    allocates every chunk in one block) to `ALIGN`; smaller objects (metadata, the id and
    status chunks, compressed chunks) keep HDF5's packing."""
    return {"alignment_threshold": n_frames * frame_bytes, "alignment_interval": ALIGN}


def early_allocation(h5py: Any) -> Any:
    """The data dataset's creation properties: all chunks allocated at creation, none filled."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def check_layout(dataset: Any, n_frames: int, frame_bytes: int) -> int | None:
    """The file offset of chunk 0 when the dataset's chunks lie one after the other, aligned,
    one frame each (the implicit index), or None."""
    dsid = dataset.id
    first = dsid.get_chunk_info(0)
    last = dsid.get_chunk_info(n_frames - 1)
    base = int(first.byte_offset)
    if (
        first.size != frame_bytes
        or last.size != frame_bytes
        or base % ALIGN
        or int(last.byte_offset) != base + (n_frames - 1) * frame_bytes
        or dsid.get_storage_size() != n_frames * frame_bytes
    ):
        return None
    return base


class DirectFrames:
    """Frames `index` = 0, 1, ... of one write, copied into aligned batches and written with
    ``O_DIRECT`` at ``base + index * frame_bytes`` by a writer thread.

    The frames lie one after the other from `base` (aligned), so they are written as one stream
    of bytes: a batch goes to the disk as its whole `ALIGN` blocks, and the bytes after its last
    whole block (frame sizes that are not a multiple of `ALIGN`, most detector geometries) are
    carried to the start of the next batch, which is written from that block on. `sync` writes
    the carried bytes too, through the page cache (less than a block: a direct write is of whole
    blocks, and the block after the frames may hold HDF5's metadata); the next batch writes that
    block again, directly, with the same bytes and more (the kernel writes the cached page back
    and drops it first).

    Frames must come in index order without gaps (the data path appends them so). A write error
    (a full disk, an I/O error) is raised as `DataPathError` by the next `append` or `sync`,
    naming the frames that were not written; nothing after it is written.
    """

    def __init__(self, path: str, base: int, frame_bytes: int) -> None:
        # OSError (EINVAL) where the file system has no direct I/O: the caller writes through
        # the page cache instead.
        self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            self._tail_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # for the carried bytes
        except OSError:
            os.close(self._fd)
            raise
        self.frame_bytes = frame_bytes
        self._base = base
        self._frames_per_batch = batch_frames(frame_bytes)
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self._free.put(mmap.mmap(-1, batch_capacity(frame_bytes)))  # anonymous maps are page-aligned
        self._todo: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()  # joined by `sync`
        self._error: str | None = None
        self._buffer: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._filled = 0  # bytes in the batch filling, the carried ones first
        self._frames = 0  # frames appended to it
        self._offset = base  # where its first byte goes (aligned)
        self._thread = threading.Thread(target=self._run, name="daqif-direct-io", daemon=True)
        self._thread.start()

    def append(self, index: int, data: Any) -> None:
        """Copy frame `index` (a buffer of `frame_bytes`) into the batch; a full batch is queued."""
        if self._error is not None:
            raise DataPathError(self._error)
        view = self._view
        if view is None:
            self._buffer = self._free.get()  # waits while DEPTH batches are on their way
            view = self._view = memoryview(self._buffer)
        start = self._filled
        view[start : start + self.frame_bytes] = data
        self._filled = start + self.frame_bytes
        self._frames += 1
        if self._frames == self._frames_per_batch:
            self._submit()

    def sync(self) -> None:
        """Write every frame appended so far (the batch filling, however few frames) and wait
        until they are in the file; `DataPathError` when one could not be."""
        if self._filled:
            self._submit()
        self._todo.join()
        if self._error is not None:
            raise DataPathError(self._error)
        if self._filled:  # the carried bytes, less than a block
            assert self._view is not None
            try:
                _write_all(self._tail_fd, self._view[: self._filled], self._offset)
            except OSError as exc:
                self._error = self._failed(self._offset, self._filled, exc)
                raise DataPathError(self._error) from None

    def close(self) -> None:
        """Stop the thread (after the writes queued) and close the descriptors; never raises for
        a write error (`sync` reports those)."""
        self._todo.put(None)
        self._thread.join()
        if self._view is not None:
            self._view.release()
            self._view = None
        os.close(self._fd)
        os.close(self._tail_fd)

    def _submit(self) -> None:
        """Queue the whole blocks of the batch filling; the bytes after them start the next one."""
        buffer, view = self._buffer, self._view
        assert buffer is not None and view is not None
        whole = self._filled - self._filled % ALIGN
        self._frames = 0
        if whole == 0:  # less than a block so far: it stays where it is
            return
        carried = self._filled - whole
        following: mmap.mmap | None = None
        if carried:
            following = self._free.get()
            following[:carried] = buffer[whole : self._filled]
        view.release()
        self._todo.put((buffer, self._offset, whole))
        self._offset += whole
        self._filled = carried
        self._buffer = following
        self._view = memoryview(following) if following is not None else None

    def _failed(self, offset: int, nbytes: int, exc: OSError) -> str:
        first = (offset - self._base) // self.frame_bytes
        last = (offset + nbytes - 1 - self._base) // self.frame_bytes
        return f"writing frames {first}-{last} to the file failed: {exc}; no frame after them was written"

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, offset, nbytes = item
            try:
                if self._error is None:
                    with memoryview(buffer) as view:
                        _write_all(self._fd, view[:nbytes], offset, direct=True)
            except OSError as exc:
                self._error = self._failed(offset, nbytes, exc)
            finally:
                self._free.put(buffer)
                self._todo.task_done()


def _write_all(fd: int, data: memoryview, offset: int, *, direct: bool = False) -> None:
    """`pwrite` all of `data` at `offset` (a direct write's every part a multiple of `ALIGN`)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0 or (direct and n % ALIGN):
            what = "direct write" if direct else "write"
            raise OSError(f"short {what} ({n} of {len(data) - done} bytes at offset {offset + done})")
        done += n
