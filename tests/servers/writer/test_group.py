"""Writer groups (`servers.writer.group`): real writers on one real PUSH simulator, driven through
the coordinator with the published `std_daq_client`; the combined file is a real virtual dataset
over the members' part files."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
from std_daq_client import StdDaqAdminException, StdDaqClient

from daqif.frame import expected_frame
from daqif.testing import wait_for
from servers.common.launch import WriterProcess, free_port
from servers.writer.group import part_path

from .conftest import DETECTOR_NAME, SHAPE, RedisServer, WriterFactory, rest_status

N = 200


def sync_write_while_sim_sends(coordinator: WriterProcess, sim_factory: Any, port: int, path: Path) -> Any:
    """`start_writer_sync` of N frames to the coordinator; the simulator sends exactly N frames
    once the write is open (paced so every member's connection is up)."""
    replies: list[Any] = []

    def write() -> None:
        try:
            replies.append(
                StdDaqClient(url_base=coordinator.rest_url).start_writer_sync(
                    {"output_file": str(path), "n_images": N}
                )
            )
        except Exception as exc:
            replies.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    wait_for(lambda: rest_status(coordinator)["state"] == "WRITING")
    sim = sim_factory("--shape", *map(str, SHAPE), "--count", str(N), "--rate", "500", port=port)
    assert sim.wait_done().frames_sent == N
    thread.join(60)
    assert not thread.is_alive()
    return replies[0]


FRAME_BYTES = int(np.prod(SHAPE)) * 2  # uint16


def bytes_written_by(pid: int) -> int:
    """Bytes process `pid` passed to write calls so far (`/proc/PID/io` wchar): a data path's
    frames reach its file in batches, at the latest at each flush (about once a second), and it
    writes nothing else of their size while a write is open."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["wchar"])


def wait_both_recording(coordinator: WriterProcess, member: WriterProcess) -> None:
    """Until the member and the coordinator's own data path both wrote frames: PUSH deals only to
    the connections already up, and each data path connects within its own reconnect interval."""

    def written(writer: WriterProcess) -> int:
        return int(rest_status(writer)["acquisition"]["stats"]["n_write_completed"])

    # The coordinator's total is its own frames plus what the member reported by then, at most
    # the member's count read after it: total >= that count + 5 means its own part has >= 5.
    wait_for(lambda: (total := written(coordinator)) >= 5 and total >= written(member) + 5)


def recording_group(
    writer_factory: WriterFactory, sim_factory: Any, port: int, path: Path, rate: int
) -> tuple[WriterProcess, WriterProcess]:
    """(coordinator, member): a group of two writing an open-ended write to `path` from a PUSH
    simulator at `rate` Hz on `port`, both data paths already writing frames."""
    endpoint = f"tcp://127.0.0.1:{port}"
    member = writer_factory(endpoint)
    coordinator = writer_factory(endpoint, group_members=(member.grpc_address,))
    StdDaqClient(url_base=coordinator.rest_url).start_writer_async(
        {"output_file": str(path), "n_images": 100_000}
    )
    sim_factory("--shape", *map(str, SHAPE), "--rate", str(rate), port=port)
    wait_both_recording(coordinator, member)
    return coordinator, member


def assert_group_file(path: Path, n_parts: int) -> list[np.ndarray]:
    """`path` maps the N simulator frames in image-id order, every pixel checked; the parts beside
    it hold disjoint image ids, together all of them. Returns each part's ids."""
    with h5py.File(path, "r") as f:
        data = f[f"{DETECTOR_NAME}/data"]
        assert data.is_virtual
        assert data.shape == (N, *SHAPE)
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        assert ids.tolist() == list(range(1, N + 1))
        frames = data[:]
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(frames[row], expected_frame(int(image_id), SHAPE, "uint16"))
        # The NeXus view (daqif.nexus) over the virtual dataset: the default plot is the image stack.
        assert f.attrs["default"] == "entry" and f["entry"].attrs["default"] == "data"
        assert f["entry/data"].attrs["signal"] == "data"
        assert f["entry/data/data"].id == data.id  # a hard link, not a copy
    parts: list[np.ndarray] = []
    for k in range(n_parts):
        with h5py.File(part_path(str(path), k), "r") as f:
            parts.append(f[f"{DETECTOR_NAME}/image_id"][:])
    together = np.concatenate(parts)
    assert len(together) == len(set(together.tolist())) == N, "the parts hold disjoint image ids"
    assert all(len(p) > 0 for p in parts), "every member was dealt frames"
    assert not Path(part_path(str(path), n_parts)).exists()
    return parts


def test_group_of_two_writers_makes_one_file_in_image_id_order(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path, redis_server: RedisServer
) -> None:
    import redis

    endpoint = f"tcp://127.0.0.1:{tcp_port}"
    member = writer_factory(endpoint)
    coordinator = writer_factory(endpoint, group_members=(member.grpc_address,), redis_url=redis_server.url)
    path = data_root / "run.h5"

    reply = sync_write_while_sim_sends(coordinator, sim_factory, tcp_port, path)
    assert not isinstance(reply, Exception), reply
    assert reply["acquisition"]["state"] == "FINISHED"
    assert reply["acquisition"]["stats"]["n_write_completed"] == N
    assert_group_file(path, 2)

    status = rest_status(coordinator)
    assert status["state"] == "READY"
    assert status["acquisition"]["message"] == "Completed."
    assert status["acquisition"]["stats"]["n_write_completed"] == N
    logs = StdDaqClient(url_base=coordinator.rest_url).get_logs(1)
    assert logs[0]["stats"]["n_write_completed"] == N
    # The coordinator's Redis log entry and its frame counters describe the whole write.
    client = redis.Redis(port=redis_server.port)
    try:
        streams: Any = wait_for(lambda: client.xread({"daq:log": "0"}, block=100))
        (entry,) = streams[0][1]
        logged = json.loads(entry[1][b"json"])
        assert (logged["info"]["output_file"], logged["stats"]["n_write_completed"]) == (str(path), N)
    finally:
        client.close()
    stats = wait_for(
        lambda: (
            (s := StdDaqClient(url_base=coordinator.rest_url).get_stats())["counters"]["written"] == N and s
        )
    )
    assert stats["counters"]["received"] >= N
    # The member recorded its own part and is READY for the next write.
    assert rest_status(member)["acquisition"]["info"]["output_file"] == part_path(str(path), 1)
    assert rest_status(member)["state"] == "READY"


def test_workers_2_make_the_same_file_as_a_group_of_two(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    coordinator = writer_factory(f"tcp://127.0.0.1:{tcp_port}", workers=2)
    assert len(coordinator.data_path_pids()) == 2
    path = data_root / "local.h5"
    reply = sync_write_while_sim_sends(coordinator, sim_factory, tcp_port, path)
    assert not isinstance(reply, Exception), reply
    assert reply["acquisition"]["stats"]["n_write_completed"] == N
    assert_group_file(path, 2)


def test_member_down_or_busy_refuses_the_write_naming_it(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{tcp_port}"
    absent = f"127.0.0.1:{free_port()}"
    coordinator = writer_factory(endpoint, group_members=(absent,))
    client = StdDaqClient(url_base=coordinator.rest_url)
    with pytest.raises(StdDaqAdminException, match=f"group member {absent} is unreachable"):
        client.start_writer_async({"output_file": str(data_root / "down.h5"), "n_images": 10})
    assert not list(data_root.glob("*.h5")), "a refused write creates nothing"
    assert rest_status(coordinator)["state"] == "READY"

    busy = writer_factory(endpoint)
    StdDaqClient(url_base=busy.rest_url).start_writer_async(
        {"output_file": str(data_root / "other.h5"), "n_images": 10}
    )
    second = writer_factory(endpoint, group_members=(busy.grpc_address,))
    with pytest.raises(StdDaqAdminException, match=f"group member {busy.grpc_address} is WRITING, not READY"):
        StdDaqClient(url_base=second.rest_url).start_writer_async(
            {"output_file": str(data_root / "busy.h5"), "n_images": 10}
        )
    assert sorted(p.name for p in data_root.glob("*.h5")) == ["other.h5"]
    assert rest_status(second)["state"] == "READY"


def test_member_killed_mid_write_fails_the_write_naming_it(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    path = data_root / "killed.h5"
    coordinator, member = recording_group(writer_factory, sim_factory, tcp_port, path, 400)
    member.kill()

    ended = wait_for(lambda: (s := rest_status(coordinator))["state"] == "READY" and s)
    acquisition = ended["acquisition"]
    assert acquisition["state"] == "FAILED"
    assert f"group member {member.grpc_address} failed during the write" in acquisition["message"]
    # The coordinator's own part is closed and readable, and the combined file maps what is readable.
    with h5py.File(part_path(str(path), 0), "r") as f:
        own = f[f"{DETECTOR_NAME}/image_id"][:]
        data = f[f"{DETECTOR_NAME}/data"]
        assert len(own) > 0 and data.shape == (len(own), *SHAPE)
        np.testing.assert_array_equal(data[-1], expected_frame(int(own[-1]), SHAPE, "uint16"))
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        assert set(own.tolist()) <= set(ids.tolist())
        assert acquisition["stats"]["n_write_completed"] == len(ids)
        np.testing.assert_array_equal(
            f[f"{DETECTOR_NAME}/data"][0], expected_frame(int(ids[0]), SHAPE, "uint16")
        )
    stopped = requests.post(coordinator.rest_url + "/writer/stop", json={}, timeout=30).json()["writer"]
    assert stopped["state"] == "READY"


def test_a_member_that_goes_silent_without_a_reset_fails_the_write_naming_it(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    # SIGSTOP: the member's connections stay open (its kernel still ACKs) but it answers nothing,
    # as across a network partition. The coordinator's keepalive on the status stream notices.
    coordinator, member = recording_group(writer_factory, sim_factory, tcp_port, data_root / "silent.h5", 200)
    os.kill(member.pid, signal.SIGSTOP)
    try:
        ended = wait_for(
            lambda: (s := rest_status(coordinator))["acquisition"]["state"] == "FAILED" and s, 90
        )
        assert (
            f"group member {member.grpc_address} failed during the write" in ended["acquisition"]["message"]
        )
    finally:
        os.kill(member.pid, signal.SIGCONT)
    stopped = requests.post(coordinator.rest_url + "/writer/stop", json={}, timeout=30).json()["writer"]
    assert stopped["state"] == "READY"


def test_stop_stops_every_member_and_keeps_what_was_written(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    path = data_root / "stopped.h5"
    coordinator, member = recording_group(writer_factory, sim_factory, tcp_port, path, 400)

    stopped = requests.post(coordinator.rest_url + "/writer/stop", json={}, timeout=30).json()["writer"]
    assert stopped["state"] == "READY"
    assert stopped["acquisition"]["message"] == "Interrupted."
    member_status = rest_status(member)
    assert member_status["state"] == "READY"
    assert member_status["acquisition"]["message"] == "Interrupted."
    parts = []
    for k in range(2):
        with h5py.File(part_path(str(path), k), "r") as f:
            parts.append(f[f"{DETECTOR_NAME}/image_id"][:])
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        data = f[f"{DETECTOR_NAME}/data"]
        assert sorted(np.concatenate(parts).tolist()) == ids.tolist()
        assert stopped["acquisition"]["stats"]["n_write_completed"] == len(ids) == data.shape[0]
        for row in (0, len(ids) - 1):
            np.testing.assert_array_equal(data[row], expected_frame(int(ids[row]), SHAPE, "uint16"))


def test_a_local_worker_killed_mid_write_fails_the_write_naming_it(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    coordinator = writer_factory(f"tcp://127.0.0.1:{tcp_port}", workers=2)
    path = data_root / "worker.h5"
    StdDaqClient(url_base=coordinator.rest_url).start_writer_async(
        {"output_file": str(path), "n_images": 100_000}
    )
    worker_0, worker_1 = sorted(coordinator.data_path_pids())  # worker 1 is the one started last
    before = bytes_written_by(worker_0)
    sim_factory("--shape", *map(str, SHAPE), "--rate", "400", port=tcp_port)
    # PUSH deals only to the connections already up: until worker 0 has connected (within its own
    # reconnect interval), every frame goes to worker 1, and killing it would leave no frame.
    wait_for(lambda: bytes_written_by(worker_0) - before >= 5 * FRAME_BYTES)
    wait_for(lambda: rest_status(coordinator)["acquisition"]["stats"]["n_write_completed"] >= 20)
    os.kill(worker_1, signal.SIGKILL)

    ended = wait_for(lambda: (s := rest_status(coordinator))["state"] != "WRITING" and s)
    assert ended["state"] == "UNKNOWN"  # one of its own data paths is gone, until stop restarts them
    assert ended["acquisition"]["state"] == "FAILED"
    assert "worker 1 failed during the write" in ended["acquisition"]["message"]
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        assert len(ids) > 0 and ended["acquisition"]["stats"]["n_write_completed"] == len(ids)
        np.testing.assert_array_equal(
            f[f"{DETECTOR_NAME}/data"][-1], expected_frame(int(ids[-1]), SHAPE, "uint16")
        )
    stopped = requests.post(coordinator.rest_url + "/writer/stop", json={}, timeout=30).json()["writer"]
    assert stopped["state"] == "READY"
    assert len(coordinator.data_path_pids()) == 2
