"""Issue 8, the writer's parts: each failure reproduced against a real writer, simulator and file.

Every test here drives a real `daqif-writer` process (REST on a free port, its data path
process, a real simulator or a real ZeroMQ PUSH socket) and checks the HDF5 file it leaves.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
import zmq

from daqif.errors import DaqException, ErrorCode
from daqif.frame import (
    Compression,
    compress_bslz4,
    encode_daqif_header,
    encode_stddaq_header,
    expected_frame,
)
from daqif.testing import wait_for
from servers.common.launch import WriterProcess, free_port

from .conftest import (
    DETECTOR_NAME,
    SHAPE,
    Simulator,
    WriterFactory,
    rest_status,
)


def post(writer: WriterProcess, path: str, body: Any) -> requests.Response:
    return requests.post(writer.rest_url + path, json=body, timeout=30)


def write_async(writer: WriterProcess, output: Path, n_images: int) -> dict[str, Any]:
    reply: dict[str, Any] = post(
        writer, "/writer/write_async", {"output_file": str(output), "n_images": n_images}
    ).json()
    assert reply["status"] == "ok", reply
    return reply


def stats_counters(writer: WriterProcess) -> dict[str, int]:
    counters: dict[str, int] = requests.get(writer.rest_url + "/daq/stats", timeout=10).json()["stats"][
        "counters"
    ]
    return counters


def datapath_pid(writer: WriterProcess) -> int:
    for pid in writer.data_path_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"servers.writer.datapath.worker" in cmdline:
            return int(pid)
    raise AssertionError("the writer has no data path process")


def frames_in(path: Path) -> tuple[int, int, int]:
    """(data, image_id, status) lengths, read by a plain (non-SWMR) reader."""
    with h5py.File(path, "r") as f:
        group = f[DETECTOR_NAME]
        return group["data"].shape[0], group["image_id"].shape[0], group["status"].shape[0]


def assert_pixels_match_ids(path: Path) -> None:
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        data = f[f"{DETECTOR_NAME}/data"][:]
    for image_id, frame in zip(ids, data, strict=True):
        np.testing.assert_array_equal(frame, expected_frame(int(image_id), SHAPE, "uint16"))


@pytest.fixture
def push_source() -> Any:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    source = ctx.socket(zmq.PUSH)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    source.setsockopt(zmq.SNDTIMEO, 10_000)
    yield source, f"tcp://127.0.0.1:{port}"
    source.close(0)
    ctx.term()


# -- file integrity ------------------------------------------------------------------------------


def test_garbage_bitshuffle_lz4_frames_are_malformed_and_never_written(
    writer_factory: WriterFactory, push_source: Any, data_root: Path
) -> None:
    source, endpoint = push_source
    writer = writer_factory(endpoint)
    output = data_root / "bslz4.h5"
    write_async(writer, output, 5)
    h, w = SHAPE
    rng = np.random.default_rng(8)
    good = [compress_bslz4(expected_frame(i, SHAPE, "uint16")) for i in range(1, 6)]
    for image_id in range(1, 20):  # 19 garbage frames whose 12-byte header is right
        chunk = good[0]
        garbage = chunk[:12] + rng.integers(0, 256, len(chunk) - 12, dtype=np.uint8).tobytes()
        source.send_multipart(
            [encode_daqif_header(100 + image_id, h, w, "uint16", compression=Compression.BSLZ4), garbage]
        )
    for image_id, chunk in enumerate(good, start=1):
        source.send_multipart(
            [encode_daqif_header(image_id, h, w, "uint16", compression=Compression.BSLZ4), chunk]
        )
    wait_for(lambda: rest_status(writer)["acquisition"]["state"] == "FINISHED")
    # Stats are sampled once a second: wait until every message is counted.
    counters = wait_for(lambda: (c := stats_counters(writer))["received"] == 24 and c)
    assert (counters["malformed"], counters["written"]) == (19, 5)
    with h5py.File(output, "r") as f:
        assert list(f[f"{DETECTOR_NAME}/image_id"][:]) == [1, 2, 3, 4, 5]
    assert_pixels_match_ids(output)


def _garble_lz4(chunk: bytes) -> bytes:
    """`chunk` with every LZ4 block overwritten, its bitshuffle framing (each block's size) kept."""
    out = bytearray(chunk)
    position = 12
    while position + 4 <= len(out):
        (size,) = struct.unpack_from(">I", out, position)
        if position + 4 + size > len(out):
            break  # the raw trailing elements
        out[position + 4 : position + 4 + size] = b"\xff" * size
        position += 4 + size
    return bytes(out)


def test_with_verify_compressed_frames_whose_lz4_blocks_are_garbage_are_malformed_and_never_written(
    writer_factory: WriterFactory, push_source: Any, data_root: Path
) -> None:
    source, endpoint = push_source
    writer = writer_factory(endpoint, extra_args=("--verify-compressed",))
    output = data_root / "verified.h5"
    write_async(writer, output, 3)
    h, w = SHAPE
    good = [compress_bslz4(expected_frame(i, SHAPE, "uint16")) for i in range(1, 4)]
    for image_id, chunk in enumerate(good, start=1):
        # The framing check alone lets each of these through (tests/daqif/test_frame.py).
        bad = [
            encode_daqif_header(100 + image_id, h, w, "uint16", compression=Compression.BSLZ4),
            _garble_lz4(chunk),
        ]
        source.send_multipart(bad)
        source.send_multipart(
            [encode_daqif_header(image_id, h, w, "uint16", compression=Compression.BSLZ4), chunk]
        )
    wait_for(lambda: rest_status(writer)["acquisition"]["state"] == "FINISHED")
    counters = wait_for(lambda: (c := stats_counters(writer))["received"] == 6 and c)
    assert (counters["malformed"], counters["written"]) == (3, 3)
    with h5py.File(output, "r") as f:
        assert list(f[f"{DETECTOR_NAME}/image_id"][:]) == [1, 2, 3]
    assert_pixels_match_ids(output)


def test_a_killed_data_path_leaves_a_repaired_file_and_the_status_counts_its_frames(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    writer = writer_factory(simulator.endpoint)
    output = data_root / "killed.h5"
    write_async(writer, output, 1_000_000)
    wait_for(lambda: rest_status(writer)["acquisition"]["stats"]["n_write_completed"] >= 700)
    os.kill(datapath_pid(writer), signal.SIGKILL)
    status = wait_for(lambda: (s := rest_status(writer))["acquisition"]["state"] == "FAILED" and s)
    n_reported = status["acquisition"]["stats"]["n_write_completed"]
    # A plain reader opens it, every dataset holds exactly the frames of the last flush, and
    # the status says so (before, data stayed at full extent and the count ran ahead).
    assert frames_in(output) == (n_reported, n_reported, n_reported)
    assert n_reported > 0
    assert_pixels_match_ids(output)
    assert status["state"] == "UNKNOWN"
    assert post(writer, "/writer/stop", {}).json()["writer"]["state"] == "READY"


def test_a_file_left_by_a_killed_writer_is_repaired_when_the_writer_starts_again(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "writer-state"
    writer = writer_factory(simulator.endpoint, state_dir=state_dir)
    output = data_root / "writer_killed.h5"
    write_async(writer, output, 1_000_000)
    wait_for(lambda: rest_status(writer)["acquisition"]["stats"]["n_write_completed"] >= 700)
    pids = [datapath_pid(writer), writer.pid]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    writer.wait(10)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids[:1]))
    with pytest.raises(OSError):  # what the issue saw: plain readers cannot open it
        h5py.File(output, "r").close()

    writer_factory(simulator.endpoint, state_dir=state_dir)
    n_data, n_ids, n_status = frames_in(output)
    assert n_data == n_ids == n_status > 0
    assert_pixels_match_ids(output)
    assert not (state_dir / "write.json").exists()


def test_a_message_larger_than_a_frame_is_dropped_by_the_socket_not_counted(
    writer_factory: WriterFactory, push_source: Any, data_root: Path
) -> None:
    source, endpoint = push_source
    writer = writer_factory(endpoint)
    h, w = SHAPE
    output = data_root / "after_huge.h5"
    write_async(writer, output, 3)
    # 64 MiB where a frame is 3 KiB: ZeroMQ refuses it (and drops that connection) instead of
    # buffering it; the data path connects again and the good frames after it are written.
    source.send_multipart([encode_stddaq_header(1, h, w, "uint16"), b"\0" * (64 << 20)])
    next_id = 2
    while rest_status(writer)["acquisition"]["state"] != "FINISHED":
        assert next_id < 100_000, "the data path never connected again"
        for image_id in range(next_id, next_id + 100):
            frame = expected_frame(image_id, SHAPE, "uint16").tobytes()
            source.send_multipart([encode_stddaq_header(image_id, h, w, "uint16"), frame])
        next_id += 100
    wait_for(lambda: rest_status(writer)["acquisition"]["state"] == "FINISHED")
    counters = wait_for(lambda: (c := stats_counters(writer))["written"] == 3 and c)
    assert counters["malformed"] == 0  # never received: not even counted as a bad frame
    with h5py.File(output, "r") as f:
        assert 1 not in list(f[f"{DETECTOR_NAME}/image_id"][:])
    assert_pixels_match_ids(output)


def test_frames_still_queued_when_a_push_source_goes_away_are_all_written(
    writer_factory: WriterFactory, data_root: Path
) -> None:
    """A detector that sends its last frames and exits: the frames the data path has received
    but not yet read (its receive queue) are written, not dropped with the lost connection."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    n = 3000
    source = ctx.socket(zmq.PUSH)
    source.setsockopt(zmq.SNDHWM, n)  # all of them queue here while the data path is stopped
    port = source.bind_to_random_port("tcp://127.0.0.1")
    source.setsockopt(zmq.SNDTIMEO, 10_000)
    writer = writer_factory(f"tcp://127.0.0.1:{port}")
    output = data_root / "source_gone.h5"
    write_async(writer, output, n)
    h, w = SHAPE

    def send(image_id: int) -> None:
        frame = expected_frame(image_id, SHAPE, "uint16").tobytes()
        source.send_multipart([encode_stddaq_header(image_id, h, w, "uint16"), frame])

    send(1)
    wait_for(lambda: rest_status(writer)["acquisition"]["stats"]["n_write_completed"] == 1)
    pid = datapath_pid(writer)
    os.kill(pid, signal.SIGSTOP)  # the frames pile up in the sockets while the data path sleeps
    try:
        for image_id in range(2, n + 1):
            send(image_id)
    finally:
        os.kill(pid, signal.SIGCONT)
    source.close(linger=30_000)
    ctx.term()  # returns once every frame is handed to the kernel: the source is gone

    wait_for(lambda: rest_status(writer)["acquisition"]["state"] == "FINISHED", timeout=60)
    n_data, n_ids, n_status = frames_in(output)
    assert n_data == n_ids == n_status == n
    assert_pixels_match_ids(output)


def test_a_source_that_restarts_mid_write_is_connected_again_and_the_write_completes(
    writer_factory: WriterFactory, data_root: Path
) -> None:
    """A detector restarted during a write binds the same endpoint again: ZeroMQ reconnects the
    data path by itself, and the frames of both runs of the source are written."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    writer = writer_factory(endpoint)
    output = data_root / "source_restarted.h5"
    n = 200
    write_async(writer, output, n)
    h, w = SHAPE
    for first, last in ((1, 100), (101, n)):
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        source = ctx.socket(zmq.PUSH)
        source.setsockopt(zmq.SNDTIMEO, 10_000)
        source.bind(endpoint)
        for image_id in range(first, last + 1):
            frame = expected_frame(image_id, SHAPE, "uint16").tobytes()
            source.send_multipart([encode_stddaq_header(image_id, h, w, "uint16"), frame])

        def written(upto: int = last) -> bool:
            return bool(rest_status(writer)["acquisition"]["stats"]["n_write_completed"] == upto)

        wait_for(written)
        source.close(linger=10_000)
        ctx.term()  # the source goes away; the next run binds the endpoint again

    wait_for(lambda: rest_status(writer)["acquisition"]["state"] == "FINISHED")
    n_data, n_ids, n_status = frames_in(output)
    assert n_data == n_ids == n_status == n
    assert_pixels_match_ids(output)


# -- bad requests ----------------------------------------------------------------------------------


def raw_post_headers(writer: WriterProcess, path: str, content_length: int) -> tuple[int, bytes]:
    """Send only the headers of a POST announcing `content_length` bytes; (status, body)."""
    host, port = writer.rest_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n".encode()
            + b'{"output_file": "/'
        )
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_100_mib_path_is_refused_by_size_without_being_read_or_echoed(writer: WriterProcess) -> None:
    status, body = raw_post_headers(writer, "/writer/write_async", 100 << 20)
    assert status == 413
    assert body == b'{"status":"error","message":"malformed request: the body is larger than 1048576 bytes"}'
    # Under the body limit but past PATH_MAX: named and quoted shortly.
    reply = post(writer, "/writer/write_async", {"output_file": "/" + "x" * 500_000, "n_images": 1}).json()
    assert reply["status"] == "error" and "is 500001 characters long, the limit is 4096" in reply["message"]
    assert len(reply["message"]) < 400


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, (422, "malformed request: the body is nested too deeply")),
        ('{"n_images": ' + "[" * 50_000 + "]" * 50_000 + "}", (422, "malformed request: the body is nested")),
    ],
)
def test_deeply_nested_json_is_a_clear_4xx_not_500(
    writer: WriterProcess, body: str, expected: tuple[int, str]
) -> None:
    for path in ("/writer/write_async", "/daq/config"):
        response = requests.post(
            writer.rest_url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert (response.status_code, response.json()["message"][: len(expected[1])]) == expected


def test_a_300_byte_file_name_is_refused_naming_the_limit_not_500(
    writer: WriterProcess, data_root: Path
) -> None:
    response = post(
        writer, "/writer/write_async", {"output_file": str(data_root / ("x" * 300)), "n_images": 1}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "error"
    assert "has a path component of 300 bytes, the limit is 255" in response.json()["message"]
    # A path too long for the file system although each name fits: also a clear refusal.
    deep = str(data_root / "/".join(["y" * 200] * 30)) + ".h5"
    reply = post(writer, "/writer/write_async", {"output_file": deep, "n_images": 1}).json()
    assert reply["status"] == "error" and len(reply["message"]) < 500
    assert rest_status(writer)["state"] == "READY"


# -- config confinement -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"writer_user_id": 2**40}, "writer_user_id: Input should be less than or equal to 4294967294"),
        ({"detector_name": "DET\x00X"}, "detector_name: must be 1-64 letters, digits"),
        ({"detector_name": "a b"}, "detector_name: must be 1-64 letters, digits"),
        ({"writer_user_id": 12345}, "writer_user_id: uid 12345 is not allowed"),
    ],
)
def test_config_values_that_would_break_writes_or_chown_freely_are_refused(
    writer: WriterProcess, data_root: Path, update: dict[str, Any], expected: str
) -> None:
    reply = post(writer, "/daq/config", update).json()
    assert reply["status"] == "error" and expected in reply["message"], reply
    # The config in force is unchanged, and the next write works.
    output = data_root / "after.h5"
    assert (
        post(writer, "/writer/write_sync", {"output_file": str(output), "n_images": 3}).json()["status"]
        == "ok"
    )
    assert frames_in(output) == (3, 3, 3)


def test_writer_user_id_inside_allowed_uids_owns_the_file(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    writer = writer_factory(simulator.endpoint, allowed_uids="12000-12999")
    assert post(writer, "/daq/config", {"writer_user_id": 13000}).json()["status"] == "error"
    reply = post(writer, "/daq/config", {"writer_user_id": 12345}).json()
    assert reply["status"] == "ok" and reply["config"]["writer_user_id"] == 12345
    output = data_root / "owned.h5"
    assert (
        post(writer, "/writer/write_sync", {"output_file": str(output), "n_images": 3}).json()["status"]
        == "ok"
    )
    expected_owner = 12345 if os.geteuid() == 0 else os.geteuid()  # only root may give files away
    assert output.stat().st_uid == expected_owner


def test_writer_user_id_in_a_write_request_owns_that_file_only(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    """Per-write ownership (a daqif extension): through the published client, which passes the
    request dict through, and through gRPC; no config change, no restart."""
    from std_daq_client import StdDaqAdminException, StdDaqClient

    from daqif.writer_client import WriterClient

    writer = writer_factory(simulator.endpoint, allowed_uids="12000-12999")
    client = StdDaqClient(writer.rest_url)
    config_before = client.get_config()
    owned, refused, after = data_root / "owned.h5", data_root / "refused.h5", data_root / "after.h5"
    status = client.start_writer_sync({"output_file": str(owned), "n_images": 3, "writer_user_id": 12345})
    assert status["acquisition"]["info"]["writer_user_id"] == 12345
    with pytest.raises(
        StdDaqAdminException, match=r"invalid write request: writer_user_id: uid 13000 is not allowed"
    ):
        client.start_writer_sync({"output_file": str(refused), "n_images": 3, "writer_user_id": 13000})
    assert not refused.exists()
    status = client.start_writer_sync({"output_file": str(after), "n_images": 3})
    assert "writer_user_id" not in status["acquisition"]["info"]
    assert client.get_config() == config_before  # the config never changed
    service_uid = os.geteuid()
    assert owned.stat().st_uid == (12345 if service_uid == 0 else service_uid)  # only root may give away
    assert after.stat().st_uid == service_uid
    assert frames_in(owned) == (3, 3, 3) and frames_in(after) == (3, 3, 3)
    logs = client.get_logs(3)  # newest first; the refused request never became an acquisition
    assert [entry["info"].get("writer_user_id") for entry in logs] == [None, 12345]

    grpc_owned, grpc_refused = data_root / "grpc_owned.h5", data_root / "grpc_refused.h5"
    with WriterClient(writer.grpc_address) as grpc_client:
        done = grpc_client.start_writer_sync(str(grpc_owned), 3, writer_user_id=12999)
        assert done.acquisition.info.writer_user_id == 12999
        with pytest.raises(DaqException, match=r"writer_user_id: uid 99 is not allowed") as refusal:
            grpc_client.start_writer_sync(str(grpc_refused), 3, writer_user_id=99)
        assert refusal.value.code is ErrorCode.INVALID_ARGUMENT
        plain = grpc_client.start_writer_sync(str(data_root / "grpc_plain.h5"), 3)
        assert not plain.acquisition.info.HasField("writer_user_id")
    assert grpc_owned.stat().st_uid == (12999 if service_uid == 0 else service_uid)
    assert not grpc_refused.exists()


def test_output_files_cannot_go_into_the_writers_state_directory(
    writer: WriterProcess, data_root: Path
) -> None:
    target = data_root / ".daqif-writer" / "x.h5"
    reply = post(writer, "/writer/write_async", {"output_file": str(target), "n_images": 1}).json()
    assert reply["status"] == "error" and "lies in the writer's own state directory" in reply["message"]
