"""Resuming after `kill -9` of the server: every DAQ completes, each product is released once."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from daqif.testing import wait_for
from daqif.v1 import dpm_pb2
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    freeze_running_merge,
    hdf5_source,
    keyword_source,
    make_spec,
    visible_files,
    wait_alert,
    wait_archived,
    wait_substate,
    write_source,
)

DAQS = ("CRASH1", "CRASH2")


@pytest.mark.parametrize("crash_in", ["COLLECTING", "MERGING", "RELEASING"])
def test_kill_9_then_restart_completes_every_daq_and_releases_each_product_once(
    dpm: DpmHarness, crash_in: str
) -> None:
    second = dpm.data / "olas2"
    second.mkdir()
    server = dpm.start({"debug_delays": {crash_in: 600}, "max_active_daqs": 2})
    client = dpm.client(server)
    for i, daq_id in enumerate(DAQS):
        source = dpm.source(f"det{i}", seed=i)
        client.queue_daq(
            make_spec(daq_id, [hdf5_source("det", source), keyword_source()], [dpm.receiver, second])
        )
    for daq_id in DAQS:
        wait_substate(client, daq_id, crash_in)

    server.kill()

    # Leave what the interrupted step may have left behind.
    daq_dir = server.workspace / "daqs" / "CRASH1"
    name = "CRASH1.product.h5"
    if crash_in == "COLLECTING":
        (daq_dir / "sources").mkdir(exist_ok=True)
        (daq_dir / "sources" / ".det.h5.daqif-tmp").write_bytes(b"half a copy")
    elif crash_in == "MERGING":
        products = server.workspace / "products" / "CRASH1"
        products.mkdir(parents=True, exist_ok=True)
        (products / name).write_bytes(b"a product whose merge was cut short")
        (products / f".{name}.part").write_bytes(b"partial")
    else:  # released to the first receiver just before the crash, not yet recorded
        os.link(server.workspace / "products" / "CRASH1" / name, dpm.receiver / name)
        (second / f".{name}.daqif-tmp").write_bytes(b"half a copy")

    server.config = {"max_active_daqs": 2}
    server.start()

    for daq_id in DAQS:
        record = wait_archived(client, server, daq_id)
        assert record["substate"] == "COMPLETED"
        assert [r["outcome"] for r in record["receivers"]] == ["hardlink", "hardlink"]
    names = sorted(f"{d}.product.h5" for d in DAQS)
    assert visible_files(dpm.receiver) == names  # no duplicate, no temporary file
    assert visible_files(second) == names
    for daq_id in DAQS:
        product = server.workspace / "products" / daq_id / f"{daq_id}.product.h5"
        assert verify(product).ok
        assert os.stat(product).st_nlink == 3  # workspace + two receivers: released once each
        assert os.stat(dpm.receiver / product.name).st_ino == os.stat(product).st_ino
        assert os.stat(second / product.name).st_ino == os.stat(product).st_ino


def test_a_copy_collected_before_a_crash_is_never_merged_the_restart_collects_the_source_afresh(
    dpm: DpmHarness,
) -> None:
    # Collected copies are not fsynced (src/servers/dpm/README.md): after a crash one may hold
    # anything. Here it holds zeros of the right size, which a size check would take for the copy.
    source = dpm.data / "raw" / "torn.h5"
    data = write_source(source, "cam", seed=3)
    server = dpm.start({"debug_delays": {"MERGING": 600}})
    client = dpm.client(server)
    client.queue_daq(make_spec("TORN1", [hdf5_source("det", source)], [dpm.receiver]))
    wait_substate(client, "TORN1", "MERGING")  # collected; the merge has not started
    server.kill()
    copy = server.workspace / "daqs" / "TORN1" / "sources" / "det.h5"
    copy.write_bytes(bytes(copy.stat().st_size))

    server.config = {}
    server.start()
    record = wait_archived(client, server, "TORN1")  # fails at an ERROR alert (a merge of zeros)
    assert record["substate"] == "COMPLETED"
    assert record["attempts"] == {"collect": 1, "merge": 1, "release": 1}
    product = dpm.receiver / "TORN1.product.h5"
    assert verify(product).ok
    with h5py.File(product) as merged:
        np.testing.assert_array_equal(merged["det/cam/data"][()], data)


def test_a_source_rewritten_before_a_crash_stops_the_daq_instead_of_reaching_the_product(
    dpm: DpmHarness,
) -> None:
    # A collected source is a snapshot. The copy of an earlier server run is not trusted (not
    # fsynced), so the restart collects the original again: rewritten since, it must not be merged.
    source = dpm.data / "raw" / "rewritten.h5"
    write_source(source, "cam", seed=3)
    server = dpm.start({"debug_delays": {"MERGING": 600}})
    client = dpm.client(server)
    client.queue_daq(make_spec("REWR1", [hdf5_source("det", source)], [dpm.receiver]))
    wait_substate(client, "REWR1", "MERGING")  # collected; the merge has not started
    server.kill()
    rewritten = write_source(source, "cam", seed=4)  # same shape and size, other pixels

    server.config = {}
    server.start()
    status = wait_alert(client, "REWR1", "collecting:det")
    alert = next(a for a in status.alerts if a.id == "collecting:det")
    assert status.error and "modified after it was collected" in alert.description
    assert "before the server restarted" in alert.description and "RetryMergeDaq" in alert.description
    assert not (dpm.receiver / "REWR1.product.h5").exists()

    client.retry_merge_daq("REWR1")  # the operator takes the source as it is now
    record = wait_archived(client, server, "REWR1")
    assert record["substate"] == "COMPLETED"
    with h5py.File(dpm.receiver / "REWR1.product.h5") as merged:
        np.testing.assert_array_equal(merged["det/cam/data"][()], rewritten)


def test_restart_resumes_every_queued_daq_in_queue_order(dpm: DpmHarness) -> None:
    server = dpm.start({"max_active_daqs": 0})
    client = dpm.client(server)
    source = dpm.source("det1")
    ids = [f"MANY{i:02d}" for i in range(12)]
    for daq_id in ids:
        client.queue_daq(make_spec(daq_id, [hdf5_source("det1", source), keyword_source()], [dpm.receiver]))
    assert [d.id for d in client.get_active_daqs()] == ids

    server.kill()
    server.config = {"max_active_daqs": 1}
    server.start()

    records = [wait_archived(client, server, daq_id) for daq_id in ids]
    assert all(r["substate"] == "COMPLETED" for r in records)
    started = [next(h["timestamp"] for h in r["history"] if h["substate"] == "COLLECTING") for r in records]
    assert started == sorted(started)
    assert visible_files(dpm.receiver) == sorted(f"{d}.product.h5" for d in ids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_kill_9_during_a_running_merge_takes_the_merge_process_down_too(dpm: DpmHarness) -> None:
    # The merge is frozen with SIGSTOP as soon as it runs: if it were not tied to the server, it
    # would stay forever. A frozen process still receives the SIGKILL sent when the server dies.
    source = dpm.data / "raw" / "big.h5"
    write_source(source, "big", frames=32, shape=(1024, 2048))
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("MERGE9", [hdf5_source("big", source)], [dpm.receiver]))

    merge_pid = wait_for(lambda: freeze_running_merge(server.pid), 60, "a running merge process")
    server.kill()
    wait_for(lambda: not _alive(merge_pid), 60, f"merge process {merge_pid} to die with the server")

    server.start()
    record = wait_archived(client, server, "MERGE9")
    assert record["attempts"]["merge"] == 2
    assert visible_files(dpm.receiver) == ["MERGE9.product.h5"]
    assert verify(dpm.receiver / "MERGE9.product.h5").ok


# A remote shell that never answers and starts a child of its own: what rsync leaves behind
# when it is killed, since its death signal reaches rsync alone.
HANGING_SHELL = """#!/bin/sh
sleep 3600 &
wait
"""


def _marked_processes(workspace: Path) -> list[int]:
    marker = f"DAQIF_DPM_WORKSPACE={workspace.resolve()}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if marker in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def test_rsync_children_left_by_a_kill_9_are_killed_when_the_server_starts_again(dpm: DpmHarness) -> None:
    shell = dpm.base / "hanging-ssh"
    shell.write_text(HANGING_SHELL)
    shell.chmod(0o755)
    server = dpm.start({"rsync_remote_shell": str(shell)})
    client = dpm.client(server)
    client.queue_daq(make_spec("HANG1", [hdf5_source("det", "remotehost:/data/det.h5")]))

    def shell_children() -> list[int]:
        return [
            p
            for p in _marked_processes(server.workspace)
            if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep")
        ]

    wait_for(shell_children, 60, "the remote shell's child")
    server.kill()
    assert not server.running
    leftovers = wait_for(shell_children, 30, "the leftovers")
    assert leftovers

    server.start()
    wait_for(lambda: not any(_alive(p) for p in leftovers), 30, "the leftovers to be killed")
    log = server.log_text()
    assert f"killed pid {leftovers[0]}" in log
    client.abort_daq("HANG1")  # its new rsync hangs too: the abort kills its whole group
    wait_for(lambda: not shell_children(), 30, "the abort to kill the new remote shell")


def test_a_merge_killed_after_it_took_the_collected_copy_is_retried_from_a_fresh_collection(
    dpm: DpmHarness,
) -> None:
    # The server's merges consume the collected copy the product starts from (renamed into the
    # part file, `--consume-collected`). A merge that dies after that must not leave the DAQ
    # without its snapshot: the retry collects every source again from the originals.
    first, second = dpm.data / "raw" / "first.h5", dpm.data / "raw" / "second.h5"
    write_source(first, "first", frames=24, shape=(1024, 2048), seed=1)  # 96 MiB: the product's start
    write_source(second, "second", frames=20, shape=(1024, 2048), seed=2)  # 80 MiB, copied by the merge
    originals = {path: path.read_bytes() for path in (first, second)}
    server = dpm.start()
    client = dpm.client(server)
    spec = make_spec("MOVED1", [hdf5_source("first", first), hdf5_source("second", second)], [dpm.receiver])
    collected = server.workspace / "daqs" / "MOVED1" / "sources"
    parts = server.workspace / "products" / "MOVED1"
    client.queue_daq(spec)

    def merge_that_took_the_copy() -> int | None:
        # Frozen the moment the collected copy of `first` has become the part file.
        if (collected / "first.h5").exists() or not any(parts.glob(".*.part")):
            return None
        return freeze_running_merge(server.pid)

    merge_pid = wait_for(merge_that_took_the_copy, 120, "a merge that moved the copy", interval=0.001)
    assert not (collected / "first.h5").exists() and (collected / "second.h5").exists()
    os.kill(merge_pid, signal.SIGKILL)
    status = wait_alert(client, "MOVED1", "merging")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_MERGING and status.error

    client.retry_merge_daq("MOVED1")
    record = wait_archived(client, server, "MOVED1", timeout=180)
    assert record["substate"] == "COMPLETED"
    assert record["attempts"]["merge"] == 2
    # Both sources were collected again, after the first merge began, and the second attempt
    # started from its own fresh copy.
    merging = next(h["timestamp"] for h in record["history"] if h["substate"] == "MERGING")
    assert all(s["timestamp"] > merging and s["outcome"] == "copied" for s in record["sources"])
    log = (server.workspace / "archive" / "MOVED1" / "logs" / "merge.log").read_text()
    # The retry moved its own fresh copy too (the first attempt's rename is shown above; it may
    # have been frozen before it logged it).
    retry_log = log.split("=== merge attempt 2")[1]
    assert "(a collected copy) moved to the product" in retry_log, log
    product = dpm.receiver / "MOVED1.product.h5"
    assert visible_files(dpm.receiver) == [product.name]
    assert verify(product).ok
    with h5py.File(product, "r") as f, h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        assert np.array_equal(f["first/first/data"][()], a["first/data"][()])
        assert np.array_equal(f["second/second/data"][()], b["second/data"][()])
    assert all(path.read_bytes() == data for path, data in originals.items())  # never touched
