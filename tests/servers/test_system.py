"""`daqif serve`'s system keeps the roles apart: the writer writes under raw/ only, and no allowed
root may overlap what the DPM, the receivers or serve itself own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from servers.system import SystemConfig, dpm_options, writer_options


def test_the_writer_is_confined_to_raw_and_the_dpm_to_raw_and_the_receivers(tmp_path: Path) -> None:
    config = SystemConfig(data_root=tmp_path)
    assert writer_options(config).allowed_roots == ((tmp_path / "raw").resolve(),)
    raw, olas = (tmp_path / "raw").resolve(), (tmp_path / "olas").resolve()
    assert dpm_options(config).allowed_roots == (raw, olas), "sources from raw/, products released to olas/"
    config.check_roles_apart()


@pytest.mark.parametrize(
    ("root", "what"),
    [
        ("olas", "the receiver directory"),
        ("olas/sub", "the receiver directory"),
        ("dpm", "the DPM workspace"),
        ("dpm/daqs", "the DPM workspace"),
        ("logs", "the log directory"),
        (".", "the DPM workspace"),
    ],
)
def test_an_allowed_root_overlapping_another_role_is_refused_naming_both(
    tmp_path: Path, root: str, what: str
) -> None:
    bad = (tmp_path / root).resolve()
    config = SystemConfig(data_root=tmp_path, extra_allowed_roots=[bad])
    with pytest.raises(ValueError) as caught:
        config.check_roles_apart()
    assert str(caught.value).startswith(f"allowed root {bad} overlaps {what} ")


def test_serve_refuses_an_overlapping_allowed_root_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daqif.cli.main", "serve", "--data-root", str(tmp_path / "d"),
         "--allowed-root", str(tmp_path / "d" / "olas"), "--dpm-port", "0", "--rest-port", "0",
         "--writer-grpc-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "overlaps the receiver directory" in result.stdout + result.stderr
    assert not (tmp_path / "d").exists(), "nothing was created"


@pytest.mark.parametrize("target", ["olas/PRODUCT.h5", "dpm/daqs/X/daq.json", "writer-config.json"])
def test_the_writer_under_serve_cannot_write_where_the_dpm_or_serve_keep_files(
    writer: Any, target: str
) -> None:
    output = writer.data_root / target
    before = output.read_bytes() if output.exists() else None
    reply = requests.post(
        writer.rest_url + "/writer/write_async", json={"output_file": str(output), "n_images": 1}, timeout=30
    ).json()
    assert reply["status"] == "error"
    assert "allowed" in reply["message"] or "not under" in reply["message"], reply["message"]
    assert (output.read_bytes() if output.exists() else None) == before, "left as it was"
