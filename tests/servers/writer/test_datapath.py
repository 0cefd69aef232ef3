"""The data path process: real simulator subprocesses, real ZeroMQ, real HDF5 files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq

from daqif.frame import encode_daqif_header, encode_stddaq_header, expected_frame
from daqif.testing import wait_for
from servers.common.launch import SimProcess
from servers.writer.datapath.api import DataPathError, WriteJob, WritePhase, WriteProgress, WriteResult
from servers.writer.datapath.handle import ProcessDataPath
from servers.writer.datapath.protocol import SocketKind

SHAPE = (48, 32)
DETECTOR = "TESTDET"
WAIT_S = 60.0

DataPathFactory = Callable[..., ProcessDataPath]


@pytest.fixture
def datapath_factory() -> Iterator[DataPathFactory]:
    """Start data path processes; all are closed (or killed) at teardown."""
    started: list[ProcessDataPath] = []

    def start(endpoint: str, kind: SocketKind = "pull", **options: Any) -> ProcessDataPath:
        datapath = ProcessDataPath(endpoint, kind, **options)
        started.append(datapath)
        datapath.start()
        return datapath

    yield start
    for datapath in started:
        datapath.close()


def job(
    path: Path, n_images: int, shape: tuple[int, int] = SHAPE, dtype: str = "uint16", **kw: Any
) -> WriteJob:
    return WriteJob(
        output_file=str(path),
        n_images=n_images,
        run_id="run-42",
        detector_name=DETECTOR,
        height=shape[0],
        width=shape[1],
        dtype=dtype,
        **kw,
    )


def wait_finished(datapath: ProcessDataPath) -> WriteResult:
    progress: WriteProgress = wait_for(
        lambda: (p := datapath.progress()).phase in (WritePhase.FINISHED, WritePhase.FAILED) and p,
        WAIT_S,
        "the write to end",
    )
    assert progress.result is not None
    return progress.result


def assert_frames(path: Path, n: int, shape: tuple[int, int] = SHAPE, dtype: str = "uint16") -> np.ndarray:
    """The file holds `n` frames of `shape`/`dtype` with the simulator's pixels; return their ids."""
    with h5py.File(path, "r") as f:
        data, ids, status = f[f"{DETECTOR}/data"], f[f"{DETECTOR}/image_id"][:], f[f"{DETECTOR}/status"][:]
        assert data.shape == (n, *shape)
        assert data.dtype == np.dtype(dtype)
        assert data.chunks == (1, *shape)
        assert ids.shape == (n,) and ids.dtype == np.uint64
        assert status.shape == (n,) and status.dtype == np.uint64 and not status.any()
        pixels = data[:]
        for i, image_id in enumerate(ids):
            np.testing.assert_array_equal(pixels[i], expected_frame(int(image_id), shape, dtype))
        return np.asarray(ids)


def test_records_n_frames_with_shape_dtype_pixels_and_ids(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "2000")
    datapath = datapath_factory(sim.endpoint)
    wait_for(lambda: datapath.counters().discarded > 0, WAIT_S, "frames before the write")
    datapath.open_write(job(tmp_path / "run.h5", 100))
    result = wait_finished(datapath)
    assert (result.n_written, result.interrupted, result.error) == (100, False, None)
    assert result.output_file == str(tmp_path / "run.h5")
    assert result.start_time <= result.stop_time
    ids = assert_frames(tmp_path / "run.h5", 100)
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + 100))  # the next 100, in order, once each
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert dict(f.attrs) == {
            "run_id": "run-42",
            "detector_name": DETECTOR,
            "n_images": 100,
            "default": "entry",  # the NeXus view (daqif.nexus)
        }
    discarded_at_end = datapath.counters().discarded
    wait_for(lambda: datapath.counters().discarded > discarded_at_end, WAIT_S, "frames after the write")
    counters = datapath.counters()
    assert counters.written == 100
    assert counters.malformed == 0
    assert counters.received == counters.written + counters.discarded
    assert counters.bytes_written == 100 * SHAPE[0] * SHAPE[1] * 2
    assert counters.bytes_received >= counters.bytes_written
    assert datapath.progress().phase is WritePhase.FINISHED


def test_frames_outside_a_write_are_discarded_and_a_second_write_takes_the_next_frames(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "1000")
    datapath = datapath_factory(sim.endpoint)
    assert datapath.progress() == WriteProgress(phase=None, n_written=0, result=None)
    wait_for(lambda: datapath.counters().discarded >= 5, WAIT_S, "frames before the write")
    datapath.open_write(job(tmp_path / "a.h5", 20))
    wait_finished(datapath)
    datapath.open_write(job(tmp_path / "b.h5", 20))
    wait_finished(datapath)
    first, second = assert_frames(tmp_path / "a.h5", 20), assert_frames(tmp_path / "b.h5", 20)
    assert second[0] > first[-1]
    assert datapath.stop_write() is None  # no write open


def test_bad_frames_are_counted_never_written_and_the_write_completes(
    datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    source = ctx.socket(zmq.PUSH)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    try:
        datapath = datapath_factory(f"tcp://127.0.0.1:{port}")
        datapath.open_write(job(tmp_path / "mixed.h5", 10))
        h, w = SHAPE

        def good(image_id: int) -> list[bytes]:
            return [
                encode_stddaq_header(image_id, h, w, "uint16"),
                expected_frame(image_id, SHAPE, "uint16").tobytes(),
            ]

        bad: list[list[bytes]] = [
            [encode_stddaq_header(900, h, w, "uint16"), b"\0" * 100],  # wrong size
            [b"this is not a header", b"\0" * (h * w * 2)],  # garbage header
            [
                encode_stddaq_header(901, h, w, "uint16")[:24] + b"\x03\x00\0\0\0\0",
                b"\0" * (h * w * 2),
            ],  # dtype 3
            [b""],  # empty message
            [b"", b""],  # empty header part
            [*good(902), b"extra"],  # three parts
            [encode_stddaq_header(903, w, h, "uint16"), b"\0" * (h * w * 2)],  # another shape than the write
            [encode_stddaq_header(904, h, w, "int32"), b"\0" * (h * w * 4)],  # another dtype than the write
            [encode_daqif_header(905, h, w, "uint16"), b"\0" * 3],  # protobuf header, wrong size
        ]
        sent_good = 0
        for image_id in range(1, 11):
            source.send_multipart(good(image_id))
            sent_good += 1
            if image_id <= len(bad):
                source.send_multipart(bad[image_id - 1])
        result = wait_finished(datapath)
        assert (result.n_written, result.error) == (10, None)
        ids = assert_frames(tmp_path / "mixed.h5", 10)
        assert list(ids) == list(range(1, 11))
        wait_for(
            lambda: datapath.counters().received == sent_good + len(bad), WAIT_S, "every message counted"
        )
        counters = datapath.counters()
        assert counters.malformed == len(bad)
        assert counters.written == 10
        assert datapath.is_alive()
    finally:
        source.close(0)
        ctx.term()


def test_stop_mid_write_shrinks_the_datasets_to_the_frames_written(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "200")
    datapath = datapath_factory(sim.endpoint)
    datapath.open_write(job(tmp_path / "stopped.h5", 100_000))
    wait_for(lambda: datapath.progress().n_written >= 10, WAIT_S, "some frames written")
    assert datapath.progress().phase is WritePhase.WRITING
    result = datapath.stop_write()
    assert result is not None
    assert result.interrupted and result.error is None
    assert result.n_written >= 10 and result.n_images == 100_000
    progress = datapath.progress()
    assert progress.phase is WritePhase.FINISHED and progress.result == result
    ids = assert_frames(tmp_path / "stopped.h5", result.n_written)
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + result.n_written))


def test_stop_before_any_frame_leaves_an_empty_file(
    datapath_factory: DataPathFactory, tmp_path: Path, tcp_port: int
) -> None:
    datapath = datapath_factory(f"tcp://127.0.0.1:{tcp_port}")  # nobody sends
    datapath.open_write(job(tmp_path / "empty.h5", 5))
    assert datapath.progress().phase is WritePhase.WAITING_IMAGES
    result = datapath.stop_write()
    assert result is not None and result.n_written == 0 and result.interrupted
    assert_frames(tmp_path / "empty.h5", 0)


def frames_a_swmr_reader_sees(path: Path) -> int:
    """The length of ``image_id`` (frames flushed) as a SWMR reader sees it now; 0 before the
    datasets exist."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return int(f[f"{DETECTOR}/image_id"].shape[0])
    except (OSError, KeyError):
        return 0


def test_kill_9_mid_write_leaves_a_file_readable_up_to_the_last_flush(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "500")
    datapath = datapath_factory(sim.endpoint, flush_interval=0.2)
    path = tmp_path / "killed.h5"
    datapath.open_write(job(path, 100_000))
    wait_for(lambda: datapath.progress().n_written >= 200, WAIT_S, "frames written")
    # Frames written are not yet flushed (a loaded machine can deliver them in one burst).
    wait_for(lambda: frames_a_swmr_reader_sees(path) > 0, WAIT_S, "a flush")
    assert datapath.pid is not None
    os.kill(datapath.pid, signal.SIGKILL)
    wait_for(lambda: not datapath.is_alive(), WAIT_S, "the process to die")
    progress = datapath.progress()
    assert progress.phase is WritePhase.FAILED
    assert progress.result is not None and progress.result.error is not None
    assert "died" in progress.result.error and progress.result.output_file == str(path)
    with pytest.raises(DataPathError, match="not running"):
        datapath.open_write(job(tmp_path / "next.h5", 5))
    # A plain (non-SWMR) reader can open it: the handle cleared the SWMR-write flag.
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR}/image_id"][:]
        n = len(ids)
        assert n > 0
        data = f[f"{DETECTOR}/data"][:n]
    for i, image_id in enumerate(ids):
        np.testing.assert_array_equal(data[i], expected_frame(int(image_id), SHAPE, "uint16"))
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + n))


def test_start_again_after_the_process_died_gives_a_working_data_path(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "1000")
    datapath = datapath_factory(sim.endpoint)
    assert datapath.pid is not None
    os.kill(datapath.pid, signal.SIGKILL)
    wait_for(lambda: not datapath.is_alive(), WAIT_S, "the process to die")
    datapath.start()
    datapath.open_write(job(tmp_path / "again.h5", 10))
    assert wait_finished(datapath).n_written == 10


def test_two_data_paths_on_one_push_source_record_every_frame_once(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path, tcp_port: int
) -> None:
    endpoint = f"tcp://127.0.0.1:{tcp_port}"
    first, second = datapath_factory(endpoint), datapath_factory(endpoint)
    n = 400
    first.open_write(job(tmp_path / "first.h5", n))
    second.open_write(job(tmp_path / "second.h5", n))
    # Paced, so both connections are up (ZeroMQ reconnects every 100 ms) before most frames go out.
    sim = sim_factory("--shape", *map(str, SHAPE), "--count", str(n), "--rate", "1000", port=tcp_port)
    assert sim.wait_done().frames_sent == n
    wait_for(
        lambda: first.counters().received + second.counters().received == n, WAIT_S, "all frames received"
    )
    # A path that got all n frames finished on its own; stop_write returns None for it.
    results = [path.stop_write() or path.progress().result for path in (first, second)]
    assert all(r is not None and r.error is None for r in results)
    ids_first = assert_frames(tmp_path / "first.h5", first.counters().written)
    ids_second = assert_frames(tmp_path / "second.h5", second.counters().written)
    assert len(ids_first) > 0 and len(ids_second) > 0  # the source really shared its frames
    together = np.concatenate([ids_first, ids_second])
    assert sorted(together.tolist()) == list(range(1, n + 1))


SWMR_READER = """
import json, sys, time
import h5py
path, name = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while True:  # the datasets (and SWMR mode) appear with the first frame
    try:
        f = h5py.File(path, "r", swmr=True)
        ids = f[name + "/image_id"]
        break
    except (OSError, KeyError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
data = f[name + "/data"]
counts = []
while len(set(counts)) < 4 and time.monotonic() < deadline:
    ids.refresh()
    data.refresh()
    n = ids.shape[0]
    if n and (not counts or n != counts[-1]):
        counts.append(n)
        last = [int(ids[n - 1]), int(data[n - 1][0, 0]), int(data[n - 1][1, 1])]
    time.sleep(0.05)
print(json.dumps({"counts": counts, "last": last}))
"""


def test_a_swmr_reader_sees_the_frame_count_grow_during_a_write(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "200")
    datapath = datapath_factory(sim.endpoint, flush_interval=0.2)
    path = tmp_path / "swmr.h5"
    datapath.open_write(job(path, 100_000))
    reader = subprocess.run(
        [sys.executable, "-c", SWMR_READER, str(path), DETECTOR], capture_output=True, text=True, timeout=120
    )
    assert reader.returncode == 0, reader.stderr
    seen = json.loads(reader.stdout)
    counts = seen["counts"]
    assert len(counts) >= 4 and counts == sorted(counts) and counts[0] > 0
    assert datapath.progress().phase is WritePhase.WRITING  # the reader followed a file being written
    last_id, pixel00, pixel11 = seen["last"]
    expected = expected_frame(last_id, SHAPE, "uint16")
    assert (pixel00, pixel11) == (expected[0, 0], expected[1, 1])
    result = datapath.stop_write()
    assert result is not None and result.n_written >= counts[-1]


def test_a_bslz4_stream_round_trips_to_identical_pixels(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory(
        "--shape", *map(str, SHAPE), "--header", "daqif", "--compress", "bslz4", "--rate", "2000"
    )
    datapath = datapath_factory(sim.endpoint)
    datapath.open_write(job(tmp_path / "bslz4.h5", 50))
    assert wait_finished(datapath).n_written == 50
    with h5py.File(tmp_path / "bslz4.h5", "r") as f:
        data = f[f"{DETECTOR}/data"]
        assert str(hdf5plugin.BSHUF_ID) in data._filters  # type: ignore[attr-defined]
        filter_mask, chunk = data.id.read_direct_chunk((0, 0, 0))
        assert filter_mask == 0 and len(chunk) < SHAPE[0] * SHAPE[1] * 2  # stored compressed, as sent
    counters = datapath.counters()
    assert counters.bytes_written < 50 * SHAPE[0] * SHAPE[1] * 2
    assert_frames(tmp_path / "bslz4.h5", 50)  # decompressed by h5py + hdf5plugin


def test_an_uncompressed_frame_in_a_compressed_write_is_stored_raw_and_reads_back(
    datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    from daqif.frame import Compression, compress_bslz4

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    source = ctx.socket(zmq.PUSH)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    try:
        datapath = datapath_factory(f"tcp://127.0.0.1:{port}")
        datapath.open_write(job(tmp_path / "mixed.h5", 3))
        h, w = SHAPE
        frame = {i: expected_frame(i, SHAPE, "uint16") for i in (1, 2, 3)}
        source.send_multipart(
            [encode_daqif_header(1, h, w, "uint16", compression=Compression.BSLZ4), compress_bslz4(frame[1])]
        )
        source.send_multipart([encode_daqif_header(2, h, w, "uint16"), frame[2].tobytes()])
        source.send_multipart([encode_stddaq_header(3, h, w, "uint16"), frame[3].tobytes()])
        assert wait_finished(datapath).n_written == 3
        assert list(assert_frames(tmp_path / "mixed.h5", 3)) == [1, 2, 3]
    finally:
        source.close(0)
        ctx.term()


def test_pub_sub_mode_records_consecutive_frames(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--socket", "pub", "--rate", "500")
    datapath = datapath_factory(sim.endpoint, "sub")
    wait_for(lambda: datapath.counters().received > 0, WAIT_S, "the subscription to take effect")
    datapath.open_write(job(tmp_path / "pub.h5", 40))
    assert wait_finished(datapath).n_written == 40
    ids = assert_frames(tmp_path / "pub.h5", 40)
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + 40))


def test_other_dtypes_are_written_as_sent(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", "16", "24", "--dtype", "float32", "--header", "daqif", "--rate", "1000")
    datapath = datapath_factory(sim.endpoint)
    datapath.open_write(job(tmp_path / "f32.h5", 10, shape=(16, 24), dtype="float32"))
    assert wait_finished(datapath).n_written == 10
    assert_frames(tmp_path / "f32.h5", 10, shape=(16, 24), dtype="float32")


def test_open_write_refuses_unusable_paths_with_a_clear_message_and_leaves_nothing(
    datapath_factory: DataPathFactory, tmp_path: Path, tcp_port: int
) -> None:
    datapath = datapath_factory(f"tcp://127.0.0.1:{tcp_port}")
    (tmp_path / "adir").mkdir()
    cases = {
        str(tmp_path / "missing" / "x.h5"): "folder",
        str(tmp_path / "adir"): "is a directory",
        "relative/x.h5": "not an absolute path",
    }
    for path, message in cases.items():
        with pytest.raises(DataPathError, match=message):
            datapath.open_write(job(Path(path), 5))
    with pytest.raises(DataPathError, match="'nonsense' is not a numpy dtype"):
        datapath.open_write(job(tmp_path / "bad-dtype.h5", 5, dtype="nonsense"))
    with pytest.raises(DataPathError, match="cannot prepare"):
        datapath.open_write(replace(job(tmp_path / "bad-name.h5", 5), detector_name=""))
    assert not (tmp_path / "bad-dtype.h5").exists() and not (tmp_path / "bad-name.h5").exists()
    assert not (tmp_path / "missing").exists()
    assert list((tmp_path / "adir").iterdir()) == []
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DataPathError, match="no permission"):
            datapath.open_write(job(locked / "x.h5", 5))
    datapath.open_write(job(tmp_path / "ok.h5", 5))
    with pytest.raises(DataPathError, match="a write is already open"):
        datapath.open_write(job(tmp_path / "other.h5", 5))
    assert not (tmp_path / "other.h5").exists()
    assert datapath.is_alive()


def test_owner_uid_is_applied_when_permitted(
    datapath_factory: DataPathFactory, tmp_path: Path, tcp_port: int
) -> None:
    datapath = datapath_factory(f"tcp://127.0.0.1:{tcp_port}")
    other_uid = os.geteuid() + 4321
    datapath.open_write(job(tmp_path / "owned.h5", 5, owner_uid=other_uid))
    datapath.stop_write()
    owner = (tmp_path / "owned.h5").stat().st_uid
    # Only root may give a file away; anyone else keeps it (and the data path logs why).
    assert owner == (other_uid if os.geteuid() == 0 else os.geteuid())


def test_close_with_an_open_write_closes_the_file_as_interrupted(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "500")
    datapath = datapath_factory(sim.endpoint)
    datapath.open_write(job(tmp_path / "closed.h5", 100_000))
    wait_for(lambda: datapath.progress().n_written >= 5, WAIT_S, "some frames written")
    datapath.close()
    assert not datapath.is_alive()
    with h5py.File(tmp_path / "closed.h5", "r") as f:  # closed properly: no SWMR flag left
        n = f[f"{DETECTOR}/image_id"].shape[0]
    assert n >= 5
    assert_frames(tmp_path / "closed.h5", n)


def test_a_write_getting_only_frames_of_another_shape_fails_naming_both_shapes(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", "64", "64", "--rate", "500")
    datapath = datapath_factory(sim.endpoint)
    wait_for(lambda: datapath.counters().discarded > 0, WAIT_S, "frames before the write")
    datapath.open_write(job(tmp_path / "wrong.h5", 10))
    result = wait_finished(datapath)
    assert result.error == f"frames are 64x64 uint16, the detector config says {SHAPE[0]}x{SHAPE[1]} uint16"
    assert (result.n_written, result.interrupted) == (0, True)
    assert result.stop_time - result.start_time < 1.0
    assert datapath.counters().malformed > 0 and datapath.counters().written == 0
    with h5py.File(tmp_path / "wrong.h5", "r") as f:
        assert f[f"{DETECTOR}/data"].shape == (0, *SHAPE), "closed like an interrupted write"
    assert datapath.is_alive()


def _thread_nices(pid: int) -> set[int]:
    return {
        int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def _autogroup_nice(pid: int) -> int | None:
    """The nice of `pid`'s scheduling autogroup, or None when autogroups are off."""
    if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
        return None
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs CAP_SYS_NICE (root here)")
def test_every_thread_of_the_data_path_runs_its_boost_while_a_write_is_open_and_only_then(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    boosted = max(-20, own - 5)
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "1000")
    datapath = datapath_factory(sim.endpoint, priority_boost=5)
    pid = datapath.pid
    assert pid is not None
    wait_for(lambda: datapath.counters().discarded > 0, WAIT_S, "frames before the write")
    # Between writes it only discards frames: at the control plane's nice, so the end of a write
    # is pushed without waiting for the CPU (issue 12).
    assert _thread_nices(pid) == {own}
    datapath.open_write(job(tmp_path / "long.h5", 10**6))
    # ZeroMQ's I/O thread receives the frames: it must get the boost, not only the main thread.
    assert len(list(Path(f"/proc/{pid}/task").iterdir())) > 1
    assert _thread_nices(pid) == {boosted}
    # The data path is a session of its own: with autogroups on, the session's nice is what
    # weighs against the control plane and the clients, so it carries the boost too.
    assert _autogroup_nice(pid) in (None, boosted)
    wait_for(lambda: datapath.progress().n_written > 0, WAIT_S, "a frame written")
    result = datapath.stop_write()
    assert result is not None and result.n_written > 0
    assert _thread_nices(pid) == {own}
    assert _autogroup_nice(pid) in (None, own)
    datapath.open_write(job(tmp_path / "short.h5", 20))  # and again for the next write
    assert _thread_nices(pid) == {boosted}
    assert wait_finished(datapath).n_written == 20
    assert _thread_nices(pid) == {own}
    assert _autogroup_nice(pid) in (None, own)


def test_a_data_path_that_may_not_raise_its_priority_says_how_to_allow_it_and_keeps_running() -> None:
    # Run as an unprivileged user (nobody) when root: the case of a writer without CAP_SYS_NICE.
    drop = "os.setuid(65534); " if os.geteuid() == 0 else ""
    code = (
        "import os; from servers.writer.datapath.worker import Priority; "  # imported as root
        f"{drop}p = Priority(10); print(p.check(), os.getpriority(os.PRIO_PROCESS, 0)); p.boost(); "
        "print(os.getpriority(os.PRIO_PROCESS, 0))"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert done.stdout.split() == [str(own), str(own), str(own)]  # a write runs at the base, no error
    assert done.stderr.count("cannot raise") == 1, done.stderr
    assert f"cannot raise the data path's priority to nice {max(-20, own - 10)}" in done.stderr
    assert "LimitNICE" in done.stderr
