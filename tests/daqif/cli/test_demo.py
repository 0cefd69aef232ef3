"""`daqif demo` runs the whole chain and leaves a product that verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py


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
