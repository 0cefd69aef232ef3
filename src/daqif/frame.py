"""The frame codec of the daqif data plane (DESIGN §4).

A frame is a 2-part ZeroMQ message ``[header, data]``. Two header forms are accepted and told
apart by their length:

- the Standard DAQ binary header, exactly 30 bytes, packed little-endian
  ``image_id u64, height u64, width u64, dtype u16, status u16, source_id u16``;
- ``daqif.v1.FrameHeader`` (protobuf), which also says whether ``data`` is compressed and when
  the frame was produced. Its encoder pads it so it is never exactly 30 bytes long.

A 30-byte header that does not validate as a Standard DAQ header is tried as protobuf before it
is called malformed (a foreign protobuf encoder may produce 30 bytes).

``data`` is the raw pixels (C order) or, with ``Compression.BSLZ4``, one chunk exactly as HDF5's
bitshuffle filter stores it (``hdf5plugin.Bitshuffle(cname="lz4")``), so a writer can store it with
a direct chunk write.

`expected_frame` is the deterministic pixel pattern the simulator sends; tests and benchmarks
use it to check what was written.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from daqif.v1 import frame_pb2

__all__ = [
    "BSLZ4_CHUNK_HEADER_SIZE",
    "MAX_FRAME_BYTES",
    "PATTERN_PERIOD",
    "STDDAQ_HEADER_SIZE",
    "Compression",
    "FrameError",
    "FrameHeader",
    "HeaderEncoder",
    "HeaderFormat",
    "check_data",
    "compress_bslz4",
    "decode_header",
    "decompress_bslz4",
    "dtype_code",
    "dtype_from_code",
    "encode_daqif_header",
    "encode_header",
    "encode_stddaq_header",
    "expected_frame",
]


class FrameError(ValueError):
    """A frame header or frame data that cannot be used; the message says what is wrong."""


class HeaderFormat(enum.Enum):
    """Which of the two header forms a frame came with."""

    STDDAQ = "stddaq"  # the 30-byte Standard DAQ binary header
    DAQIF = "daqif"  # daqif.v1.FrameHeader (protobuf)


class Compression(enum.Enum):
    """What the data part holds."""

    NONE = "none"  # raw pixels, C order
    BSLZ4 = "bslz4"  # one bitshuffle-LZ4 chunk in HDF5 filter framing


STDDAQ_HEADER_SIZE: Final = 30
_STDDAQ = struct.Struct("<QQQHHH")
assert _STDDAQ.size == STDDAQ_HEADER_SIZE

# One frame is one HDF5 chunk, and HDF5 chunks must be smaller than 4 GiB.
MAX_FRAME_BYTES: Final = (1 << 32) - 1

# Bitshuffle's chunk framing: big-endian u64 uncompressed size, u32 block size (bytes), blocks.
BSLZ4_CHUNK_HEADER_SIZE: Final = 12
_BSLZ4_HEADER = struct.Struct(">QI")

_CODE_TO_DTYPE: Final[dict[int, np.dtype[np.generic]]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
    11: np.dtype("<i1"),
    12: np.dtype("<i2"),
    14: np.dtype("<i4"),
    18: np.dtype("<i8"),
    22: np.dtype("<f2"),
    24: np.dtype("<f4"),
    28: np.dtype("<f8"),
}
_DTYPE_TO_CODE: Final[dict[np.dtype[np.generic], int]] = {dt: code for code, dt in _CODE_TO_DTYPE.items()}
_KNOWN_CODES_TEXT: Final = ", ".join(f"{code} {dt.name}" for code, dt in _CODE_TO_DTYPE.items())

_PB_COMPRESSION: Final = {
    frame_pb2.COMPRESSION_UNDEFINED: Compression.NONE,
    frame_pb2.COMPRESSION_NONE: Compression.NONE,
    frame_pb2.COMPRESSION_BITSHUFFLE_LZ4: Compression.BSLZ4,
}
_COMPRESSION_PB: Final = {
    Compression.NONE: frame_pb2.COMPRESSION_NONE,
    Compression.BSLZ4: frame_pb2.COMPRESSION_BITSHUFFLE_LZ4,
}


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded frame header (either form)."""

    image_id: int
    height: int
    width: int
    dtype: np.dtype[np.generic]  # little-endian numpy dtype
    status: int = 0  # 0 good, 1 missing packets, 2 id mismatch (Standard DAQ codes)
    source_id: int = 0
    compression: Compression = Compression.NONE
    timestamp: float | None = None  # Unix seconds; the Standard DAQ header carries none
    header_format: HeaderFormat = HeaderFormat.STDDAQ

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    @property
    def nbytes(self) -> int:
        """Size of the uncompressed pixels."""
        return self.height * self.width * self.dtype.itemsize


def dtype_from_code(code: int) -> np.dtype[np.generic]:
    """The numpy dtype of a Standard DAQ / ``daqif.v1.Dtype`` code."""
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype is None:
        raise FrameError(f"unknown dtype code {code}; known codes: {_KNOWN_CODES_TEXT}")
    return dtype


def dtype_code(dtype: npt.DTypeLike) -> int:
    """The Standard DAQ / ``daqif.v1.Dtype`` code of a numpy dtype (byte order: little-endian)."""
    try:
        normalized = np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise FrameError(f"not a numpy dtype: {dtype!r}") from exc
    code = _DTYPE_TO_CODE.get(normalized)
    if code is None:
        names = ", ".join(dt.name for dt in _CODE_TO_DTYPE.values())
        raise FrameError(f"dtype {normalized.name} has no frame dtype code; supported: {names}")
    return code


def _shape_problem(height: int, width: int, itemsize: int) -> str | None:
    if height <= 0 or width <= 0:
        return f"frame shape {height}x{width} has a zero dimension"
    nbytes = height * width * itemsize
    if nbytes > MAX_FRAME_BYTES:
        return f"frame shape {height}x{width} ({nbytes} bytes) exceeds the 4 GiB limit of one HDF5 chunk"
    return None


def _validate(height: int, width: int, dtype: np.dtype[np.generic]) -> None:
    problem = _shape_problem(height, width, dtype.itemsize)
    if problem is not None:
        raise FrameError(problem)


# ---------------------------------------------------------------------------------------- encode


def encode_stddaq_header(
    image_id: int,
    height: int,
    width: int,
    dtype: npt.DTypeLike,
    status: int = 0,
    source_id: int = 0,
) -> bytes:
    """The 30-byte Standard DAQ binary header."""
    code = dtype_code(dtype)
    _validate(height, width, _CODE_TO_DTYPE[code])
    try:
        return _STDDAQ.pack(image_id, height, width, code, status, source_id)
    except struct.error as exc:
        raise FrameError(f"Standard DAQ header field out of range: {exc}") from exc


def encode_daqif_header(
    image_id: int,
    height: int,
    width: int,
    dtype: npt.DTypeLike,
    *,
    status: int = 0,
    source_id: int = 0,
    compression: Compression = Compression.NONE,
    timestamp: float | None = None,
) -> bytes:
    """A serialized ``daqif.v1.FrameHeader``, padded so it is never 30 bytes long.

    `timestamp` defaults to now.
    """
    code = dtype_code(dtype)
    _validate(height, width, _CODE_TO_DTYPE[code])
    message = frame_pb2.FrameHeader(
        image_id=image_id,
        height=height,
        width=width,
        dtype=code,  # type: ignore[arg-type]  # the enum numbers are the codes
        status=status,
        compression=_COMPRESSION_PB[compression],
        timestamp=time.time() if timestamp is None else timestamp,
        source_id=source_id,
    )
    try:
        encoded = message.SerializeToString()
    except ValueError as exc:  # out-of-range integers are only caught on serialization
        raise FrameError(f"daqif.v1.FrameHeader field out of range: {exc}") from exc
    if len(encoded) == STDDAQ_HEADER_SIZE:
        message.padding = b"\0"
        encoded = message.SerializeToString()
    return encoded


class HeaderEncoder:
    """Encodes the headers of one stream (fixed shape, dtype, format, compression) quickly:
    everything is validated once here, and `encode` only fills in the image id and time."""

    def __init__(
        self,
        height: int,
        width: int,
        dtype: npt.DTypeLike,
        header_format: HeaderFormat = HeaderFormat.STDDAQ,
        compression: Compression = Compression.NONE,
        *,
        status: int = 0,
        source_id: int = 0,
    ) -> None:
        if header_format is HeaderFormat.STDDAQ:
            if compression is not Compression.NONE:
                raise FrameError(
                    "the Standard DAQ header cannot say a frame is compressed; use the daqif header"
                )
            # Everything after the image id is constant.
            self._stddaq_tail: bytes | None = encode_stddaq_header(
                0, height, width, dtype, status, source_id
            )[8:]
        else:
            self._stddaq_tail = None
            encode_daqif_header(
                0, height, width, dtype, status=status, source_id=source_id, compression=compression
            )
        self._message = frame_pb2.FrameHeader(
            height=height,
            width=width,
            dtype=dtype_code(dtype),  # type: ignore[arg-type]  # the enum numbers are the codes
            status=status,
            compression=_COMPRESSION_PB[compression],
            source_id=source_id,
        )

    def encode(self, image_id: int, timestamp: float | None = None) -> bytes:
        """The header of frame `image_id` (`timestamp` defaults to now; daqif form only)."""
        if self._stddaq_tail is not None:
            return image_id.to_bytes(8, "little") + self._stddaq_tail
        message = self._message
        message.image_id = image_id
        message.timestamp = time.time() if timestamp is None else timestamp
        message.ClearField("padding")
        encoded = message.SerializeToString()
        if len(encoded) == STDDAQ_HEADER_SIZE:
            message.padding = b"\0"
            encoded = message.SerializeToString()
        return encoded


def encode_header(header: FrameHeader) -> bytes:
    """Encode `header` in its own `header_format`."""
    if header.header_format is HeaderFormat.STDDAQ:
        if header.compression is not Compression.NONE:
            raise FrameError("the Standard DAQ header cannot say a frame is compressed; use the daqif header")
        return encode_stddaq_header(
            header.image_id, header.height, header.width, header.dtype, header.status, header.source_id
        )
    return encode_daqif_header(
        header.image_id,
        header.height,
        header.width,
        header.dtype,
        status=header.status,
        source_id=header.source_id,
        compression=header.compression,
        timestamp=header.timestamp,
    )


# ---------------------------------------------------------------------------------------- decode


def decode_header(buf: bytes | memoryview) -> FrameHeader:
    """Decode either header form; raise `FrameError` saying what is wrong.

    Accepts anything with the buffer protocol (bytes, memoryview, a ``zmq.Frame``'s buffer).
    """
    size = len(buf)
    if size == STDDAQ_HEADER_SIZE:
        image_id, height, width, code, status, source_id = _STDDAQ.unpack_from(buf)
        dtype = _CODE_TO_DTYPE.get(code)
        if dtype is None:
            problem = f"unknown dtype code {code} (known: {_KNOWN_CODES_TEXT})"
        else:
            problem = _shape_problem(height, width, dtype.itemsize)  # type: ignore[assignment]
            if problem is None:
                return FrameHeader(image_id, height, width, dtype, status, source_id)
        try:
            return _decode_protobuf(buf)
        except FrameError:
            raise FrameError(f"bad 30-byte Standard DAQ header: {problem}") from None
    if size == 0:
        raise FrameError("empty header part")
    return _decode_protobuf(buf)


def _decode_protobuf(buf: bytes | memoryview) -> FrameHeader:
    message = frame_pb2.FrameHeader()
    try:
        message.ParseFromString(bytes(buf))
    except DecodeError as exc:
        raise FrameError(
            f"header of {len(buf)} bytes is neither a 30-byte Standard DAQ header nor a "
            f"daqif.v1.FrameHeader ({exc})"
        ) from None
    code = int(message.dtype)
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype is None:
        raise FrameError(f"daqif.v1.FrameHeader: unknown dtype code {code} (known: {_KNOWN_CODES_TEXT})")
    problem = _shape_problem(message.height, message.width, dtype.itemsize)
    if problem is not None:
        raise FrameError(f"daqif.v1.FrameHeader: {problem}")
    compression = _PB_COMPRESSION.get(message.compression)
    if compression is None:
        raise FrameError(f"daqif.v1.FrameHeader: unknown compression {int(message.compression)}")
    return FrameHeader(
        image_id=message.image_id,
        height=message.height,
        width=message.width,
        dtype=dtype,
        status=message.status,
        source_id=message.source_id,
        compression=compression,
        timestamp=message.timestamp,
        header_format=HeaderFormat.DAQIF,
    )


def check_data(header: FrameHeader, data: bytes | memoryview, *, decode: bool = False) -> None:
    """Raise `FrameError` if `data` cannot be the frame `header` describes.

    Uncompressed data must be exactly ``header.nbytes``; a bitshuffle-LZ4 chunk must carry
    bitshuffle's framing with the uncompressed size of the frame. With `decode`, every LZ4 block
    of the chunk is decompressed too and must give exactly its block of pixels (11 to 24 times the
    cost of the framing walk: docs/writer.md).
    """
    size = len(data)
    if header.compression is Compression.NONE:
        if size != header.nbytes:
            raise FrameError(
                f"frame {header.image_id}: data is {size} bytes, header says "
                f"{header.height}x{header.width} {header.dtype.name} = {header.nbytes} bytes"
            )
        return
    if size <= BSLZ4_CHUNK_HEADER_SIZE:
        raise FrameError(f"frame {header.image_id}: bitshuffle-LZ4 chunk of {size} bytes is too short")
    total, block = _BSLZ4_HEADER.unpack_from(data)
    if total != header.nbytes:
        raise FrameError(
            f"frame {header.image_id}: bitshuffle-LZ4 chunk holds {total} bytes, header says "
            f"{header.height}x{header.width} {header.dtype.name} = {header.nbytes} bytes"
        )
    problem = _bslz4_framing_problem(data, total, block, header.dtype.itemsize)
    if problem is None and decode:
        problem = _bslz4_block_problem(data, total, block, header.dtype.itemsize)
    if problem is not None:
        raise FrameError(f"frame {header.image_id}: bitshuffle-LZ4 chunk {problem}")


_BLOCK_SIZE = struct.Struct(">I")


def _bslz4_framing_problem(data: bytes | memoryview, total: int, block: int, itemsize: int) -> str | None:
    """What is wrong with the block framing of a bitshuffle-LZ4 chunk, or None.

    After the 12-byte header come the blocks of `block` bytes of pixels (the last one shorter,
    a multiple of 8 elements), each a big-endian u32 compressed size and that many LZ4 bytes,
    then the last ``n_elements % 8`` elements as they are. The walk costs one unpack per block
    (64 for a 512 KiB frame at the default 8 KiB blocks), not a decompression.
    """
    if block <= 0 or block % (8 * itemsize):
        return f"has block size {block} bytes, not a positive multiple of 8 elements of {itemsize} bytes"
    n_elements = total // itemsize
    block_elements = block // itemsize
    n_blocks, rest = divmod(n_elements, block_elements)
    n_blocks += rest >= 8
    tail = (rest % 8) * itemsize
    size = len(data)
    unpack = _BLOCK_SIZE.unpack_from
    position = BSLZ4_CHUNK_HEADER_SIZE
    for _ in range(n_blocks):
        if position + 4 > size:
            return f"of {size} bytes ends inside its block framing (at byte {position})"
        position += 4 + unpack(data, position)[0]
    if position + tail != size:
        return f"framing accounts for {position + tail} bytes, the chunk has {size}"
    return None


def _bslz4_block_problem(data: bytes | memoryview, total: int, block: int, itemsize: int) -> str | None:
    """Which LZ4 block of a correctly framed bitshuffle-LZ4 chunk does not decode, or None.

    Each block must decompress to exactly its size (`block`, the last one the whole multiple of 8
    elements left); the bit shuffle is a permutation, so any decoded bytes are valid pixels.
    """
    import lz4.block

    n_blocks, rest = divmod(total // itemsize, block // itemsize)
    last = (rest - rest % 8) * itemsize
    view = memoryview(data)
    unpack = _BLOCK_SIZE.unpack_from
    position = BSLZ4_CHUNK_HEADER_SIZE
    for index in range(n_blocks + (rest >= 8)):
        size = unpack(view, position)[0]
        expected = block if index < n_blocks else last
        try:
            decoded = lz4.block.decompress(
                view[position + 4 : position + 4 + size], uncompressed_size=expected
            )
        except lz4.block.LZ4BlockError as exc:
            return f"block {index} (at byte {position}) is not valid LZ4: {exc}"
        if len(decoded) != expected:
            return f"block {index} (at byte {position}) decodes to {len(decoded)} bytes, not {expected}"
        position += 4 + size
    return None


# ---------------------------------------------------------------------------------------- pixels

PATTERN_PERIOD: Final = 16


def expected_frame(image_id: int, shape: tuple[int, int], dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """The pixels the simulator sends for `image_id`: ``(col + 3*row + 17*(image_id % 16)) % m``.

    ``m`` is 127 for 1-byte types and 2039 otherwise, so every value is exact in every supported
    dtype (float16 included). The pattern repeats every `PATTERN_PERIOD` ids, which lets the
    simulator pre-build (and pre-compress) its frames; compressible like a real low-count image.
    """
    height, width = shape
    dt = np.dtype(dtype).newbyteorder("<")
    modulus = 127 if dt.itemsize == 1 else 2039
    rows = np.arange(height, dtype=np.int64)[:, None]
    cols = np.arange(width, dtype=np.int64)[None, :]
    values = (cols + 3 * rows + 17 * (image_id % PATTERN_PERIOD)) % modulus
    return np.ascontiguousarray(values.astype(dt))


def compress_bslz4(frame: npt.NDArray[np.generic]) -> bytes:
    """One 2-D frame as the chunk HDF5's bitshuffle-LZ4 filter (hdf5plugin) would store it.

    Compressed by HDF5 itself (an in-memory file with the filter, read back with a direct chunk
    read), so the bytes are exactly what a direct chunk write needs. Not for the hot path.
    """
    import h5py
    import hdf5plugin

    if frame.ndim != 2:
        raise FrameError(f"a frame is 2-D, got shape {frame.shape}")
    with h5py.File(_memory_file_name(), "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset(
            "frame",
            data=frame[np.newaxis],
            chunks=(1, *frame.shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        filter_mask, chunk = dset.id.read_direct_chunk((0, 0, 0))
    if filter_mask != 0:
        raise FrameError("HDF5 did not apply the bitshuffle filter (is hdf5plugin working?)")
    return bytes(chunk)


def decompress_bslz4(chunk: bytes, shape: tuple[int, int], dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """Decode one bitshuffle-LZ4 chunk with HDF5's filter (the way any h5py reader would)."""
    import h5py
    import hdf5plugin

    with h5py.File(_memory_file_name(), "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset(
            "frame",
            shape=(1, *shape),
            dtype=np.dtype(dtype),
            chunks=(1, *shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        dset.id.write_direct_chunk((0, 0, 0), chunk)
        result: npt.NDArray[np.generic] = dset[0]
    return result


_memory_files = 0


def _memory_file_name() -> str:
    # The core driver keys open files by name; unique names keep concurrent uses apart.
    global _memory_files
    _memory_files += 1
    return f"daqif-frame-{_memory_files}.h5"
