"""Releasing the product: failures and retry, remote receivers, symlinks and copies."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daqif.errors import ErrorCode
from daqif.v1 import dpm_pb2
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    error_of,
    hdf5_source,
    make_spec,
    visible_files,
    wait_alert,
    wait_archived,
)


def test_receiver_that_cannot_be_written_waits_in_releasing_until_retried(dpm: DpmHarness) -> None:
    # The tests run as root, for whom permissions do not stop a write; a receiver path that is
    # a regular file is a receiver directory nobody can write into.
    blocked = dpm.data / "blocked"
    blocked.write_text("a file where the receiver directory should be")
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("REL1", [hdf5_source("det1", dpm.source("det1"))], [dpm.receiver, blocked]))

    status = wait_alert(client, "REL1", "releasing:1")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_RELEASING and status.error
    assert [a.id for a in status.alerts] == ["releasing:1"]
    assert status.alerts[0].description == f"receiver path {blocked} is not a directory"
    internal = client.get_internal_daq_status("REL1")
    assert [r.outcome for r in internal.receivers] == ["hardlink", internal.receivers[1].outcome]
    assert internal.receivers[1].outcome.startswith("failed: ")

    blocked.unlink()
    blocked.mkdir()
    client.retry_merge_daq("REL1")

    record = wait_archived(client, server, "REL1")
    assert record["substate"] == "COMPLETED" and record["alerts"] == []
    assert [r["outcome"] for r in record["receivers"]] == ["hardlink", "hardlink"]
    first, second = dpm.receiver / "REL1.product.h5", blocked / "REL1.product.h5"
    assert os.stat(first).st_ino == os.stat(second).st_ino
    assert os.stat(first).st_nlink == 3  # the workspace product and two receivers: once each
    assert visible_files(blocked) == ["REL1.product.h5"]


def test_receiver_holding_another_file_of_that_name_is_not_overwritten(dpm: DpmHarness) -> None:
    (dpm.receiver / "REL2.product.h5").write_text("someone else's file")
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(make_spec("REL2", [hdf5_source("det1", dpm.source("det1"))], [dpm.receiver]))
    status = wait_alert(client, "REL2", "releasing:0")
    assert "already exists and is not this product" in status.alerts[0].description
    assert (dpm.receiver / "REL2.product.h5").read_text() == "someone else's file"


def test_remote_receiver_gets_the_product_through_rsync(dpm: DpmHarness, remote_shell: str) -> None:
    remote_dir = dpm.base / "archive-host" / "incoming"
    remote_dir.mkdir(parents=True)
    server = dpm.start({"rsync_remote_shell": remote_shell})
    client = dpm.client(server)
    receiver = {"type": "olasReceiver", "path": str(remote_dir), "host": "archive-host"}
    client.queue_daq(make_spec("REL3", [hdf5_source("det1", dpm.source("det1"))], [receiver]))

    record = wait_archived(client, server, "REL3")
    assert record["substate"] == "COMPLETED", record["alerts"]
    assert record["receivers"][0]["outcome"] == "rsync"
    assert record["receivers"][0]["released_path"] == f"archive-host:{remote_dir}/REL3.product.h5"
    assert visible_files(remote_dir) == ["REL3.product.h5"]
    assert verify(remote_dir / "REL3.product.h5").ok


@pytest.fixture
def other_file_system() -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="daqif-dpm-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_receiver_on_another_file_system_gets_a_symlink_if_allowed_else_a_copy(
    dpm: DpmHarness, other_file_system: Path
) -> None:
    linked, copied = other_file_system / "linked", other_file_system / "copied"
    linked.mkdir()
    copied.mkdir()
    server = dpm.start(allowed_roots=[dpm.data, other_file_system])
    client = dpm.client(server)
    receivers: list[dict[str, Any]] = [
        {"type": "olasReceiver", "path": str(linked), "options": {"allowSymlink": True}},
        {"type": "olasReceiver", "path": str(copied)},
    ]
    client.queue_daq(make_spec("REL4", [hdf5_source("det1", dpm.source("det1"))], receivers))

    record = wait_archived(client, server, "REL4")
    assert [r["outcome"] for r in record["receivers"]] == ["symlink", "copy"]
    product = Path(record["result"])
    assert os.readlink(linked / "REL4.product.h5") == str(product)
    assert product.is_file()  # archiving did not move the product the symlink points to
    assert not (copied / "REL4.product.h5").is_symlink()
    assert verify(copied / "REL4.product.h5").ok
    assert visible_files(linked) == ["REL4.product.h5"] and visible_files(copied) == ["REL4.product.h5"]


@pytest.mark.parametrize(
    ("receiver", "where"),
    [
        ({"type": "olasReceiver", "host": "-e", "path": "/data/olas"}, "receivers[0].host"),
        ({"type": "olasReceiver", "host": "--rsh=sh -c id", "path": "/data/olas"}, "receivers[0].host"),
        (
            {"type": "olasReceiver", "host": "-oProxyCommand=x@host", "path": "/data/olas"},
            "receivers[0].host",
        ),
    ],
)
def test_a_receiver_host_rsync_would_read_as_an_option_is_refused_at_queue_daq_and_nothing_runs(
    dpm: DpmHarness, receiver: dict[str, Any], where: str
) -> None:
    # What the adversarial run saw: host "-e" became rsync's -e option, the DAQ completed and
    # nothing was delivered. Now QueueDaq refuses it, and the server goes on serving.
    server = dpm.start()
    client = dpm.client(server)
    error = error_of(
        lambda: client.queue_daq(make_spec("OPT1", [hdf5_source("det", dpm.source("det"))], [receiver]))
    )
    assert (error.code, error.id) == (ErrorCode.INVALID_ARGUMENT, "OPT1")
    assert where in error.message and "never an option" in error.message
    assert not (server.workspace / "daqs" / "OPT1").exists()
    assert client.get_active_daqs() == []
