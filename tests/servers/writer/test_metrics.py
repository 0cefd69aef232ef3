"""`GET /metrics` of a real writer process fed by the test's own ZeroMQ PUSH socket: every counter
is checked against the exact frames the test sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import zmq
from prometheus_client.parser import text_string_to_metric_families

from daqif.frame import encode_stddaq_header, expected_frame
from daqif.testing import wait_for
from servers.common.launch import WriterProcess

from .conftest import SHAPE, RedisServer, WriterFactory, rest_status, stop_process


def scrape(writer: WriterProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`, parsed by prometheus_client's own parser, keyed by name and labels."""
    reply = requests.get(writer.rest_url + "/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def source() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = ctx.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDTIMEO, 10_000)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield socket, f"tcp://127.0.0.1:{port}"
    finally:
        socket.close(0)
        ctx.term()


def good(image_id: int) -> list[bytes]:
    h, w = SHAPE
    return [
        encode_stddaq_header(image_id, h, w, "uint16"),
        expected_frame(image_id, SHAPE, "uint16").tobytes(),
    ]


def test_metrics_count_exactly_the_frames_sent_and_the_write_that_ended(
    writer_factory: WriterFactory, source: tuple[zmq.Socket[bytes], str], data_root: Path
) -> None:
    socket, endpoint = source
    writer = writer_factory(endpoint)
    h, w = SHAPE
    frame_bytes = h * w * 2
    before = scrape(writer)
    assert value(before, "daqif_writer_frames_received_total") == 0
    assert value(before, "daqif_writer_writes_total", outcome="completed") == 0
    assert value(before, "daqif_writer_write_duration_seconds_count") == 0
    assert value(before, "daqif_writer_state", state="READY") == 1
    assert value(before, "daqif_writer_datapath_up") == 1
    assert ("daqif_writer_redis_connected", ()) not in before  # no --redis-url: not reported

    malformed = [[b"not a header", b"\0" * frame_bytes], [encode_stddaq_header(9, h, w, "uint16"), b"\0" * 7]]
    for message in malformed:
        socket.send_multipart(message)
    for image_id in range(1, 6):  # no write open: discarded
        socket.send_multipart(good(image_id))
    wait_for(lambda: value(scrape(writer), "daqif_writer_frames_received_total") == 7)

    output = data_root / "run.h5"
    reply = requests.post(
        writer.rest_url + "/writer/write_async", json={"output_file": str(output), "n_images": 4}, timeout=10
    ).json()
    assert reply["status"] == "ok", reply
    writing = scrape(writer)
    assert value(writing, "daqif_writer_write_active") == 1
    assert value(writing, "daqif_writer_write_images_requested") == 4
    assert value(writing, "daqif_writer_state", state="WRITING") == 1
    for image_id in range(10, 14):
        socket.send_multipart(good(image_id))
    wait_for(lambda: rest_status(writer)["acquisition"]["message"] == "Completed.")
    wait_for(lambda: value(scrape(writer), "daqif_writer_frames_written_total") == 4)

    after = scrape(writer)
    assert value(after, "daqif_writer_frames_received_total") == 11
    assert value(after, "daqif_writer_frames_discarded_total") == 5
    assert value(after, "daqif_writer_frames_malformed_total") == 2
    header_bytes = len(encode_stddaq_header(1, h, w, "uint16"))
    sent_bytes = sum(len(part) for message in malformed for part in message) + 9 * (
        header_bytes + frame_bytes
    )
    assert value(after, "daqif_writer_received_bytes_total") == sent_bytes
    assert value(after, "daqif_writer_written_bytes_total") == 4 * frame_bytes
    assert value(after, "daqif_writer_write_images_written") == 4
    assert value(after, "daqif_writer_write_active") == 0
    assert value(after, "daqif_writer_writes_total", outcome="completed") == 1
    assert value(after, "daqif_writer_writes_total", outcome="failed") == 0
    assert value(after, "daqif_writer_write_duration_seconds_count") == 1
    # The one duration observed falls in the last bucket and in every bucket above its value.
    assert value(after, "daqif_writer_write_duration_seconds_bucket", le="+Inf") == 1
    status = rest_status(writer)["acquisition"]["stats"]
    duration = status["stop_time"] - status["start_time"]
    assert value(after, "daqif_writer_write_duration_seconds_sum") == pytest.approx(duration)


def test_redis_connected_follows_the_redis_server(
    writer_factory: WriterFactory, source: tuple[zmq.Socket[bytes], str], redis_server: RedisServer
) -> None:
    _, endpoint = source
    writer = writer_factory(endpoint, redis_url=redis_server.url)
    wait_for(lambda: value(scrape(writer), "daqif_writer_redis_connected") == 1)
    stop_process(redis_server.process)
    wait_for(lambda: value(scrape(writer), "daqif_writer_redis_connected") == 0)
    assert value(scrape(writer), "daqif_writer_datapath_up") == 1  # the writer keeps running
