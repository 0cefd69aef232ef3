"""The DPM merge: build one data product `<fileId>.h5` from the sources of a specification.

`merge()` is the one implementation; the DPM server runs it through `daqif-dpm-merge`
(`servers.dpm.merge_cli`), and nothing here knows about gRPC or the server's workspace beyond the
`resolve_sources()` naming convention. `verify()` checks a product's checksums.

Product format (DESIGN §3; the decisions below are part of the format)
-----------------------------------------------------------------------

Layout
    Each `hdf5File` source's links (groups, datasets, named datatypes, soft and external links)
    appear under `/<sourceName>/`; its non-keyword root attributes (e.g. the writer's `run_id`,
    `detector_name`, `n_images`) become attributes of the `/<sourceName>` group. With
    `target.source`, that file is the base: its links and non-keyword root attributes stay at
    the product root as they are (no `/<sourceName>` group), and the other sources are merged
    into it; a base link named like another source is a merge error. Absolute soft links are
    re-rooted (`/det/data` in source `det1` becomes `/det1/det/data`); external links are kept as
    they are (with a warning: they point outside the product). Hard links to one object stay one
    object.

Data (nothing is ever decompressed or re-encoded)
    The base, or else the largest HDF5 source, is cloned: the product starts as a byte copy of
    that file made by the kernel (`copy_file_range`, as `cp` does), whose root links are then
    moved under `/<sourceName>` (`H5Lmove`, metadata only). Its chunks, filters, object headers
    and file-format versions are therefore exactly the source's, free space included. Datasets
    of the clone whose data lie outside the file (external raw files, virtual datasets) are
    replaced by a copy of their values, so the product holds its data itself.
    The other sources are copied object by object: chunked datasets of fixed-size types chunk by
    chunk, raw (`read_direct_chunk` → `write_direct_chunk`: the stored bytes and each chunk's
    filter mask unchanged, with the source's creation properties: chunk shape, filter pipeline
    with its exact parameters, fill value, maxshape); contiguous, compact, external and virtual
    datasets of fixed-size types by value into a contiguous (or compact) dataset; datasets of
    variable-length or reference types and named datatypes with `H5Ocopy`, which translates heap
    and object references.

Keywords
    In an HDF5 source, a keyword is a root attribute named like an ESO keyword (`ESO <WORD>[ <WORD>…]`,
    words of `A-Z 0-9 _ -`) or a FITS keyword (1-8 of `A-Z 0-9 _ -`); `COMMENT` and `HISTORY` are
    commentary keywords (string arrays). A `fitsKeywords` source gives `valueKeyword NAME`,
    `esoKeyword ESO NAME` and `literalKeyword` cards: `COMMENT text`, `HISTORY text`, or a card
    with a blank name (stored as `COMMENT`) are commentary; any other card is parsed as
    `NAME = value / comment` (`HIERARCH ESO A B = …` gives `ESO A B`; values: a quoted string
    with `''` for a quote, `T`/`F`, an integer or a real, `D` exponents accepted); a card that
    does not parse is a merge error.

    An HDF5 source's `keywordRules` apply in order to its keywords only. `filter`: start from an
    empty selection, apply each pattern `[+-][ev] GLOB` in order (`e` ESO keywords matched without
    `ESO `, `v` value keywords, commentary included; `fnmatch.fnmatchcase`), keep the selection.
    `transform`: select the same way, rename each selected keyword with
    `re.sub(regex, format, name)` semantics, matched by RE2 so a rule takes linear time (ESO names without
    `ESO `; an ESO keyword stays ESO and a value keyword stays a value keyword; commentary keywords are
    never renamed); a result that is not a valid name of its kind is a merge error;
    a renamed keyword replaces one of the same name.
    No rules (`keywordRules` absent): every keyword is copied; an empty list: none.

    Merged keywords are root attributes of the product. Priority: `sources` in specification
    order, highest first; `target.source` (the base) has the LOWEST priority, so the
    specification overrides it. On a name collision the highest-priority value wins (and its
    comment). Commentary keywords are concatenated in priority order (the base's last) into one
    string array per name. Values keep the HDF5 type of an HDF5 source; a `fitsKeywords` value
    is stored as a UTF-8 string, int64, float64 or bool. Root attributes are written in the
    order: reserved (below), value keywords, ESO keywords, COMMENT, HISTORY, KEYWORD_COMMENTS,
    DATASUM (iteration shows that order when the root tracks creation order).

    Keyword comments: the root attribute `KEYWORD_COMMENTS`, a string array of shape (N, 2) with
    rows (keyword name, comment), for every merged keyword that has a non-empty comment
    (`dict(f.attrs["KEYWORD_COMMENTS"])`). It is not a keyword name (longer than 8 characters, no
    `ESO `), so it cannot collide with one. A source's own `KEYWORD_COMMENTS` (e.g. a previous
    product used as base) supplies the comments of that source's keywords.

Reserved root attributes (written by the merge; a source keyword with one of these names is
dropped with a warning)
    `ARCFILE`  the product's file name (`<fileId>.h5` unless `--outfile` names it otherwise).
    `ORIGFILE` `<fileId>.h5`; with `target.source`, the base file's original name (the basename of
               its `location`).
    `DATE`     UTC time of the merge, FITS/ISO-8601 form `YYYY-MM-DDThh:mm:ss.sss` (UTC implied).
    `KEYWORD_COMMENTS` as above.
    `DATASUM`  written last: `xxh3-sha256:<64 hex>`, see below.

Checksums (`verify()`, `daqif-dpm-merge --verify`)
    A tree: every chunk (or slab) is hashed with XXH3-128, and SHA-256 combines those leaf
    digests with everything else. Leaves are XXH3 because SHA-256 over every byte costs more CPU
    than the copy itself (1.6 GB/s against tens of GB/s), and a checksum without a key guards
    against accidents, not against someone who can rewrite the file, whatever the hash.
    Every field below is length-prefixed (8-byte little-endian length, then the bytes).

    Each dataset carries an attribute `DATASUM = "xxh3-sha256:<hex>"` (a source's own `DATASUM`
    on a dataset is replaced): the SHA-256 of `"daqif-dataset-v1"`, the method (`"raw"` or
    `"values"`), `dtype.str`, `repr(dtype.descr)`, `repr(shape)`, `repr(chunk shape)`; then for
    `raw` (chunked, fixed-size type) every stored chunk in order of its logical offset:
    `repr(offset)`, the filter mask and the stored size as decimal text, then the XXH3-128
    digest (16 bytes, unprefixed) of the stored chunk bytes; for `values` (anything else) the
    data read by slabs of whole rows along the first axis (rows per slab: max(1, 4 MiB // bytes
    per row)), each slab as `ndarray.tobytes()` for fixed-size types or `repr(slab.tolist())` for
    object types: slab index and size as decimal text, then the slab's XXH3-128 digest; then each
    attribute except `DATASUM` in name order: its name and its value encoding
    (`_attribute_field`).

    The root `DATASUM` is the SHA-256 of a manifest of the whole file: `"daqif-product-v1"`,
    `"G /"` and the root's attributes except `DATASUM`, then a depth-first walk from the root,
    links in byte order of their names, one entry per link: group `G <path>` followed by its
    attributes, dataset `D <path> <its DATASUM attribute>`, named datatype `T <path> <dtype>` plus
    attributes, soft link `S <path> <target>`, external link `E <path> <file> <object>`, a
    further hard link to an object already seen `H <path> <first path>`. So the root checksum
    covers every attribute, every link and (through the per-dataset sums) every stored byte;
    `verify` names the dataset whose data or attributes changed, and reports a root mismatch
    when only groups, links or root attributes changed.

Durability: the product is written as `.<name>.part` next to `outfile` through the one
atomic-output helper (`servers.common.atomic.atomic_output`: a leftover part file is removed
first; fsync, rename to `outfile`, fsync of the directory; on any error the part file is
removed), and its data is flushed in the background while the merge goes on, so that the final
fsync finds little left to write. `outfile` only ever holds a complete product.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/... so compressed sources can be read)
import numpy as np
import re2
import xxhash

from daqif.spec import (
    FilterRule,
    FitsKeywordsSource,
    Hdf5FileSource,
    KeywordKind,
    KeywordRule,
    Specification,
    TransformRule,
)
from servers.common.atomic import atomic_output, copy_file
from servers.dpm import references

ARCFILE = "ARCFILE"
ORIGFILE = "ORIGFILE"
DATE = "DATE"
DATASUM = "DATASUM"
KEYWORD_COMMENTS = "KEYWORD_COMMENTS"
RESERVED_ATTRIBUTES = frozenset({ARCFILE, ORIGFILE, DATE, DATASUM, KEYWORD_COMMENTS})
COMMENTARY = ("COMMENT", "HISTORY")
CHECKSUM_PREFIX = "xxh3-sha256:"

ESO_NAME = re.compile(r"[A-Z0-9_-]+( [A-Z0-9_-]+)*")
FITS_NAME = re.compile(r"[A-Z0-9_-]{1,8}")
_SLAB_BYTES = 4 << 20


class MergeError(Exception):
    """The merge could not be done; the message says what is wrong and where (one line)."""


class ProductUnreadableError(MergeError):
    """`verify()` could not read the file as an HDF5 product at all."""


# -- results ---------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """What `merge()` did. With `dry_run`, nothing was written: `bytes` is 0 and `checksum` ""."""

    product: Path
    bytes: int
    datasets: int
    keywords: int
    checksum: str
    duration_s: float
    dry_run: bool = False
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class VerifyResult:
    """The outcome of `verify()`: `ok`, or `mismatches` saying what differs."""

    path: Path
    ok: bool
    stored: str
    computed: str
    datasets: int
    mismatches: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.datasets} datasets, {self.stored})"
        return f"{self.path}: checksum mismatch: " + "; ".join(self.mismatches)


# -- logging ---------------------------------------------------------------------------------------


class _Log:
    """Collects log lines for the result and forwards them to a logger or a text stream."""

    def __init__(self, sink: logging.Logger | TextIO | None) -> None:
        self.sink = sink
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self._emit("INFO", message)

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        self._emit("WARNING", message)

    def _emit(self, level: str, message: str) -> None:
        self.lines.append(f"{level} {message}")
        if isinstance(self.sink, logging.Logger):
            self.sink.log(logging.WARNING if level == "WARNING" else logging.INFO, "%s", message)
        elif self.sink is not None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            self.sink.write(f"{stamp} {level} {message}\n")
            self.sink.flush()


# -- keywords --------------------------------------------------------------------------------------


@dataclass
class _Keyword:
    """One keyword on its way into the product. `name` is the attribute name (`ESO DET DIT`)."""

    name: str
    value: Any
    comment: str = ""
    dtype: np.dtype[Any] | None = None  # the HDF5 source's type, kept in the product

    @property
    def is_eso(self) -> bool:
        return self.name.startswith("ESO ")

    @property
    def is_commentary(self) -> bool:
        return self.name in COMMENTARY

    @property
    def short_name(self) -> str:
        """The name rules match against: ESO names without `ESO `."""
        return self.name[4:] if self.is_eso else self.name


def is_keyword_name(name: str) -> bool:
    """True when an HDF5 root attribute name is a FITS or ESO keyword name."""
    if name.startswith("ESO "):
        return ESO_NAME.fullmatch(name[4:]) is not None
    return FITS_NAME.fullmatch(name) is not None


def _commentary_lines(value: Any) -> list[str]:
    items = value.tolist() if isinstance(value, np.ndarray) else [value]
    flat: list[str] = []
    for item in np.ravel(np.asarray(items, dtype=object)).tolist():
        flat.append(item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))
    return flat


@dataclass(frozen=True)
class Card:
    """A parsed literal keyword card: `name` is "" for commentary text (then `commentary` is set)."""

    name: str
    value: str | int | float | bool
    comment: str = ""
    commentary: str = ""  # COMMENT or HISTORY when the card is commentary


_CARD = re.compile(r"(?P<name>[^=]*?)\s*=\s?(?P<rest>.*)")
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?")


def parse_card(text: str) -> Card:
    """Parse a FITS card (`literalKeyword` value); raise `ValueError` saying what is wrong."""
    head = text[:8].rstrip()
    if head in COMMENTARY and (len(text) <= 7 or text[7] == " "):
        return Card(name=head, value=text[8:].rstrip(), commentary=head)
    if not head.strip():
        return Card(name="COMMENT", value=text.strip(), commentary="COMMENT")
    match = _CARD.fullmatch(text.rstrip())
    if match is None:
        raise ValueError(f"card {text!r} is neither commentary (COMMENT/HISTORY/blank name) nor NAME = value")
    raw_name = match["name"].strip()
    if raw_name.startswith("HIERARCH "):
        raw_name = raw_name[len("HIERARCH ") :].strip()
    if raw_name.startswith("ESO "):
        short = " ".join(raw_name[4:].split())
        if ESO_NAME.fullmatch(short) is None:
            raise ValueError(f"card {text!r}: {raw_name!r} is not a valid ESO keyword name")
        name = f"ESO {short}"
    elif FITS_NAME.fullmatch(raw_name):
        name = raw_name
    else:
        raise ValueError(
            f"card {text!r}: {raw_name!r} is not a valid keyword name (1-8 of A-Z 0-9 _ -, or ESO words)"
        )
    value, comment = _parse_card_value(text, match["rest"])
    return Card(name=name, value=value, comment=comment)


def _parse_card_value(card: str, rest: str) -> tuple[str | int | float | bool, str]:
    rest = rest.strip()
    if rest.startswith("'"):
        out: list[str] = []
        i = 1
        while True:
            end = rest.find("'", i)
            if end < 0:
                raise ValueError(f"card {card!r}: string value has no closing quote")
            out.append(rest[i:end])
            if rest[end + 1 : end + 2] == "'":  # '' is a quote inside the string
                out.append("'")
                i = end + 2
                continue
            tail = rest[end + 1 :].strip()
            break
        if tail and not tail.startswith("/"):
            raise ValueError(f"card {card!r}: unexpected {tail!r} after the string value")
        return "".join(out).rstrip(), tail[1:].strip()
    text, _, comment = rest.partition("/")
    text = text.strip()
    comment = comment.strip()
    if not text:
        raise ValueError(f"card {card!r} has no value (undefined values are not supported)")
    if text in ("T", "F"):
        return text == "T", comment
    if _INT.fullmatch(text):
        return int(text), comment
    if _REAL.fullmatch(text):
        return float(text.replace("D", "E").replace("d", "e")), comment
    raise ValueError(f"card {card!r}: value {text!r} is not a string, T/F, an integer or a real number")


def _selection(keywords: Sequence[_Keyword], patterns: Sequence[str]) -> set[int]:
    """Indexes selected by `[+-][ev] GLOB` patterns applied in order to an empty selection."""
    selected: set[int] = set()
    for pattern in patterns:
        sign, kind, glob = pattern[0], pattern[1], pattern[3:]
        for i, kw in enumerate(keywords):
            if (kw.is_eso == (kind == "e")) and fnmatch.fnmatchcase(kw.short_name, glob):
                if sign == "+":
                    selected.add(i)
                else:
                    selected.discard(i)
    return selected


def apply_keyword_rules(
    keywords: Sequence[_Keyword], rules: Sequence[KeywordRule] | None, where: str, log: _Log | None = None
) -> list[_Keyword]:
    """Apply `keywordRules` in order; `where` names the rules in errors (`sources[0].keywordRules`)."""
    if rules is None:
        return list(keywords)
    if not rules:
        return []  # an explicit empty list: copy no keyword at all
    current = list(keywords)
    for r, rule in enumerate(rules):
        chosen = _selection(current, rule.selection_patterns)
        if isinstance(rule, FilterRule):
            current = [kw for i, kw in enumerate(current) if i in chosen]
            continue
        current = _transform(current, chosen, rule, f"{where}[{r}]", log)
    return current


def _transform(
    keywords: list[_Keyword], chosen: set[int], rule: TransformRule, where: str, log: _Log | None
) -> list[_Keyword]:
    result: list[tuple[_Keyword, bool]] = []  # (keyword, was renamed)
    for i, kw in enumerate(keywords):
        if i not in chosen or kw.is_commentary:
            result.append((kw, False))
            continue
        try:
            new_short = rule.rename(kw.short_name)
        except (re.error, re2.error, IndexError) as exc:
            raise MergeError(f"{where}: transform of {kw.name!r} failed: {exc}") from None
        if kw.is_eso:
            if ESO_NAME.fullmatch(new_short) is None:
                raise MergeError(
                    f"{where}: transform renames {kw.name!r} to 'ESO {new_short}', which is not a valid ESO "
                    "keyword name (upper-case words of A-Z 0-9 _ - separated by single spaces)"
                )
            new_name = f"ESO {new_short}"
        else:
            if FITS_NAME.fullmatch(new_short) is None or new_short in RESERVED_ATTRIBUTES:
                raise MergeError(
                    f"{where}: transform renames {kw.name!r} to {new_short!r}, which is not a valid value "
                    "keyword name (1-8 characters of A-Z 0-9 _ -, not a reserved name)"
                )
            new_name = new_short
        result.append((_Keyword(new_name, kw.value, kw.comment, kw.dtype), new_name != kw.name))
    # A renamed keyword replaces an untouched one of the same name; between two renamed ones (or
    # two untouched ones) the later one wins. The survivor keeps the first one's place.
    by_name: dict[str, tuple[_Keyword, bool]] = {}
    for kw, was_renamed in result:
        existing = by_name.get(kw.name)
        if existing is not None:
            if log is not None:
                log.warning(
                    f"{where}: two keywords are named {kw.name!r} after the transform; one is dropped"
                )
            if existing[1] and not was_renamed:
                continue
        by_name[kw.name] = (kw, was_renamed)
    return [kw for kw, _ in by_name.values()]


def _fits_keywords(source: FitsKeywordsSource, where: str) -> list[_Keyword]:
    out: list[_Keyword] = []
    for k, kw in enumerate(source.keywords):
        if kw.kind is KeywordKind.LITERAL:
            try:
                card = parse_card(str(kw.value))
            except ValueError as exc:
                raise MergeError(f"{where}.keywords[{k}]: {exc}") from None
            if card.commentary:
                out.append(_Keyword(card.commentary, [str(card.value)]))
            else:
                out.append(
                    _Keyword(card.name, _fits_value(card.value, f"{where}.keywords[{k}]"), card.comment)
                )
            continue
        out.append(_Keyword(kw.attribute_name, _fits_value(kw.value, f"{where}.keywords[{k}]"), kw.comment))
    return out


def _fits_value(value: str | int | float | bool, where: str) -> Any:
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise MergeError(f"{where}: integer {value} does not fit in 64 bits")
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    return str(value)


@dataclass
class _MergedKeywords:
    values: dict[str, _Keyword] = field(default_factory=dict)
    commentary: dict[str, list[str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.values) + sum(len(lines) for lines in self.commentary.values())


def _merge_keywords(per_source: Sequence[tuple[str, list[_Keyword]]], log: _Log) -> _MergedKeywords:
    """`per_source` in priority order, highest first."""
    merged = _MergedKeywords()
    for source_name, keywords in per_source:
        for kw in keywords:
            if kw.name in RESERVED_ATTRIBUTES:
                log.warning(f"source {source_name!r}: keyword {kw.name!r} is reserved for the merge; dropped")
                continue
            if kw.is_commentary:
                merged.commentary.setdefault(kw.name, []).extend(_commentary_lines(kw.value))
                continue
            if kw.name in merged.values:
                winner = merged.origin[kw.name]
                log.info(f"keyword {kw.name!r} of source {source_name!r} overridden by source {winner!r}")
                continue
            merged.values[kw.name] = kw
            merged.origin[kw.name] = source_name
    return merged


# -- hashing ---------------------------------------------------------------------------------------


def _field(h: Any, data: bytes | str) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def _attribute_field(value: Any) -> bytes:
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


def _hash_attributes(h: Any, attrs: h5py.AttributeManager, skip: str | None = None) -> None:
    for name in sorted(attrs.keys(), key=lambda n: n.encode("utf-8", "surrogatepass")):
        if name == skip:
            continue
        _field(h, name)
        _field(h, _attribute_field(attrs[name]))


class _DatasetSum:
    """The `DATASUM` of one dataset in the making: fixed fields, then one (prefix, leaf digest)
    record per chunk or slab in order (a leaf may still be computing on a worker)."""

    def __init__(self, method: str, dtype: np.dtype[Any], shape: Any, chunks: Any) -> None:
        self.header = hashlib.sha256()
        for part in ("daqif-dataset-v1", method, dtype.str, repr(dtype.descr), repr(shape), repr(chunks)):
            _field(self.header, part)
        self.parts: list[tuple[bytes, bytes | Future[bytes]]] = []

    def add(self, prefix: bytes, digest: bytes | Future[bytes]) -> None:
        self.parts.append((prefix, digest))

    def finish(self, dset: h5py.Dataset) -> str:
        """Wait for the part digests, add `dset`'s attributes (but DATASUM), return `sha256:<hex>`."""
        h = self.header
        for prefix, digest in self.parts:
            h.update(prefix)
            h.update(digest.result() if isinstance(digest, Future) else digest)
        _hash_attributes(h, dset.attrs, skip=DATASUM)
        return CHECKSUM_PREFIX + h.hexdigest()


def _chunk_prefix(offset: tuple[int, ...], mask: int, size: int) -> bytes:
    # The fields of one chunk record, length-prefixed like every other field.
    parts = [repr(tuple(offset)).encode(), str(mask).encode(), str(size).encode()]
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def _slab_prefix(index: int, size: int) -> bytes:
    parts = [str(index).encode(), str(size).encode()]
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def _sorted_chunks(dsid: Any) -> list[Any]:
    infos: list[Any] = []
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(infos.append)
    else:  # HDF5 without H5Dchunk_iter
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    infos.sort(key=lambda info: tuple(info.chunk_offset))
    return infos


def _slab_rows(dset: h5py.Dataset) -> int:
    shape = dset.shape or ()
    row = int(np.prod(shape[1:], dtype=np.int64)) * max(int(dset.dtype.itemsize), 1)
    return max(1, _SLAB_BYTES // max(row, 1))


def _slab_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.hasobject:
        return repr(arr.tolist()).encode("utf-8", "surrogatepass")
    return np.ascontiguousarray(arr).tobytes()


def _is_raw_copyable(dset: h5py.Dataset) -> bool:
    return bool(dset.id.get_create_plist().get_layout() == h5py.h5d.CHUNKED and not dset.dtype.hasobject)


def _dataset_sum(dset: h5py.Dataset, buffer: _ChunkBuffer) -> _DatasetSum:
    """The sum of a dataset as stored in its own file (chunks read raw, or values by slabs)."""
    if _is_raw_copyable(dset):
        total = _DatasetSum("raw", dset.dtype, dset.shape, dset.chunks)
        dsid = dset.id
        for info in _sorted_chunks(dsid):
            mask, data = dsid.read_direct_chunk(info.chunk_offset, out=buffer.get(info.size))
            total.add(_chunk_prefix(info.chunk_offset, mask, len(data)), _leaf_digest(data))
        return total
    total = _DatasetSum("values", dset.dtype, dset.shape, dset.chunks)
    shape = dset.shape
    if shape is None:
        return total
    if shape == ():
        slab = _slab_bytes(np.asarray(dset[()]))
        total.add(_slab_prefix(0, len(slab)), _leaf_digest(slab))
        return total
    rows = _slab_rows(dset)
    for index, start in enumerate(range(0, shape[0], rows)):
        slab = _slab_bytes(np.asarray(dset[start : start + rows]))
        total.add(_slab_prefix(index, len(slab)), _leaf_digest(slab))
    return total


def _manifest_digest(f: h5py.File) -> str:
    """The root DATASUM: a walk over every link, attribute and per-dataset sum (see the docstring)."""
    h = hashlib.sha256()
    seen: dict[tuple[int, int], str] = {}

    def walk(group: h5py.Group, path: str) -> None:
        for name in sorted(group.keys(), key=lambda n: n.encode("utf-8", "surrogatepass")):
            child = f"{path.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                _field(h, f"S {child} {link.path}")
                continue
            if isinstance(link, h5py.ExternalLink):
                _field(h, f"E {child} {link.filename} {link.path}")
                continue
            obj = group[name]
            info = h5py.h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in seen:
                _field(h, f"H {child} {seen[key]}")
                continue
            seen[key] = child
            if isinstance(obj, h5py.Dataset):
                _field(h, f"D {child} {obj.attrs.get(DATASUM, '')}")
            elif isinstance(obj, h5py.Group):
                _field(h, f"G {child}")
                _hash_attributes(h, obj.attrs)
                walk(obj, child)
            else:
                _field(h, f"T {child} {obj.dtype.str} {obj.dtype.descr!r}")
                _hash_attributes(h, obj.attrs)

    _field(h, "daqif-product-v1")
    _field(h, "G /")
    _hash_attributes(h, f.attrs, skip=DATASUM)
    walk(f, "/")
    return CHECKSUM_PREFIX + h.hexdigest()


def _leaf_digest(data: Any) -> bytes:
    """The digest of one chunk or slab: XXH3-128 (tens of GB/s; SHA-256 costs more CPU than
    the copy itself, and a keyless hash protects against accidents, not attackers, either way)."""
    return xxhash.xxh3_128_digest(data)


class _FileDigests:
    """Leaf digests of byte ranges of an open file, read and hashed on a worker thread while the
    main thread copies the same file in the kernel."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-sum")
        self._buffer = np.empty(0, dtype=np.uint8)

    def digest(self, fd: int, offset: int, size: int) -> Future[bytes]:
        return self._pool.submit(self._digest, fd, offset, size)

    def _digest(self, fd: int, offset: int, size: int) -> bytes:
        if self._buffer.nbytes < size:
            self._buffer = np.empty(max(size, _SLAB_BYTES), dtype=np.uint8)
        view = memoryview(self._buffer.data)[:size]
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise MergeError(f"source file ends before byte {offset + size}")
            got += n
        return _leaf_digest(view)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _ChunkBuffer:
    """One reusable buffer for raw chunks: a fresh 4 MiB `bytes` per chunk costs page faults on
    every allocation, which was measured to slow the copy several-fold."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray[Any, Any]:
        if self._buffer.nbytes < size:
            self._buffer = np.empty(max(size, _SLAB_BYTES), dtype=np.uint8)
        return self._buffer


# -- copying ---------------------------------------------------------------------------------------


@dataclass
class _OpenSource:
    source: Hdf5FileSource
    where: str
    path: Path
    file: h5py.File
    is_base: bool
    keywords: list[_Keyword] = field(default_factory=list)
    other_attributes: list[str] = field(default_factory=list)
    references: Mapping[str, Path] | None = None
    """Stored file name → the file to read, for its virtual and external data; None: resolved
    next to `path` (the standalone merge of files in place)."""


def _copy_attributes(
    src: h5py.AttributeManager, dst: h5py.AttributeManager, names: Sequence[str], log: _Log
) -> None:
    for name in names:
        aid = src.get_id(name)
        if h5py.check_dtype(ref=aid.dtype) is not None:
            log.warning(
                f"attribute {name!r} holds object references, which cannot point into the product; dropped"
            )
            continue
        value = src[name]
        if isinstance(value, h5py.Empty):
            dst.create(name, value)
        else:
            dst.create(name, value, shape=aid.shape, dtype=aid.dtype)


class _Copier:
    """Copies the objects of sources into the product, summing each chunk as it passes."""

    def __init__(self, product: h5py.File, log: _Log) -> None:
        self.product = product
        self.references: Mapping[str, Path] | None = None  # of the source being copied, see _OpenSource
        self.buffer = _ChunkBuffer()
        self.log = log
        self.sums: dict[str, _DatasetSum] = {}  # product dataset path -> its sum in the making
        self.after_copy: list[str] = []  # datasets whose sum is computed from the product
        self.bytes_copied = 0
        self._scratch: h5py.File | None = None

    def copy_tree(
        self, src: h5py.Group, dst: h5py.Group, dst_path: str, link_root: str, source_name: str
    ) -> None:
        """Copy every link of `src` into `dst` (at product path `dst_path`); absolute soft links are
        re-rooted under `link_root`."""
        seen: dict[tuple[int, int], str] = {}
        self._copy_links(src, dst, dst_path, link_root, source_name, seen)

    def _copy_links(
        self,
        src: h5py.Group,
        dst: h5py.Group,
        dst_path: str,
        link_root: str,
        source_name: str,
        seen: dict[tuple[int, int], str],
    ) -> None:
        for name in src:
            child_path = f"{dst_path.rstrip('/')}/{name}"
            if name in dst:
                raise MergeError(f"source {source_name!r}: {child_path} already exists in the product")
            link = src.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                target = link.path
                if target.startswith("/") and link_root != "/":
                    target = link_root.rstrip("/") + target
                dst[name] = h5py.SoftLink(target)
                continue
            if isinstance(link, h5py.ExternalLink):
                self.log.warning(
                    f"source {source_name!r}: {child_path} is an external link to "
                    f"{link.filename}:{link.path}; kept as a link (its data is not in the product)"
                )
                dst[name] = h5py.ExternalLink(link.filename, link.path)
                continue
            obj = src.get(name)
            if obj is None:
                raise MergeError(f"source {source_name!r}: cannot open {src.name}/{name}")
            info = h5py.h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in seen:
                dst[name] = self.product[seen[key]]
                continue
            seen[key] = child_path
            if isinstance(obj, h5py.Group):
                group = dst.create_group(name, track_order=True)
                _copy_attributes(obj.attrs, group.attrs, list(obj.attrs), self.log)
                self._copy_links(obj, group, child_path, link_root, source_name, seen)
            elif isinstance(obj, h5py.Dataset):
                try:
                    self.copy_dataset(obj, dst, name, child_path)
                except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
                    raise MergeError(
                        f"source {source_name!r}: cannot copy dataset {obj.name}: {exc}"
                    ) from exc
            else:
                src.copy(obj, dst, name)

    def copy_dataset(self, src: h5py.Dataset, dst: h5py.Group, name: str, path: str) -> None:
        """Copy one dataset to `dst/name` (product path `path`) and start its sum."""
        dcpl = src.id.get_create_plist()
        layout = dcpl.get_layout()
        if src.dtype.hasobject:
            # Heap and object references need HDF5's own translation.
            src.parent.copy(src, dst, name)
            self.after_copy.append(path)
            return
        tid = src.id.get_type().copy()
        if layout == h5py.h5d.CHUNKED:
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_INCR)  # never pre-write fill values we overwrite
            exact = self._exact_pipeline(src, tid, dcpl)
            if exact is None:
                self.log.warning(f"{path}: filter pipeline cannot be recreated exactly; copied with H5Ocopy")
                src.parent.copy(src, dst, name)
                self.after_copy.append(path)
                return
            did = h5py.h5d.create(dst.id, name.encode("utf-8"), tid, src.id.get_space(), dcpl=exact)
            self._copy_chunks(src, did, path)
        else:
            values = src
            if next(references.dataset_references(dcpl, src.name), None) is not None:
                # Read only through the collected copies (a ReferenceError names dataset and file).
                values = references.value_view(src, self.references, self._scratch_file(), self._next_name())
            did = h5py.h5d.create(
                dst.id, name.encode("utf-8"), tid, src.id.get_space(), dcpl=_plain_dcpl(src, dcpl)
            )
            self._copy_values(values, h5py.Dataset(did), path, sparse=values is src)
        copied = dst[name]
        _copy_attributes(src.attrs, copied.attrs, [a for a in src.attrs if a != DATASUM], self.log)

    def _exact_pipeline(self, src: h5py.Dataset, tid: Any, dcpl: Any) -> Any:
        """A creation list that gives the source's filter pipeline exactly, or None.

        A filter's `set_local` callback runs again when a dataset is created and may rewrite the
        parameters it finds; bitshuffle (32008) prepends its three reserved values every time.
        Raw chunks are only readable with the source's exact parameters, so the pipeline is
        probed in a scratch in-memory file and the callback's prefix taken off when needed.
        """
        want = _filters(dcpl)
        if not want:
            return dcpl
        got = self._probe(tid, src.id.get_space(), dcpl)
        if got == want:
            return dcpl
        fixed = dcpl.copy()
        fixed.remove_filter(h5py.h5z.FILTER_ALL)
        for (fid, flags, values), (_, _, made) in zip(want, got, strict=True):
            extra = len(made) - len(values)
            if extra > 0 and made[extra:] == values:
                values = values[extra:]
            fixed.set_filter(fid, flags, values)
        return fixed if self._probe(tid, src.id.get_space(), fixed) == want else None

    def _scratch_file(self) -> h5py.File:
        """An in-memory file for probe datasets and the views of virtual and external data."""
        if self._scratch is None:
            self._scratch = h5py.File("daqif-merge-probe", "w", driver="core", backing_store=False)
        return self._scratch

    def _next_name(self) -> str:
        return f"p{len(self._scratch_file())}"

    def _probe(self, tid: Any, space: Any, dcpl: Any) -> list[tuple[int, int, tuple[int, ...]]]:
        did = h5py.h5d.create(self._scratch_file().id, self._next_name().encode(), tid, space, dcpl=dcpl)
        return _filters(did.get_create_plist())

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def _copy_chunks(self, src: h5py.Dataset, did: Any, path: str) -> None:
        total = self.sums[path] = _DatasetSum("raw", src.dtype, src.shape, src.chunks)
        sid = src.id
        for info in _sorted_chunks(sid):
            offset = tuple(info.chunk_offset)
            mask, data = sid.read_direct_chunk(offset, out=self.buffer.get(info.size))
            total.add(_chunk_prefix(offset, mask, len(data)), _leaf_digest(data))
            did.write_direct_chunk(offset, data, mask)
            self.bytes_copied += len(data)

    def _copy_values(self, src: h5py.Dataset, dst: h5py.Dataset, path: str, sparse: bool = False) -> None:
        """Copy `src` by value, by slabs; with `sparse`, storage `src` never allocated is not
        written either (its fill values are still summed), so a source declaring a large empty
        dataset does not make a large product."""
        total = self.sums[path] = _DatasetSum("values", src.dtype, src.shape, src.chunks)
        if src.shape is None:
            return
        write = not (sparse and src.id.get_storage_size() == 0)
        if src.shape == ():
            arr = np.asarray(src[()])
            if write:
                dst[()] = arr
            slab = _slab_bytes(arr)
            total.add(_slab_prefix(0, len(slab)), _leaf_digest(slab))
            return
        rows = _slab_rows(src)
        for index, start in enumerate(range(0, src.shape[0], rows)):
            arr = np.asarray(src[start : start + rows])
            slab = _slab_bytes(arr)
            total.add(_slab_prefix(index, len(slab)), _leaf_digest(slab))
            if write:
                dst[start : start + len(arr)] = arr
                self.bytes_copied += len(slab)


def _filters(dcpl: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    out = []
    for i in range(dcpl.get_nfilters()):
        fid, flags, values, _ = dcpl.get_filter(i)
        out.append((int(fid), int(flags), tuple(int(v) for v in values)))
    return out


def _plain_dcpl(src: h5py.Dataset, dcpl: Any) -> Any:
    """A contiguous/compact creation list without external storage, keeping the fill value."""
    plain = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plain.set_layout(h5py.h5d.COMPACT if dcpl.get_layout() == h5py.h5d.COMPACT else h5py.h5d.CONTIGUOUS)
    if dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_USER_DEFINED:
        fill = np.zeros((1,), dtype=src.dtype)
        dcpl.get_fill_value(fill)
        plain.set_fill_value(fill)
    return plain


# -- sources ---------------------------------------------------------------------------------------


def _source_where(spec: Specification, source: Hdf5FileSource | FitsKeywordsSource) -> str:
    if source is spec.target_source:
        return "target.source"
    return f"sources[{spec.sources.index(source)}]"


def resolve_sources(spec: Specification, root: Path) -> dict[str, Path]:
    """The file to read for each HDF5 source: `<root>/sources/<sourceName>.h5` when it exists (a
    DPM workspace after collection), else the local `location`; a remote location without a
    collected copy is a `MergeError`."""
    files: dict[str, Path] = {}
    for source in spec.hdf5_sources:
        collected = Path(root) / "sources" / f"{source.source_name}.h5"
        if collected.exists():
            files[source.source_name] = collected
        elif source.location.is_remote:
            raise MergeError(
                f"{_source_where(spec, source)} {source.source_name!r}: remote location {source.location} "
                f"has no collected copy at {collected}; collect it first (the DPM server does) or give a "
                "local path"
            )
        else:
            files[source.source_name] = Path(source.location.path)
    return files


def resolve_references(spec: Specification, source_files: Mapping[str, Path]) -> dict[str, dict[str, Path]]:
    """Per source, the collected copies of the files it refers to, from the manifest the DPM
    wrote beside each collected source (`<name>.refs.json`); sources without one are absent."""
    found: dict[str, dict[str, Path]] = {}
    for name, path in source_files.items():
        manifest = references.manifest_path(Path(path))
        if manifest.is_file():
            try:
                found[name] = references.read_manifest(manifest)
            except references.ReferenceError as exc:
                raise MergeError(str(exc)) from None
    return found


def _open_source(spec: Specification, source: Hdf5FileSource, path: Path, log: _Log) -> _OpenSource:
    where = _source_where(spec, source)
    label = f"{where} {source.source_name!r}"
    if not path.exists():
        raise MergeError(f"{label}: file {path} does not exist")
    if not path.is_file():
        raise MergeError(f"{label}: {path} is not a regular file")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise MergeError(f"{label}: cannot open {path} as an HDF5 file: {exc}") from None
    opened = _OpenSource(source, where, path, handle, is_base=source is spec.target_source)
    try:
        _read_source_keywords(opened, log)
    except BaseException:
        handle.close()
        raise
    return opened


def _read_source_keywords(src: _OpenSource, log: _Log) -> None:
    attrs = src.file.attrs
    comments: dict[str, str] = {}
    if KEYWORD_COMMENTS in attrs:
        try:
            rows = np.asarray(attrs[KEYWORD_COMMENTS], dtype=object).reshape(-1, 2).tolist()
            comments = {_text(name): _text(comment) for name, comment in rows}
        except (ValueError, TypeError):
            log.warning(f"{src.where}: {KEYWORD_COMMENTS} is not an (N, 2) string array; comments ignored")
    keywords: list[_Keyword] = []
    for name in attrs:
        if name == KEYWORD_COMMENTS:
            continue
        if name in RESERVED_ATTRIBUTES:
            log.warning(
                f"source {src.source.source_name!r}: attribute {name!r} is reserved for the merge; dropped"
            )
            continue
        if is_keyword_name(name):
            dtype = attrs.get_id(name).dtype
            keywords.append(_Keyword(name, attrs[name], comments.get(name, ""), dtype))
        else:
            src.other_attributes.append(name)
    src.keywords = apply_keyword_rules(keywords, src.source.keyword_rules, f"{src.where}.keywordRules", log)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _write_keyword(attrs: h5py.AttributeManager, kw: _Keyword) -> None:
    if kw.is_commentary:
        return
    if kw.dtype is not None and not isinstance(kw.value, h5py.Empty):
        attrs.create(kw.name, kw.value, dtype=kw.dtype)
    else:
        attrs[kw.name] = kw.value


def _utc_date(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}"


# -- merge -----------------------------------------------------------------------------------------


def merge(
    spec: Specification,
    source_files: Mapping[str, Path],
    outfile: Path,
    log: logging.Logger | TextIO | None = None,
    dry_run: bool = False,
    source_references: Mapping[str, Mapping[str, Path]] | None = None,
) -> MergeResult:
    """Build the data product of `spec` at `outfile` (see the module docstring for the format).

    `source_files` maps every HDF5 source's `sourceName` (`target.source` included) to the file
    to read. The product is written as `.<name>.part` beside `outfile` and renamed when complete.
    With `dry_run`, every source is opened and the plan logged, and nothing is written.
    `source_references` maps a sourceName to the collected copies of the files its virtual and
    external datasets name (`references.read_manifest`); a source without an entry reads them
    next to its own file.
    Raises `MergeError` with a one-line message on any problem; `outfile` is then untouched.
    """
    started = time.monotonic()
    out = _Log(log)
    outfile = Path(outfile)
    for source in spec.hdf5_sources:
        if source.source_name not in source_files:
            raise MergeError(
                f"{_source_where(spec, source)} {source.source_name!r}: no file given for this source"
            )
    opened: list[_OpenSource] = []
    try:
        return _merge_opened(
            spec, source_files, outfile, out, dry_run, started, opened, source_references or {}
        )
    except MergeError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"merge of {spec.product_name} failed: {exc}") from exc
    finally:
        for o in opened:
            o.file.close()


def _merge_opened(
    spec: Specification,
    source_files: Mapping[str, Path],
    outfile: Path,
    out: _Log,
    dry_run: bool,
    started: float,
    opened: list[_OpenSource],
    source_references: Mapping[str, Mapping[str, Path]],
) -> MergeResult:
    for source in spec.hdf5_sources:
        opened.append(_open_source(spec, source, Path(source_files[source.source_name]), out))
        opened[-1].references = source_references.get(source.source_name)
    by_name = {o.source.source_name: o for o in opened}
    base = by_name[spec.target_source.source_name] if spec.target_source else None
    per_source: list[tuple[str, list[_Keyword]]] = []
    for entry in spec.sources:
        if isinstance(entry, FitsKeywordsSource):
            per_source.append((entry.source_name, _fits_keywords(entry, _source_where(spec, entry))))
        else:
            per_source.append((entry.source_name, by_name[entry.source_name].keywords))
    if base is not None:
        per_source.append((base.source.source_name, base.keywords))
    keywords = _merge_keywords(per_source, out)
    if base is not None:
        _check_base_names(base, spec)
    if dry_run:
        return _dry_run(spec, opened, keywords, outfile, out, started)
    return _write_product(spec, opened, base, keywords, outfile, out, started)


def _check_base_names(base: _OpenSource, spec: Specification) -> None:
    names = set(base.file.keys())
    for source in spec.sources:
        if isinstance(source, Hdf5FileSource) and source.source_name in names:
            raise MergeError(
                f"{_source_where(spec, source)} {source.source_name!r}: target.source {base.path} already "
                f"has /{source.source_name}; rename the source"
            )


def _describe_dataset(dset: h5py.Dataset) -> str:
    dcpl = dset.id.get_create_plist()
    filters = [str(dcpl.get_filter(i)[0]) for i in range(dcpl.get_nfilters())]
    stored = dset.id.get_storage_size()
    layout = "chunks " + repr(dset.chunks) if dset.chunks else "contiguous"
    return (
        f"{dset.dtype} {dset.shape} {layout} filters [{' '.join(filters) or 'none'}] "
        f"stored {stored / 2**20:.1f} MiB"
    )


def _dataset_paths(group: h5py.Group) -> list[str]:
    paths: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            paths.append(name)

    group.visititems(visit)
    return paths


def _dry_run(
    spec: Specification,
    opened: Sequence[_OpenSource],
    keywords: _MergedKeywords,
    outfile: Path,
    out: _Log,
    started: float,
) -> MergeResult:
    n_datasets = 0
    out.info(f"dry run: would write {outfile} ({spec.product_name}, id {spec.id})")
    for o in opened:
        prefix = "" if o.is_base else f"/{o.source.source_name}"
        role = "base, copied to /" if o.is_base else f"copied to {prefix}/"
        out.info(f"source {o.source.source_name!r} ({o.where}) {o.path}: {role}")
        for path in _dataset_paths(o.file):
            n_datasets += 1
            out.info(f"  dataset {prefix}/{path}: {_describe_dataset(o.file[path])}")
        if o.other_attributes:
            out.info(f"  attributes onto {prefix or '/'}: {', '.join(o.other_attributes)}")
        out.info(f"  keywords after rules: {', '.join(kw.name for kw in o.keywords) or 'none'}")
    for name, kw in keywords.values.items():
        comment = f" / {kw.comment}" if kw.comment else ""
        out.info(f"keyword {name} = {_show(kw.value)}{comment} (from {keywords.origin[name]})")
    for name, lines in keywords.commentary.items():
        for line in lines:
            out.info(f"keyword {name} {line}")
    out.info(f"dry run: {n_datasets} datasets, {keywords.count} keywords; nothing written")
    return MergeResult(
        product=outfile,
        bytes=0,
        datasets=n_datasets,
        keywords=keywords.count,
        checksum="",
        duration_s=time.monotonic() - started,
        dry_run=True,
        log=out.lines,
        warnings=out.warnings,
    )


def _show(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _part_path(outfile: Path) -> Path:
    return outfile.with_name(f".{outfile.name}.part")


def _write_product(
    spec: Specification,
    opened: Sequence[_OpenSource],
    base: _OpenSource | None,
    keywords: _MergedKeywords,
    outfile: Path,
    out: _Log,
    started: float,
) -> MergeResult:
    if not outfile.parent.is_dir():
        raise MergeError(f"output directory {outfile.parent} does not exist")
    part_name = _part_path(outfile).name  # a fixed name: the next attempt replaces a leftover
    out.info(f"merging {len(opened)} HDF5 source(s) into {outfile} (writing {part_name})")
    try:
        with atomic_output(outfile, temp_name=part_name) as part:
            checksum, n_datasets, copied = _build(spec, opened, base, keywords, outfile, part, out)
            if outfile.exists():
                out.warning(f"replacing the existing {outfile}")
    except BaseException as exc:
        if isinstance(exc, MergeError):
            raise
        if isinstance(exc, (OSError, RuntimeError, ValueError, KeyError, TypeError)):
            raise MergeError(f"merge failed writing {outfile}: {exc}") from exc
        raise
    size = outfile.stat().st_size
    duration = time.monotonic() - started
    out.info(
        f"wrote {outfile}: {size} bytes, {n_datasets} datasets, {keywords.count} keywords, {checksum} "
        f"in {duration:.2f} s ({copied / 2**20 / max(duration, 1e-9):.0f} MiB/s)"
    )
    return MergeResult(
        product=outfile,
        bytes=size,
        datasets=n_datasets,
        keywords=keywords.count,
        checksum=checksum,
        duration_s=duration,
        log=out.lines,
        warnings=out.warnings,
    )


def _build(
    spec: Specification,
    opened: Sequence[_OpenSource],
    base: _OpenSource | None,
    keywords: _MergedKeywords,
    outfile: Path,
    part: Path,
    out: _Log,
) -> tuple[str, int, int]:
    digests = _FileDigests()
    flusher = _Flusher(part)
    clone = base if base is not None else max(opened, key=lambda o: o.path.stat().st_size, default=None)
    try:
        with contextlib.ExitStack() as stack:
            if clone is None:
                product = stack.enter_context(
                    h5py.File(part, "w", libver=("v108", "latest"), track_order=True)
                )
                copier = _Copier(product, out)
            else:
                product, copier = _clone_source(clone, part, digests, out, stack)
                flusher.kick()
            stack.callback(copier.close)
            # Reserved attributes first so a reader sees them at the top; DATASUM comes last.
            product.attrs[ARCFILE] = outfile.name
            product.attrs[ORIGFILE] = Path(base.source.location.path).name if base else spec.product_name
            product.attrs[DATE] = _utc_date(datetime.now(UTC))
            ordered = sorted(keywords.values.values(), key=lambda kw: kw.is_eso)  # value keywords, then ESO
            for kw in ordered:
                _write_keyword(product.attrs, kw)
            for name in COMMENTARY:
                if keywords.commentary.get(name):
                    product.attrs.create(name, keywords.commentary[name], dtype=h5py.string_dtype())
            rows = [[kw.name, kw.comment] for kw in ordered if kw.comment]
            if rows:
                product.attrs.create(
                    KEYWORD_COMMENTS, np.array(rows, dtype=object), dtype=h5py.string_dtype()
                )
            for o in opened:
                if o is clone:
                    continue
                name = o.source.source_name
                out.info(f"copying {name!r} ({o.path}) to /{name}")
                group = product.create_group(name, track_order=True)
                _copy_attributes(o.file.attrs, group.attrs, o.other_attributes, out)
                copier.references = o.references
                copier.copy_tree(o.file, group, f"/{name}", f"/{name}", name)
                flusher.kick()
            for path in copier.after_copy:  # HDF5-copied datasets: summed from the product
                copier.sums[path] = _dataset_sum(product[path], copier.buffer)
            for path, total in copier.sums.items():
                product[path].attrs[DATASUM] = total.finish(product[path])
            checksum = _manifest_digest(product)
            product.attrs[DATASUM] = checksum
        return checksum, len(copier.sums), copier.bytes_copied
    finally:
        flusher.close()
        digests.close()


class _Flusher:
    """Writes the part file's data out in the background while the merge goes on, so the fsync
    before the rename finds little left to write (the disk works while the CPU copies)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="merge-flush", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                fd = os.open(self._path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass  # only an early start: the fsync before the rename is the one that counts

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()


def _clone_source(
    src: _OpenSource, part: Path, digests: _FileDigests, out: _Log, stack: contextlib.ExitStack
) -> tuple[h5py.File, _Copier]:
    """Start the product as a byte copy of `src` (the base, or the largest source), restructured.

    The kernel copies the bytes (`copy_file_range`, as `cp` does) while the hash thread reads
    the same chunks from the source for the checksums; then the source's root links move under
    `/<sourceName>` (unless it is the base) and its root attributes are sorted out. Links and
    object addresses stay valid, so nothing of the source is decoded or rewritten.
    """
    name = src.source.source_name
    prefix = "" if src.is_base else f"/{name}"
    out.info(f"copying {name!r} ({src.path}) to {prefix or '/'} (file clone)")
    sums: dict[str, _DatasetSum] = {}
    after_copy: list[str] = []
    recopy: list[str] = []
    fd = os.open(src.path, os.O_RDONLY)
    stack.callback(os.close, fd)
    stack.callback(digests.close)  # runs first: no worker may read `fd` once it is closed

    def plan(path: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        target = f"{prefix}/{path}"
        dcpl = obj.id.get_create_plist()
        if dcpl.get_layout() == h5py.h5d.VIRTUAL or (
            dcpl.get_layout() == h5py.h5d.CONTIGUOUS and dcpl.get_external_count() > 0
        ):
            recopy.append(path)  # data outside the source file: bring it into the product
        elif _is_raw_copyable(obj):
            total = sums[target] = _DatasetSum("raw", obj.dtype, obj.shape, obj.chunks)
            for info in _sorted_chunks(obj.id):
                fields = _chunk_prefix(tuple(info.chunk_offset), info.filter_mask, info.size)
                total.add(fields, digests.digest(fd, info.byte_offset, info.size))
        else:
            after_copy.append(target)

    src.file.visititems(plan)
    copied = copy_file(src.path, part, durable=False)  # fsynced with the whole part file
    product = stack.enter_context(h5py.File(part, "r+", libver=("v108", "latest")))
    copier = _Copier(product, out)
    stack.callback(copier.close)  # its scratch file, also when the recopy below fails
    copier.references = src.references
    copier.sums.update(sums)
    copier.after_copy.extend(after_copy)
    copier.bytes_copied += copied
    if src.is_base:
        group = product
    else:
        holder = f".daqif-merge-{os.getpid()}"  # the source may hold a link named like itself
        group = product.create_group(holder, track_order=True)
        for link in list(product.keys()):
            if link != holder:
                product.move(link, f"{holder}/{link}")
        product.move(holder, name)
        group = product[name]
        _reroot_soft_links(group, prefix)
        _copy_attributes(product.attrs, group.attrs, src.other_attributes, out)
    for attr in list(product.attrs):
        if not src.is_base or attr not in src.other_attributes:
            del product.attrs[attr]
    for path in recopy:
        where = f"{prefix}/{path}"
        parent_path, _, leaf = where.rpartition("/")
        del product[where]
        try:
            copier.copy_dataset(src.file[path], product[parent_path or "/"], leaf, where)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"source {name!r}: cannot copy dataset /{path}: {exc}") from exc
    return product, copier


def _reroot_soft_links(group: h5py.Group, prefix: str) -> None:
    """Point the absolute soft links under `group` (moved to `prefix`) at their moved targets."""
    seen: set[int] = set()

    def walk(g: h5py.Group) -> None:
        addr = h5py.h5o.get_info(g.id).addr
        if addr in seen:
            return
        seen.add(addr)
        for link_name in list(g.keys()):
            link = g.get(link_name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                if link.path.startswith("/"):
                    del g[link_name]
                    g[link_name] = h5py.SoftLink(prefix + link.path)
            elif isinstance(link, h5py.HardLink):
                child = g[link_name]
                if isinstance(child, h5py.Group):
                    walk(child)

    walk(group)


# -- verify ----------------------------------------------------------------------------------------


def verify(path: Path) -> VerifyResult:
    """Recompute every dataset's and the root `DATASUM` of a product; `ok` when all match.

    Raises `ProductUnreadableError` when the file cannot be read as HDF5 at all.
    """
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise ProductUnreadableError(f"{path}: cannot open as an HDF5 file: {exc}") from None
    try:
        with handle as f:
            return _verify_open(path, f)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ProductUnreadableError(f"{path}: cannot read the product: {exc}") from None


def _verify_open(path: Path, f: h5py.File) -> VerifyResult:
    mismatches: list[str] = []
    stored = f.attrs.get(DATASUM)
    stored_text = _text(stored) if stored is not None else ""
    if not stored_text:
        mismatches.append(f"no root {DATASUM} attribute (not a daqif product, or the merge did not finish)")
    datasets = 0
    seen: set[tuple[int, int]] = set()
    dataset_names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            info = h5py.h5o.get_info(obj.id)
            if (info.fileno, info.addr) not in seen:
                seen.add((info.fileno, info.addr))
                dataset_names.append(name)

    f.visititems(visit)
    buffer = _ChunkBuffer()
    for name in dataset_names:
        dset = f[name]
        datasets += 1
        want = dset.attrs.get(DATASUM)
        got = _dataset_sum(dset, buffer).finish(dset)
        if want is None:
            mismatches.append(f"dataset /{name} has no {DATASUM} attribute")
        elif _text(want) != got:
            mismatches.append(
                f"dataset /{name}: data or attributes changed ({DATASUM} {_text(want)}, computed {got})"
            )
    computed = _manifest_digest(f)
    if stored_text and computed != stored_text:
        detail = (
            ""
            if any(m.startswith("dataset") for m in mismatches)
            else " (groups, links or root attributes changed)"
        )
        mismatches.append(f"root {DATASUM} {stored_text} != computed {computed}{detail}")
    return VerifyResult(
        path=path,
        ok=not mismatches,
        stored=stored_text,
        computed=computed,
        datasets=datasets,
        mismatches=mismatches,
    )
