"""The workspace on a full disk (servers/dpm/store.py): a small tmpfs holds the workspace."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daqif.errors import ErrorCode

from .dpm_helpers import DpmHarness, error_of, fill, hdf5_source, make_spec, small_tmpfs, wait_archived


@pytest.fixture
def small_disk(dpm: DpmHarness) -> Iterator[Path]:
    """`server0/` (the first server's directory, its workspace included) on a 4 MiB tmpfs."""
    with small_tmpfs(dpm.base / "server0", dpm) as mount_point:
        yield mount_point


def test_queue_on_a_full_disk_is_resource_exhausted_leaves_nothing_and_can_be_queued_again(
    dpm: DpmHarness, small_disk: Path
) -> None:
    source = dpm.source("det", frames=1)
    server = dpm.start()
    client = dpm.client(server)
    filler = fill(small_disk)
    spec = make_spec("FULL1", [hdf5_source("det", source)], [dpm.receiver])

    error = error_of(lambda: client.queue_daq(spec))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED and "is full" in str(error)
    assert not (server.workspace / "daqs" / "FULL1").exists()

    # The server starts again on the full disk, serves status, and resurrects nothing.
    server.stop()
    server.start()
    client = dpm.client(server)
    assert client.get_active_daqs() == []
    assert client.query_storage_status().available < 65536
    assert error_of(lambda: client.queue_daq(spec)).code is ErrorCode.RESOURCE_EXHAUSTED

    os.unlink(filler)  # space returns: the same id is queued and completes
    client.queue_daq(spec)
    assert wait_archived(client, server, "FULL1")["substate"] == "COMPLETED"
