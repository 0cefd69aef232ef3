"""The writer's preview images: the latest frame of the live stream, scaled for display.

The control plane subscribes to the data path's live stream (`servers.writer.live`) and keeps
the latest frame; `GET /daq/preview` returns it as PNG (``?format=jpeg`` for JPEG) and
`GET /daq/live` streams each new one as a JPEG part of a ``multipart/x-mixed-replace`` (MJPEG)
response. An image is encoded only when asked for, once per frame and format.

Display scaling (`display_pixels`): the pixels are mapped linearly to 0-255 between the 1st and
the 99.5th percentile of the frame (taken on an even grid of about 65,536 of its pixels), so a few
hot or dead pixels do not wash the image out; a flat frame is mid-grey. Large 8- and 16-bit frames
are mapped through a lookup table (one gather per pixel): a 4 MiB frame costs ~3 ms, not 11.
Frames taller or wider than `MAX_PREVIEW_SIDE` are reduced (by an integer step), so a
16-megapixel detector costs a browser a few hundred KiB, not 32 MiB.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import zmq
import zmq.asyncio

from servers.writer.live import LiveError, LiveFrame, decode_live_message

log = logging.getLogger(__name__)

ImageFormat = Literal["png", "jpeg"]
MEDIA_TYPES: Final[dict[str, str]] = {"png": "image/png", "jpeg": "image/jpeg"}
MAX_PREVIEW_SIDE: Final = 1024
LOW_PERCENTILE: Final = 1.0
HIGH_PERCENTILE: Final = 99.5
JPEG_QUALITY: Final = 85
PERCENTILE_SAMPLE: Final = 65536  # pixels the contrast limits are taken from
MJPEG_BOUNDARY: Final = "daqif-frame"


def display_pixels(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """`pixels` [H, W] as uint8 for display (see the module docstring)."""
    step = max(1, -(-max(pixels.shape) // MAX_PREVIEW_SIDE))
    view = pixels[::step, ::step]
    # The contrast limits from at most ~PERCENTILE_SAMPLE pixels (an even grid over the frame).
    grid = max(1, math.ceil(math.sqrt(view.size / PERCENTILE_SAMPLE)))
    low, high = (float(v) for v in np.percentile(view[::grid, ::grid], [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if high <= low:
        return np.full(view.shape, 128, dtype=np.uint8)
    scale = 255.0 / (high - low)
    if view.dtype.kind == "u" and view.dtype.itemsize <= 2 and view.size > 2 ** (8 * view.dtype.itemsize):
        # A large 8/16-bit frame: one table lookup per pixel instead of float arithmetic.
        table = np.arange(2 ** (8 * view.dtype.itemsize), dtype=np.float32)
        lookup: np.ndarray[Any, Any] = np.clip((table - low) * scale, 0, 255).astype(np.uint8)
        mapped: np.ndarray[Any, Any] = lookup[view]
        return mapped
    scaled = (view.astype(np.float32) - low) * scale
    shown: np.ndarray[Any, Any] = np.clip(scaled, 0, 255).astype(np.uint8)
    return shown


def encode_image(pixels: np.ndarray[Any, Any], image_format: ImageFormat) -> bytes:
    """A PNG or JPEG of a frame, scaled for display."""
    from PIL import Image

    out = io.BytesIO()
    image = Image.fromarray(display_pixels(pixels), mode="L")
    if image_format == "jpeg":
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


@dataclass(frozen=True)
class PreviewImage:
    image_id: int
    body: bytes
    media_type: str


class LivePreview:
    """The latest frame of the live stream at `endpoint`, and its images (one per format)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._latest: LiveFrame | None = None
        self._seq = 0  # frames received so far
        self._images: dict[str, tuple[int, PreviewImage]] = {}
        self._changed = asyncio.Condition()
        self._closed = False
        self.bad_messages = 0

    @property
    def latest(self) -> LiveFrame | None:
        return self._latest

    async def run(self) -> None:
        """Receive the live stream until cancelled (reconnecting by itself, as ZeroMQ does)."""
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 2)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self.endpoint)
        try:
            while True:
                parts = await socket.recv_multipart()
                try:
                    frame = decode_live_message(parts)
                except LiveError as exc:
                    self.bad_messages += 1
                    if self.bad_messages == 1 or self.bad_messages % 1000 == 0:
                        log.warning(
                            "live stream %s: message skipped (%d so far): %s",
                            self.endpoint,
                            self.bad_messages,
                            exc,
                        )
                    continue
                async with self._changed:
                    self._latest = frame
                    self._seq += 1
                    self._changed.notify_all()
        finally:
            socket.close(0)
            context.term()

    async def close(self) -> None:
        """Wake every `frames()` stream so it ends."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def image(self, image_format: ImageFormat) -> PreviewImage | None:
        """The latest frame as an image, None before the first frame arrived."""
        frame, seq = self._latest, self._seq
        if frame is None:
            return None
        cached = self._images.get(image_format)
        if cached is not None and cached[0] == seq:
            return cached[1]
        body = await asyncio.to_thread(encode_image, frame.pixels, image_format)
        image = PreviewImage(frame.image_id, body, MEDIA_TYPES[image_format])
        self._images[image_format] = (seq, image)
        return image

    async def frames(self, image_format: ImageFormat = "jpeg") -> AsyncIterator[PreviewImage]:
        """The latest image now (if any), then each new one, until `close`."""
        seen = 0
        while not self._closed:
            async with self._changed:
                while self._seq == seen and not self._closed:
                    await self._changed.wait()
                if self._closed:
                    return
                seen = self._seq
            image = await self.image(image_format)
            if image is not None:
                yield image


async def mjpeg_parts(preview: LivePreview) -> AsyncIterator[bytes]:
    """The body of `GET /daq/live`: one multipart part per new frame."""
    async for image in preview.frames("jpeg"):
        head = (
            f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(image.body)}\r\n"
            f"X-Frame-Id: {image.image_id}\r\n\r\n"
        )
        yield head.encode() + image.body + b"\r\n"
