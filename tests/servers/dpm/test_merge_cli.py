"""`daqif-dpm-merge` as a real process and in-process: merge, dry run, verify, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from servers.dpm.merge import verify
from servers.dpm.merge_cli import main

from .merge_samples import hdf5_source, keyword_source, spec_document, write_detector_file, write_spec

FILE_ID = "CLI.2026-11-22T10:00:00.000"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servers.dpm.merge_cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A DPM-like workspace: det1 collected under sources/, det2 read from its location."""
    root = tmp_path / "daq"
    (root / "sources").mkdir(parents=True)
    write_detector_file(root / "sources" / "det1.h5", "jf1", keywords={"ESO DET DIT": 0.5})
    det2 = write_detector_file(tmp_path / "det2.h5", "jf2", seed=2, compressed=True)
    document = spec_document(
        [
            keyword_source("ocm", [{"type": "valueKeyword", "name": "OBJECT", "value": "M31"}]),
            hdf5_source("det1", Path("/nonexistent/det1.h5")),  # the workspace copy is used
            hdf5_source("det2", det2),
        ],
        file_id=FILE_ID,
    )
    write_spec(root / "specification.json", document)
    return root


def test_merge_writes_the_product_in_the_root_and_logs_to_stdout(workspace: Path) -> None:
    done = run_cli(str(workspace / "specification.json"), "--root", str(workspace))

    assert done.returncode == 0, done.stderr
    product = workspace / f"{FILE_ID}.h5"
    with h5py.File(product, "r") as f:
        assert sorted(f.keys()) == ["det1", "det2", "entry"]  # entry: the NeXus view
        assert f.attrs["OBJECT"] == "M31" and f.attrs["ESO DET DIT"] == 0.5
    assert f"wrote {product}" in done.stdout
    assert done.stderr == ""
    assert not list(workspace.glob(".*.part"))


def test_outfile_option_names_the_product(workspace: Path, tmp_path: Path) -> None:
    outfile = tmp_path / "elsewhere.h5"

    code = main([str(workspace / "specification.json"), "--root", str(workspace), "--outfile", str(outfile)])

    assert code == 0
    with h5py.File(outfile, "r") as f:
        assert f.attrs["ARCFILE"] == "elsewhere.h5" and f.attrs["ORIGFILE"] == f"{FILE_ID}.h5"
    assert not (workspace / f"{FILE_ID}.h5").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(workspace: Path) -> None:
    before = sorted(p.name for p in workspace.rglob("*"))

    done = run_cli(str(workspace / "specification.json"), "--root", str(workspace), "--dry-run")

    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in workspace.rglob("*")) == before
    assert "dataset /det1/jf1/data: uint16 (4, 32, 48)" in done.stdout
    assert "dataset /det2/jf2/data" in done.stdout and "filters [32008]" in done.stdout
    assert "keyword OBJECT = 'M31' (from ocm)" in done.stdout
    assert "keyword ESO DET DIT = 0.5 (from det1)" in done.stdout


def test_verify_passes_then_fails_on_a_flipped_data_byte(workspace: Path) -> None:
    assert main([str(workspace / "specification.json"), "--root", str(workspace)]) == 0
    product = workspace / f"{FILE_ID}.h5"
    ok = run_cli("--verify", str(product))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr

    with h5py.File(product, "r") as f:
        offset = f["det1/jf1/data"].id.get_chunk_info(0).byte_offset
    with open(product, "r+b") as handle:
        handle.seek(offset)
        first = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([first[0] ^ 0xFF]))
    bad = run_cli("--verify", str(product))

    assert bad.returncode == 1
    assert "checksum mismatch" in bad.stderr and "dataset /det1/jf1/data" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_verify_fails_on_a_modified_attribute(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(workspace / "specification.json"), "--root", str(workspace)]) == 0
    product = workspace / f"{FILE_ID}.h5"
    with h5py.File(product, "r+") as f:
        f.attrs["OBJECT"] = "M32"
    capsys.readouterr()

    assert main(["--verify", str(product)]) == 1
    assert "root DATASUM" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"garbage, not HDF5"])
def test_verify_of_an_unreadable_file_exits_2(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "product.h5"
    if content is not None:
        path.write_bytes(content)

    done = run_cli("--verify", str(path))

    assert done.returncode == 2
    assert done.stderr.startswith("daqif-dpm-merge: error: unreadable:")
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_source_exits_1_with_one_line_and_no_product(workspace: Path) -> None:
    (workspace / "sources" / "det1.h5").unlink()

    done = run_cli(str(workspace / "specification.json"), "--root", str(workspace))

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sources[1] 'det1': file /nonexistent/det1.h5 does not exist" in lines[0]
    assert not (workspace / f"{FILE_ID}.h5").exists()
    assert not list(workspace.glob(".*.part"))


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("{not json", "not valid JSON"),
        ({"id": "X", "target": {"fileId": "X"}, "sources": [{"type": "tape"}]}, "sources[0].type"),
    ],
)
def test_invalid_specification_exits_3_with_where(tmp_path: Path, document: Any, expected: str) -> None:
    spec = tmp_path / "spec.json"
    if isinstance(document, str):
        spec.write_text(document)
    else:
        write_spec(spec, document)

    done = run_cli(str(spec), "--root", str(tmp_path))

    assert done.returncode == 3
    assert expected in done.stderr and "Traceback" not in done.stderr


def test_unreadable_specification_file_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.json"), "--root", str(tmp_path)]) == 3
    assert "cannot read the specification" in capsys.readouterr().err


def test_help_documents_the_exit_codes() -> None:
    done = run_cli("--help")

    assert done.returncode == 0
    assert "exit codes:" in done.stdout and "--verify" in done.stdout and "--dry-run" in done.stdout


def test_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli(str(tmp_path / "spec.json"))

    assert done.returncode == 2 and "--root" in done.stderr


def _two_sources(tmp_path: Path, collected_is_larger: bool) -> tuple[Path, Path, Path]:
    """A workspace with det1 collected under sources/ and det2 read from its location; the one
    named by `collected_is_larger` holds more frames, so the merge clones it."""
    root = tmp_path / "daq"
    (root / "sources").mkdir(parents=True)
    big, little = 16, 2
    det1 = write_detector_file(root / "sources" / "det1.h5", "jf1", n=big if collected_is_larger else little)
    det2 = write_detector_file(tmp_path / "det2.h5", "jf2", seed=2, n=little if collected_is_larger else big)
    document = spec_document(
        [hdf5_source("det1", Path("/nonexistent/det1.h5")), hdf5_source("det2", det2)], file_id=FILE_ID
    )
    write_spec(root / "specification.json", document)
    return root, det1, det2


def test_consume_collected_moves_the_collected_clone_into_the_product(tmp_path: Path) -> None:
    root, det1, det2 = _two_sources(tmp_path, collected_is_larger=True)
    with h5py.File(det1) as f:
        frames = f["jf1/data"][()]
    det2_bytes = det2.read_bytes()

    done = run_cli(str(root / "specification.json"), "--root", str(root), "--consume-collected")

    assert done.returncode == 0, done.stderr
    assert f"{det1} (a collected copy) moved to the product" in done.stdout
    assert not det1.exists()  # consumed: a retry collects afresh
    assert det2.read_bytes() == det2_bytes
    product = root / f"{FILE_ID}.h5"
    assert verify(product).ok
    with h5py.File(product) as f:
        assert np.array_equal(f["det1/jf1/data"][()], frames)


@pytest.mark.parametrize(
    ("flag", "collected_is_larger"),
    [([], True), ([], False), (["--consume-collected"], False)],  # the last: det2, outside, is cloned
)
def test_without_the_flag_or_outside_the_roots_sources_no_source_is_moved(
    tmp_path: Path, flag: list[str], collected_is_larger: bool
) -> None:
    root, det1, det2 = _two_sources(tmp_path, collected_is_larger)
    before = det1.read_bytes(), det2.read_bytes()

    done = run_cli(str(root / "specification.json"), "--root", str(root), *flag)

    assert done.returncode == 0, done.stderr
    assert "moved to the product" not in done.stdout
    assert (det1.read_bytes(), det2.read_bytes()) == before
    assert verify(root / f"{FILE_ID}.h5").ok


def test_consume_collected_moves_the_cloned_snapshot_into_the_product(
    workspace: Path, tmp_path: Path
) -> None:
    spec, snapshot = str(workspace / "specification.json"), workspace / "sources" / "det1.h5"
    copied, moved = tmp_path / "copied.h5", tmp_path / "moved.h5"
    assert main([spec, "--root", str(workspace), "--outfile", str(copied)]) == 0
    assert snapshot.is_file()  # without the option a source is only read
    inode = snapshot.stat().st_ino

    assert main([spec, "--root", str(workspace), "--outfile", str(moved), "--consume-collected"]) == 0
    assert not snapshot.exists() and moved.stat().st_ino == inode  # the snapshot became the product
    assert (tmp_path / "det2.h5").is_file()  # read from its location, outside <root>/sources/: kept
    assert verify(moved).ok
    with h5py.File(copied, "r") as a, h5py.File(moved, "r") as b:
        sums = [
            {p: f[p].attrs["DATASUM"] for p in _datasets(f)} for f in (a, b)
        ]  # the same bytes, whichever way the product started
        assert sums[0] == sums[1] and len(sums[0]) > 2


def test_consume_collected_copies_a_snapshot_whose_data_lie_in_other_files(tmp_path: Path) -> None:
    root = tmp_path / "daq"
    (root / "sources").mkdir(parents=True)
    snapshot = root / "sources" / "det.h5"
    (root / "sources" / "raw.bin").write_bytes(bytes([0, 1, 2, 3]))
    with h5py.File(snapshot, "w") as f:
        f.create_dataset("v", shape=(4,), dtype=np.uint8, external=[("raw.bin", 0, 4)])
    write_spec(root / "specification.json", spec_document([hdf5_source("det", Path("/nonexistent/det.h5"))]))
    outfile = tmp_path / "product.h5"
    argv = [str(root / "specification.json"), "--root", str(root), "--outfile", str(outfile)]
    assert main([*argv, "--consume-collected"]) == 0
    assert snapshot.is_file()  # its external data are read through its name: copied, not moved
    with h5py.File(outfile, "r") as f:
        assert f["det/v"][()].tolist() == [0, 1, 2, 3]


def _datasets(f: h5py.File) -> list[str]:
    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_collected_only_refuses_a_source_without_a_collected_copy_and_reads_no_original(
    tmp_path: Path,
) -> None:
    root, det1, det2 = _two_sources(tmp_path, collected_is_larger=True)  # det2 lies outside sources/
    before = det1.read_bytes(), det2.read_bytes()

    done = run_cli(
        str(root / "specification.json"), "--root", str(root), "--consume-collected", "--collected-only"
    )

    assert done.returncode != 0
    assert f"'det2': its collected copy {root / 'sources' / 'det2.h5'} is missing" in done.stderr
    assert not (root / f"{FILE_ID}.h5").exists()
    assert (det1.read_bytes(), det2.read_bytes()) == before  # nothing consumed by a refused merge
