"""The product checksums: the manifest digest the merge and `verify` compute equals a plain
high-level h5py walk of the format's definition (kept here), over varied files."""

from __future__ import annotations

import hashlib
import itertools
import struct
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers.dpm.merge.checksum import manifest_digest
from servers.dpm.merge.common import CHECKSUM_PREFIX, DATASUM

# -- the reference: the format's definition, walked with h5py's high-level objects ------------------


def ref_field(h: Any, data: bytes | str) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def ref_attribute_field(value: Any) -> bytes:
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


def ref_attributes(h: Any, attrs: h5py.AttributeManager, skip: str | None = None) -> None:
    for name in sorted(attrs.keys(), key=lambda n: n.encode("utf-8", "surrogatepass")):
        if name != skip:
            ref_field(h, name)
            ref_field(h, ref_attribute_field(attrs[name]))


def reference_manifest_digest(f: h5py.File) -> str:
    h = hashlib.sha256()
    seen: dict[tuple[int, int], str] = {}

    def walk(group: h5py.Group, path: str) -> None:
        for name in sorted(group.keys(), key=lambda n: n.encode("utf-8", "surrogatepass")):
            child = f"{path.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                ref_field(h, f"S {child} {link.path}")
                continue
            if isinstance(link, h5py.ExternalLink):
                ref_field(h, f"E {child} {link.filename} {link.path}")
                continue
            obj = group[name]
            info = h5py.h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in seen:
                ref_field(h, f"H {child} {seen[key]}")
                continue
            seen[key] = child
            if isinstance(obj, h5py.Dataset):
                ref_field(h, f"D {child} {obj.attrs.get(DATASUM, '')}")
            elif isinstance(obj, h5py.Group):
                ref_field(h, f"G {child}")
                ref_attributes(h, obj.attrs)
                walk(obj, child)
            else:
                ref_field(h, f"T {child} {obj.dtype.str} {obj.dtype.descr!r}")
                ref_attributes(h, obj.attrs)

    ref_field(h, "daqif-product-v1")
    ref_field(h, "G /")
    ref_attributes(h, f.attrs, skip=DATASUM)
    walk(f, "/")
    return CHECKSUM_PREFIX + h.hexdigest()


# -- varied files -----------------------------------------------------------------------------------

# Non-ASCII letters: UTF-8 byte order differs from code-point order only through them.
NAMES = st.text(alphabet="abAB_ 9éßΩ€", min_size=1, max_size=6)
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=8)
COMPOUND = np.dtype([("x", "<i4"), ("y", "<f8"), ("tag", "S3")])

ATTRIBUTE_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.floats(allow_nan=False, width=32).map(np.float32),
    st.booleans().map(np.bool_),
    TEXT,
    st.binary(min_size=1, max_size=8).filter(lambda b: b"\x00" not in b).map(np.bytes_),
    st.just(h5py.Empty("f8")),
    st.just(h5py.Empty("S5")),
    st.lists(st.integers(0, 2**16 - 1), min_size=0, max_size=5).map(lambda v: np.array(v, dtype="<u2")),
    st.lists(st.floats(allow_nan=False), min_size=1, max_size=4).map(
        lambda v: np.array(v, dtype=">f8").reshape(-1, 1)
    ),
    st.lists(TEXT, min_size=1, max_size=3).map(lambda v: np.array(v, dtype=object)),
    st.integers(0, 3).map(lambda n: np.array([(i, i / 2, b"ab") for i in range(n)], dtype=COMPOUND)),
)


def add_attributes(data: st.DataObject, attrs: h5py.AttributeManager, datasum: bool = False) -> None:
    for name in data.draw(st.lists(NAMES, max_size=3, unique=True)):
        value = data.draw(ATTRIBUTE_VALUES)
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            attrs.create(name, value, dtype=h5py.string_dtype())
        else:
            attrs[name] = value
    if datasum and data.draw(st.booleans()):
        attrs[DATASUM] = data.draw(st.sampled_from(["xxh3-sha256:" + "ab" * 32, "", "not a sum"]))


def build(data: st.DataObject, f: h5py.File) -> None:
    """Groups to depth 3 with datasets, committed types, soft, external and hard links (to
    anything made before, the root and a group's parent included: cycles)."""
    counter = itertools.count()
    objects: list[h5py.HLObject] = [f]
    add_attributes(data, f.attrs, datasum=True)

    def fill(group: h5py.Group, depth: int) -> None:
        for name in data.draw(st.lists(NAMES, max_size=4, unique=True)):
            kind = data.draw(st.sampled_from(["group", "dataset", "type", "soft", "external", "hard"]))
            if kind == "group" and depth < 3:
                child = group.create_group(name, track_order=data.draw(st.booleans()))
                add_attributes(data, child.attrs)
                objects.append(child)
                fill(child, depth + 1)
            elif kind == "dataset" or kind == "group":
                shape = data.draw(st.sampled_from([(), (3,), (2, 2), None]))
                if shape is None:
                    dset = group.create_dataset(name, data=h5py.Empty("i4"))
                else:
                    dset = group.create_dataset(name, data=np.full(shape, next(counter), dtype="<i2"))
                add_attributes(data, dset.attrs, datasum=True)
                objects.append(dset)
            elif kind == "type":
                group[name] = data.draw(st.sampled_from([np.dtype("<f4"), np.dtype(">i8"), COMPOUND]))
                add_attributes(data, group[name].attrs)
                objects.append(group[name])
            elif kind == "soft":
                target = data.draw(st.sampled_from(["/", "/nowhere", "rel/x", "..", "/é"]))
                group[name] = h5py.SoftLink(target)
            elif kind == "external":
                filename = data.draw(st.sampled_from(["other.h5", "dir/é.h5"]))
                group[name] = h5py.ExternalLink(filename, data.draw(st.sampled_from(["/", "/a/b"])))
            else:
                group[name] = data.draw(st.sampled_from(objects))

    fill(f, 0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_manifest_digest_equals_the_reference_walk(data: st.DataObject) -> None:
    name = f"manifest-{data.draw(st.integers(0, 2**32))}"
    with h5py.File(name, "w", driver="core", backing_store=False, track_order=data.draw(st.booleans())) as f:
        build(data, f)
        assert manifest_digest(f) == reference_manifest_digest(f)


def test_manifest_digest_of_a_fixed_file_is_the_format_s(tmp_path: Any) -> None:
    """A digest pinned when it was computed by the high-level walk: products made before verify."""
    with h5py.File(tmp_path / "fixed.h5", "w", track_order=True) as f:
        f.attrs["ARCFILE"] = "fixed.h5"
        f.attrs["ESO DET DIT"] = 0.5
        f.attrs[DATASUM] = "ignored"
        det = f.create_group("det")
        det.attrs["n_images"] = np.int64(2)
        data = det.create_dataset("data", data=np.arange(8, dtype="<u2").reshape(2, 2, 2), chunks=(1, 2, 2))
        data.attrs[DATASUM] = "xxh3-sha256:" + "0" * 64
        det["alias"] = data
        det["soft"] = h5py.SoftLink("/det/data")
        det["ext"] = h5py.ExternalLink("raw.h5", "/x")
        f["é/ß"] = np.float64(1.5)
        f["t"] = COMPOUND
        f["t"].attrs["unit"] = "m"
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert reference_manifest_digest(f) == PINNED
        assert manifest_digest(f) == PINNED


PINNED = "xxh3-sha256:8739eb34be974147ae9d9e52d7bc73a00623d60d25bbe7d43b7978a9ba1780fb"


def test_a_link_name_that_is_not_utf8_is_a_value_error() -> None:
    with h5py.File("bad-name", "w", driver="core", backing_store=False) as f:
        f.create_group(b"\xff")
        with pytest.raises(ValueError, match="utf-8"):
            manifest_digest(f)
