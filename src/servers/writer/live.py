"""The live stream: a sample of the frames the data path receives, on a ZeroMQ PUB socket.

``daqif-writer --live-stream tcp://HOST:PORT [--live-rate HZ | --live-every N]`` makes the data
path publish some of the good frames it receives, whether or not a write is open, in the
Standard DAQ live-stream form ``array-1.0``: a two-part message

    part 1  JSON  {"htype": "array-1.0", "frame": <image id>, "shape": [H, W], "type": "uint16",
                   "status": <frame status>, "source_id": <id>,
                   "timestamp": <Unix seconds the writer received it>}
    part 2  the raw pixels, C order, little-endian, H*W*itemsize bytes (decompressed if the
            detector sent bitshuffle-LZ4)

Off the hot path: the receive loop (`datapath.worker`) compares one int per frame
(`LiveSampler.take_at`, the count of received frames at which the next sample is taken). The
sampled frame's ZeroMQ buffer is handed, with no copy, to a publisher thread through a one-slot
queue (a sample that finds the slot full is dropped, never waited for); that thread decompresses
it if needed, encodes the header and sends it. Frames that are not sampled are never
decompressed. PUB drops messages to slow subscribers, so a viewer never holds up the writer.

`--live-rate HZ` (default 2) takes at most HZ frames a second, each at least 1/HZ s after the
previous one (the clock is looked at once per receive batch); `--live-every N` takes every N-th
frame received instead. The writer's REST API subscribes to this stream for `/daq/preview` and
`/daq/live` (`servers.writer.preview`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zmq

from daqif.frame import Compression, FrameHeader, decompress_bslz4

log = logging.getLogger(__name__)

HTYPE: Final = "array-1.0"
DEFAULT_LIVE_RATE_HZ: Final = 2.0
NEVER: Final = 2**62  # take_at when no sample is due
# The JSON header a subscriber accepts: a few hundred bytes; anything longer is not ours.
MAX_HEADER_BYTES: Final = 4096
_ENDPOINT = re.compile(r"tcp://[^\s:/]+:[0-9]{1,5}")


class LiveError(ValueError):
    """A live-stream setting or message is unusable; the message says what is wrong."""


@dataclass(frozen=True)
class LiveOptions:
    """What `--live-stream`, `--live-rate` and `--live-every` ask for."""

    endpoint: str
    rate_hz: float | None = DEFAULT_LIVE_RATE_HZ  # at most this many samples a second …
    every: int | None = None  # … or every N-th frame received (then rate_hz is None)

    def __post_init__(self) -> None:
        if _ENDPOINT.fullmatch(self.endpoint) is None:
            raise LiveError(f"--live-stream must be tcp://HOST:PORT, got {self.endpoint[:200]!r}")
        if (self.rate_hz is None) == (self.every is None):
            raise LiveError("give one of --live-rate HZ and --live-every N")
        if self.rate_hz is not None and not 0 < self.rate_hz <= 1000:
            raise LiveError(f"--live-rate must be > 0 and <= 1000 frames a second, got {self.rate_hz:g}")
        if self.every is not None and self.every < 1:
            raise LiveError(f"--live-every must be >= 1, got {self.every}")

    def worker_args(self) -> list[str]:
        """The data path's command-line flags for these options."""
        args = [f"--live-stream={self.endpoint}"]
        if self.every is not None:
            return [*args, f"--live-every={self.every}"]
        return [*args, f"--live-rate={self.rate_hz}"]


@dataclass(frozen=True)
class LiveFrame:
    """One frame of the live stream, decoded."""

    image_id: int
    pixels: np.ndarray[Any, Any]  # [H, W]
    status: int = 0


def encode_live_header(header: FrameHeader, received_at: float) -> bytes:
    """The ``array-1.0`` JSON header of a frame received at `received_at` (Unix seconds)."""
    return json.dumps(
        {
            "htype": HTYPE,
            "frame": header.image_id,
            "shape": [header.height, header.width],
            "type": header.dtype.name,
            "status": header.status,
            "source_id": header.source_id,
            "timestamp": received_at,
        }
    ).encode()


def decode_live_message(parts: list[bytes]) -> LiveFrame:
    """A live-stream message as a `LiveFrame`; `LiveError` says what is wrong with it."""
    if len(parts) != 2:
        raise LiveError(f"a live-stream message has 2 parts (header, pixels), got {len(parts)}")
    head, data = parts
    if len(head) > MAX_HEADER_BYTES:
        raise LiveError(f"header of {len(head)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        meta = json.loads(head)
        if meta.get("htype") != HTYPE:
            raise LiveError(f"htype {str(meta.get('htype'))[:40]!r}, expected {HTYPE!r}")
        height, width = (int(n) for n in meta["shape"])
        dtype = np.dtype(str(meta["type"])).newbyteorder("<")
        image_id = int(meta["frame"])
        status = int(meta.get("status", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LiveError(f"unreadable array-1.0 header: {str(exc)[:200]}") from None
    if height < 1 or width < 1 or len(data) != height * width * dtype.itemsize:
        raise LiveError(f"{len(data)} bytes of pixels for shape [{height}, {width}] {dtype.name}")
    return LiveFrame(image_id, np.frombuffer(data, dtype=dtype).reshape(height, width), status)


def check_bindable(endpoint: str) -> None:
    """`LiveError` naming `endpoint` when a PUB socket cannot bind it now (the writer checks
    before it starts the data path, which binds it)."""
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise LiveError(f"cannot bind the live stream to {endpoint}: {exc}") from None
    finally:
        socket.close(0)
        context.term()


class LiveSampler:
    """The data path's side: decides which frames are sampled and publishes them from a thread.

    The receive loop calls `take` for a good frame when its count of received frames reached
    `take_at`, and `tick` once per batch (the rate clock); nothing else.
    """

    def __init__(self, context: zmq.Context[Any], options: LiveOptions) -> None:
        self.options = options
        self.take_at = 0 if options.every is not None else NEVER
        self._period = 0.0 if options.rate_hz is None else 1.0 / options.rate_hz
        self._next_time = 0.0
        self._slot: queue.Queue[tuple[FrameHeader, Any, float] | None] = queue.Queue(maxsize=1)
        self.published = 0
        self.dropped = 0  # sampled while the publisher was still busy with the previous one
        self._socket = context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 4)  # a slow viewer loses frames, never holds them
        try:
            self._socket.bind(options.endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise LiveError(f"cannot bind the live stream to {options.endpoint}: {exc}") from None
        self._thread = threading.Thread(target=self._publish_loop, name="live-publisher", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        """Once per receive batch: with `--live-rate`, make the next good frame due when its time came."""
        if self._period and self.take_at == NEVER:
            now = time.monotonic()
            if now >= self._next_time:
                self.take_at = 0
                self._next_time = now + self._period  # at least a period apart, no catching up

    def take(self, header: FrameHeader, data: Any, received: int) -> None:
        """Hand one frame (its ZeroMQ buffer, not a copy) to the publisher; never waits."""
        self.take_at = received + self.options.every if self.options.every is not None else NEVER
        try:
            self._slot.put_nowait((header, data, time.time()))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._slot.put_nowait(None)
        self._thread.join(timeout=5)

    def _publish_loop(self) -> None:
        socket = self._socket
        try:
            while (item := self._slot.get()) is not None:
                header, data, seen = item
                try:
                    if header.compression is Compression.BSLZ4:
                        pixels: Any = decompress_bslz4(bytes(data), header.shape, header.dtype).tobytes()
                    else:
                        pixels = data
                    socket.send_multipart(
                        [encode_live_header(header, seen), pixels], flags=zmq.NOBLOCK, copy=False
                    )
                    self.published += 1
                except zmq.Again:
                    self.dropped += 1
                except Exception as exc:  # a frame that cannot be shown must not end the stream
                    log.warning("live stream: frame %d not published: %s", header.image_id, exc)
        finally:
            socket.close(0)
