"""The live stream (`servers.writer.live`): a real writer, a real simulator, a real SUB client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests
import zmq

from daqif.frame import expected_frame
from servers.common.launch import SimOptions, SimProcess, WriterProcess, free_port
from servers.writer.live import HTYPE, LiveError, LiveFrame, LiveOptions, decode_live_message

from .conftest import DETECTOR_NAME, SHAPE, WriterFactory

WAIT_S = 60.0


class LiveClient:
    """A SUB socket on a writer's live stream, keeping every frame and its header."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.headers: list[dict[str, object]] = []
        self.frames: list[LiveFrame] = []

    def receive(self, n: int) -> list[LiveFrame]:
        """The next `n` frames (a generous wait, not a timing check)."""
        received: list[LiveFrame] = []
        deadline = time.monotonic() + WAIT_S
        while len(received) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(received)} of {n} live frames within {WAIT_S} s")
            if self.socket.poll(1000):
                parts = self.socket.recv_multipart()
                self.headers.append(json.loads(parts[0]))
                received.append(decode_live_message(parts))
        self.frames += received
        return received

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def live_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def live_client(live_endpoint: str) -> Iterator[LiveClient]:
    client = LiveClient(live_endpoint)
    yield client
    client.close()


def live_writer(writer_factory: WriterFactory, stream: str, endpoint: str, *mode: str) -> WriterProcess:
    return writer_factory(stream, extra_args=("--live-stream", endpoint, *mode))


def file_frames(path: Path) -> dict[int, np.ndarray]:
    with h5py.File(path, "r") as f:
        ids = f[f"{DETECTOR_NAME}/image_id"][:]
        data = f[f"{DETECTOR_NAME}/data"][:]
    return {int(image_id): data[i] for i, image_id in enumerate(ids)}


def test_every_nth_frame_is_published_during_and_between_writes(
    writer_factory: WriterFactory, data_root: Path, live_endpoint: str, live_client: LiveClient
) -> None:
    with SimProcess(
        SimOptions(shape=SHAPE, dtype="uint16", rate=400, header="stddaq", linger=0)
    ).start() as sim:
        writer = live_writer(writer_factory, sim.endpoint, live_endpoint, "--live-every", "10")
        before = live_client.receive(3)  # no write open yet
        output = data_root / "run.h5"
        reply = requests.post(
            writer.rest_url + "/writer/write_sync",
            json={"output_file": str(output), "n_images": 200},
            timeout=120,
        ).json()
        assert reply["status"] == "ok", reply
        # Frames published during the write may still be queued at the client: read on to one after it.
        last_written = max(file_frames(output))
        while live_client.receive(1)[0].image_id <= last_written:
            pass
    written = file_frames(output)
    during = [frame for frame in live_client.frames if frame.image_id in written]
    assert during, "no live frame was one of the frames written"
    assert all(frame.image_id < min(written) for frame in before)
    assert all(
        frame.image_id < min(written) or frame.image_id in written or frame.image_id > max(written)
        for frame in live_client.frames
    )
    for frame in live_client.frames:  # every pixel as the simulator sent it, the file's where written
        np.testing.assert_array_equal(frame.pixels, expected_frame(frame.image_id, SHAPE, "uint16"))
    for frame in during:
        np.testing.assert_array_equal(frame.pixels, written[frame.image_id])
    ids = [frame.image_id for frame in live_client.frames]
    steps = np.diff(ids)
    assert (steps > 0).all() and (steps % 10 == 0).all(), ids  # every 10th (a PUB may drop, never add)
    header = live_client.headers[0]
    assert header["htype"] == HTYPE and header["shape"] == list(SHAPE) and header["type"] == "uint16"
    assert isinstance(header["frame"], int)


def test_a_writer_with_several_workers_has_one_live_stream(
    writer_factory: WriterFactory, live_endpoint: str, live_client: LiveClient
) -> None:
    # Only worker 0 binds the live endpoint (N binds of one address would fail); it samples the
    # frames it is dealt.
    with SimProcess(
        SimOptions(shape=SHAPE, dtype="uint16", rate=400, header="stddaq", linger=0)
    ).start() as sim:
        writer = writer_factory(sim.endpoint, extra_args=("--workers", "2", "--live-stream", live_endpoint))
        frames = live_client.receive(2)
        assert writer.running
        assert not [line for line in writer.tail(200) if "no live stream" in line]
    for frame in frames:
        np.testing.assert_array_equal(frame.pixels, expected_frame(frame.image_id, SHAPE, "uint16"))


def test_live_rate_caps_the_frames_per_second_and_compressed_frames_arrive_decompressed(
    writer_factory: WriterFactory, live_endpoint: str, live_client: LiveClient
) -> None:
    options = SimOptions(shape=SHAPE, dtype="uint16", rate=400, header="daqif", compress="bslz4", linger=0)
    with SimProcess(options).start() as sim:
        live_writer(writer_factory, sim.endpoint, live_endpoint, "--live-rate", "10")
        frames = live_client.receive(6)
    # Samples are at least 1/10 s apart as the writer received them (half of it allowed for the
    # moment within a receive batch), whatever the machine's load: a bound, not a speed.
    received_at = [float(str(header["timestamp"])) for header in live_client.headers]
    assert min(np.diff(received_at)) >= 0.05, received_at
    ids = [frame.image_id for frame in frames]
    assert min(np.diff(ids)) > 1  # a sample, not every frame (the simulator sends 400 a second)
    for frame in frames:
        np.testing.assert_array_equal(frame.pixels, expected_frame(frame.image_id, SHAPE, "uint16"))


def run_writer(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`daqif-writer` with `flags`, which must make it stop before it serves."""
    argv = [sys.executable, "-m", "servers.writer.main", "--stream", "tcp://127.0.0.1:9"]
    argv += ["--data-root", str(tmp_path), "--rest-port", "0", "--grpc-port", "0", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--live-stream", "udp://127.0.0.1:5"], "--live-stream must be tcp://HOST:PORT"),
        (["--live-stream", "tcp://127.0.0.1:9", "--live-every", "0"], "--live-every must be >= 1"),
        (["--live-stream", "tcp://127.0.0.1:9", "--live-rate", "-1"], "--live-rate must be > 0"),
        (["--live-rate", "5"], "--live-rate and --live-every need --live-stream"),
    ],
)
def test_bad_live_flags_stop_the_writer_naming_them(tmp_path: Path, flags: list[str], expected: str) -> None:
    done = run_writer(tmp_path, *flags)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_a_live_stream_address_in_use_stops_the_writer_naming_it(tmp_path: Path, live_endpoint: str) -> None:
    context = zmq.Context()
    taken = context.socket(zmq.PUB)
    taken.bind(live_endpoint)
    try:
        done = run_writer(tmp_path, "--live-stream", live_endpoint)
    finally:
        taken.close(0)
        context.term()
    assert done.returncode == 2
    assert f"cannot bind the live stream to {live_endpoint}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b"{}"], "2 parts"),
        ([b"not json", b""], "unreadable array-1.0 header"),
        ([json.dumps({"htype": "chunk-1.0"}).encode(), b""], "htype 'chunk-1.0'"),
        (
            [json.dumps({"htype": HTYPE, "frame": 1, "shape": [2, 2], "type": "uint16"}).encode(), b"123"],
            "3 bytes",
        ),
        ([b" " * 5000, b""], "more than 4096"),
    ],
)
def test_a_bad_live_message_is_refused_saying_why(parts: list[bytes], expected: str) -> None:
    with pytest.raises(LiveError, match=expected):
        decode_live_message(parts)


def test_live_options_give_the_data_path_its_flags() -> None:
    assert LiveOptions("tcp://127.0.0.1:5", rate_hz=None, every=3).worker_args() == [
        "--live-stream=tcp://127.0.0.1:5",
        "--live-every=3",
    ]
    with pytest.raises(LiveError, match="one of --live-rate HZ and --live-every N"):
        LiveOptions("tcp://127.0.0.1:5", rate_hz=2.0, every=3)
