"""`/daq/preview` and `/daq/live` (`servers.writer.preview`) of a real writer fed by a real simulator."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from daqif.testing import wait_for
from servers.common.launch import WriterProcess, free_port
from servers.writer.preview import MAX_PREVIEW_SIDE, MJPEG_BOUNDARY, display_pixels

from .conftest import SHAPE, Simulator, WriterFactory


@pytest.fixture
def live_writer(writer_factory: WriterFactory, simulator: Simulator) -> WriterProcess:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    return writer_factory(simulator.endpoint, extra_args=("--live-stream", endpoint, "--live-rate", "20"))


def preview(writer: WriterProcess, **params: str) -> requests.Response:
    return requests.get(writer.rest_url + "/daq/preview", params=params, timeout=30)


def test_preview_is_the_latest_frame_as_png_or_jpeg_of_the_frame_size(live_writer: WriterProcess) -> None:
    png = wait_for(lambda: (reply := preview(live_writer)).status_code == 200 and reply)
    assert png.headers["content-type"] == "image/png" and int(png.headers["x-frame-id"]) >= 1
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.size == (SHAPE[1], SHAPE[0]) and image.mode == "L"
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() == 255  # the simulator's ramp, stretched for display
    jpeg = preview(live_writer, format="jpeg")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg.content))
    assert image.format == "JPEG" and image.size == (SHAPE[1], SHAPE[0])


def test_live_streams_jpeg_parts_of_new_frames(live_writer: WriterProcess) -> None:
    wait_for(lambda: preview(live_writer).status_code == 200)
    with requests.get(live_writer.rest_url + "/daq/live", stream=True, timeout=30) as reply:
        assert reply.headers["content-type"] == f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}"
        buffer = b""
        parts: list[tuple[int, bytes]] = []
        for chunk in reply.iter_content(chunk_size=None):
            buffer += chunk
            while (end := _part_end(buffer)) is not None:
                parts.append(_part(buffer[:end]))
                buffer = buffer[end:]
            if len(parts) >= 2:
                break
    assert parts[1][0] > parts[0][0]  # a new frame each part
    for _, body in parts:
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and image.size == (SHAPE[1], SHAPE[0])


def _part(data: bytes) -> tuple[int, bytes]:
    """(frame id, JPEG) of one complete multipart part."""
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:])
    assert headers["Content-Type"] == "image/jpeg"
    return int(headers["X-Frame-Id"]), body[: int(headers["Content-Length"])]


def _part_end(buffer: bytes) -> int | None:
    """Where the first complete part of `buffer` ends, None while it is incomplete."""
    head, found, rest = buffer.partition(b"\r\n\r\n")
    if not found:
        return None
    assert head.startswith(f"--{MJPEG_BOUNDARY}".encode()), head[:80]
    length = next(
        int(line.split(b": ", 1)[1]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length")
    )
    return len(head) + 4 + length + 2 if len(rest) >= length + 2 else None


def test_a_writer_without_live_stream_or_with_a_bad_format_says_so(
    writer: WriterProcess, live_writer: WriterProcess
) -> None:
    for path in ("/daq/preview", "/daq/live"):
        reply = requests.get(writer.rest_url + path, timeout=30)
        assert reply.status_code == 404
        assert reply.json() == {
            "status": "error",
            "message": "malformed request: this writer has no live stream; start it with --live-stream",
        }
    bad = preview(live_writer, format="gif")
    assert (
        bad.status_code == 422
        and "format" in bad.json()["message"]
        and "'png' or 'jpeg'" in bad.json()["message"]
    )


def test_display_scaling_ignores_hot_pixels_and_reduces_large_frames() -> None:
    ramp = np.tile(np.arange(100, dtype=np.uint16), (100, 1))
    ramp[0, 0] = 65535  # one hot pixel
    shown = display_pixels(ramp)
    assert shown.dtype == np.uint8 and shown.shape == (100, 100)
    assert shown[50, 50] == pytest.approx(128, abs=4)  # the ramp's middle stays mid-grey
    assert shown[0, 0] == 255 and shown[1, 0] == 0
    assert (display_pixels(np.full((8, 8), 7, dtype=np.uint16)) == 128).all()  # a flat frame
    big = display_pixels(np.zeros((3000, 1000), dtype=np.uint32))
    assert max(big.shape) <= MAX_PREVIEW_SIDE


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
def test_large_frames_are_scaled_like_small_ones(dtype: str) -> None:
    # A large frame takes its contrast from a grid of its pixels and (8/16-bit) a lookup table:
    # the image is the one the direct float arithmetic gives, within one grey level.
    rng = np.random.default_rng(7)
    top = 250 if dtype == "uint8" else 60000
    frame = rng.integers(0, top, size=(1024, 1024)).astype(dtype)
    frame[10, 10] = top + 5  # a hot pixel does not set the contrast
    shown = display_pixels(frame)
    low, high = np.percentile(frame, [1.0, 99.5])
    direct = np.clip((frame.astype(np.float64) - low) * (255.0 / (high - low)), 0, 255)
    assert shown.shape == frame.shape and shown.dtype == np.uint8
    assert np.abs(shown.astype(np.float64) - direct).max() <= 1.5 + 255 * 0.01  # grid percentiles
    assert shown[10, 10] == 255 and shown.min() == 0


def test_output_files_are_untouched_by_the_preview(live_writer: WriterProcess, data_root: Path) -> None:
    wait_for(lambda: preview(live_writer).status_code == 200)
    output = data_root / "with-preview.h5"
    reply = requests.post(
        live_writer.rest_url + "/writer/write_sync",
        json={"output_file": str(output), "n_images": 50},
        timeout=120,
    ).json()
    assert reply["status"] == "ok" and reply["writer"]["acquisition"]["message"] == "Completed."
    from .test_integrity import assert_pixels_match_ids, frames_in

    assert frames_in(output) == (50, 50, 50)
    assert_pixels_match_ids(output)
