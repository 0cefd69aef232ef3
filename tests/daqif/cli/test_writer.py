"""`daqif writer …` (src/daqif/cli/writer.py) against a real writer (the `daqif.testing` fixture)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import pytest

from daqif.cli.writer import add_writer_parser
from daqif.testing import TEST_DETECTOR, Writer

DETECTOR_NAME = str(TEST_DETECTOR["detector_name"])


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="daqif")
    add_writer_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_sync_write_records_the_images_and_reports_completion(
    writer: Writer, capsys: pytest.CaptureFixture[str]
) -> None:
    output = writer.raw_dir / "cli_sync.h5"
    assert run(["writer", "write", str(output), "30", "--sync", "--url", writer.rest_url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "READY"
    assert status["acquisition"]["message"] == "Completed."
    with h5py.File(output, "r") as f:
        assert f[DETECTOR_NAME]["data"].shape[0] == 30


def test_sub_commands_print_text_or_json(
    writer: Writer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", writer.rest_url]
    assert run(["writer", "write", str(writer.raw_dir / "a.h5"), "3", "--sync", *url]) == 0
    assert "Completed." in capsys.readouterr().out
    assert run(["writer", "status", *url]) == 0
    assert "READY" in capsys.readouterr().out
    assert run(["writer", "logs", "-n", "1", *url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["info"]["output_file"] == str(writer.raw_dir / "a.h5")
    update = tmp_path / "u.json"
    update.write_text(json.dumps({"n_modules": 2}))
    assert run(["writer", "set-config", str(update), *url]) == 0
    assert json.loads(capsys.readouterr().out)["n_modules"] == 2
    for command in ("config", "stats", "deployment", "stop"):
        assert run(["writer", command, *url, "--json"]) == 0
        json.loads(capsys.readouterr().out)


def test_refused_write_exits_non_zero_with_the_reason(
    writer: Writer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["writer", "write", "relative.h5", "3", "--url", writer.rest_url]) == 1
    assert "not an absolute path" in capsys.readouterr().err
