"""The detector simulator, driven as a subprocess and as a Python object, read with plain ZeroMQ."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from daqif.frame import (
    Compression,
    FrameHeader,
    HeaderFormat,
    check_data,
    decode_header,
    decompress_bslz4,
    expected_frame,
)
from servers.common.launch import SimProcess
from servers.sim.main import SimConfig, Simulator

RECV_TIMEOUT_MS = 30_000


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def receiver(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, kind: int = zmq.PULL) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[bytes], n: int) -> list[tuple[FrameHeader, bytes]]:
    frames = []
    for _ in range(n):
        header, data = sock.recv_multipart()
        frames.append((decode_header(header), data))
    return frames


def test_simulator_sends_ids_from_one_with_the_expected_pixels(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "48", "32", "--dtype", "uint16", "--count", "20")
    frames = receive(receiver(context, sim.endpoint), 20)
    assert [h.image_id for h, _ in frames] == list(range(1, 21))
    for header, data in frames:
        assert header.header_format is HeaderFormat.STDDAQ
        assert (header.height, header.width, header.dtype) == (48, 32, np.dtype("uint16"))
        pixels = np.frombuffer(data, dtype=header.dtype).reshape(header.shape)
        np.testing.assert_array_equal(pixels, expected_frame(header.image_id, (48, 32), "uint16"))
    summary = sim.wait_done()
    assert summary.frames_sent == 20
    assert summary.last_image_id == 20


def test_count_delivers_every_frame_to_a_receiver_that_connects_late(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "16", "16", "--count", "500")
    sock = receiver(context, sim.endpoint)  # PUSH waits for us; nothing is lost
    frames = receive(sock, 500)
    assert [h.image_id for h, _ in frames] == list(range(1, 501))
    assert sim.wait_done().frames_sent == 500


@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32", "float64"])
def test_every_dtype_is_sent_with_its_code(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]], dtype: str
) -> None:
    sim = sim_factory("--shape", "8", "12", "--dtype", dtype, "--count", "3")
    for header, data in receive(receiver(context, sim.endpoint), 3):
        assert header.dtype == np.dtype(dtype)
        pixels = np.frombuffer(data, dtype=header.dtype).reshape(header.shape)
        np.testing.assert_array_equal(pixels, expected_frame(header.image_id, (8, 12), dtype))


def test_daqif_header_carries_compression_and_timestamp(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "32", "32", "--header", "daqif", "--count", "3")
    for header, data in receive(receiver(context, sim.endpoint), 3):
        assert header.header_format is HeaderFormat.DAQIF
        assert header.compression is Compression.NONE
        assert header.timestamp is not None and header.timestamp > 1.6e9
        check_data(header, data)


def test_bslz4_chunks_decompress_to_the_expected_pixels(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "64", "48", "--header", "daqif", "--compress", "bslz4", "--count", str(20))
    frames = receive(receiver(context, sim.endpoint), 20)
    for header, chunk in frames:
        assert header.compression is Compression.BSLZ4
        check_data(header, chunk)
        assert len(chunk) < header.nbytes
        pixels = decompress_bslz4(chunk, header.shape, header.dtype)
        np.testing.assert_array_equal(pixels, expected_frame(header.image_id, (64, 48), "uint16"))


def test_rate_limits_the_send_rate(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "8", "8", "--header", "daqif", "--rate", "100", "--count", "21")
    frames = receive(receiver(context, sim.endpoint), 21)
    stamps = [h.timestamp for h, _ in frames]
    assert all(s is not None for s in stamps)
    # 20 intervals at 100 Hz cannot take less than 0.2 s (the simulator sleeps to its schedule).
    assert stamps[-1] - stamps[0] >= 0.19  # type: ignore[operator]
    assert sim.wait_done().elapsed_s >= 0.19


def test_pub_socket_feeds_subscribers(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "8", "8", "--socket", "pub", "--rate", "200")
    frames = receive(receiver(context, sim.endpoint, zmq.SUB), 10)
    ids = [h.image_id for h, _ in frames]
    assert ids == list(range(ids[0], ids[0] + 10))  # a late subscriber misses the start, then gets all
    assert sim.stop() == 0
    assert sim.summary().frames_sent >= 10


def test_sigterm_stops_it_cleanly_with_a_summary(
    sim_factory: Callable[..., SimProcess], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = sim_factory("--shape", "8", "8", "--rate", "500")
    sock = receiver(context, sim.endpoint)
    receive(sock, 5)
    # Gone, not stalled: frames queued for a receiver that is still connected but no longer reads
    # are delivered for up to --linger (30 s) after the stop, longer than stop()'s grace.
    sock.close(linger=0)
    assert sim.stop() == 0
    summary = sim.summary()
    assert summary.frames_sent >= 5
    assert summary.endpoint == sim.endpoint


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--header", "stddaq", "--compress", "bslz4"], "--compress bslz4 needs --header daqif"),
        (["--shape", "0", "16"], "both dimensions must be >= 1"),
        (["--dtype", "complex64"], "dtype complex64 has no frame dtype code"),
        (["--rate", "-1"], "--rate -1.0: must be >= 0"),
        (["--count", "-5"], "--count -5: must be >= 0"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_wrong(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servers.sim.main", "--endpoint", "tcp://127.0.0.1:*", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_python_api_runs_in_a_thread_until_stopped(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    sim = Simulator(SimConfig(endpoint="tcp://127.0.0.1:*", shape=(4, 4), rate=1000.0, linger_s=0))
    endpoint = sim.bind()
    stats = []
    thread = threading.Thread(target=lambda: stats.append(sim.run()))
    thread.start()
    try:
        frames = receive(receiver(context, endpoint), 5)
    finally:
        sim.stop()
        thread.join(30)
    assert [h.image_id for h, _ in frames] == [1, 2, 3, 4, 5]
    assert not thread.is_alive()
    assert stats[0].frames_sent >= 5
    assert stats[0].endpoint == endpoint
