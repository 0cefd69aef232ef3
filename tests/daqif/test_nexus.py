"""`daqif.nexus`: /entry over the Standard DAQ layout, read back with h5py and nexusformat."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from nexusformat.nexus import nxload

from daqif.nexus import DetectorInfo, NexusError, add_nexus_entry, find_detector_groups
from daqif.vds import join_writer_files


def write_standard_daq_file(
    path: Path, detector: str, ids: list[int], shape: tuple[int, int] = (6, 5)
) -> Path:
    """A writer-like file: /<detector>/data, image_id, status; pixel values = image id."""
    frames = np.stack([np.full(shape, i, dtype=np.uint16) for i in ids])
    with h5py.File(path, "w") as f:
        group = f.create_group(detector)
        group.create_dataset("data", data=frames, chunks=(1, *shape), maxshape=(None, *shape))
        group.create_dataset("image_id", data=np.asarray(ids, dtype=np.uint64), maxshape=(None,))
        group.create_dataset("status", data=np.zeros(len(ids), dtype=np.uint64), maxshape=(None,))
        f.attrs["detector_name"] = detector
    return path


def assert_default_plot_is_the_image_stack(
    path: Path, detector: str, n: int, shape: tuple[int, int], *, virtual: bool = False
) -> None:
    """h5py follows the `default` attributes to /entry/data, whose signal is /<detector>/data."""
    with h5py.File(path, "r") as f:
        entry = f[f.attrs["default"]]
        assert entry.attrs["NX_class"] == "NXentry"
        nxdata = entry[entry.attrs["default"]]
        assert nxdata.name == "/entry/data" and nxdata.attrs["NX_class"] == "NXdata"
        signal = nxdata[nxdata.attrs["signal"]]
        assert signal.shape == (n, *shape)
        for name in ("data", "image_id", "status"):  # the same objects, not copies
            assert nxdata[name].id == f[f"{detector}/{name}"].id
        np.testing.assert_array_equal(signal[:], f[f"{detector}/data"][:])
    plottable = nxload(str(path)).plottable_data
    assert plottable.nxpath == "/entry/data"
    assert plottable.nxsignal.nxname == "data"
    if not virtual:  # nexusformat models a virtual dataset as one frame per source file
        assert plottable.nxsignal.shape == (n, *shape)


def test_entry_links_the_detector_datasets_and_describes_the_detector(tmp_path: Path) -> None:
    path = write_standard_daq_file(tmp_path / "w.h5", "JF", [1, 2, 3])
    with h5py.File(path, "r+") as f:
        add_nexus_entry(f, "/JF", DetectorInfo(name="JF", detector_type="jungfrau", bit_depth=16))
    assert_default_plot_is_the_image_stack(path, "JF", 3, (6, 5))
    with h5py.File(path, "r") as f:
        det = f["entry/instrument/JF"]
        assert f["entry/instrument"].attrs["NX_class"] == "NXinstrument"
        assert det.attrs["NX_class"] == "NXdetector"
        assert det["local_name"][()] == b"JF" and det["type"][()] == b"jungfrau"
        assert det["bit_depth_readout"][()] == 16
        assert list(det["frame_shape"][()]) == [6, 5]
        assert det["data"].id == f["JF/data"].id
        assert find_detector_groups(f) == ["/JF"]  # /entry/data is no second detector


def test_a_resized_dataset_is_seen_resized_through_the_entry(tmp_path: Path) -> None:
    path = write_standard_daq_file(tmp_path / "w.h5", "JF", [1, 2, 3, 4])
    with h5py.File(path, "r+") as f:
        add_nexus_entry(f, "/JF")
        f["JF/data"].resize(2, axis=0)
    with h5py.File(path, "r") as f:
        assert f["entry/data/data"].shape == (2, 6, 5)
        assert f["entry/instrument/JF/bit_depth_readout"][()] == 16  # from the dtype


def test_making_the_entry_again_replaces_it(tmp_path: Path) -> None:
    path = write_standard_daq_file(tmp_path / "w.h5", "JF", [1, 2])
    with h5py.File(path, "r+") as f:
        add_nexus_entry(f, "/JF", DetectorInfo(name="JF", detector_type="eiger"))
        f["entry"].create_group("sample")  # someone else's: kept
        del f["JF/data"]
        f["JF"].create_dataset("data", data=np.ones((1, 6, 5), dtype=np.uint16))
        add_nexus_entry(f, "/JF")
    with h5py.File(path, "r") as f:
        assert f["entry/data/data"].id == f["JF/data"].id
        assert f["entry/instrument/JF/type"][()] == b"eiger"  # what the file said is kept
        assert "sample" in f["entry"]


def test_a_group_without_data_is_refused_naming_it(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_group("JF")
        with pytest.raises(NexusError, match=r"no dataset /JF/data to make /entry from"):
            add_nexus_entry(f, "/JF")
        assert "entry" not in f


def test_a_joined_file_plots_its_virtual_dataset_by_default(tmp_path: Path) -> None:
    a = write_standard_daq_file(tmp_path / "a.h5", "JF", [1, 3, 5])
    b = write_standard_daq_file(tmp_path / "b.h5", "JF", [2, 4])
    joined = join_writer_files(tmp_path / "joined.h5", [a, b]).output
    assert_default_plot_is_the_image_stack(joined, "JF", 5, (6, 5), virtual=True)
    with h5py.File(joined, "r") as f:
        assert [int(frame[0, 0]) for frame in f["entry/data/data"][:]] == [1, 2, 3, 4, 5]


def test_detector_groups_are_the_groups_with_3d_data_and_image_id_in_name_order() -> None:
    with h5py.File("detectors", "w", driver="core", backing_store=False) as f:
        for name in ("b", "a", "deep/er/c"):
            f.create_dataset(f"{name}/data", data=np.zeros((1, 2, 2), dtype="u2"))
            f.create_dataset(f"{name}/image_id", data=np.zeros(1, dtype="u8"))
        f["soft/data"] = h5py.SoftLink("/a/data")  # followed, as h5py's get follows it
        f["soft/image_id"] = h5py.SoftLink("/a/image_id")
        f.create_dataset("flat/data", data=np.zeros((2, 2)))  # 2-D: no detector
        f["flat/image_id"] = f["a/image_id"]
        f["dangling/data"] = h5py.SoftLink("/nowhere")
        f["dangling/image_id"] = f["a/image_id"]
        f.create_group("no_ids")["data"] = f["a/data"]
        f["nexus/data"] = f["a/data"]
        f["nexus/image_id"] = f["a/image_id"]
        f["nexus"].attrs["NX_class"] = "NXdata"
        f["group_data/data"] = f.create_group("elsewhere")
        f["group_data/image_id"] = f["a/image_id"]
        f["alias"] = f["b"]  # one group under two names: visited once, by its first name
        assert find_detector_groups(f) == ["/a", "/alias", "/deep/er/c", "/soft"]
