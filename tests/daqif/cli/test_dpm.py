"""`daqif dpm …` against a real DPM server: JSON output parses, errors exit non-zero with a
one-line message, `queue --wait` follows the DAQ to COMPLETED."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py

from daqif.testing import DpmServer


def daqif(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daqif.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def write_spec(server: DpmServer, tmp_path: Path, daq_id: str) -> Path:
    source = server.data_root / "raw" / "cli.h5"
    with h5py.File(source, "w") as f:
        f["data"] = [1, 2, 3]
    spec = tmp_path / f"{daq_id}.json"
    spec.write_text(
        json.dumps(
            {
                "id": daq_id,
                "target": {"fileId": daq_id},
                "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
                "receivers": [{"type": "olasReceiver", "path": str(server.receiver_dir)}],
            }
        )
    )
    return spec


def test_queue_wait_follows_to_completed_and_prints_json(dpm_server: DpmServer, tmp_path: Path) -> None:
    spec = write_spec(dpm_server, tmp_path, "CLI.1")
    result = daqif("dpm", "queue", str(spec), "--wait", "--json", "--address", dpm_server.address)
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout)
    assert final["id"] == "CLI.1" and final["substate"] == "DAQ_SUB_STATE_COMPLETED"
    assert (dpm_server.receiver_dir / "CLI.1.h5").exists()


def test_queue_without_wait_then_text_follow(dpm_server: DpmServer, tmp_path: Path) -> None:
    spec = write_spec(dpm_server, tmp_path, "CLI.2")
    result = daqif("dpm", "queue", str(spec), "--wait", "--address", dpm_server.address)
    assert result.returncode == 0, result.stderr
    assert "CLI.2 COMPLETED" in result.stdout


def test_read_only_commands_print_json(dpm_server: DpmServer) -> None:
    active = daqif("dpm", "active", "--json", "--address", dpm_server.address)
    assert active.returncode == 0 and json.loads(active.stdout) == []
    storage = daqif("dpm", "storage", "--json", "--address", dpm_server.address)
    assert storage.returncode == 0 and int(json.loads(storage.stdout)["capacity"]) > 0


def test_errors_exit_nonzero_with_code_id_and_message(dpm_server: DpmServer, tmp_path: Path) -> None:
    missing = daqif("dpm", "status", "NOPE", "--address", dpm_server.address)
    assert missing.returncode == 1
    assert "NOT_FOUND [NOPE]" in missing.stderr and "Traceback" not in missing.stderr
    for command in ("abort", "retry", "internal"):
        result = daqif("dpm", command, "NOPE", "--address", dpm_server.address)
        assert result.returncode == 1 and "NOPE" in result.stderr, (command, result.stderr)
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "X", "target": {"fileId": "X"}, "sources": [{"type": "nope"}]}')
    invalid = daqif("dpm", "queue", str(bad), "--address", dpm_server.address)
    assert invalid.returncode == 1 and "sources[0].type: unknown type 'nope'" in invalid.stderr
    nowhere = daqif("dpm", "active", "--address", "127.0.0.1:1", "--call-timeout", "2")
    assert nowhere.returncode == 1 and "UNAVAILABLE" in nowhere.stderr


def test_exit_stops_the_server(dpm_server: DpmServer) -> None:
    result = daqif("dpm", "exit", "--json", "--address", dpm_server.address)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"]
