"""The frame codec: both header forms, every dtype, and a clear error for each malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from daqif.frame import (
    MAX_FRAME_BYTES,
    PATTERN_PERIOD,
    STDDAQ_HEADER_SIZE,
    Compression,
    FrameError,
    FrameHeader,
    HeaderEncoder,
    HeaderFormat,
    check_data,
    compress_bslz4,
    decode_header,
    decompress_bslz4,
    dtype_code,
    dtype_from_code,
    encode_daqif_header,
    encode_header,
    encode_stddaq_header,
    expected_frame,
)
from daqif.v1 import frame_pb2

CODES = {
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "int8": 11,
    "int16": 12,
    "int32": 14,
    "int64": 18,
    "float16": 22,
    "float32": 24,
    "float64": 28,
}


@pytest.mark.parametrize(("dtype", "code"), CODES.items())
def test_dtype_codes_are_the_standard_daq_ones(dtype: str, code: int) -> None:
    assert dtype_code(dtype) == code
    assert dtype_from_code(code) == np.dtype(dtype)
    assert frame_pb2.Dtype.Value(f"DTYPE_{dtype.upper()}") == code


@pytest.mark.parametrize("dtype", CODES)
def test_stddaq_header_round_trips_every_dtype(dtype: str) -> None:
    encoded = encode_stddaq_header(2**40 + 7, 512, 1024, dtype, status=2, source_id=3)
    assert len(encoded) == STDDAQ_HEADER_SIZE
    assert struct.unpack("<QQQHHH", encoded) == (2**40 + 7, 512, 1024, CODES[dtype], 2, 3)
    header = decode_header(encoded)
    assert header == FrameHeader(2**40 + 7, 512, 1024, np.dtype(dtype), 2, 3)
    assert header.header_format is HeaderFormat.STDDAQ
    assert header.timestamp is None
    assert encode_header(header) == encoded


@pytest.mark.parametrize("dtype", CODES)
@pytest.mark.parametrize("compression", list(Compression))
def test_daqif_header_round_trips_every_dtype_and_compression(dtype: str, compression: Compression) -> None:
    encoded = encode_daqif_header(
        99, 16, 8, dtype, status=1, source_id=4, compression=compression, timestamp=1234.5
    )
    assert len(encoded) != STDDAQ_HEADER_SIZE
    header = decode_header(encoded)
    assert header == FrameHeader(99, 16, 8, np.dtype(dtype), 1, 4, compression, 1234.5, HeaderFormat.DAQIF)
    assert decode_header(encode_header(header)) == header


def test_daqif_encoder_pads_a_header_that_would_be_30_bytes() -> None:
    # image_id 2**63 (11 bytes), height 2**14 (4), width 127 (2), dtype (2), compression (2), time (9).
    unpadded = frame_pb2.FrameHeader(
        image_id=2**63,
        height=2**14,
        width=127,
        dtype=frame_pb2.DTYPE_UINT8,
        compression=frame_pb2.COMPRESSION_NONE,
        timestamp=1.5,
    )
    assert len(unpadded.SerializeToString()) == STDDAQ_HEADER_SIZE
    encoded = encode_daqif_header(2**63, 2**14, 127, "uint8", timestamp=1.5)
    assert len(encoded) != STDDAQ_HEADER_SIZE
    assert decode_header(encoded).image_id == 2**63
    encoder = HeaderEncoder(2**14, 127, "uint8", HeaderFormat.DAQIF)
    assert len(encoder.encode(2**63, timestamp=1.5)) != STDDAQ_HEADER_SIZE
    assert len(encoder.encode(2, timestamp=1.5)) != STDDAQ_HEADER_SIZE  # padding does not stick


def test_a_30_byte_protobuf_header_from_a_foreign_encoder_is_still_decoded() -> None:
    message = frame_pb2.FrameHeader(
        image_id=2**63, height=2**14, width=2**14, dtype=frame_pb2.DTYPE_UINT8, timestamp=1.5
    )
    encoded = message.SerializeToString()
    assert len(encoded) == STDDAQ_HEADER_SIZE
    header = decode_header(encoded)
    assert header.header_format is HeaderFormat.DAQIF
    assert (header.image_id, header.height, header.width) == (2**63, 2**14, 2**14)


def test_header_encoder_matches_the_plain_encoders() -> None:
    stddaq = HeaderEncoder(256, 128, "uint16")
    assert stddaq.encode(77) == encode_stddaq_header(77, 256, 128, "uint16")
    daqif = HeaderEncoder(256, 128, "float32", HeaderFormat.DAQIF, Compression.BSLZ4, status=1)
    assert decode_header(daqif.encode(5, timestamp=3.0)) == decode_header(
        encode_daqif_header(5, 256, 128, "float32", compression=Compression.BSLZ4, status=1, timestamp=3.0)
    )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"", "empty header part"),
        (struct.pack("<QQQHHH", 1, 4, 4, 3, 0, 0), "bad 30-byte Standard DAQ header: unknown dtype code 3"),
        (struct.pack("<QQQHHH", 1, 0, 4, 2, 0, 0), "frame shape 0x4 has a zero dimension"),
        (struct.pack("<QQQHHH", 1, 2**20, 2**20, 28, 0, 0), "exceeds the 4 GiB limit of one HDF5 chunk"),
        (b"\xff" * 7, "neither a 30-byte Standard DAQ header nor a daqif.v1.FrameHeader"),
        (b"garbage header bytes!", "header of 21 bytes is neither"),
        (
            frame_pb2.FrameHeader(image_id=1, height=4, width=4, dtype=5).SerializeToString(),  # type: ignore[arg-type]
            "daqif.v1.FrameHeader: unknown dtype code 5",
        ),
        (
            frame_pb2.FrameHeader(image_id=1, height=4, dtype=frame_pb2.DTYPE_UINT16).SerializeToString(),
            "daqif.v1.FrameHeader: frame shape 4x0 has a zero dimension",
        ),
        (
            frame_pb2.FrameHeader(
                image_id=1,
                height=4,
                width=4,
                dtype=frame_pb2.DTYPE_UINT16,
                compression=9,  # type: ignore[arg-type]
            ).SerializeToString(),
            "daqif.v1.FrameHeader: unknown compression 9",
        ),
    ],
)
def test_malformed_headers_raise_frame_error_saying_what_is_wrong(header: bytes, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_header(header)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_decode_accepts_a_memoryview() -> None:
    encoded = encode_stddaq_header(3, 2, 2, "int16")
    assert decode_header(memoryview(encoded)).image_id == 3
    assert decode_header(memoryview(encode_daqif_header(4, 2, 2, "int16"))).image_id == 4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_stddaq_header(1, 4, 4, "complex64"), "dtype complex64 has no frame dtype code"),
        (lambda: encode_stddaq_header(1, 4, 4, "not-a-dtype"), "not a numpy dtype"),
        (lambda: encode_stddaq_header(1, 0, 4, "uint8"), "zero dimension"),
        (lambda: encode_stddaq_header(-1, 4, 4, "uint8"), "Standard DAQ header field out of range"),
        (lambda: encode_daqif_header(1, 2**33, 1, "uint8"), "exceeds the 4 GiB limit"),
        (
            lambda: encode_header(FrameHeader(1, 4, 4, np.dtype("uint8"), compression=Compression.BSLZ4)),
            "the Standard DAQ header cannot say a frame is compressed",
        ),
        (lambda: dtype_from_code(99), "unknown dtype code 99"),
    ],
)
def test_encoding_bad_values_raises_frame_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(FrameError) as caught:
        call()
    assert message in str(caught.value)


def test_check_data_refuses_uncompressed_data_of_the_wrong_size() -> None:
    header = decode_header(encode_stddaq_header(8, 4, 4, "uint16"))
    check_data(header, bytes(32))
    with pytest.raises(FrameError, match=r"frame 8: data is 31 bytes, header says 4x4 uint16 = 32 bytes"):
        check_data(header, bytes(31))


def test_check_data_refuses_a_bslz4_chunk_of_another_frame_size() -> None:
    header = decode_header(encode_daqif_header(9, 16, 16, "uint16", compression=Compression.BSLZ4))
    check_data(header, compress_bslz4(expected_frame(9, (16, 16), "uint16")))
    with pytest.raises(FrameError, match="bitshuffle-LZ4 chunk holds 128 bytes, header says"):
        check_data(header, compress_bslz4(expected_frame(9, (8, 8), "uint16")))
    with pytest.raises(FrameError, match="chunk of 5 bytes is too short"):
        check_data(header, b"short")


def _garble_lz4_blocks(chunk: bytes, blocks: set[int]) -> bytes:
    """`chunk` with the LZ4 bytes of `blocks` overwritten, its framing (every block's size) kept."""
    out = bytearray(chunk)
    position = 12
    for index in range(len(chunk)):
        if position + 4 > len(chunk) - 1:
            break
        (size,) = struct.unpack_from(">I", out, position)
        if index in blocks:
            out[position + 4 : position + 4 + size] = b"\xff" * size
        position += 4 + size
    return bytes(out)


@pytest.mark.parametrize("garbled", [0, 1])
def test_check_data_decoding_refuses_garbage_lz4_blocks_that_the_framing_walk_lets_through(
    garbled: int,
) -> None:
    # 64x96 uint16 = 12 KiB: one full 8 KiB block, then a last one of 4 KiB.
    header = decode_header(encode_daqif_header(4, 64, 96, "uint16", compression=Compression.BSLZ4))
    chunk = compress_bslz4(expected_frame(4, (64, 96), "uint16"))
    check_data(header, chunk, decode=True)
    garbage = _garble_lz4_blocks(chunk, {garbled})
    check_data(header, garbage)  # the default check walks the framing only
    with pytest.raises(
        FrameError, match=rf"frame 4: bitshuffle-LZ4 chunk block {garbled} \(at byte \d+\) is not"
    ):
        check_data(header, garbage, decode=True)


@pytest.mark.parametrize("dtype", CODES)
def test_expected_frame_is_deterministic_exact_and_periodic(dtype: str) -> None:
    frame = expected_frame(5, (20, 30), dtype)
    assert frame.shape == (20, 30) and frame.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(frame, expected_frame(5, (20, 30), dtype))
    np.testing.assert_array_equal(frame, expected_frame(5 + PATTERN_PERIOD, (20, 30), dtype))
    assert not np.array_equal(frame, expected_frame(6, (20, 30), dtype))
    rows, cols = np.indices((20, 30))
    modulus = 127 if np.dtype(dtype).itemsize == 1 else 2039
    np.testing.assert_array_equal(frame.astype(np.int64), (cols + 3 * rows + 17 * 5) % modulus)


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32", "uint8"])
def test_bslz4_compression_round_trips_through_hdf5s_filter(dtype: str) -> None:
    frame = expected_frame(3, (64, 40), dtype)
    chunk = compress_bslz4(frame)
    assert struct.unpack_from(">Q", chunk)[0] == frame.nbytes  # bitshuffle's framing
    np.testing.assert_array_equal(decompress_bslz4(chunk, (64, 40), dtype), frame)


def test_max_frame_bytes_is_just_under_4_gib() -> None:
    assert MAX_FRAME_BYTES == 2**32 - 1
