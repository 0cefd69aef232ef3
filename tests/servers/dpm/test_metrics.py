"""`daqif-dpm-server --metrics-port`: `/metrics` parses with prometheus_client's parser, its counters
move with exact values as DAQs progress, and its gauges are rebuilt from the workspace after a
restart. A real server process, real HDF5 sources, real releases."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.testing import wait_for

from .dpm_helpers import DpmHarness, DpmServerProcess, hdf5_source, make_spec, wait_alert

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: DpmServerProcess) -> Samples:
    reply = requests.get(server.ready.address("metrics") + "/metrics", timeout=10)
    assert reply.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_bare_server_serves_no_metrics(dpm: DpmHarness) -> None:
    server = dpm.start()
    assert [e.name for e in server.ready.endpoints] == ["grpc"]


def test_counters_move_exactly_as_a_daq_completes(dpm: DpmHarness) -> None:
    server = dpm.start(metrics_port=0)
    client = dpm.client(server)
    empty = scrape(server)
    for substate in ("SCHEDULED", "COLLECTING", "MERGING", "RELEASING", "ABORTING"):
        assert value(empty, "daqif_dpm_daqs", substate=substate) == 0
    assert value(empty, "daqif_dpm_queue_daq_seconds_count") == 0
    assert value(empty, "daqif_dpm_daqs_finished_total", substate="COMPLETED") == 0
    capacity = value(empty, "daqif_dpm_storage_capacity_bytes")
    assert (
        capacity
        >= value(empty, "daqif_dpm_storage_free_bytes")
        >= value(empty, "daqif_dpm_storage_available_bytes")
    )
    assert capacity == os.statvfs(server.workspace).f_blocks * os.statvfs(server.workspace).f_frsize

    source = dpm.source("det1", frames=6)
    second = dpm.data / "olas2"
    second.mkdir()
    spec = make_spec("METRICS.1", [hdf5_source("det1", source)], [dpm.receiver, second])
    client.queue_daq(spec)
    client.wait_for("METRICS.1", timeout=60)
    product = os.stat(dpm.receiver / "METRICS.1.product.h5").st_size

    done = scrape(server)
    assert value(done, "daqif_dpm_queue_daq_seconds_count") == 1
    for step in ("collect", "merge", "release"):
        assert value(done, f"daqif_dpm_{step}_seconds_count") == 1, step
    assert value(done, "daqif_dpm_merged_bytes_total") == product
    assert value(done, "daqif_dpm_released_bytes_total") == 2 * product
    assert value(done, "daqif_dpm_daqs_finished_total", substate="COMPLETED") == 1
    assert value(done, "daqif_dpm_daqs", substate="RELEASING") == 0

    # A refused QueueDaq (a duplicate) is timed too: the latency covers every call.
    with pytest.raises(DaqException) as refused:
        client.queue_daq(spec)
    assert refused.value.code is ErrorCode.ALREADY_EXISTS
    # Observed as the handler ends (`QueueLatency`); a refusal is sent by `abort` before that.
    wait_for(lambda: value(scrape(server), "daqif_dpm_queue_daq_seconds_count") == 2)


def test_gauges_are_rebuilt_from_the_workspace_after_a_restart(dpm: DpmHarness) -> None:
    server = dpm.start(metrics_port=0)
    client: DpmClient = dpm.client(server)
    missing = dpm.data / "raw" / "late.h5"
    client.queue_daq(make_spec("METRICS.STUCK", [hdf5_source("late", missing)], [dpm.receiver]))
    wait_alert(client, "METRICS.STUCK", "collecting:late")
    stuck = scrape(server)
    assert value(stuck, "daqif_dpm_daqs", substate="COLLECTING") == 1
    assert value(stuck, "daqif_dpm_alerts", severity="ERROR") == 1
    assert value(stuck, "daqif_dpm_daqs_in_error") == 1

    server.restart()
    client = dpm.client(server)
    wait_alert(client, "METRICS.STUCK", "collecting:late")  # resumed, failed again
    resumed = scrape(server)
    assert value(resumed, "daqif_dpm_daqs", substate="COLLECTING") == 1
    assert value(resumed, "daqif_dpm_alerts", severity="ERROR") == 1
    assert value(resumed, "daqif_dpm_queue_daq_seconds_count") == 0  # a new process counts afresh

    dpm.source("late")  # the source arrives; the operator retries
    client.retry_merge_daq("METRICS.STUCK")
    client.wait_for("METRICS.STUCK", timeout=60)
    wait_for(lambda: value(scrape(server), "daqif_dpm_daqs_finished_total", substate="COMPLETED") == 1)
    finished = scrape(server)
    assert value(finished, "daqif_dpm_daqs", substate="COLLECTING") == 0
    assert value(finished, "daqif_dpm_alerts", severity="ERROR") == 0
    # The retried collect started in this run, so it is timed; so are the merge and the release.
    for step in ("collect", "merge", "release"):
        assert value(finished, f"daqif_dpm_{step}_seconds_count") == 1, step
    product = os.stat(dpm.receiver / "METRICS.STUCK.product.h5").st_size
    assert value(finished, "daqif_dpm_merged_bytes_total") == product
    assert value(finished, "daqif_dpm_released_bytes_total") == product


def test_a_busy_metrics_port_is_a_one_line_error_before_the_workspace_is_touched(tmp_path: Path) -> None:
    workspace = tmp_path / "dpm"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                *(sys.executable, "-m", "servers.dpm.main", "--port", "0"),
                *("--workspace", str(workspace), "--metrics-port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot bind the Prometheus metrics to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workspace.exists()
