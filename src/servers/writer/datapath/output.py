"""One open HDF5 output file of the data path: datasets, direct chunk writes, SWMR flushes.

Used by the worker process only; see the package docstring for the file layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Final

from daqif.frame import Compression, FrameHeader
from servers.writer.datapath import direct
from servers.writer.datapath.api import DataPathError, WriteJob, WritePhase, WriteResult
from servers.writer.datapath.writeback import Writeback, make_durable

log = logging.getLogger(__name__)

METADATA_BUFFER: Final = 1 << 16  # image ids / statuses buffered between flushes
# How long frames of another shape or dtype than the config may arrive, with no good frame
# written since the first of them, before the write fails (well within the second the user waits).
MISMATCH_GRACE_S: Final = 0.5
GROW_FRAMES: Final = 4096
"""Frames the data dataset grows by when the page cache writes it (`OutputFile._grow`)."""


class OutputFile:
    """One open output file: created by the constructor, filled by `append`, ended by `close`.

    With `direct_io`, uncompressed frames are written past the page cache where the file system
    allows it (`servers.writer.datapath.direct`); otherwise each frame is a direct chunk write of
    HDF5."""

    def __init__(self, job: WriteJob, flush_interval: float, direct_io: bool = False) -> None:
        import h5py
        import numpy as np

        self.job = job
        self.flush_interval = flush_interval
        try:
            self.dtype = np.dtype(job.dtype).newbyteorder("<")
        except TypeError:
            raise DataPathError(f"dtype {job.dtype!r} is not a numpy dtype") from None
        if job.n_images < 1 or job.height < 1 or job.width < 1:
            raise DataPathError(
                f"n_images, height and width must be >= 1 (got {job.n_images}, {job.height}, {job.width})"
            )
        self.phase = WritePhase.WAITING_IMAGES
        self.n_written = 0
        self.n_flushed = 0
        self.full = False
        self.data_extent = 0  # frames the data dataset has room for (its first dimension)
        self.dirty = False
        self.next_flush = 0.0
        self.start_time = time.time()
        self.stop_time: float | None = None
        self.compressed = False
        self.data: Any = None
        self.image_id: Any = None
        self.status: Any = None
        self.write_chunk: Any = None
        self.frame_bytes = job.height * job.width * self.dtype.itemsize
        self.direct_io = direct_io
        if self.direct_io and not direct.fits_on_disk(job.output_file, job.n_images, self.frame_bytes):
            log.info(
                "%s: %d frames of %d bytes are more than the free space (or 8 TiB); writing through the "
                "page cache",
                job.output_file,
                job.n_images,
                self.frame_bytes,
            )
            self.direct_io = False
        self.direct: direct.DirectFrames | None = None  # set when the (uncompressed) datasets are made
        buffer_len = min(job.n_images, METADATA_BUFFER)
        self.id_buffer = np.zeros(buffer_len, dtype=np.uint64)
        self.status_buffer = np.zeros(buffer_len, dtype=np.uint64)
        self.buffered = 0
        self.mismatch_since: float | None = None  # monotonic; first mismatched frame since a write
        self.mismatch_n_written = 0
        self.mismatch_problem = ""
        self.file = create_file(
            job, h5py, direct.align_storage(job.n_images, self.frame_bytes) if self.direct_io else {}
        )
        self.group = self.file[job.detector_name]
        try:
            self.writeback = Writeback(job.output_file)
        except OSError as exc:
            self.file.close()
            raise DataPathError(f"cannot open {job.output_file!r} for writeback: {exc}") from None

    # -- per frame ---------------------------------------------------------------------------

    def fits(self, header: FrameHeader) -> bool:
        """Whether the frame of `header` can go into this file (the per-frame check)."""
        return (
            header.height == self.job.height
            and header.width == self.job.width
            and header.dtype == self.dtype
            and (header.compression is not Compression.BSLZ4 or self.compressed or self.data is None)
        )

    def has_shape_of(self, header: FrameHeader) -> bool:
        """Whether the frame of `header` has the shape and dtype of this write."""
        return (
            header.height == self.job.height and header.width == self.job.width and header.dtype == self.dtype
        )

    def shape_problem(self, header: FrameHeader) -> str:
        """What is wrong with a frame of another shape or dtype, in the words the user sees."""
        return (
            f"frames are {header.height}x{header.width} {header.dtype.name}, "
            f"the detector config says {self.job.height}x{self.job.width} {self.dtype.name}"
        )

    def note_mismatch(self, problem: str) -> None:
        """A frame of another shape or dtype arrived; starts the grace period unless one runs."""
        self.mismatch_problem = problem
        if self.mismatch_since is None or self.n_written != self.mismatch_n_written:
            self.mismatch_since = time.monotonic()
            self.mismatch_n_written = self.n_written

    def mismatch_deadline(self) -> float | None:
        """When the write fails if no good frame is written before (monotonic), or None."""
        if self.mismatch_since is None or self.n_written != self.mismatch_n_written:
            return None
        return self.mismatch_since + MISMATCH_GRACE_S

    def mismatch_expired(self, now: float) -> bool:
        deadline = self.mismatch_deadline()
        return deadline is not None and now >= deadline

    def saw_frame(self) -> None:
        if self.phase is WritePhase.WAITING_IMAGES:
            self.phase = WritePhase.ACQUIRING_IMAGES

    def append(self, header: FrameHeader, data: Any) -> None:
        """Store one frame at the next index, straight from the received buffer."""
        compressed = header.compression is Compression.BSLZ4
        if self.data is None:
            self._create_datasets(compressed)
        index = self.n_written
        if self.direct is not None:
            # A zmq.Frame's own memoryview: copying from the Frame itself crashes pyzmq 27.
            self.direct.append(index, getattr(data, "buffer", data))
        else:
            if index >= self.data_extent:
                self._grow()
            # Filter mask bit 0 set = "bitshuffle not applied to this chunk".
            self.write_chunk((index, 0, 0), data, 0 if compressed or not self.compressed else 1)
        slot = self.buffered
        self.id_buffer[slot] = header.image_id
        self.status_buffer[slot] = header.status
        self.buffered = slot + 1
        self.n_written = index + 1
        self.dirty = True
        self.phase = WritePhase.WRITING
        if self.n_written >= self.job.n_images:
            self.full = True
        elif self.buffered == len(self.id_buffer):
            self.flush()

    def _grow(self) -> None:
        """Room for `GROW_FRAMES` more frames (at most `n_images`) in the data dataset."""
        self.data_extent = min(self.job.n_images, self.data_extent + GROW_FRAMES)
        self.data.resize(self.data_extent, axis=0)

    def kick_writeback(self) -> None:
        """Start writing back what was written so far (`Writeback`; the data path calls it every
        `WRITEBACK_BYTES`). Frames written directly are on their way to the disk already: no
        page cache to write back (the final fsync flushes the device's cache once)."""
        if self.direct is None:
            self.writeback.kick()

    # -- file ------------------------------------------------------------------------------

    def _create_datasets(self, compressed: bool) -> None:
        import hdf5plugin
        import numpy as np

        job = self.job
        n = job.n_images
        filters: dict[str, Any] = dict(hdf5plugin.Bitshuffle(cname="lz4")) if compressed else {}
        direct_io = self.direct_io and not compressed
        if direct_io:
            import h5py

            filters["dcpl"] = direct.early_allocation(h5py)
        # Through the page cache the dataset starts with room for `GROW_FRAMES` frames and grows
        # by as many (`_grow`); its frames' dimension is unlimited, so HDF5 indexes the chunks
        # with an extensible array. Made with all n frames and a fixed maximum, its index was a
        # fixed array of n entries made at once, and the shrink at the end visited every chunk
        # not written: 800 MB and 3.8 s for n_images = 10^8, minutes for 10^10 (a data path deaf
        # to its commands all that time). The direct layout needs the whole fixed extent (its
        # implicit index); `direct.fits_on_disk` bounds it.
        self.data_extent = n if direct_io else min(n, GROW_FRAMES)
        self.data = self.group.create_dataset(
            "data",
            shape=(self.data_extent, job.height, job.width),
            maxshape=(n if direct_io else None, job.height, job.width),
            chunks=(1, job.height, job.width),
            dtype=self.dtype,
            **filters,
        )
        if direct_io:
            self.direct = self._open_direct()
        meta_chunk = (min(n, 4096),)
        self.image_id = self.group.create_dataset(
            "image_id", shape=(0,), maxshape=(None,), chunks=meta_chunk, dtype=np.uint64
        )
        self.status = self.group.create_dataset(
            "status", shape=(0,), maxshape=(None,), chunks=meta_chunk, dtype=np.uint64
        )
        self.compressed = compressed
        self.write_chunk = self.data.id.write_direct_chunk
        add_nexus_view(self.file, job)  # HDF5 creates no object once SWMR writing has started
        self.file.swmr_mode = True
        self.next_flush = time.monotonic() + self.flush_interval

    def _open_direct(self) -> direct.DirectFrames | None:
        base = direct.check_layout(self.data, self.job.n_images, self.frame_bytes)
        if base is None:  # not the implicit index (another HDF5?): HDF5 writes the chunks
            log.warning(
                "%s: the chunks are not laid out for direct I/O; writing through the page cache",
                self.job.output_file,
            )
            return None
        try:
            return direct.DirectFrames(self.job.output_file, base, self.frame_bytes)
        except OSError as exc:  # e.g. EINVAL: the file system has no O_DIRECT
            log.info("%s: no direct I/O (%s); writing through the page cache", self.job.output_file, exc)
            return None

    def flush(self) -> None:
        """Make the frames written so far visible to SWMR readers (once they are in the file)."""
        start, stop = self.n_flushed, self.n_written
        if stop > start:
            if self.direct is not None:
                self.direct.sync()
            count = self.buffered
            for dataset, buffer in ((self.image_id, self.id_buffer), (self.status, self.status_buffer)):
                dataset.resize((stop,))
                dataset[start:stop] = buffer[:count]
            self.buffered = 0
            self.n_flushed = stop
            self.file.flush()
        self.dirty = False
        self.next_flush = time.monotonic() + self.flush_interval

    def close(self) -> None:
        """Flush, shrink to the frames written, close, and make the file durable (fsync'd with
        its folder): a write is FINISHED only once its file would survive a power cut."""
        self.phase = WritePhase.FLUSHING_IMAGES
        if self.data is None:
            self._create_datasets(compressed=False)
        self.flush()
        if self.n_written < self.data_extent:
            self.data.resize((self.n_written, self.job.height, self.job.width))
        if self.direct is not None:
            self.direct.sync()  # every frame in the file (flush did, unless none came since)
            self.direct.close()
            self.direct = None
        self.writeback.stop()
        self.file.close()
        if self.writeback.error is not None:
            raise OSError(f"writing to the disk failed: {self.writeback.error}")
        make_durable(self.job.output_file)
        self.stop_time = time.time()

    def abandon(self) -> None:
        """Close after an error, keeping whatever reached the file."""
        if self.direct is not None:
            with contextlib.suppress(Exception):
                self.direct.close()
            self.direct = None
        with contextlib.suppress(Exception):
            self.writeback.stop()
        with contextlib.suppress(Exception):
            self.file.close()
        self.stop_time = time.time()

    def result(self, *, interrupted: bool, error: str | None) -> WriteResult:
        return WriteResult(
            output_file=self.job.output_file,
            n_images=self.job.n_images,
            n_written=self.n_written,
            interrupted=interrupted,
            error=error,
            start_time=self.start_time,
            stop_time=self.stop_time if self.stop_time is not None else time.time(),
        )


def create_file(job: WriteJob, h5py: Any, options: dict[str, int] | None = None) -> Any:
    """Create the output file with its root attributes (`options`: more h5py.File keywords);
    `DataPathError` says why it cannot be."""
    path = job.output_file
    folder = os.path.dirname(path) or "."
    if not os.path.isabs(path):
        raise DataPathError(f"output_file {path!r} is not an absolute path")
    if os.path.isdir(path):
        raise DataPathError(f"output_file {path!r} is a directory")
    if not os.path.isdir(folder):
        raise DataPathError(f"folder {folder!r} of output_file does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataPathError(f"no permission to create files in folder {folder!r}")
    existed = os.path.exists(path)
    try:
        handle = h5py.File(path, "w", libver="latest", **(options or {}))
    except OSError as exc:
        raise DataPathError(f"cannot create {path!r}: {exc}") from None
    try:
        handle.attrs["run_id"] = job.run_id
        handle.attrs["detector_name"] = job.detector_name
        handle.attrs["n_images"] = job.n_images
        handle.create_group(job.detector_name)
        give_to_owner(path, job.owner_uid)
    except Exception as exc:
        handle.close()
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise DataPathError(f"cannot prepare {path!r}: {exc}") from None
    return handle


def add_nexus_view(handle: Any, job: WriteJob) -> None:
    """`/entry` over the job's datasets (`daqif.nexus`): hard links, no second copy."""
    from daqif.nexus import DetectorInfo, add_nexus_entry

    add_nexus_entry(
        handle,
        f"/{job.detector_name}",
        DetectorInfo(name=job.detector_name, detector_type=job.detector_type),
    )


def give_to_owner(path: str, owner_uid: int | None) -> None:
    if owner_uid is None or owner_uid == os.geteuid():
        return
    try:
        os.chown(path, owner_uid, -1)
    except PermissionError:
        log.warning(
            "cannot give %s to uid %d (this process, uid %d, may not chown); it stays owned by uid %d",
            path,
            owner_uid,
            os.geteuid(),
            os.geteuid(),
        )
