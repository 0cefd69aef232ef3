"""`daqif demo` runs the whole chain and leaves a product that verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
from astropy.io import fits


def test_demo_on_a_terminal_leaves_a_verified_product_and_prints_dpm_timings(tmp_path: Path) -> None:
    # FORCE_COLOR makes rich treat the pipe as a terminal: the progress-bar path, which had
    # lost the per-stage DPM timings.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daqif.cli.main",
            "demo",
            "--data-root",
            str(tmp_path / "data"),
            "--frames",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    products = list((tmp_path / "data" / "olas").glob("DEMO.*.h5"))
    assert len(products) == 1, result.stdout
    assert f"data product: {products[0]}" in result.stdout.replace("\n", "")
    for stage in ("collecting", "merging", "releasing"):
        assert f"DPM {stage}" in result.stdout, result.stdout
    verify = subprocess.run(
        [sys.executable, "-m", "servers.dpm.merge_cli", "--verify", str(products[0])],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with h5py.File(products[0], "r") as product:
        assert product.attrs["OBJECT"] == "DEMO"
        data = product["det1/SIM1/data"]
        assert data.shape == (40, 512, 512)
        assert list(product["det1/SIM1/image_id"][:]) == sorted(product["det1/SIM1/image_id"][:])


def test_fits_demo_writes_detector_files_and_leaves_a_verified_fits_product(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daqif.cli.main",
            "demo",
            "--fits",
            "--chips",
            "2",
            "--data-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (product,) = (tmp_path / "olas").glob("DEMO.*.fits")
    assert f"data product: {product}" in result.stdout.replace("\n", "")
    assert "OK (5 HDUs" in result.stdout
    with fits.open(product) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "DET1.CHIP1", "DET1.CHIP2", "DET2.CHIP1", "DET2.CHIP2"]
        header = hdul[0].header
        assert (header["OBJECT"], header["RA"], header["HIERARCH ESO DET1 DIT"]) == ("DEMO", 10.684708, 0.5)
        assert header["ARCFILE"] == product.name
    done = subprocess.run(["fitsverify", "-q", str(product)], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == f"verification OK: {product}", done.stdout
    # The demo's specification lists the built-in dictionaries, so COMPLETED means every ESO
    # keyword of the product (from the keyword sources and the detector files) is defined there.
    (spec_file,) = tmp_path.glob("DEMO.*.spec.json")
    assert json.loads(spec_file.read_text())["keywordDictionaries"] == [
        "ESO-VLT-DIC.DAQIF_OBS",
        "ESO-VLT-DIC.DAQIF_TCS",
        "ESO-VLT-DIC.DAQIF_DCS",
    ]
