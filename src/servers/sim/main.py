"""``daqif-sim``: a detector simulator that binds a ZeroMQ source and sends frames (DESIGN §4).

Frames are ``[header, data]`` with the pixels of `daqif.frame.expected_frame` (deterministic from
the image id), so whoever records them can check every pixel. Image ids start at ``--first-id``
(default 1) and count up.

The frames (and their bitshuffle-LZ4 chunks) are built once at start-up and the same immutable
buffers are sent again and again (zero-copy for large frames), so the simulator is not the
bottleneck of a benchmark.

Run it from the command line, or from Python::

    sim = Simulator(SimConfig(endpoint="tcp://127.0.0.1:*", shape=(256, 128), count=100))
    sim.bind()             # sim.endpoint is now the bound address
    stats = sim.run()      # or run it in a thread and call sim.stop()
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import zmq

from daqif.frame import (
    PATTERN_PERIOD,
    Compression,
    FrameError,
    HeaderEncoder,
    HeaderFormat,
    compress_bslz4,
    dtype_code,
    expected_frame,
)
from servers.common.process import die_with_parent
from servers.common.ready import ready_line

SocketKind = Literal["push", "pub"]

DONE_PREFIX = "daqif-sim: done "

DEFAULT_SNDHWM = 1000
DEFAULT_LINGER_S = 30.0
_POLL_MS = 100  # how often a blocked send looks at the stop flag


@dataclass(frozen=True)
class SimConfig:
    """What the simulator sends and where."""

    endpoint: str  # e.g. "tcp://127.0.0.1:9999"; "tcp://127.0.0.1:*" picks a free port
    shape: tuple[int, int]  # (height, width)
    dtype: str = "uint16"
    rate: float = 0.0  # frames per second; 0 = as fast as possible
    count: int = 0  # frames to send; 0 = until stopped
    header: HeaderFormat = HeaderFormat.STDDAQ
    compress: Compression = Compression.NONE
    socket: SocketKind = "push"
    first_id: int = 1
    sndhwm: int = DEFAULT_SNDHWM  # messages queued per connected receiver
    linger_s: float = DEFAULT_LINGER_S  # at exit, how long queued frames may still be delivered

    def check(self) -> None:
        """Raise `ValueError` (with what is wrong) for an unusable configuration."""
        height, width = self.shape
        if height < 1 or width < 1:
            raise ValueError(f"--shape {height} {width}: both dimensions must be >= 1")
        dtype_code(self.dtype)  # FrameError (a ValueError) for an unsupported dtype
        if self.rate < 0:
            raise ValueError(f"--rate {self.rate}: must be >= 0 (0 = as fast as possible)")
        if self.count < 0:
            raise ValueError(f"--count {self.count}: must be >= 0 (0 = until stopped)")
        if self.first_id < 0:
            raise ValueError(f"--first-id {self.first_id}: must be >= 0")
        if self.header is HeaderFormat.STDDAQ and self.compress is not Compression.NONE:
            raise ValueError(
                "--compress bslz4 needs --header daqif (the Standard DAQ header has no such field)"
            )
        if self.socket not in ("push", "pub"):
            raise ValueError(f"--socket {self.socket}: must be push or pub")


@dataclass(frozen=True)
class SimStats:
    """What a run sent."""

    endpoint: str
    frames_sent: int
    bytes_sent: int  # data parts as sent (compressed size when compressed)
    raw_bytes_sent: int  # uncompressed equivalent
    last_image_id: int  # 0 when nothing was sent
    elapsed_s: float  # first send to last send
    frames_per_s: float
    max_lag_s: float  # with --rate: worst delay of a send behind its schedule


class Simulator:
    """The simulator as a Python object: `bind`, then `run` (blocking) until done or `stop`."""

    def __init__(self, config: SimConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        config.check()
        self.config = config
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._payloads, self.frame_nbytes = _build_payloads(config)
        self.endpoint = config.endpoint

    def bind(self) -> str:
        """Bind the source socket; return the bound endpoint (the real port for ``:*``)."""
        kind = zmq.PUSH if self.config.socket == "push" else zmq.PUB
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        sock.setsockopt(zmq.LINGER, int(self.config.linger_s * 1000))
        sock.bind(self.config.endpoint)
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def stop(self) -> None:
        """Ask `run` to return after the frame it is sending (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> SimStats:
        """Send frames until `count` are sent or `stop` is called; close the socket (lingering
        so queued frames are still delivered) and return what was sent."""
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None
        cfg = self.config
        height, width = cfg.shape
        encoder = HeaderEncoder(height, width, cfg.dtype, cfg.header, cfg.compress)
        payloads = self._payloads
        period = 1.0 / cfg.rate if cfg.rate > 0 else 0.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLOUT)
        stop = self._stop
        sent = 0
        sent_bytes = 0
        max_lag = 0.0
        image_id = cfg.first_id
        t_start = 0.0  # set at the first send: waiting for a receiver is not sending time
        t_last = 0.0
        try:
            while not stop.is_set() and (cfg.count == 0 or sent < cfg.count):
                if period and sent:
                    due = t_start + sent * period
                    now = time.perf_counter()
                    if due > now:
                        time.sleep(due - now)
                    else:
                        max_lag = max(max_lag, now - due)
                header = encoder.encode(image_id)
                payload = payloads[image_id % PATTERN_PERIOD]
                if not _send(sock, poller, header, payload, stop):
                    break
                if not sent:
                    t_start = time.perf_counter()
                sent += 1
                sent_bytes += len(payload)
                image_id += 1
            t_last = time.perf_counter() if sent else 0.0
        finally:
            sock.close()
            self._socket = None
            if self._own_context:
                self._context.term()  # blocks up to LINGER while queued frames go out
        elapsed = t_last - t_start
        return SimStats(
            endpoint=self.endpoint,
            frames_sent=sent,
            bytes_sent=sent_bytes,
            raw_bytes_sent=sent * self.frame_nbytes,
            last_image_id=image_id - 1 if sent else 0,
            elapsed_s=elapsed,
            frames_per_s=sent / elapsed if elapsed > 0 else 0.0,
            max_lag_s=max_lag,
        )


def _send(
    sock: zmq.Socket[bytes], poller: zmq.Poller, header: bytes, payload: bytes, stop: threading.Event
) -> bool:
    """Send one frame; wait (looking at `stop`) while PUSH has no receiver or its queue is full."""
    while True:
        try:
            # copy=False: pyzmq still copies below its copy threshold (64 KiB), where that is cheaper.
            sock.send_multipart((header, payload), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            while not poller.poll(_POLL_MS):
                if stop.is_set():
                    return False


def _build_payloads(config: SimConfig) -> tuple[list[bytes], int]:
    """The data parts for each residue of image_id modulo PATTERN_PERIOD (built once)."""
    payloads = []
    nbytes = 0
    for residue in range(PATTERN_PERIOD):
        frame = expected_frame(residue, config.shape, config.dtype)
        nbytes = frame.nbytes
        if config.compress is Compression.BSLZ4:
            payloads.append(compress_bslz4(frame))
        else:
            payloads.append(frame.tobytes())
    return payloads, nbytes


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``daqif-sim`` command line."""
    parser = argparse.ArgumentParser(
        prog="daqif-sim",
        description="Detector simulator: binds a ZeroMQ PUSH (or PUB) socket and sends [header, data] "
        "frames with deterministic pixels (daqif.frame.expected_frame), image ids from 1.",
    )
    parser.add_argument(
        "--endpoint",
        required=True,
        help="address to bind, e.g. tcp://127.0.0.1:9999 (port *: any free one)",
    )
    parser.add_argument("--shape", nargs=2, type=int, metavar=("H", "W"), default=[256, 128])
    parser.add_argument("--dtype", default="uint16", help="numpy dtype name (default uint16)")
    parser.add_argument("--rate", type=float, default=0.0, help="frames per second; 0 = as fast as possible")
    parser.add_argument("--count", type=int, default=0, help="frames to send; 0 = until stopped")
    parser.add_argument("--header", choices=[f.value for f in HeaderFormat], default="stddaq")
    parser.add_argument("--compress", choices=[c.value for c in Compression], default="none")
    parser.add_argument("--socket", choices=["push", "pub"], default="push")
    parser.add_argument("--first-id", type=int, default=1, help="image id of the first frame (default 1)")
    parser.add_argument("--sndhwm", type=int, default=DEFAULT_SNDHWM, help="ZeroMQ send high-water mark")
    parser.add_argument(
        "--linger",
        type=float,
        default=DEFAULT_LINGER_S,
        help="seconds queued frames may still be delivered after the last send",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The `SimConfig` of parsed command-line arguments."""
    socket_kind: SocketKind = "pub" if args.socket == "pub" else "push"
    return SimConfig(
        endpoint=args.endpoint,
        shape=(args.shape[0], args.shape[1]),
        dtype=args.dtype,
        rate=args.rate,
        count=args.count,
        header=HeaderFormat(args.header),
        compress=Compression(args.compress),
        socket=socket_kind,
        first_id=args.first_id,
        sndhwm=args.sndhwm,
        linger_s=args.linger,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``daqif-sim``. Prints its ready line (``daqif-ready sim stream=ENDPOINT``,
    the bound endpoint) once it listens and a ``done`` line (JSON of `SimStats`) on exit;
    SIGINT/SIGTERM stop it cleanly."""
    die_with_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        sim = Simulator(config)
    except (ValueError, FrameError) as exc:
        parser.error(str(exc))
    try:
        endpoint = sim.bind()
    except zmq.ZMQError as exc:
        print(f"daqif-sim: cannot bind {config.endpoint}: {exc}", file=sys.stderr)
        return 1

    def _on_signal(_signum: int, _frame: object) -> None:
        sim.stop()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    height, width = config.shape
    print(ready_line("sim", stream=endpoint), flush=True)
    print(
        f"daqif-sim: sending {config.socket}, {height}x{width} {np.dtype(config.dtype).name}, "
        f"{config.header.value} header, compress {config.compress.value}, {sim.frame_nbytes} bytes/frame",
        flush=True,
    )
    stats = sim.run()
    print(f"{DONE_PREFIX}{json.dumps(asdict(stats))}", flush=True)
    return 0


def parse_done_line(line: str) -> SimStats | None:
    """The `SimStats` of the simulator's last line (`daqif-sim: done {...}`); `None` for other lines."""
    if not line.startswith(DONE_PREFIX):
        return None
    return SimStats(**json.loads(line.removeprefix(DONE_PREFIX)))


if __name__ == "__main__":
    sys.exit(main())
