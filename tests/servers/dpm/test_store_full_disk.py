"""The workspace on a full disk (servers/dpm/store.py): a small tmpfs holds the workspace."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daqif.errors import ErrorCode

from .dpm_helpers import DpmHarness, error_of, hdf5_source, make_spec, wait_archived


@pytest.fixture
def small_disk(dpm: DpmHarness) -> Iterator[Path]:
    """`server0/` (the first server's directory, its workspace included) on a 4 MiB tmpfs."""
    mount_point = dpm.base / "server0"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        dpm.close()  # the servers first: their files are on it
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(directory: Path) -> Path:
    """Take every free block of `directory`'s file system."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):  # large writes, then the last partial blocks
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_queue_on_a_full_disk_is_resource_exhausted_leaves_nothing_and_can_be_queued_again(
    dpm: DpmHarness, small_disk: Path
) -> None:
    source = dpm.source("det", frames=1)
    server = dpm.start()
    client = dpm.client(server)
    filler = _fill(small_disk)
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
