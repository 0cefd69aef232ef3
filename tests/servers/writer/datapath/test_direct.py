"""Frames written past the page cache (`servers.writer.datapath.direct`): a real data path
process fed by a real simulator, real HDF5 files on real file systems (ext4 here; ramfs, which has
no O_DIRECT, and a full tmpfs where root may mount them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daqif.frame import expected_frame
from daqif.testing import wait_for
from servers.common.launch import SimProcess
from servers.writer.datapath import direct
from servers.writer.datapath.api import WritePhase

from .. import test_datapath
from ..test_datapath import (
    DETECTOR,
    SWMR_READER,
    WAIT_S,
    DataPathFactory,
    assert_frames,
    frames_a_swmr_reader_sees,
    job,
    wait_finished,
)

datapath_factory = test_datapath.datapath_factory  # the fixture, shared

SHAPE = (64, 64)  # uint16: 8 KiB frames, a multiple of direct.ALIGN
FRAME_BYTES = SHAPE[0] * SHAPE[1] * 2
PER_BATCH = direct.BATCH_BYTES // FRAME_BYTES


def chunk_offsets(path: Path) -> list[int]:
    with h5py.File(path, "r") as f:
        offsets: list[int] = []
        f[f"{DETECTOR}/data"].id.chunk_iter(lambda info: offsets.append(info.byte_offset))
        return offsets


def allocated_early(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return bool(f[f"{DETECTOR}/data"].id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY)


def fed_datapath(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, *sim_args: str
) -> Any:
    """A data path fed by a simulator of `SHAPE` frames (`sim_args`: e.g. its rate)."""
    return datapath_factory(sim_factory("--shape", *map(str, SHAPE), *sim_args).endpoint)


def assert_consecutive(ids: Any, n: int) -> None:
    assert len(ids) == n and np.array_equal(ids, np.arange(ids[0], ids[0] + n))


@pytest.mark.parametrize("frame_io", ["direct", "page-cache"])
def test_either_way_the_file_holds_every_frame_and_direct_chunks_lie_aligned_one_after_the_other(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path, frame_io: str
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE))
    datapath = datapath_factory(sim.endpoint, frame_io=frame_io)
    n = 2 * PER_BATCH + 77  # two whole batches and a part of one
    path = tmp_path / f"{frame_io}.h5"
    datapath.open_write(job(path, n, SHAPE))
    result = wait_finished(datapath)
    assert (result.n_written, result.interrupted, result.error) == (n, False, None)
    assert_consecutive(assert_frames(path, n, SHAPE), n)  # every pixel as the simulator sent it
    offsets = chunk_offsets(path)
    assert len(offsets) == n
    if frame_io == "direct":
        assert allocated_early(path)
        assert offsets[0] % direct.ALIGN == 0
        assert offsets == [offsets[0] + i * FRAME_BYTES for i in range(n)]
    else:
        assert not allocated_early(path)  # HDF5 allocates each chunk as it is written


ODD_SHAPE = (48, 33)  # uint16: 3,168 bytes = 32 x 99, so the bytes carried between batches vary
ODD_BYTES = ODD_SHAPE[0] * ODD_SHAPE[1] * 2
ODD_PER_BATCH = direct.BATCH_BYTES // ODD_BYTES
SHAPES = pytest.mark.parametrize(("shape", "per_batch"), [(SHAPE, PER_BATCH), (ODD_SHAPE, ODD_PER_BATCH)])


def test_a_frame_size_that_is_not_a_multiple_of_the_block_is_written_directly_as_one_stream(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    # Most detector geometries (an Eiger 500k frame is 1030 x 514 x 2 bytes): the chunks lie one
    # after the other from an aligned base, and every pixel of three batches is as it was sent.
    sim = sim_factory("--shape", *map(str, ODD_SHAPE))
    datapath = datapath_factory(sim.endpoint, frame_io="direct")
    n = 2 * ODD_PER_BATCH + 77
    path = tmp_path / "odd.h5"
    datapath.open_write(job(path, n, ODD_SHAPE))
    assert wait_finished(datapath).n_written == n
    assert_consecutive(assert_frames(path, n, ODD_SHAPE), n)
    assert allocated_early(path)
    offsets = chunk_offsets(path)
    assert offsets[0] % direct.ALIGN == 0
    assert offsets == [offsets[0] + i * ODD_BYTES for i in range(n)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frame_bytes=st.integers(1, 3 * direct.ALIGN),
    batch_bytes=st.integers(1, 16 * direct.ALIGN),
    steps=st.lists(st.one_of(st.integers(1, 40), st.just(0)), min_size=1, max_size=12),
)
def test_direct_frames_of_any_size_land_as_one_stream_whatever_the_syncs_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frame_bytes: int, batch_bytes: int, steps: list[int]
) -> None:
    # `steps`: runs of frames appended, 0 = a sync (a flush of the data path) in between; small
    # batches (`batch_bytes`), so that full batches carry bytes too. The bytes before the frames
    # and after them (HDF5's, in a real file) stay as they were.
    monkeypatch.setattr(direct, "BATCH_BYTES", batch_bytes)
    path = tmp_path / f"stream-{frame_bytes}.bin"
    base = 2 * direct.ALIGN
    n = sum(steps)
    before, after = b"\xa5" * base, b"\x5a" * direct.ALIGN
    path.write_bytes(before + bytes(n * frame_bytes) + after)
    frames = [bytes([(i * 7 + k) % 251 for k in range(frame_bytes)]) for i in range(min(n, 251))]
    writer = direct.DirectFrames(str(path), base, frame_bytes)
    index = 0
    for step in steps:
        if step == 0:
            writer.sync()
            written = path.read_bytes()[base : base + index * frame_bytes]
            assert written == b"".join(frames[i % 251] for i in range(index))  # all so far, at once
        for _ in range(step):
            writer.append(index, frames[index % 251])
            index += 1
    writer.sync()
    writer.close()
    content = path.read_bytes()
    assert content[:base] == before and content[base + n * frame_bytes :] == after
    assert content[base : base + n * frame_bytes] == b"".join(frames[i % 251] for i in range(n))


@SHAPES
def test_a_stopped_direct_write_keeps_exactly_the_frames_written(
    sim_factory: Callable[..., SimProcess],
    datapath_factory: DataPathFactory,
    tmp_path: Path,
    shape: tuple[int, int],
    per_batch: int,
) -> None:
    sim = sim_factory("--shape", *map(str, shape), "--rate", "4000")
    datapath = datapath_factory(sim.endpoint)
    path = tmp_path / "stopped.h5"
    datapath.open_write(job(path, 100_000, shape))
    wait_for(lambda: datapath.progress().n_written >= per_batch + 10, WAIT_S, "more than a batch written")
    result = datapath.stop_write()
    assert result is not None and result.interrupted and result.error is None
    # The part of a batch not yet on its way when the stop came is in the file too.
    assert_consecutive(assert_frames(path, result.n_written, shape), result.n_written)


@SHAPES
def test_a_swmr_reader_sees_direct_frames_with_their_pixels_while_the_write_runs(
    sim_factory: Callable[..., SimProcess],
    datapath_factory: DataPathFactory,
    tmp_path: Path,
    shape: tuple[int, int],
    per_batch: int,
) -> None:
    sim = sim_factory("--shape", *map(str, shape), "--rate", "500")
    datapath = datapath_factory(sim.endpoint, flush_interval=0.2)
    path = tmp_path / "swmr.h5"
    datapath.open_write(job(path, 100_000, shape))
    reader = subprocess.run(
        [sys.executable, "-c", SWMR_READER, str(path), DETECTOR], capture_output=True, text=True, timeout=120
    )
    assert reader.returncode == 0, reader.stderr
    seen = json.loads(reader.stdout)
    counts = seen["counts"]
    assert len(counts) >= 4 and counts == sorted(counts) and counts[0] > 0
    assert datapath.progress().phase is WritePhase.WRITING
    # The newest frame a reader is told of is already in the file (flushed after the batch).
    last_id, pixel00, pixel11 = seen["last"]
    expected = expected_frame(last_id, shape, "uint16")
    assert (pixel00, pixel11) == (expected[0, 0], expected[1, 1])
    assert datapath.stop_write() is not None


@SHAPES
def test_kill_9_mid_direct_write_leaves_every_flushed_frame_readable(
    sim_factory: Callable[..., SimProcess],
    datapath_factory: DataPathFactory,
    tmp_path: Path,
    shape: tuple[int, int],
    per_batch: int,
) -> None:
    sim = sim_factory("--shape", *map(str, shape), "--rate", "4000")
    datapath = datapath_factory(sim.endpoint, flush_interval=0.2)
    path = tmp_path / "killed.h5"
    datapath.open_write(job(path, 100_000, shape))
    wait_for(lambda: frames_a_swmr_reader_sees(path) > per_batch, WAIT_S, "a flush after a batch")
    assert datapath.pid is not None
    os.kill(datapath.pid, signal.SIGKILL)
    wait_for(lambda: not datapath.is_alive(), WAIT_S, "the process to die")
    assert datapath.progress().phase is WritePhase.FAILED
    with h5py.File(path, "r") as f:  # repaired: the datasets end at the last flush
        n = f[f"{DETECTOR}/image_id"].shape[0]
        assert f[f"{DETECTOR}/data"].shape == (n, *shape)
    assert n > per_batch
    assert_consecutive(assert_frames(path, n, shape), n)


@contextlib.contextmanager
def mounted(fs_type: str, mount_point: Path, options: str = "") -> Iterator[Path]:
    """A fresh `fs_type` mounted at `mount_point` for the test (root); skips where it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    mount_point.mkdir()
    argv = ["mount", "-t", fs_type, *(["-o", options] if options else []), fs_type, str(mount_point)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {fs_type} here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_on_a_file_system_without_direct_io_hdf5_writes_the_frames_into_the_same_layout(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    with mounted("ramfs", tmp_path / "ramfs") as folder:
        probe = folder / "probe"
        probe.touch()
        with pytest.raises(OSError):  # what the data path meets there
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        datapath = fed_datapath(sim_factory, datapath_factory)
        n = PER_BATCH + 5
        datapath.open_write(job(folder / "ram.h5", n, SHAPE))
        result = wait_finished(datapath)
        assert (result.n_written, result.error) == (n, None)
        assert_consecutive(assert_frames(folder / "ram.h5", n, SHAPE), n)
        # ramfs reports no size (`fits_on_disk`), so the layout was made; O_DIRECT then failed,
        # and HDF5 wrote the chunks into it through the page cache.
        assert allocated_early(folder / "ram.h5")
        datapath.close()  # before the unmount


def test_a_full_disk_fails_the_direct_write_with_the_reason_and_the_data_path_stays_up(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    with mounted("tmpfs", tmp_path / "small", "size=12m") as folder:
        datapath = fed_datapath(sim_factory, datapath_factory, "--rate", "1000")
        datapath.open_write(job(folder / "full.h5", 2 * PER_BATCH, SHAPE))  # 8 MiB: it fits, for now
        # Something else takes the disk before the first batch (half a second of frames) is full.
        st = os.statvfs(folder)
        with open(folder / "other", "wb") as other:
            os.posix_fallocate(other.fileno(), 0, st.f_bavail * st.f_frsize - (256 << 10))
        result = wait_finished(datapath)
        assert result.error is not None and "No space left on device" in result.error, result.error
        assert "writing frames" in result.error
        assert datapath.is_alive()
        datapath.open_write(job(tmp_path / "next.h5", 10, SHAPE))  # the next write, elsewhere
        assert wait_finished(datapath).n_written == 10
        assert_consecutive(assert_frames(tmp_path / "next.h5", 10, SHAPE), 10)
        datapath.close()


@pytest.mark.parametrize("n_images", [100_000, 10**10])
def test_a_write_larger_than_the_free_space_goes_through_the_page_cache_and_its_file_grows_with_it(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path, n_images: int
) -> None:
    # std_daq's "n_images as large as you like, then stop": a direct write would give the file the
    # size of all its frames (800 MiB for 100,000) on a 16 MiB disk at once. Through the page cache
    # the dataset grows with the frames: with a fixed maximum of 10^10 frames HDF5 would first make
    # a chunk index of 10^10 entries (minutes, the data path deaf meanwhile).
    with mounted("tmpfs", tmp_path / "small", "size=16m") as folder:
        datapath = fed_datapath(sim_factory, datapath_factory, "--rate", "2000")
        path = folder / "stopped.h5"
        datapath.open_write(job(path, n_images, SHAPE))
        wait_for(lambda: datapath.progress().n_written >= 200, WAIT_S, "frames written")
        result = datapath.stop_write()
        assert result is not None and result.interrupted and result.error is None
        assert not allocated_early(path)
        assert path.stat().st_size < 8 << 20
        with h5py.File(path, "r") as f:
            assert f[f"{DETECTOR}/data"].maxshape[0] is None
        assert_consecutive(assert_frames(path, result.n_written, SHAPE), result.n_written)
        datapath.close()  # before the unmount


def test_fits_on_disk_weighs_the_whole_write_against_the_free_space_of_its_folder(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free_frames = st.f_bavail * st.f_frsize // FRAME_BYTES
    path = str(tmp_path / "w.h5")
    assert direct.fits_on_disk(path, 1000, FRAME_BYTES)
    assert not direct.fits_on_disk(path, free_frames + 10**6, FRAME_BYTES)
    assert not direct.fits_on_disk(str(tmp_path / "missing" / "w.h5"), 1, FRAME_BYTES)
