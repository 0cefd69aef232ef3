"""The HDF5 product's NeXus view: `/entry` over the first detector group, through h5py and
nexusformat, with the product's checksums still verifying; the clone's soft links, and a
collected copy opened once as the product, or left as it was when it cannot be moved."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from nexusformat.nexus import nxload

from daqif.nexus import add_nexus_entry
from daqif.spec import load_specification
from daqif.vds import join_writer_files
from servers.dpm.merge import merge, resolve_sources, verify
from servers.dpm.merge.hdf5 import has_soft_links

from ..merge_samples import FRAME, frames, hdf5_source, spec_document, write_detector_file


def writer_file(path: Path, detector: str, seed: int, image_ids: range | None = None) -> Path:
    """A file as the writer makes it: the Standard DAQ layout and its /entry."""
    write_detector_file(path, detector, seed=seed)
    with h5py.File(path, "r+") as f:
        if image_ids is not None:
            f[f"{detector}/image_id"][:] = np.asarray(image_ids, dtype=np.uint64)
        add_nexus_entry(f, f"/{detector}")
    return path


def merged(tmp_path: Path, document: dict[str, object]) -> Path:
    spec = load_specification(document)
    outfile = tmp_path / "out" / spec.product_name
    outfile.parent.mkdir(exist_ok=True)
    merge(spec, resolve_sources(spec, tmp_path / "nowhere"), outfile)
    assert verify(outfile).ok
    return outfile


def assert_product_plots(product: Path, group: str, pixels: np.ndarray) -> None:
    with h5py.File(product, "r") as f:
        nxdata = f[f.attrs["default"]][f["entry"].attrs["default"]]
        assert nxdata.name == "/entry/data" and nxdata.attrs["signal"] == "data"
        assert nxdata["data"].id == f[f"{group}/data"].id  # a link, no second copy
        assert nxdata["image_id"].id == f[f"{group}/image_id"].id
        assert not nxdata["data"].is_virtual
        np.testing.assert_array_equal(nxdata["data"][()], pixels)
    plottable = nxload(str(product)).plottable_data
    assert plottable.nxpath == "/entry/data" and plottable.nxsignal.shape == pixels.shape


def test_a_product_of_writer_files_plots_the_first_detector(tmp_path: Path) -> None:
    det1 = writer_file(tmp_path / "d1.h5", "jf1", seed=1)
    det2 = writer_file(tmp_path / "d2.h5", "jf2", seed=2)
    product = merged(tmp_path, spec_document([hdf5_source("det1", det1), hdf5_source("det2", det2)]))
    assert_product_plots(product, "/det1/jf1", frames(4, 1))
    with h5py.File(product, "r") as f:  # each source keeps its own view, still valid
        assert f["det2/entry/data/data"].id == f["det2/jf2/data"].id


def test_a_product_of_files_without_entry_gets_one(tmp_path: Path) -> None:
    det = write_detector_file(tmp_path / "plain.h5", "cam", seed=3)
    product = merged(tmp_path, spec_document([hdf5_source("det", det)]))
    assert_product_plots(product, "/det/cam", frames(4, 3))


def test_a_base_writer_file_keeps_its_entry_at_the_root(tmp_path: Path) -> None:
    base = writer_file(tmp_path / "base.h5", "cam", seed=5)
    det = writer_file(tmp_path / "d.h5", "jf", seed=6)
    document = spec_document([hdf5_source("det", det)], target_source=hdf5_source("inst", base))
    product = merged(tmp_path, document)
    assert_product_plots(product, "/cam", frames(4, 5))


def test_a_joined_file_in_a_product_plots_the_copied_frames_not_the_virtual_ones(tmp_path: Path) -> None:
    a = writer_file(tmp_path / "a.h5", "jf", seed=7, image_ids=range(0, 8, 2))
    b = writer_file(tmp_path / "b.h5", "jf", seed=8, image_ids=range(1, 8, 2))
    joined = join_writer_files(tmp_path / "joined.h5", [a, b]).output
    product = merged(tmp_path, spec_document([hdf5_source("det", joined)]))
    expected = np.empty((8, *FRAME), dtype=np.uint16)
    expected[0::2], expected[1::2] = frames(4, 7), frames(4, 8)
    assert_product_plots(product, "/det/jf", expected)
    with h5py.File(product, "r") as f:  # the joined file's own view points at the copy too
        assert f["det/entry/data/data"].id == f["det/jf/data"].id


def test_a_cloned_source_s_only_soft_link_deep_down_is_rerooted(tmp_path: Path) -> None:
    # The clone skips the re-rooting walk only when the source has no soft link at all.
    path = tmp_path / "deep.h5"
    with h5py.File(path, "w") as f:
        f["a/b/c/values"] = np.arange(3)
        f["a/b/c/alias"] = h5py.SoftLink("/a/b/c/values")
        f["again"] = f["a"]  # the group reached by two hard links
        f["outside"] = h5py.ExternalLink("other.h5", "/x")
    with h5py.File(path, "r") as f:
        assert has_soft_links(f)
    product = merged(tmp_path, spec_document([hdf5_source("deep", path)]))
    with h5py.File(product, "r") as f:
        assert f["deep/a/b/c"].get("alias", getlink=True).path == "/deep/a/b/c/values"
        np.testing.assert_array_equal(f["deep/again/b/c/alias"][()], np.arange(3))


def test_hard_and_external_links_are_no_soft_links(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["a/b/values"] = np.arange(3)
        f["a/same"] = f["a/b/values"]
        f["loop"] = f["a"]
        f["outside"] = h5py.ExternalLink("other.h5", "/x")
        assert not has_soft_links(f)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (tmpfs /dev/shm)")
def test_a_movable_clone_that_cannot_be_renamed_is_copied_and_left_as_it_was(tmp_path: Path) -> None:
    # Opened read-write to become the product; a rename across file systems fails (EXDEV).
    snapshot = write_detector_file(tmp_path / "det.h5", "jf", keywords={"OBJECT": "x"})
    before = snapshot.read_bytes()
    spec = load_specification(spec_document([hdf5_source("det", snapshot)]))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        outfile = Path(other) / spec.product_name
        result = merge(spec, {"det": snapshot}, outfile, movable={snapshot})
        assert any(f"cannot move {snapshot}" in line for line in result.log)
        assert verify(outfile).ok
        with h5py.File(outfile, "r") as f:
            np.testing.assert_array_equal(f["det/jf/data"][()], frames(4, 1))
            assert f.attrs["OBJECT"] == "x"
    assert snapshot.read_bytes() == before


def test_a_movable_clone_with_virtual_data_is_copied_and_left_as_it_was(tmp_path: Path) -> None:
    a = writer_file(tmp_path / "a.h5", "jf", seed=7, image_ids=range(0, 8, 2))
    b = writer_file(tmp_path / "b.h5", "jf", seed=8, image_ids=range(1, 8, 2))
    joined = join_writer_files(tmp_path / "joined.h5", [a, b]).output
    before = joined.read_bytes()
    spec = load_specification(spec_document([hdf5_source("det", joined)]))
    outfile = tmp_path / spec.product_name

    result = merge(spec, {"det": joined}, outfile, movable={joined})

    assert not any("moved to the product" in line for line in result.log)
    assert joined.read_bytes() == before
    assert verify(outfile).ok
    with h5py.File(outfile, "r") as f:
        assert not f["det/jf/data"].is_virtual
        np.testing.assert_array_equal(f["det/jf/data"][0::2], frames(4, 7))
