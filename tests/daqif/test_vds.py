"""Joining writer files into one virtual dataset ordered by image id: the frames read back in
order with their pixels, few mappings, and every file that cannot be joined is refused saying why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from daqif.frame import expected_frame
from daqif.vds import JoinError, join_writer_files

SHAPE = (6, 5)


def writer_file(path: Path, ids: list[int], detector: str = "DET", shape: tuple[int, int] = SHAPE) -> Path:
    """A file in the writer's layout holding the simulator's frames `ids`."""
    with h5py.File(path, "w") as f:
        group = f.create_group(detector)
        group["data"] = np.stack([expected_frame(i, shape, "uint16") for i in ids]).reshape(len(ids), *shape)
        group["image_id"] = np.array(ids, dtype=np.uint64)
        group["status"] = np.array([i % 3 for i in ids], dtype=np.uint64)
        f.attrs["run_id"] = 7
        f.attrs["detector_name"] = detector
    return path


def test_alternating_writers_join_in_image_id_order_with_one_mapping_each(tmp_path: Path) -> None:
    a = writer_file(tmp_path / "a.h5", list(range(1, 201, 2)))
    b = writer_file(tmp_path / "b.h5", list(range(2, 201, 2)))
    result = join_writer_files(tmp_path / "joined.h5", [a, b])
    assert (result.n_images, result.detector_name, result.mappings) == (200, "DET", 2)
    with h5py.File(tmp_path / "joined.h5", "r") as f:
        data = f["DET/data"]
        assert data.is_virtual and data.shape == (200, *SHAPE)
        assert f["DET/image_id"][:].tolist() == list(range(1, 201))
        assert f["DET/status"][:].tolist() == [i % 3 for i in range(1, 201)]
        for row in (0, 1, 99, 199):
            assert np.array_equal(data[row], expected_frame(row + 1, SHAPE, "uint16"))
        assert f.attrs["n_images"] == 200
        assert list(f.attrs["source_files"]) == [str(a.resolve()), str(b.resolve())]


def test_irregular_dealing_with_relative_paths_reads_back_after_moving_the_set(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    a = writer_file(run / "a.h5", [1, 2, 5, 6, 7, 11])
    b = writer_file(run / "b.h5", [3, 4, 8])
    c = writer_file(run / "c.h5", [9, 10, 12])
    join_writer_files(run / "joined.h5", [a, b, c], relative=True)
    moved = run.rename(tmp_path / "moved")
    with h5py.File(moved / "joined.h5", "r") as f:  # sources stored relative to the joined file
        frames = f["DET/data"][:]
    expected = np.stack([expected_frame(i, SHAPE, "uint16") for i in range(1, 13)])
    assert np.array_equal(frames, expected)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("duplicate ids", "recorded in more than one file"),
        ("other shape", "frames (4, 4) uint16, but"),
        ("other detector", "detector 'OTHER'"),
        ("no detector group", "expected one /<detector>/data group"),
        ("not hdf5", "cannot open as HDF5"),
        ("still being written", "a file still being written?"),
        ("output is a source", "the output is one of the files to join"),
        ("same file twice", "named more than once"),
    ],
)
def test_files_that_cannot_be_joined_are_refused_saying_why(tmp_path: Path, case: str, fragment: str) -> None:
    a = writer_file(tmp_path / "a.h5", [1, 3])
    second = tmp_path / "b.h5"
    output = tmp_path / "joined.h5"
    if case == "duplicate ids":
        writer_file(second, [2, 3])
    elif case == "other shape":
        writer_file(second, [2], shape=(4, 4))
    elif case == "other detector":
        writer_file(second, [2], detector="OTHER")
    elif case == "no detector group":
        with h5py.File(second, "w") as f:
            f["x"] = [1]
    elif case == "not hdf5":
        second.write_text("not a file of frames")
    elif case == "still being written":
        writer_file(second, [2, 4])
        with h5py.File(second, "a") as f:
            del f["DET/image_id"]
            f["DET/image_id"] = np.array([2], dtype=np.uint64)
    elif case == "output is a source":
        output = a
        writer_file(second, [2])
    elif case == "same file twice":
        second = a
    with pytest.raises(JoinError) as info:
        join_writer_files(output, [a, second])
    assert fragment in str(info.value)
    assert not (tmp_path / ".joined.h5.part").exists()


def test_join_command_prints_json_and_fails_with_one_line(tmp_path: Path) -> None:
    a = writer_file(tmp_path / "a.h5", [1, 3])
    b = writer_file(tmp_path / "b.h5", [2])
    command = [sys.executable, "-m", "daqif.cli.main", "writer", "join"]
    ok = subprocess.run(
        [*command, str(tmp_path / "j.h5"), str(a), str(b), "--json"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["n_images"] == 3
    bad = subprocess.run([*command, str(tmp_path / "k.h5"), str(a), str(a)], capture_output=True, text=True)
    assert bad.returncode == 1 and "named more than once" in bad.stderr and "Traceback" not in bad.stderr


def test_a_limit_maps_only_the_smallest_image_ids(tmp_path: Path) -> None:
    files = []
    for name, ids in (("a.h5", [1, 3, 5, 7]), ("b.h5", [2, 4])):
        with h5py.File(tmp_path / name, "w") as f:
            f["DET/data"] = np.stack([expected_frame(i, (4, 3), "uint16") for i in ids])
            f["DET/image_id"] = np.array(ids, dtype=np.uint64)
        files.append(tmp_path / name)
    result = join_writer_files(tmp_path / "joined.h5", files, limit=4)
    assert result.n_images == 4
    with h5py.File(tmp_path / "joined.h5", "r") as f:
        assert f["DET/image_id"][:].tolist() == [1, 2, 3, 4]
        assert np.array_equal(
            f["DET/data"][:], np.stack([expected_frame(i, (4, 3), "uint16") for i in range(1, 5)])
        )
    assert join_writer_files(tmp_path / "all.h5", files, limit=10).n_images == 6
    with pytest.raises(JoinError, match="limit -1 is negative"):
        join_writer_files(tmp_path / "bad.h5", files, limit=-1)
