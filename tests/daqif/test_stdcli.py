"""The `std_cli_*` tools (`python -m daqif.stdcli …`) against a real writer (the `daqif.testing` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from daqif.testing import TEST_DETECTOR, Writer
from servers.common.launch import free_port

DETECTOR_NAME = TEST_DETECTOR["detector_name"]


def stdcli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daqif.stdcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_all_nine_tools_print_json(writer: Writer, tmp_path: Path) -> None:
    url = writer.rest_url
    assert ok_json(stdcli("get_status", "-b", url))["state"] == "READY"
    assert ok_json(stdcli("std_cli_get_config", "--url_base", url))["detector_name"] == DETECTOR_NAME
    update = tmp_path / "update.json"
    update.write_text(json.dumps({"n_modules": 5}))
    assert ok_json(stdcli("set_config", str(update), "-b", url))["n_modules"] == 5
    assert ok_json(stdcli("get_deploy_status", "-b", url))["status"] == "SUCCESS"

    output = writer.raw_dir / "cli.h5"
    status = ok_json(stdcli("write_sync", str(output), "4", "-b", url))
    assert status["acquisition"]["message"] == "Completed."
    assert status["acquisition"]["stats"]["n_write_completed"] == 4
    status = ok_json(stdcli("write_async", str(writer.raw_dir / "cli_async.h5"), "100000", "-b", url))
    assert status["state"] == "WRITING"
    status = ok_json(stdcli("write_stop", "-b", url))
    assert status["acquisition"]["message"] == "Interrupted."

    logs = ok_json(stdcli("get_logs", "-n", "2", "-b", url))
    assert [entry["message"] for entry in logs] == ["Interrupted.", "Completed."]
    stats = ok_json(stdcli("get_stats", "-b", url))
    assert set(stats) >= {"detector", "writer"}


def test_url_comes_from_std_daq_api_url(writer: Writer) -> None:
    assert ok_json(stdcli("get_status", env={"STD_DAQ_API_URL": writer.rest_url}))["state"] == "READY"


def test_errors_are_one_line_on_stderr_with_nonzero_exit(writer: Writer, tmp_path: Path) -> None:
    refused = stdcli("write_async", "relative.h5", "3", "-b", writer.rest_url)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0
    assert "not an absolute path" in refused.stderr and "Traceback" not in refused.stderr

    invalid = stdcli("write_sync", "/x.h5", "0", "-b", writer.rest_url)
    assert invalid.returncode == 1, "a value error is refused by the writer (HTTP 200, status error)"
    assert "n_images: Input should be greater than or equal to 1" in invalid.stderr

    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"detector_type": "pilatus"}))
    result = stdcli("set_config", str(bad_config), "-b", writer.rest_url)
    assert result.returncode == 1 and "detector_type" in result.stderr

    missing = stdcli("set_config", str(tmp_path / "nope.json"), "-b", writer.rest_url)
    assert missing.returncode == 3 and "cannot read" in missing.stderr

    unreachable = stdcli("get_status", "-b", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3
    assert "cannot reach the writer" in unreachable.stderr and "Traceback" not in unreachable.stderr

    assert stdcli("no_such_command").returncode == 2
