"""Confinement through the data, and collected sources as snapshots (servers/dpm/references.py).

A source inside the allowed root may name other files: virtual dataset sources, external raw
storage, external links. Each is resolved against the source's own location and must lie under
the allowed roots (else an ERROR alert naming the dataset and the file, and no merge); the files
the merge reads are collected with the source, so what the product holds is what was collected.
Real servers, real HDF5 files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from daqif.frame import expected_frame
from daqif.v1 import dpm_pb2
from daqif.vds import join_writer_files
from servers.dpm.merge import verify
from servers.dpm.references import ReferenceKind, find_references, resolve

from .dpm_helpers import (
    DpmHarness,
    complete_one,
    hdf5_source,
    make_spec,
    visible_files,
    wait_alert,
    wait_archived,
    wait_substate,
)

FRAME = (4, 3)


def _secret(path: Path) -> Path:
    """An HDF5 file outside the allowed root, with a dataset `/secret`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["secret"] = np.full(8, 42, dtype=np.int64)
    return path


def _virtual_over(source: Path, stored_name: str) -> None:
    layout = h5py.VirtualLayout(shape=(8,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(stored_name, "secret", shape=(8,))
    source.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(source, "w") as f:
        f.create_virtual_dataset("leak", layout)


def _external_storage(source: Path, stored_name: str) -> None:
    source.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(source, "w") as f:
        f.create_dataset("leak", shape=(4,), dtype=np.uint8, external=[(stored_name, 0, 4)])


def _external_link(source: Path, stored_name: str) -> None:
    source.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(source, "w") as f:
        f["leak"] = h5py.ExternalLink(stored_name, "/secret")


MAKERS: dict[str, Callable[[Path, str], None]] = {
    "virtual": _virtual_over,
    "external storage": _external_storage,
    "external link": _external_link,
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("naming", ["absolute", "relative"])
def test_source_reaching_a_file_outside_the_allowed_roots_raises_an_error_and_is_not_merged(
    dpm: DpmHarness, kind: str, naming: str
) -> None:
    outside = _secret(dpm.base / "outside" / "secret.h5")
    source = dpm.data / "raw" / "run" / "det1.h5"
    stored = str(outside) if naming == "absolute" else "../../../outside/secret.h5"
    assert resolve(stored, source) == outside  # the relative name leads out from the original
    MAKERS[kind](source, stored)
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("LEAK1", [hdf5_source("det1", source)], [dpm.receiver]))

    status = wait_alert(client, "LEAK1", "collecting:det1")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_COLLECTING and status.error
    (alert,) = [a for a in status.alerts if a.id == "collecting:det1"]
    assert alert.severity == dpm_pb2.ALERT_SEVERITY_ERROR
    assert "/leak" in alert.description and repr(stored) in alert.description
    assert "outside the allowed roots" in alert.description
    assert visible_files(dpm.receiver) == []
    assert not (server.workspace / "products" / "LEAK1").exists()


def _writer_files(directory: Path, ids_per_file: list[list[int]], seed: int = 0) -> list[Path]:
    files = []
    for n, ids in enumerate(ids_per_file):
        path = directory / f"writer{n}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f["DET/data"] = np.stack([expected_frame(i + seed, FRAME, "uint16") for i in ids])
            f["DET/image_id"] = np.array(ids, dtype=np.uint64)
        files.append(path)
    return files


@pytest.mark.parametrize("relative", [False, True])
def test_joined_writer_files_inside_the_roots_are_collected_with_the_join_and_merged(
    dpm: DpmHarness, relative: bool
) -> None:
    raw = dpm.data / "raw"
    files = _writer_files(raw, [[1, 3, 5], [2, 4, 6]])
    join_writer_files(raw / "joined.h5", files, relative=relative)
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("JOIN1", [hdf5_source("det", raw / "joined.h5")], [dpm.receiver]))

    record = wait_archived(client, server, "JOIN1")
    assert record["substate"] == "COMPLETED"
    assert record["sources"][0]["references"] == 2
    product = dpm.receiver / "JOIN1.product.h5"
    with h5py.File(product, "r") as f:
        data = f["det/DET/data"]
        assert not data.is_virtual
        assert np.array_equal(data[:], np.stack([expected_frame(i, FRAME, "uint16") for i in range(1, 7)]))
    assert verify(product).ok


def test_raw_files_rewritten_in_place_after_collection_do_not_reach_the_product(dpm: DpmHarness) -> None:
    raw = dpm.data / "raw"
    files = _writer_files(raw, [[1, 3], [2, 4]])
    join_writer_files(raw / "joined.h5", files)
    single = raw / "single.h5"
    with h5py.File(single, "w") as f:
        f["DET/data"] = np.stack([expected_frame(i, FRAME, "uint16") for i in range(4)])
    # Held in MERGING long enough for the rewrite; the `modified:` warnings, raised when the merge
    # starts, prove it happened before the merge read anything.
    server = dpm.start(config={"debug_delays": {"MERGING": 3.0}})
    client = dpm.client(server)
    sources = [hdf5_source("join", raw / "joined.h5"), hdf5_source("single", single)]
    client.queue_daq(make_spec("SNAP1", sources, [dpm.receiver]))
    wait_substate(client, "SNAP1", "MERGING")
    # A writer reusing the file names rewrites them in place (same inodes, other frames).
    for path in [*files, single]:
        with h5py.File(path, "r+") as f:
            f["DET/data"][...] = 0
    with h5py.File(single, "r+") as f:
        f.attrs["rewritten"] = True  # the size changes too: the warning is certain

    record = wait_archived(client, server, "SNAP1")
    assert record["substate"] == "COMPLETED"
    assert ("modified:single", "WARNING") in [(a["id"], a["severity"]) for a in record["alerts"]]
    product = dpm.receiver / "SNAP1.product.h5"
    with h5py.File(product, "r") as f:
        joined = np.stack([expected_frame(i, FRAME, "uint16") for i in range(1, 5)])
        assert np.array_equal(f["join/DET/data"][:], joined)
        assert np.array_equal(
            f["single/DET/data"][:], np.stack([expected_frame(i, FRAME, "uint16") for i in range(4)])
        )
    assert verify(product).ok


def test_virtual_datasets_over_their_own_file_and_all_of_another_are_collected_and_merged(
    dpm: DpmHarness,
) -> None:
    raw = dpm.data / "raw"
    (beside,) = _writer_files(raw, [[1, 2, 3]], seed=10)
    source = raw / "self.h5"
    frames = np.stack([expected_frame(i, FRAME, "uint16") for i in range(3)])
    with h5py.File(source, "w") as f:
        f["DET/raw"] = frames
        for name, stored, target in (("own", ".", "DET/raw"), ("beside", beside.name, "DET/data")):
            layout = h5py.VirtualLayout(shape=frames.shape, dtype=frames.dtype)
            layout[:] = h5py.VirtualSource(stored, target, shape=frames.shape)  # all of it, unsliced
            f["DET"].create_virtual_dataset(name, layout)
    product = complete_one(dpm, "SELF1", [hdf5_source("det", source)])

    with h5py.File(product, "r") as f:
        assert not f["det/DET/own"].is_virtual and not f["det/DET/beside"].is_virtual
        assert np.array_equal(f["det/DET/own"][:], frames)
        assert np.array_equal(
            f["det/DET/beside"][:], np.stack([expected_frame(i + 10, FRAME, "uint16") for i in (1, 2, 3)])
        )
    assert verify(product).ok


# -- in-process: listing references -------------------------------------------------------------


def test_find_references_lists_every_kind_with_the_dataset_and_the_stored_name(tmp_path: Path) -> None:
    source = tmp_path / "s.h5"
    layout = h5py.VirtualLayout(shape=(8,), dtype=np.int64)
    layout[:] = h5py.VirtualSource("a.h5", "secret", shape=(8,))
    with h5py.File(source, "w") as f:
        f.create_virtual_dataset("g/v", layout)
        f.create_dataset("e", shape=(4,), dtype=np.uint8, external=[("raw.bin", 0, 4)])
        f["g/x"] = h5py.ExternalLink("/abs/other.h5", "/secret")
        f["g/again"] = f["g"]  # a second hard link: walked once
    found = sorted((r.object_path, r.kind, r.name) for r in find_references(source))
    assert found == [
        ("/e", ReferenceKind.EXTERNAL_STORAGE, "raw.bin"),
        ("/g/v", ReferenceKind.VIRTUAL, "a.h5"),
        ("/g/x", ReferenceKind.EXTERNAL_LINK, "/abs/other.h5"),
    ]
    text = tmp_path / "text.h5"
    text.write_bytes(b"not HDF5")
    assert find_references(text) == []  # the merge says what is wrong with it


def test_find_references_walks_nested_groups_once_and_never_follows_soft_links(tmp_path: Path) -> None:
    source = tmp_path / "s.h5"
    layout = h5py.VirtualLayout(shape=(8,), dtype=np.int64)
    layout[:] = h5py.VirtualSource("deep.h5", "secret", shape=(8,))
    with h5py.File(source, "w") as f:
        f.create_virtual_dataset("a/b/c/v", layout)
        f["a/b/c/loop"] = f["a"]  # a hard link back up: a cycle, walked once
        f["a/b/soft"] = h5py.SoftLink("/a/b/c")  # its target is walked where it is
        f["a/b/dangling"] = h5py.SoftLink("/nowhere")
        f["a/t"] = np.dtype("<i4")  # a named datatype: no file reference
        f["a/b/c/ext"] = h5py.ExternalLink("elsewhere.h5", "/x")
        f.create_dataset("a/b/plain", data=np.arange(3))
    found = sorted((r.object_path, r.kind, r.name) for r in find_references(source))
    assert found == [
        ("/a/b/c/ext", ReferenceKind.EXTERNAL_LINK, "elsewhere.h5"),
        ("/a/b/c/v", ReferenceKind.VIRTUAL, "deep.h5"),
    ]


def test_resolve_names_relative_to_the_original_location_and_dot_as_the_file_itself() -> None:
    original = Path("/data/raw/run/det.h5")
    assert resolve(".", original) == original
    assert resolve("w0.h5", original) == Path("/data/raw/run/w0.h5")
    assert resolve("../../x.h5", original) == Path("/data/x.h5")
    assert resolve("/etc/hostname", original) == Path("/etc/hostname")
    assert os.path.isabs(resolve("a/b.h5", original))
