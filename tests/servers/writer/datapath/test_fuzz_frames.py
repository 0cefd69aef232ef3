"""Generated malformed frames against a real data path process over a real ZeroMQ PUSH socket.

Each example opens a write of a few good frames and sends them interleaved with generated bad
messages (wrong part counts, truncated or oversized headers, random bytes, valid headers with
wrong data sizes, broken bitshuffle-LZ4 framing). The file must hold exactly the good frames,
every bad message must be counted as malformed, and the process must stay up for the next example.
"""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daqif.frame import (
    STDDAQ_HEADER_SIZE,
    Compression,
    FrameError,
    check_data,
    compress_bslz4,
    decode_header,
    encode_daqif_header,
    encode_stddaq_header,
    expected_frame,
)
from daqif.testing import wait_for
from servers.writer.datapath.api import WriteJob, WritePhase, WriteProgress, WriteResult
from servers.writer.datapath.handle import ProcessDataPath

SHAPE = (16, 8)
DTYPE = "uint16"
NBYTES = SHAPE[0] * SHAPE[1] * 2
DETECTOR = "FUZZDET"
GOOD_PER_WRITE = 3
WAIT_S = 10.0

Message = list[bytes]


def good_frame(image_id: int, compressed: bool = False) -> Message:
    pixels = expected_frame(image_id, SHAPE, DTYPE)
    if compressed:
        return [
            encode_daqif_header(image_id, *SHAPE, DTYPE, compression=Compression.BSLZ4),
            compress_bslz4(pixels),
        ]
    return [encode_stddaq_header(image_id, *SHAPE, DTYPE), pixels.tobytes()]


def codec_rejects(message: Message) -> bool:
    """The oracle: the frame codec itself refuses `message` (so no write may take it)."""
    if len(message) != 2:
        return True
    try:
        check_data(decode_header(message[0]), message[1])
    except FrameError:
        return True
    return False


_COMPRESSED = compress_bslz4(expected_frame(7, SHAPE, DTYPE))


def _with_bytes(chunk: bytes, at: int, value: bytes) -> bytes:
    return chunk[:at] + value + chunk[at + len(value) :]


def _stddaq_raw(image_id: int, height: int, width: int, code: int) -> bytes:
    return struct.pack("<QQQHHH", image_id, height, width, code, 0, 0)


u64 = st.integers(0, 2**64 - 1)
data_sizes = st.integers(0, 3 * NBYTES).filter(lambda n: n != NBYTES)

bad_messages: st.SearchStrategy[Message] = st.one_of(
    # Wrong number of parts (a frame has exactly two).
    st.lists(st.binary(max_size=64), min_size=1, max_size=1),
    st.lists(st.binary(max_size=64), min_size=3, max_size=6),
    st.builds(
        lambda extra: [*good_frame(5), *extra], st.lists(st.binary(max_size=8), min_size=1, max_size=3)
    ),
    # Random header bytes of any length, random data.
    st.tuples(st.binary(max_size=80), st.binary(max_size=NBYTES + 16)).map(list),
    # Truncated or oversized Standard DAQ headers with the right data.
    st.builds(
        lambda cut: [encode_stddaq_header(5, *SHAPE, DTYPE)[:cut], bytes(NBYTES)],
        st.integers(0, STDDAQ_HEADER_SIZE - 1),
    ),
    st.builds(
        lambda tail: [encode_stddaq_header(5, *SHAPE, DTYPE) + tail, bytes(NBYTES)],
        st.binary(min_size=1, max_size=64),
    ),
    # 30-byte headers with hostile fields: zero or huge shapes, unknown dtype codes.
    st.builds(
        lambda image_id, h, w, code, n: [_stddaq_raw(image_id, h, w, code), bytes(n)],
        u64,
        st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1]),
        st.sampled_from([0, 1, 2**32, 2**64 - 1]),
        st.integers(0, 65535),
        st.sampled_from([0, 2, NBYTES]),
    ),
    # Valid headers (either form) with the wrong data size.
    st.builds(lambda image_id, n: [encode_stddaq_header(image_id, *SHAPE, DTYPE), bytes(n)], u64, data_sizes),
    st.builds(lambda image_id, n: [encode_daqif_header(image_id, *SHAPE, DTYPE), bytes(n)], u64, data_sizes),
    # A bitshuffle-LZ4 header with broken chunk framing: truncated, extended, wrong total or block size.
    st.builds(
        lambda cut: [encode_daqif_header(7, *SHAPE, DTYPE, compression=Compression.BSLZ4), _COMPRESSED[:cut]],
        st.integers(0, len(_COMPRESSED) - 1),
    ),
    st.builds(
        lambda tail: [
            encode_daqif_header(7, *SHAPE, DTYPE, compression=Compression.BSLZ4),
            _COMPRESSED + tail,
        ],
        st.binary(min_size=1, max_size=32),
    ),
    st.builds(
        lambda total: [
            encode_daqif_header(7, *SHAPE, DTYPE, compression=Compression.BSLZ4),
            _with_bytes(_COMPRESSED, 0, struct.pack(">Q", total)),
        ],
        u64.filter(lambda n: n != NBYTES),
    ),
    st.builds(
        lambda block: [
            encode_daqif_header(7, *SHAPE, DTYPE, compression=Compression.BSLZ4),
            _with_bytes(_COMPRESSED, 8, struct.pack(">I", block)),
        ],
        st.integers(0, 2**32 - 1),
    ),
    st.builds(
        lambda at, size: [
            encode_daqif_header(7, *SHAPE, DTYPE, compression=Compression.BSLZ4),
            _with_bytes(_COMPRESSED, 12 + at % max(1, len(_COMPRESSED) - 16), struct.pack(">I", size)),
        ],
        st.integers(0, 10_000),
        st.integers(0, 2**32 - 1),
    ),
    # Random bytes parsed as protobuf (the daqif header form).
    st.builds(
        lambda header, n: [header, bytes(n)],
        st.binary(min_size=31, max_size=120),
        st.sampled_from([0, NBYTES]),
    ),
).filter(codec_rejects)


def wait_finished(datapath: ProcessDataPath) -> WriteResult:
    progress: WriteProgress = wait_for(
        lambda: (p := datapath.progress()).phase in (WritePhase.FINISHED, WritePhase.FAILED) and p,
        WAIT_S,
        "the write to end",
    )
    assert progress.result is not None
    return progress.result


def frames_in(path: Path) -> tuple[list[int], np.ndarray]:
    with h5py.File(path, "r") as f:
        return [int(i) for i in f[f"{DETECTOR}/image_id"][:]], f[f"{DETECTOR}/data"][:]


def test_generated_malformed_frames_are_counted_never_written_and_good_frames_are_intact(
    tmp_path: Path,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    source = ctx.socket(zmq.PUSH)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    datapath = ProcessDataPath(f"tcp://127.0.0.1:{port}")
    writes = iter(range(1_000_000))
    try:
        datapath.start()

        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(
            bad=st.lists(bad_messages, min_size=1, max_size=6),
            # One choice per write: a write that starts uncompressed refuses compressed frames.
            compressed=st.booleans(),
        )
        def one_write(bad: list[Message], compressed: bool) -> None:
            n = next(writes)
            path = tmp_path / f"w{n}.h5"
            first_id = 1000 * (n + 1)
            good_ids = [first_id + i for i in range(GOOD_PER_WRITE)]
            before = datapath.counters()
            datapath.open_write(WriteJob(str(path), GOOD_PER_WRITE, f"run-{n}", DETECTOR, *SHAPE, DTYPE))
            # Bad messages before, between and after the good frames.
            sends: list[Message] = []
            for i, image_id in enumerate(good_ids):
                sends.extend(bad[i::GOOD_PER_WRITE])
                sends.append(good_frame(image_id, compressed))
            for message in sends:
                source.send_multipart(message)
            try:
                result = wait_finished(datapath)
            finally:
                datapath.stop_write()  # a failed example leaves no write open for the next one
            assert (result.n_written, result.error) == (GOOD_PER_WRITE, None), result
            ids, pixels = frames_in(path)
            assert ids == good_ids
            for image_id, frame in zip(ids, pixels, strict=True):
                np.testing.assert_array_equal(frame, expected_frame(image_id, SHAPE, DTYPE))
            wait_for(
                lambda: datapath.counters().received - before.received == len(sends),
                WAIT_S,
                "every message counted",
            )
            after = datapath.counters()
            assert after.malformed - before.malformed == len(bad)
            assert after.written - before.written == GOOD_PER_WRITE
            assert datapath.is_alive()

        one_write()
        assert datapath.is_alive()
    finally:
        datapath.close()
        source.close(0)
        ctx.term()
