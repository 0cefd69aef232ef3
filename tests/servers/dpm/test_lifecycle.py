"""The DAQ lifecycle through a real DPM server: substates, abort, retry, free-space reserve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daqif.errors import ErrorCode
from daqif.testing import wait_for
from daqif.v1 import dpm_pb2
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    error_of,
    follow_from_now,
    hdf5_source,
    keyword_source,
    make_spec,
    statuses_until_final,
    substate_names,
    visible_files,
    wait_alert,
    wait_archived,
    wait_substate,
    write_source,
)


def test_daq_with_two_hdf5_sources_and_keywords_passes_every_substate_to_the_receiver(
    dpm: DpmHarness,
) -> None:
    server = dpm.start()
    client = dpm.client(server)
    det1 = write_source(dpm.data / "raw" / "det1.h5", "det1", seed=1, attrs={"ESO INS MODE": "A"})
    det2 = write_source(
        dpm.data / "raw" / "det2.h5", "det2", seed=2, attrs={"ESO INS MODE": "B", "EXPTIME": 2.0}
    )
    stream = follow_from_now(dpm, client)

    spec = make_spec(
        "LIFE.2026-11-22T10:00:00.000",
        [
            hdf5_source("det1", dpm.data / "raw" / "det1.h5"),
            hdf5_source("det2", dpm.data / "raw" / "det2.h5"),
            keyword_source("ocm"),
        ],
        [dpm.receiver],
        file_id="LIFE_PRODUCT",
    )
    reply = client.queue_daq(spec)
    assert (reply.id, reply.error) == ("LIFE.2026-11-22T10:00:00.000", False)
    statuses = statuses_until_final(stream, reply.id)

    assert substate_names(statuses) == ["SCHEDULED", "COLLECTING", "MERGING", "RELEASING", "COMPLETED"]
    assert all(s.state == dpm_pb2.DAQ_STATE_MERGING for s in statuses[:-1])
    final = statuses[-1]
    assert final.state == dpm_pb2.DAQ_STATE_COMPLETED
    assert not final.error and list(final.alerts) == []
    assert final.file_id == "LIFE_PRODUCT"
    assert final.result == str(server.workspace / "products" / reply.id / "LIFE_PRODUCT.h5")

    released = dpm.receiver / "LIFE_PRODUCT.h5"
    assert visible_files(dpm.receiver) == ["LIFE_PRODUCT.h5"]
    assert os.stat(released).st_ino == os.stat(final.result).st_ino  # a hard link, not a copy
    assert os.stat(released).st_nlink == 2
    assert verify(released).ok
    with h5py.File(released, "r") as f:
        np.testing.assert_array_equal(f["det1/det1/data"][()], det1)
        np.testing.assert_array_equal(f["det2/det2/data"][()], det2)
        assert f.attrs["ESO INS MODE"] == "A"  # det1 comes first: it wins the collision
        assert f.attrs["EXPTIME"] == 2.0
        assert f.attrs["OBJECT"] == "M31"
        assert f.attrs["ESO DET DIT"] == 0.5
        assert "queued by the DPM tests" in " ".join(map(str, f.attrs["COMMENT"]))
        assert f.attrs["ARCFILE"] == "LIFE_PRODUCT.h5"

    exc = error_of(lambda: client.get_daq_status(reply.id))
    assert exc.code is ErrorCode.NOT_FOUND
    record = wait_archived(client, server, reply.id)
    assert [h["substate"] for h in record["history"]] == substate_names(statuses)
    assert [s["outcome"] for s in record["sources"]] == ["copied", "copied"]  # snapshots, never hard links
    assert record["receivers"][0]["outcome"] == "hardlink"
    assert (server.workspace / "archive" / reply.id / "logs" / "merge.log").stat().st_size > 0
    assert not (server.workspace / "archive" / reply.id / "sources").exists()
    # One INFO line per DAQ (the steps are DEBUG): its end, with the time spent in each substate.
    lines = [line for line in server.log_text().splitlines() if f"DAQ {reply.id}:" in line]
    assert len(lines) == 1 and " INFO " in lines[0], lines
    assert "COMPLETED" in lines[0]
    durations = lines[0].split("; ", 1)[1].split(", ")
    assert [part.split()[0] for part in durations] == substate_names(statuses)[:-1]


HOLD: dict[str, dict[str, Any]] = {
    "SCHEDULED": {"max_active_daqs": 0},
    "COLLECTING": {"debug_delays": {"COLLECTING": 600}},
    "MERGING": {"debug_delays": {"MERGING": 600}},
    "RELEASING": {"debug_delays": {"RELEASING": 600}},
}


@pytest.mark.parametrize("held_in", list(HOLD))
def test_abort_ends_the_daq_aborted_from_each_non_final_substate(dpm: DpmHarness, held_in: str) -> None:
    server = dpm.start(HOLD[held_in])
    client = dpm.client(server)
    source = dpm.source("det1")
    stream = follow_from_now(dpm, client)
    client.queue_daq(make_spec("ABORT1", [hdf5_source("det1", source)], [dpm.receiver]))
    wait_substate(client, "ABORT1", held_in)

    assert client.abort_daq("ABORT1").id == "ABORT1"

    statuses = statuses_until_final(stream, "ABORT1")
    assert substate_names(statuses)[-3:] == [held_in, "ABORTING", "ABORTED"]
    assert statuses[-1].state == dpm_pb2.DAQ_STATE_COMPLETED
    assert wait_archived(client, server, "ABORT1")["substate"] == "ABORTED"
    assert visible_files(dpm.receiver) == []  # nothing released, no temporary file left
    assert not (server.workspace / "daqs" / "ABORT1").exists()
    assert source.is_file()  # the original is never touched


def test_abort_of_an_archived_daq_is_not_found_and_its_id_cannot_be_queued_again(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    spec = make_spec("DONE1", [keyword_source()], [dpm.receiver])
    client.queue_daq(spec)
    assert wait_archived(client, server, "DONE1")["substate"] == "COMPLETED"

    exc = error_of(lambda: client.abort_daq("DONE1"))
    assert (exc.code, exc.id) == (ErrorCode.NOT_FOUND, "DONE1")
    assert "archived" in exc.message
    exc = error_of(lambda: client.queue_daq(spec))
    assert (exc.code, exc.id) == (ErrorCode.ALREADY_EXISTS, "DONE1")


def test_free_space_reserve_holds_the_daq_scheduled_with_a_storage_warning(dpm: DpmHarness) -> None:
    server = dpm.start({"free_space_reserve_bytes": 2**62, "storage_report_interval_s": 0.1})
    client = dpm.client(server)
    client.queue_daq(make_spec("SPACE1", [hdf5_source("det1", dpm.source("det1"))], [dpm.receiver]))
    status = wait_alert(client, "SPACE1", "storage")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_SCHEDULED
    assert not status.error  # a warning: nothing failed, the DAQ waits
    (alert,) = status.alerts
    assert alert.severity == dpm_pb2.ALERT_SEVERITY_WARNING
    assert "reserve is 4611686018427387904 bytes" in alert.description

    # The reserve is a server setting: the operator lowers it and restarts the server.
    server.stop()
    server.config["free_space_reserve_bytes"] = 1024
    server.start()
    record = wait_archived(client, server, "SPACE1")
    assert record["substate"] == "COMPLETED" and record["alerts"] == []
    assert (dpm.receiver / "SPACE1.product.h5").is_file()


def test_failed_merge_waits_for_retry_which_collects_the_sources_again(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    broken = dpm.data / "raw" / "det1.h5"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an HDF5 file")
    client.queue_daq(make_spec("MERGE1", [hdf5_source("det1", broken)], [dpm.receiver]))

    status = wait_alert(client, "MERGE1", "merging")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_MERGING and status.error
    internal = client.get_internal_daq_status("MERGE1")
    assert "merge attempt 1" in Path(internal.merge_log).read_text()

    # The source is rewritten in place; the collected snapshot still holds the broken bytes,
    # and the retry collects the source afresh.
    with open(broken, "r+b") as handle:
        handle.truncate(0)
    write_source(broken, "det1", seed=5)
    client.retry_merge_daq("MERGE1")

    record = wait_archived(client, server, "MERGE1")
    assert record["substate"] == "COMPLETED"
    assert record["alerts"] == []
    assert record["attempts"]["collect"] == 1
    assert record["attempts"]["merge"] == 2
    assert verify(dpm.receiver / "MERGE1.product.h5").ok


def test_a_backtracking_transform_regex_does_not_hold_the_merge_and_the_daq_completes(
    dpm: DpmHarness,
) -> None:
    # `(A+)+$` against 'AAA…AC' takes Python's re 2^n steps (the adversarial run: 23.6 s of the
    # only merge slot, doubling per character); with 60 A's this DAQ would never complete.
    long_name = "ESO DET " + "A" * 60 + "C"
    source = dpm.data / "raw" / "det.h5"
    write_source(source, "det", attrs={long_name: 1, "ESO DET AA": 2})
    rules = [{"type": "transform", "selectionPatterns": ["+e DET *"], "regex": "(A+)+$", "format": "X"}]
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("REGEX1", [hdf5_source("det", source, keywordRules=rules)], [dpm.receiver]))
    assert wait_archived(client, server, "REGEX1")["substate"] == "COMPLETED"
    with h5py.File(dpm.receiver / "REGEX1.product.h5") as f:
        assert f.attrs[long_name] == 1  # not matched: unchanged
        assert f.attrs["ESO DET X"] == 2 and "ESO DET AA" not in f.attrs


def test_a_source_declaring_an_empty_1_gib_dataset_is_released_as_a_small_product(dpm: DpmHarness) -> None:
    # The adversarial run: a 2.4 KB source declaring an empty 1 GiB dataset made a 1 GiB product.
    sparse = dpm.data / "raw" / "sparse.h5"
    sparse.parent.mkdir(parents=True)
    with h5py.File(sparse, "w") as f:
        f.create_dataset("empty", shape=(1 << 30,), dtype=np.uint8, chunks=(1 << 20,), fillvalue=7)
    assert sparse.stat().st_size < 8192
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("SPARSE1", [hdf5_source("s", sparse)], [dpm.receiver]))
    assert wait_archived(client, server, "SPARSE1")["substate"] == "COMPLETED"
    product = dpm.receiver / "SPARSE1.product.h5"
    assert product.stat().st_size < (1 << 20)
    with h5py.File(product) as f:
        empty = f["s/empty"]
        assert (empty.shape, empty.id.get_storage_size(), empty[-1]) == ((1 << 30,), 0, 7)
    assert verify(product).ok


def test_merge_running_past_merge_timeout_is_killed_with_an_error_and_can_be_retried(dpm: DpmHarness) -> None:
    source = dpm.source("det1")
    server = dpm.start({"merge_timeout_s": 0.001})  # shorter than any merge takes to start
    client = dpm.client(server)
    client.queue_daq(make_spec("SLOW1", [hdf5_source("det1", source)], [dpm.receiver]))

    status = wait_alert(client, "SLOW1", "merging")
    assert "timed out after 0.001 s (merge_timeout_s); the merge process was killed" in status.message
    assert not (server.workspace / "products" / "SLOW1" / "SLOW1.product.h5").exists()
    client.retry_merge_daq("SLOW1")  # accepted: the step runs again (and times out again)

    def merge_attempts() -> int:
        return sum(a.attempts for a in client.get_internal_daq_status("SLOW1").attempts if a.step == "merge")

    wait_for(lambda: merge_attempts() >= 2, 60, "the retried merge")
