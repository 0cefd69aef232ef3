"""`daqif dpm …` against a real DPM server: JSON output parses, errors exit non-zero with a
one-line message, `queue --wait` follows the DAQ to COMPLETED."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from daqif.cli.dpm import with_default_port
from daqif.errors import DaqException, ErrorCode
from daqif.testing import DpmServer


def daqif(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daqif.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def write_spec(server: DpmServer, tmp_path: Path, daq_id: str, receiver: Path | None = None) -> Path:
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
                "receivers": [{"type": "olasReceiver", "path": str(receiver or server.receiver_dir)}],
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


def test_piped_wait_prints_one_unwrapped_line_per_change_and_the_final_one_once(
    dpm_server: DpmServer, tmp_path: Path
) -> None:
    spec = write_spec(
        dpm_server, tmp_path, "CLI.2.a-long-id-so-that-the-final-line-is-longer-than-eighty-columns"
    )
    result = daqif("dpm", "queue", str(spec), "--wait", "--address", dpm_server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    daq_id = spec.stem
    product = dpm_server.workspace / "products" / daq_id / f"{daq_id}.h5"
    assert lines[-1] == f"{daq_id} COMPLETED → {product}"
    assert len(lines[-1]) > 80
    assert [line.split()[1] for line in lines][-1] == "COMPLETED"
    assert len(lines) == len(set(lines))  # no line twice, the final one included
    assert all(line.startswith(f"{daq_id} ") for line in lines)


def test_status_of_a_finished_daq_shows_its_final_substate_and_product(
    dpm_server: DpmServer, tmp_path: Path
) -> None:
    spec = write_spec(dpm_server, tmp_path, "CLI.3")
    assert (
        daqif("dpm", "queue", str(spec), "--wait", "--json", "--address", dpm_server.address).returncode == 0
    )
    text = daqif("dpm", "status", "CLI.3", "--address", dpm_server.address)
    assert text.returncode == 0, text.stderr
    product = dpm_server.workspace / "products" / "CLI.3" / "CLI.3.h5"
    lines = text.stdout.splitlines()
    assert "substate: COMPLETED" in lines and f"product: {product}" in lines and "error: no" in lines
    final = json.loads(daqif("dpm", "status", "CLI.3", "--json", "--address", dpm_server.address).stdout)
    assert final["substate"] == "DAQ_SUB_STATE_COMPLETED" and final["state"] == "DAQ_STATE_COMPLETED"
    assert final["result"] == str(product)
    with pytest.raises(DaqException) as seed_behaviour:
        dpm_server.client.get_daq_status("CLI.3")
    assert seed_behaviour.value.code is ErrorCode.NOT_FOUND


def test_wait_stops_at_an_error_alert_prints_it_and_exits_4(dpm_server: DpmServer, tmp_path: Path) -> None:
    missing = dpm_server.receiver_dir / "not-there"
    spec = write_spec(dpm_server, tmp_path, "CLI.4", receiver=missing)
    result = daqif("dpm", "queue", str(spec), "--wait", "--address", dpm_server.address)
    assert result.returncode == 4, result.stdout + result.stderr
    alert = f"releasing:0: receiver directory {missing} does not exist"
    assert result.stdout.splitlines()[-1] == f"CLI.4 RELEASING  [ERROR {alert}]"
    assert f"DAQ CLI.4 is waiting in RELEASING after an ERROR alert ({alert})" in result.stderr
    assert "daqif dpm retry CLI.4" in result.stderr
    assert dpm_server.client.get_daq_status("CLI.4").error  # it waits for the operator


def test_keep_waiting_follows_past_the_alert_and_an_abort_exits_3_without_a_product(
    dpm_server: DpmServer, tmp_path: Path
) -> None:
    missing = dpm_server.receiver_dir / "later"
    spec = write_spec(dpm_server, tmp_path, "CLI.5", receiver=missing)
    command = [sys.executable, "-m", "daqif.cli.main", "dpm", "queue", str(spec), "--wait", "--keep-waiting"]
    with subprocess.Popen(
        [*command, "--address", dpm_server.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as follower:
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()  # printed once the DAQ is queued
            dpm_server.client.wait_for("CLI.5", substates=(), stop_when=lambda s: s.error, timeout=60)
            dpm_server.client.abort_daq("CLI.5")
            rest, stderr = follower.communicate(timeout=60)
            stdout = first + rest
        finally:
            follower.kill()
    assert follower.returncode == 3, stdout + stderr
    lines = stdout.splitlines()
    assert any("RELEASING  [ERROR releasing:0" in line for line in lines)
    assert lines[-1] == "CLI.5 ABORTED"  # no product path: an aborted DAQ has none
    assert len(lines) == len(set(lines))


def test_watch_of_an_unknown_id_answers_not_found_at_once(dpm_server: DpmServer) -> None:
    result = daqif("dpm", "watch", "NEVER.QUEUED", "--address", dpm_server.address)
    assert result.returncode == 1
    assert "NOT_FOUND [NEVER.QUEUED]: no DAQ with id 'NEVER.QUEUED' was queued" in result.stderr


def test_watch_piped_prints_one_json_document_per_line(dpm_server: DpmServer, tmp_path: Path) -> None:
    spec = write_spec(dpm_server, tmp_path, "CLI.6", receiver=dpm_server.receiver_dir / "no")
    dpm_server.client.queue_daq(spec.read_text())
    dpm_server.client.wait_for("CLI.6", substates=(), stop_when=lambda s: s.error, timeout=60)
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daqif.cli.main",
            "dpm",
            "watch",
            "CLI.6",
            "--json",
            "--address",
            dpm_server.address,
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as watcher:
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            dpm_server.client.abort_daq("CLI.6")
            rest = [json.loads(watcher.stdout.readline()) for _ in range(2)]
        finally:
            watcher.kill()
    assert first["id"] == "CLI.6" and first["error"] is True
    assert [r["substate"] for r in rest] == ["DAQ_SUB_STATE_ABORTING", "DAQ_SUB_STATE_ABORTED"]


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("dpm.example.org", "dpm.example.org:12083"),
        ("127.0.0.1", "127.0.0.1:12083"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[::1]", "[::1]:12083"),
        ("[::1]:5000", "[::1]:5000"),
        ("grpcs://dpm.example.org", "grpcs://dpm.example.org:12083"),
        ("grpcs://127.0.0.1:5000", "grpcs://127.0.0.1:5000"),
    ],
)
def test_an_address_without_a_port_uses_the_default_port(given: str, used: str) -> None:
    assert with_default_port(given) == used


def test_help_of_every_command_shows_every_default() -> None:
    for command in ("queue", "status", "watch", "active", "storage", "exit", "abort", "retry", "internal"):
        result = daqif("dpm", command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "(default: 127.0.0.1:12083)" in text and "(default: 10.0)" in text, command
    queue = " ".join(daqif("dpm", "queue", "--help").stdout.split())
    assert "(default: 3600.0)" in queue and "--keep-waiting" in queue


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


def test_commands_speak_mutual_tls_with_the_tls_flags_and_are_refused_without_a_certificate(
    tls_dpm_server: DpmServer,
) -> None:
    tls = tls_dpm_server.tls
    assert tls is not None
    address = ["--address", tls_dpm_server.address, "--tls-ca", str(tls.ca_cert)]
    client = ["--tls-cert", str(tls.client.cert), "--tls-key", str(tls.client.key)]
    active = daqif("dpm", "active", "--json", *address, *client)
    assert active.returncode == 0, active.stderr
    assert json.loads(active.stdout) == []
    refused = daqif("dpm", "active", "--call-timeout", "5", *address)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_a_missing_client_key_file_is_named_in_one_line(tls_dpm_server: DpmServer, tmp_path: Path) -> None:
    tls = tls_dpm_server.tls
    assert tls is not None
    missing = tmp_path / "me.key"
    result = daqif(
        "dpm",
        "active",
        "--address",
        tls_dpm_server.address,
        "--tls-cert",
        str(tls.client.cert),
        "--tls-key",
        str(missing),
    )
    assert result.returncode == 1
    assert " ".join(result.stderr.split()) == (
        f"error: cannot read the private key {missing}: No such file or directory"
    )
    half = daqif("dpm", "active", "--tls-cert", str(tls.client.cert))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
