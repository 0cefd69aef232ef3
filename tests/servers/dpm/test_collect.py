"""Collecting sources: missing files, rsync over a remote shell, copies across file systems."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daqif.testing import wait_for
from daqif.v1 import dpm_pb2
from servers.common.process import system_tool
from servers.dpm.merge import verify

from .dpm_helpers import (
    REMOTE_SHELL_SHIM,
    DpmHarness,
    complete_one,
    hdf5_source,
    make_spec,
    wait_alert,
    wait_archived,
    write_source,
)


def test_missing_source_waits_in_collecting_until_created_and_retried(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    missing = dpm.data / "raw" / "late.h5"
    client.queue_daq(make_spec("LATE1", [hdf5_source("late", missing)], [dpm.receiver]))

    status = wait_alert(client, "LATE1", "collecting:late")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_COLLECTING
    assert status.error
    (alert,) = status.alerts
    assert alert.severity == dpm_pb2.ALERT_SEVERITY_ERROR
    assert alert.description == f"source {missing} does not exist"
    internal = client.get_internal_daq_status("LATE1")
    assert internal.sources[0].outcome.startswith("failed: ")

    data = write_source(missing, "late", seed=3)
    client.retry_merge_daq("LATE1")

    record = wait_archived(client, server, "LATE1")
    assert record["substate"] == "COMPLETED" and record["alerts"] == []
    assert record["attempts"]["collect"] == 2
    with h5py.File(dpm.receiver / "LATE1.product.h5", "r") as f:
        np.testing.assert_array_equal(f["late/late/data"][()], data)


def test_remote_source_is_fetched_with_rsync_through_the_remote_shell(
    dpm: DpmHarness, remote_shell: str
) -> None:
    # The "remote" file lies outside the allowed roots: remote locations are not confined
    # locally, they are whatever the remote shell gives access to.
    remote_dir = dpm.base / "remote-host"
    data = write_source(remote_dir / "det9.h5", "det9", seed=9)
    server = dpm.start({"rsync_remote_shell": remote_shell})
    client = dpm.client(server)
    location = f"operator@detector-host:{remote_dir / 'det9.h5'}"
    client.queue_daq(make_spec("REMOTE1", [hdf5_source("det9", location)], [dpm.receiver]))

    record = wait_archived(client, server, "REMOTE1")
    assert record["substate"] == "COMPLETED", record["alerts"]
    (source,) = record["sources"]
    assert (source["location"], source["outcome"]) == (location, "rsync")
    assert source["bytes"] == (remote_dir / "det9.h5").stat().st_size
    with h5py.File(dpm.receiver / "REMOTE1.product.h5", "r") as f:
        np.testing.assert_array_equal(f["det9/det9/data"][()], data)


def test_unreachable_remote_source_raises_an_error_alert_with_rsyncs_reason(
    dpm: DpmHarness, remote_shell: str
) -> None:
    server = dpm.start({"rsync_remote_shell": remote_shell})
    client = dpm.client(server)
    client.queue_daq(make_spec("REMOTE2", [hdf5_source("det9", "host:/nonexistent/det9.h5")], [dpm.receiver]))
    status = wait_alert(client, "REMOTE2", "collecting:det9")
    (alert,) = status.alerts
    assert alert.description.startswith("rsync of host:/nonexistent/det9.h5 failed: ")
    assert "No such file or directory" in alert.description


@pytest.fixture
def other_file_system() -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm): not the workspace's file system, so links fail."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="daqif-dpm-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_source_on_another_file_system_is_copied(dpm: DpmHarness, other_file_system: Path) -> None:
    source = other_file_system / "det1.h5"
    data = write_source(source, "det1", seed=4)
    server = dpm.start(allowed_roots=[dpm.data, other_file_system])
    client = dpm.client(server)
    client.queue_daq(make_spec("COPY1", [hdf5_source("det1", source)], [dpm.receiver]))

    record = wait_archived(client, server, "COPY1")
    assert record["sources"][0]["outcome"] == "copied"
    assert record["sources"][0]["bytes"] == source.stat().st_size
    product = dpm.receiver / "COPY1.product.h5"
    assert verify(product).ok
    with h5py.File(product, "r") as f:
        np.testing.assert_array_equal(f["det1/det1/data"][()], data)


def test_target_source_is_collected_and_becomes_the_base_of_the_product(dpm: DpmHarness) -> None:
    base = write_source(dpm.data / "raw" / "base.h5", "base", seed=7, attrs={"ORIGIN": "ESO"})
    det1 = dpm.source("det1", seed=8)
    server = dpm.start()
    client = dpm.client(server)
    spec = make_spec("BASE1", [hdf5_source("det1", det1)], [dpm.receiver])
    spec["target"]["source"] = hdf5_source("base", dpm.data / "raw" / "base.h5")
    client.queue_daq(spec)

    record = wait_archived(client, server, "BASE1")
    assert [(s["source_name"], s["outcome"]) for s in record["sources"]] == [
        ("base", "copied"),
        ("det1", "copied"),
    ]
    with h5py.File(dpm.receiver / "BASE1.product.h5", "r") as f:
        np.testing.assert_array_equal(f["base/data"][()], base)  # the base's layout, at the root
        assert "det1/det1/data" in f
        assert f.attrs["ORIGIN"] == "ESO"


# Like ssh: the options and the host dropped, the rest handed to a shell as one command line.
SSH_LIKE_SHELL = REMOTE_SHELL_SHIM.replace('exec "$@"', 'exec sh -c "$*"')


def test_a_remote_path_is_never_run_by_the_remote_shell(dpm: DpmHarness, tmp_path: Path) -> None:
    """rsync's --protect-args sends the path as data: a real remote shell would otherwise split it at
    spaces and run the `$(...)` in it."""
    shell = tmp_path / "ssh-like"
    shell.write_text(SSH_LIKE_SHELL)
    shell.chmod(0o755)
    marker = tmp_path / "PWNED"
    remote_dir = dpm.base / "remote host"
    name = f"det 9 $(touch {marker}).h5"
    data = write_source(remote_dir / name, "det9", seed=9)
    # RSYNC_OLD_ARGS=1 turns off the escaping newer rsyncs do by default: only --protect-args guards.
    server = dpm.start({"rsync_remote_shell": str(shell), "rsync_command": "env RSYNC_OLD_ARGS=1 rsync"})
    client = dpm.client(server)
    location = f"detector-host:{remote_dir / name}"
    client.queue_daq(make_spec("REMOTE2", [hdf5_source("det9", location)], [dpm.receiver]))

    record = wait_archived(client, server, "REMOTE2")
    assert record["substate"] == "COMPLETED", record["alerts"]
    assert not marker.exists(), "the remote shell ran a command from the path"
    with h5py.File(dpm.receiver / "REMOTE2.product.h5", "r") as f:
        np.testing.assert_array_equal(f["det9/det9/data"][()], data)


def test_a_grouped_writers_file_is_collected_with_its_parts_and_merged_by_value(
    dpm: DpmHarness, sim_factory: Any, tcp_port: int, tmp_path: Path
) -> None:
    """A writer group's `output_file` (`daqif-writer --workers 2`: a virtual dataset over two part
    files) queued as an `hdf5File` source: the product holds every frame by value."""
    import json

    from std_daq_client import StdDaqClient

    from daqif.frame import expected_frame
    from servers.common.launch import WriterOptions, WriterProcess

    server = dpm.start()
    client = dpm.client(server)
    n, shape = 60, (24, 16)
    config = tmp_path / "detector.json"
    config.write_text(
        json.dumps(
            {"detector_name": "GDET", "bit_depth": 16, "image_pixel_height": 24, "image_pixel_width": 16}
        )
    )
    raw = dpm.data / "raw"
    raw.mkdir()
    options = WriterOptions(stream=f"tcp://127.0.0.1:{tcp_port}", data_root=raw, config=config, workers=2)
    output = raw / "grouped.h5"
    with WriterProcess(options, log_file=tmp_path / "writer.log").start() as writer:
        writer_client = StdDaqClient(url_base=writer.rest_url)
        writer_client.start_writer_async({"output_file": str(output), "n_images": n})
        # The data paths connect to the simulator once it binds, each within ZeroMQ's 100 ms reconnect
        # interval: 0.6 s of frames reach both (at 500 Hz the 60 frames could all go to the first).
        sim = sim_factory("--shape", *map(str, shape), "--count", str(n), "--rate", "100", port=tcp_port)
        assert sim.wait_done().frames_sent == n
        wait_for(lambda: writer_client.get_status()["state"] == "READY", what="the grouped write to end")
        assert writer_client.get_status()["acquisition"]["stats"]["n_write_completed"] == n
    with h5py.File(output, "r") as f:
        assert f["GDET/data"].is_virtual
        assert len(f["GDET/data"].virtual_sources()) >= 2

    client.queue_daq(make_spec("GROUP1", [hdf5_source("det", output)], [dpm.receiver], "GROUPED"))
    record = wait_archived(client, server, "GROUP1")
    assert record["substate"] == "COMPLETED", record["alerts"]
    (source,) = record["sources"]
    assert source["references"] == 2, "both part files were collected with the combined file"
    product = dpm.receiver / "GROUPED.h5"
    assert verify(product).ok
    with h5py.File(product, "r") as f:
        data = f["det/GDET/data"]
        assert not data.is_virtual, "the product holds the frames by value"
        frames = data[:]
        assert frames.shape == (n, *shape)
        for row in range(n):
            np.testing.assert_array_equal(frames[row], expected_frame(row + 1, shape, "uint16"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_largest_collected_copy_becomes_the_product_and_the_originals_are_untouched(
    dpm: DpmHarness,
) -> None:
    large = dpm.source("large", frames=64, shape=(128, 128), seed=1)  # 2 MiB: the clone
    small = dpm.source("small", frames=4, shape=(128, 128), seed=2)
    before = {path: (_digest(path), path.stat().st_mtime_ns) for path in (large, small)}
    server = dpm.start()
    client = dpm.client(server)
    client.queue_daq(
        make_spec("MOVE1", [hdf5_source("large", large), hdf5_source("small", small)], [dpm.receiver])
    )
    assert wait_archived(client, server, "MOVE1")["substate"] == "COMPLETED"

    log = (server.workspace / "archive" / "MOVE1" / "logs" / "merge.log").read_text()
    assert "sources/large.h5 (a collected copy) moved to the product" in log
    assert "small.h5 (a collected copy) moved" not in log
    assert {path: (_digest(path), path.stat().st_mtime_ns) for path in (large, small)} == before
    product = dpm.receiver / "MOVE1.product.h5"
    assert product.stat().st_ino not in {large.stat().st_ino, small.stat().st_ino}
    assert verify(product).ok
    with h5py.File(product) as f, h5py.File(large) as a, h5py.File(small) as b:
        assert np.array_equal(f["large/large/data"][()], a["large/data"][()])
        assert np.array_equal(f["small/small/data"][()], b["small/data"][()])


def _shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents FIEMAP flags as shared with another file (`filefrag -v`)."""
    report = subprocess.run(
        [system_tool("filefrag") or "filefrag", "-v", "-b4096", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    shared = 0
    for line in report.stdout.splitlines():
        fields = line.replace(":", " ").split()
        if fields and fields[0].isdigit() and "shared" in line:
            shared += int(fields[5]) * 4096  # ext, logical start, end, physical start, end, length
    return shared


@contextlib.contextmanager
def _xfs_with_reflinks(directory: Path) -> Iterator[Path]:
    """A fresh XFS (reflink=1) in a sparse image in `directory`, loop-mounted for the test.

    Root and xfsprogs are needed (`tools/setup.sh --test` installs it): the test fails loudly,
    naming the command, where either is missing; it is never skipped."""
    image, mount_point = directory / "xfs.img", directory / "xfs"
    with open(image, "wb") as handle:
        handle.truncate(512 << 20)  # XFS's minimum is 300 MiB; sparse, so it costs what is written
    mkfs = system_tool("mkfs.xfs") or "mkfs.xfs"  # in /usr/sbin: not on a plain user's PATH
    for argv in ([mkfs, "-q", "-m", "reflink=1", str(image)], ["mount", "-o", "loop", str(image)]):
        if argv[0] == "mount":
            mount_point.mkdir()
            argv.append(str(mount_point))
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()} (needs root and xfsprogs)"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        image.unlink()


def test_on_xfs_the_collected_copy_shares_the_originals_extents_and_stays_a_snapshot(tmp_path: Path) -> None:
    with _xfs_with_reflinks(tmp_path) as mounted:
        (mounted / "dpm").mkdir()
        harness = DpmHarness(mounted / "dpm")
        try:
            source = harness.source("det", frames=128, shape=(256, 256), seed=3)  # 16 MiB
            with h5py.File(source) as f:
                frames = f["det/data"][()]
            server = harness.start()
            client = harness.client(server)
            client.queue_daq(make_spec("REFLINK1", [hdf5_source("det", source)], [harness.receiver]))
            assert wait_archived(client, server, "REFLINK1")["substate"] == "COMPLETED"
            product = harness.receiver / "REFLINK1.product.h5"

            # The product is the collected copy (moved): its data blocks are the original's.
            assert _shared_bytes(product) >= frames.nbytes - (1 << 20)
            assert _shared_bytes(source) >= frames.nbytes - (1 << 20)
            # A snapshot, not a link: the original rewritten in place leaves the product as it was.
            with open(source, "r+b") as handle:
                handle.seek(source.stat().st_size // 2)
                handle.write(b"\xff" * 65536)
                os.fsync(handle.fileno())
            assert verify(product).ok
            with h5py.File(product) as f:
                assert np.array_equal(f["det/det/data"][()], frames)
        finally:
            harness.close()


def _stopped_direct_io_write(source: Path, n_images: int = 1024, written: int = 8) -> np.ndarray:
    """A writer's file of 1 MiB frames written with direct I/O and stopped after `written` of
    `n_images` frames: its size is that of `n_images` frames, nearly all of it a hole (the writer
    allocates storage for every frame of a write: docs/writer.md, "Direct I/O"). The frames."""
    from daqif.frame import decode_header, encode_daqif_header
    from servers.writer.datapath.api import WriteJob
    from servers.writer.datapath.output import OutputFile

    source.parent.mkdir(parents=True, exist_ok=True)
    shape = (512, 1024)
    job = WriteJob(
        output_file=str(source), n_images=n_images, run_id="r1", detector_name="det",
        height=shape[0], width=shape[1], dtype="uint16",
    )  # fmt: skip
    frames = np.random.default_rng(5).integers(0, 4000, size=(written, *shape), dtype=np.uint16)
    out = OutputFile(job, 1.0, direct_io=True)
    for i in range(written):
        out.append(decode_header(encode_daqif_header(i, *shape, "uint16")), frames[i].tobytes())
    assert out.direct is not None, "the frames went through direct I/O"
    out.close()
    assert source.stat().st_size > n_images * frames[0].nbytes and source.stat().st_blocks * 512 < 64 << 20
    return frames


def _assert_sparse_product(product: Path, frames: np.ndarray) -> None:
    assert verify(product).ok
    with h5py.File(product, "r") as f:
        np.testing.assert_array_equal(f["det/det/data"][()], frames)
    # The frames' blocks, not the holes'.
    assert product.stat().st_blocks * 512 < 64 << 20, product.stat()


def test_a_stopped_direct_io_write_stays_sparse_through_collect_merge_and_release(dpm: DpmHarness) -> None:
    # Collected, merged and released, a 1 GiB file of 8 MiB of frames must not become 1 GiB of zeros.
    source = dpm.data / "raw" / "stopped.h5"
    frames = _stopped_direct_io_write(source)

    _assert_sparse_product(complete_one(dpm, "SPARSE1", [hdf5_source("det", source)]), frames)


def test_a_stopped_direct_io_write_collected_over_rsync_stays_sparse(
    dpm: DpmHarness, remote_shell: str
) -> None:
    remote = dpm.base / "detector-host" / "stopped.h5"
    frames = _stopped_direct_io_write(remote)

    sources = [hdf5_source("det", f"detector-host:{remote}")]
    product = complete_one(dpm, "SPARSE2", sources, {"rsync_remote_shell": remote_shell})
    _assert_sparse_product(product, frames)


def test_a_stopped_direct_io_write_larger_than_the_workspace_disk_is_merged_by_its_frames(
    dpm: DpmHarness,
) -> None:
    # A 64 MiB disk for a product of 1 GiB in size and 8 MiB in blocks: the DPM waits for the
    # space the product takes, not for its size (it would wait for ever).
    from .dpm_helpers import small_tmpfs

    source = dpm.data / "raw" / "stopped.h5"
    frames = _stopped_direct_io_write(source)
    with small_tmpfs(dpm.base / "server0", dpm, size="64m"):
        server = dpm.start({"free_space_reserve_bytes": 16 << 20, "storage_report_interval_s": 0.1})
        client = dpm.client(server)
        client.queue_daq(make_spec("SPARSE3", [hdf5_source("det", source)], [dpm.receiver]))
        record = wait_archived(client, server, "SPARSE3", timeout=60)
        assert record["substate"] == "COMPLETED" and record["alerts"] == [], record["alerts"]
        assert 0 < record["sources"][0]["stored_bytes"] < 64 << 20
    _assert_sparse_product(dpm.receiver / "SPARSE3.product.h5", frames)
