"""The HDF5 product checksums: per-dataset sums and the manifest digest (see `servers.dpm.merge`)."""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/... so compressed sources can be read)
import numpy as np
import xxhash

from servers.dpm.merge.common import CHECKSUM_PREFIX, DATASUM, MergeError

SLAB_BYTES = 4 << 20


def hash_field(h: Any, data: bytes | str) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def attribute_field(value: Any) -> bytes:
    """A canonical byte encoding of an attribute value as h5py reads it."""
    if isinstance(value, h5py.Empty):
        return b"E" + str(np.dtype(value.dtype).str).encode()
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"b" + bytes(value)
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        return b"o" + repr(arr.tolist()).encode("utf-8", "surrogatepass")
    return b"n" + f"{arr.dtype.str}{arr.dtype.descr!r}{arr.shape!r}".encode() + arr.tobytes()


def hash_attributes(h: Any, attrs: h5py.AttributeManager, skip: str | None = None) -> None:
    if not len(attrs):  # one H5Aget_num_attrs: listing the names costs ~30 us even when none
        return
    for name in sorted(attrs.keys(), key=lambda n: n.encode("utf-8", "surrogatepass")):
        if name == skip:
            continue
        hash_field(h, name)
        hash_field(h, attribute_field(attrs[name]))


class DatasetSum:
    """The `DATASUM` of one dataset in the making: fixed fields, then one (prefix, leaf digest)
    record per chunk or slab in order (a leaf may still be computing on a worker)."""

    def __init__(self, method: str, dtype: np.dtype[Any], shape: Any, chunks: Any) -> None:
        self.header = hashlib.sha256()
        for part in ("daqif-dataset-v1", method, dtype.str, repr(dtype.descr), repr(shape), repr(chunks)):
            hash_field(self.header, part)
        self.parts: list[tuple[bytes, bytes | Future[bytes]]] = []

    def add(self, prefix: bytes, digest: bytes | Future[bytes]) -> None:
        self.parts.append((prefix, digest))

    def finish(self, dset: h5py.Dataset) -> str:
        """Wait for the part digests, add `dset`'s attributes (but DATASUM), return `sha256:<hex>`."""
        h = self.header
        for prefix, digest in self.parts:
            h.update(prefix)
            h.update(digest.result() if isinstance(digest, Future) else digest)
        hash_attributes(h, dset.attrs, skip=DATASUM)
        return CHECKSUM_PREFIX + h.hexdigest()


def chunk_prefix(offset: tuple[int, ...], mask: int, size: int) -> bytes:
    # The fields of one chunk record, length-prefixed like every other field.
    parts = [repr(tuple(offset)).encode(), str(mask).encode(), str(size).encode()]
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def slab_prefix(index: int, size: int) -> bytes:
    parts = [str(index).encode(), str(size).encode()]
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def sorted_chunks(dsid: Any) -> list[Any]:
    infos: list[Any] = []
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(infos.append)
    else:  # HDF5 without H5Dchunk_iter
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    infos.sort(key=lambda info: tuple(info.chunk_offset))
    return infos


def slab_rows(dset: h5py.Dataset) -> int:
    shape = dset.shape or ()
    row = int(np.prod(shape[1:], dtype=np.int64)) * max(int(dset.dtype.itemsize), 1)
    return max(1, SLAB_BYTES // max(row, 1))


def slab_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.hasobject:
        return repr(arr.tolist()).encode("utf-8", "surrogatepass")
    return np.ascontiguousarray(arr).tobytes()


def is_raw_copyable(dset: h5py.Dataset) -> bool:
    return bool(dset.id.get_create_plist().get_layout() == h5py.h5d.CHUNKED and not dset.dtype.hasobject)


def dataset_sum(dset: h5py.Dataset, buffer: ChunkBuffer) -> DatasetSum:
    """The sum of a dataset as stored in its own file (chunks read raw, or values by slabs)."""
    if is_raw_copyable(dset):
        total = DatasetSum("raw", dset.dtype, dset.shape, dset.chunks)
        dsid = dset.id
        for info in sorted_chunks(dsid):
            mask, data = dsid.read_direct_chunk(info.chunk_offset, out=buffer.get(info.size))
            total.add(chunk_prefix(info.chunk_offset, mask, len(data)), leaf_digest(data))
        return total
    total = DatasetSum("values", dset.dtype, dset.shape, dset.chunks)
    shape = dset.shape
    if shape is None:
        return total
    if shape == ():
        slab = slab_bytes(np.asarray(dset[()]))
        total.add(slab_prefix(0, len(slab)), leaf_digest(slab))
        return total
    rows = slab_rows(dset)
    for index, start in enumerate(range(0, shape[0], rows)):
        slab = slab_bytes(np.asarray(dset[start : start + rows]))
        total.add(slab_prefix(index, len(slab)), leaf_digest(slab))
    return total


def manifest_digest(f: h5py.File) -> str:
    """The root DATASUM: a walk over every link, attribute and per-dataset sum (see the docstring)."""
    h = hashlib.sha256()
    hash_field(h, "daqif-product-v1")
    hash_field(h, "G /")
    hash_attributes(h, f.attrs, skip=DATASUM)
    _hash_links(h, f.id, "/", {})
    return CHECKSUM_PREFIX + h.hexdigest()


def _hash_links(h: Any, gid: Any, path: str, seen: dict[tuple[int, int], str]) -> None:
    """The manifest entries of the links of group `gid` (at `path`), depth first.

    Through h5py's low-level API: one call for a link's type, objects opened through hard links
    only, and a high-level object made only to read an object's attributes (h5py's own decoding
    of their values). Entries are the texts `h5py.Group.get(name, getlink=True)` gives: a link
    name that is not UTF-8 is a `ValueError`, as its byte string could not be hashed either."""
    for raw in sorted(gid):  # byte order of the names, which is the manifest's order
        name = raw.decode("utf-8")
        child = f"{path.rstrip('/')}/{name}"
        kind = gid.links.get_info(raw).type
        if kind == h5py.h5l.TYPE_SOFT:
            hash_field(h, f"S {child} {_link_text(gid.links.get_val(raw))}")
            continue
        if kind == h5py.h5l.TYPE_EXTERNAL:
            filename, target = gid.links.get_val(raw)
            hash_field(h, f"E {child} {os.fsdecode(filename)} {_link_text(target)}")
            continue
        if kind != h5py.h5l.TYPE_HARD:
            raise TypeError("Unknown link type")
        oid = h5py.h5o.open(gid, raw)
        info = h5py.h5o.get_info(oid)
        key = (info.fileno, info.addr)
        if key in seen:
            hash_field(h, f"H {child} {seen[key]}")
            continue
        seen[key] = child
        if info.type == h5py.h5o.TYPE_DATASET:
            hash_field(h, f"D {child} {h5py.Dataset(oid).attrs.get(DATASUM, '')}")
        elif info.type == h5py.h5o.TYPE_GROUP:
            hash_field(h, f"G {child}")
            hash_attributes(h, h5py.Group(oid).attrs)
            _hash_links(h, oid, child, seen)
        else:
            named = h5py.Datatype(oid)
            hash_field(h, f"T {child} {named.dtype.str} {named.dtype.descr!r}")
            hash_attributes(h, named.attrs)


def _link_text(value: bytes) -> str:
    # h5py's decoding of a link value: UTF-8, else the byte string (which SoftLink makes `str`).
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return str(value)


def leaf_digest(data: Any) -> bytes:
    """The digest of one chunk or slab: XXH3-128 (tens of GB/s; SHA-256 costs more CPU than
    the copy itself, and a keyless hash protects against accidents, not attackers, either way)."""
    return xxhash.xxh3_128_digest(data)


class FileDigests:
    """Leaf digests of byte ranges of an open file, read and hashed on a worker thread while the
    main thread copies the same file in the kernel.

    With `inline` (a small file: a thread would cost more than the overlap saves) each digest
    is computed at once on the calling thread."""

    def __init__(self, inline: bool = False) -> None:
        self._inline = inline
        self._pool: ThreadPoolExecutor | None = None  # started by the first digest
        self._buffer = np.empty(0, dtype=np.uint8)

    def digest(self, fd: int, offset: int, size: int) -> Future[bytes]:
        if self._inline:
            done: Future[bytes] = Future()
            try:
                done.set_result(self._digest(fd, offset, size))
            except BaseException as exc:
                done.set_exception(exc)
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-sum")
        return self._pool.submit(self._digest, fd, offset, size)

    def _digest(self, fd: int, offset: int, size: int) -> bytes:
        if self._buffer.nbytes < size:
            self._buffer = np.empty(max(size, SLAB_BYTES), dtype=np.uint8)
        view = memoryview(self._buffer.data)[:size]
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise MergeError(f"source file ends before byte {offset + size}")
            got += n
        return leaf_digest(view)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class ChunkBuffer:
    """One reusable buffer for raw chunks: a fresh 4 MiB `bytes` per chunk costs page faults on
    every allocation, which was measured to slow the copy several-fold."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray[Any, Any]:
        if self._buffer.nbytes < size:
            self._buffer = np.empty(max(size, SLAB_BYTES), dtype=np.uint8)
        return self._buffer
