"""The steps on a small disk (servers/dpm/phases.py): the product waits for space above the
free-space reserve, and a disk that fills during collect, merge or release is that step's ERROR
alert, leaves no partial file and is completed by RetryMergeDaq once space returns.

Each test puts the workspace (or the receiver) on a real tmpfs of a few MiB and fills it.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from daqif.v1 import dpm_pb2
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    fill,
    hdf5_source,
    make_spec,
    small_tmpfs,
    visible_files,
    wait_alert,
    wait_archived,
    write_source,
)

MIB = 1 << 20
NO_SPACE = "No space left on device"


def _source(dpm: DpmHarness, name: str) -> Path:
    """A 1 MiB source like the writer's."""
    path = dpm.data / "raw" / f"{name}.h5"
    write_source(path, name, frames=8, shape=(256, 256))
    return path


def _virtual_source(dpm: DpmHarness, name: str, copies: int) -> Path:
    """A small source whose `copies` virtual datasets each map all of a 1 MiB file beside it."""
    frames = _source(dpm, f"{name}-frames")
    path = dpm.data / "raw" / f"{name}.h5"
    with h5py.File(path, "w") as f:
        for i in range(copies):
            layout = h5py.VirtualLayout(shape=(8, 256, 256), dtype="uint16")
            vsource = h5py.VirtualSource(frames.name, f"{name}-frames/data", shape=(8, 256, 256))
            layout[0:8] = vsource[0:8]
            f.create_virtual_dataset(f"{name}/view{i}", layout)
    return path


def _alert(status: dpm_pb2.DaqStatus, alert_id: str) -> dpm_pb2.DaqAlert:
    return next(a for a in status.alerts if a.id == alert_id)


def _files(directory: Path) -> list[str]:
    """Every file below `directory`, relative, hidden ones included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_a_product_that_does_not_fit_above_the_reserve_waits_in_merging_and_completes_when_space_returns(
    dpm: DpmHarness,
) -> None:
    with small_tmpfs(dpm.base / "server0", dpm) as disk:
        source = _source(dpm, "det")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * MIB)
        # ~2.9 MiB free: enough to collect 1 MiB above the reserve, not for the product as well.
        server = dpm.start({"free_space_reserve_bytes": 3 * MIB // 2, "storage_report_interval_s": 0.1})
        client = dpm.client(server)
        client.queue_daq(make_spec("ROOM1", [hdf5_source("det", source)], [dpm.receiver]))

        status = wait_alert(client, "ROOM1", "storage")
        assert status.substate == dpm_pb2.DAQ_SUB_STATE_MERGING and not status.error
        alert = _alert(status, "storage")
        assert alert.severity == dpm_pb2.ALERT_SEVERITY_WARNING
        assert f"the product may need {source.stat().st_size} bytes" in alert.description
        assert f"reserve is {3 * MIB // 2} bytes" in alert.description
        # Nothing of the product was written, nothing released.
        assert not (server.workspace / "products" / "ROOM1").exists()
        assert visible_files(dpm.receiver) == []

        filler.unlink()  # space returns: the DAQ goes on by itself
        record = wait_archived(client, server, "ROOM1")
        assert record["substate"] == "COMPLETED" and record["alerts"] == []
        assert verify(dpm.receiver / "ROOM1.product.h5").ok


def test_a_disk_that_fills_during_collect_is_an_error_that_leaves_no_partial_copy_and_a_retry_completes(
    dpm: DpmHarness,
) -> None:
    with small_tmpfs(dpm.base / "server0", dpm) as disk:
        source = _source(dpm, "det")
        server = dpm.start()
        client = dpm.client(server)
        filler = fill(disk, leave=256 * 1024)  # room for the DAQ's status, not for its source
        client.queue_daq(make_spec("FULLC", [hdf5_source("det", source)], [dpm.receiver]))

        status = wait_alert(client, "FULLC", "collecting:det")
        assert status.substate == dpm_pb2.DAQ_SUB_STATE_COLLECTING and status.error
        assert NO_SPACE in _alert(status, "collecting:det").description
        # No partial copy (the status file itself is written at the store's checkpoint).
        assert [f for f in _files(server.workspace / "daqs" / "FULLC") if f != "daq.json"] == []

        filler.unlink()
        client.retry_merge_daq("FULLC")
        assert wait_archived(client, server, "FULLC")["substate"] == "COMPLETED"
        assert verify(dpm.receiver / "FULLC.product.h5").ok


def test_a_disk_that_fills_during_the_merge_is_an_error_that_leaves_no_partial_product_and_a_retry_completes(
    dpm: DpmHarness,
) -> None:
    with small_tmpfs(dpm.base / "server0", dpm, size="8m") as disk:
        # Each virtual dataset is written by value: 1 MiB collected makes a 3 MiB product.
        source = _virtual_source(dpm, "det", copies=3)
        server = dpm.start()
        client = dpm.client(server)
        # After the 1 MiB collection 2 MiB stay free: the expected product (1 MiB) fits, it does not.
        filler = fill(disk, leave=3 * MIB)
        client.queue_daq(make_spec("FULLM", [hdf5_source("det", source)], [dpm.receiver]))

        status = wait_alert(client, "FULLM", "merging")
        assert status.substate == dpm_pb2.DAQ_SUB_STATE_MERGING and status.error
        assert NO_SPACE in _alert(status, "merging").description
        assert not (server.workspace / "products" / "FULLM").exists()  # no partial product
        assert visible_files(dpm.receiver) == []  # nothing released

        filler.unlink()
        client.retry_merge_daq("FULLM")
        assert wait_archived(client, server, "FULLM")["substate"] == "COMPLETED"
        product = dpm.receiver / "FULLM.product.h5"
        assert verify(product).ok
        with h5py.File(product) as f:
            assert f["det/det/view2"].shape == (8, 256, 256) and not f["det/det/view2"].is_virtual


def test_a_receiver_disk_that_fills_during_release_is_an_error_that_leaves_nothing_and_a_retry_completes(
    dpm: DpmHarness,
) -> None:
    with small_tmpfs(dpm.data / "small-olas", dpm) as receiver:
        source = _source(dpm, "det")
        server = dpm.start()
        client = dpm.client(server)
        filler = fill(receiver, leave=256 * 1024)  # the product is copied: another file system
        client.queue_daq(make_spec("FULLR", [hdf5_source("det", source)], [receiver]))

        status = wait_alert(client, "FULLR", "releasing:0")
        assert status.substate == dpm_pb2.DAQ_SUB_STATE_RELEASING and status.error
        assert NO_SPACE in _alert(status, "releasing:0").description
        assert visible_files(receiver) == ["filler"]  # no partial product, no temporary file

        filler.unlink()
        client.retry_merge_daq("FULLR")
        record = wait_archived(client, server, "FULLR")
        assert record["substate"] == "COMPLETED"
        assert record["receivers"][0]["outcome"] == "copy"
        assert verify(receiver / "FULLR.product.h5").ok
