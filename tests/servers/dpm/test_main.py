"""`daqif-dpm-server` as a program: ready line, refusals at start-up, graceful stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servers.common.launch import DpmOptions, DpmProcess, ServerStartError

from .dpm_helpers import DpmHarness, DpmServerProcess, keyword_source, make_spec, wait_archived


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servers.dpm.main", *args], capture_output=True, text=True, timeout=60
    )


def test_bad_config_file_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "dpm.json"
    config.write_text(json.dumps({"max_merges": "two"}))
    result = run_server("--workspace", str(tmp_path / "ws"), "--port", "0", "--config", str(config))
    assert result.returncode == 2
    assert f"config file {config}: key 'max_merges'" in result.stderr


def test_second_server_on_the_same_workspace_refuses_to_start(dpm: DpmHarness) -> None:
    first = dpm.start()
    second = DpmServerProcess(dpm.base / "second", workspace=first.workspace, allowed_roots=[dpm.data])
    with pytest.raises(ServerStartError, match="in use by another daqif-dpm-server"):
        second.start()
    assert first.running


def test_sigterm_stops_gracefully_and_the_queue_survives(dpm: DpmHarness) -> None:
    server = dpm.start({"max_active_daqs": 0})
    client = dpm.client(server)
    client.queue_daq(make_spec("KEPT1", [keyword_source()], [dpm.receiver]))
    assert server.stop() == 0
    assert f"daqif-ready dpm grpc={server.address}" in server.log_text()

    server.config = {}
    server.start()
    assert wait_archived(client, server, "KEPT1")["substate"] == "COMPLETED"


def test_help_names_every_option() -> None:
    result = run_server("--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--workspace", "--allowed-root", "--config", "--data-root"):
        assert option in result.stdout


def test_second_server_on_a_busy_grpc_port_exits_non_zero_naming_the_port(dpm: DpmHarness) -> None:
    # gRPC would share the port through SO_REUSEPORT unless the server turns it off.
    first = dpm.start()
    port = first.ready.port("grpc")
    second = DpmProcess(DpmOptions(port=port, workspace=dpm.base / "second-ws", allowed_roots=(dpm.data,)))
    with pytest.raises(ServerStartError):
        second.start()
    assert second.returncode == 2
    assert second.tail() == [
        f"daqif-dpm-server: cannot bind the DPM gRPC services to 127.0.0.1:{port}: "
        "address in use or not a local address"
    ]
    assert first.running
    assert dpm.client(first).get_active_daqs() == []
