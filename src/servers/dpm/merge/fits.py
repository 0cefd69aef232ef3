"""The FITS product `<fileId>.fits`: primary HDU with the merged keywords, extensions verbatim.

The same `merge()` (`plan.py`) runs it when the specification's file sources are `fitsFile`s
(`Specification.product_format`); keywords go through the same rules and priority merge
(`keywords.py`), and only the writing differs from the HDF5 product. astropy.io.fits reads the
headers and renders the cards; the data is never decoded.

Layout
    Primary HDU: the `target.source`'s primary HDU (its structure keywords and its data bytes)
    or, without a target, an empty one (`NAXIS = 0`); `EXTEND = T`. Its header holds the
    merged keywords in DICB order (`fits_cards.py`), then the reserved `CHECKSUM` and `DATASUM`.
    Reserved keywords written by the merge: `ARCFILE` (the product's file name), `ORIGFILE`
    (`<fileId>.fits`, or the basename of the target's location), `DATE` (UTC time of the merge,
    `YYYY-MM-DDThh:mm:ss.sss`). A source keyword of a reserved name is dropped with a warning;
    structure keywords of the sources are never copied.
    Extensions: the target's extensions first, then every other `fitsFile` source's extensions
    (HDU >= 1) in priority order, each copied verbatim: its header bytes and its data bytes (heap
    and padding included) move by kernel copy (`copy_file_range`) at their raw offsets, so
    tile-compressed HDUs stay compressed and EXTNAME/EXTVER stay as they are. A non-target
    source whose primary HDU has data: WARNING `unmerged:<sourceName>`; that data is not copied.

Checksums (FITS standard 4.0, Appendix J; `CHECKSUM` and `DATASUM` on every HDU)
    `DATASUM` is the 32-bit ones' complement sum of the data records, `CHECKSUM` the encoded
    complement of the HDU's sum, so that header plus data sum to -0. They are computed last,
    from the bytes written. An extension whose own `CHECKSUM`/`DATASUM` verify is copied
    byte-for-byte with them; otherwise its header is rewritten with the two cards set (every
    other card image unchanged). `verify_fits` recomputes every HDU's sums from the raw bytes and
    names the HDU (index and EXTNAME) whose data or header changed. astropy and `fitsverify`
    check the same sums (the tests run both).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from daqif.spec import FitsFileSource, Specification
from servers.dpm.dictionary import DictionarySet
from servers.dpm.merge.common import (
    ARCFILE,
    DATE,
    ORIGFILE,
    MergeError,
    MergeLog,
    MergeResult,
    ProductUnreadableError,
    VerifyResult,
    product_output,
    product_written,
    source_label,
    source_where,
    utc_date,
)
from servers.dpm.merge.dictionaries import apply_dictionaries, check_copied_keywords, dictionary_card
from servers.dpm.merge.fits_cards import (
    FITS_RESERVED,
    STRUCTURE,
    commentary_cards,
    dicb_order,
    header_keywords,
    render_card,
)
from servers.dpm.merge.keywords import (
    Keyword,
    MergedKeywords,
    apply_keyword_rules,
    keywords_by_priority,
    merge_keywords,
)

BLOCK = 2880
_SUM_BYTES = 16 << 20  # bytes summed per numpy call (the uint64 sum cannot overflow)
_PLACEHOLDER = "0" * 16
_FALL_BACK = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})
UNMERGED_ALERT = "unmerged:"  # + sourceName: the primary data of a non-target source


# -- checksums (FITS Appendix J) ---------------------------------------------------------------


def ones_complement_add(a: int, b: int) -> int:
    s = a + b
    while s >> 32:
        s = (s & 0xFFFFFFFF) + (s >> 32)
    return s


def ones_complement_sum(data: Any, start: int = 0) -> int:
    """The 32-bit ones' complement sum of `data` (a multiple of 4 bytes, big-endian words)."""
    view = memoryview(data).cast("B")
    total = start
    for offset in range(0, len(view), _SUM_BYTES):
        piece = np.frombuffer(view[offset : offset + _SUM_BYTES], dtype=">u4")
        total = ones_complement_add(total, int(piece.sum(dtype=np.uint64)))
    return total


_EXCLUDE = frozenset(b":;<=>?@[\\]^_`")


def encode_checksum(value: int) -> str:
    """The 16-character ASCII encoding of a 32-bit value (Appendix J), rotated one place."""
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        quotient, remainder = byte // 4 + 0x30, byte % 4
        ch = [quotient + remainder, quotient, quotient, quotient]
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                while ch[j] in _EXCLUDE or ch[j + 1] in _EXCLUDE:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = ch[j]
    return bytes(chars[15:] + chars[:15]).decode("ascii")


def checksummed_header(header: fits.Header, datasum: int, when: str) -> bytes:
    """`header` with `CHECKSUM`/`DATASUM` set so that the HDU (with data of sum `datasum`) sums to -0."""
    # Cards already there keep their place (a verbatim header stays as it was); new ones go last.
    for key, value, comment in (
        ("CHECKSUM", _PLACEHOLDER, f"HDU checksum updated {when}"),
        ("DATASUM", str(datasum), f"data unit checksum updated {when}"),
    ):
        if key in header:
            header[key] = (value, comment)
        else:
            header.append((key, value, comment), end=True)
    raw = header.tostring().encode("ascii")
    total = ones_complement_sum(raw, datasum)
    header["CHECKSUM"] = (encode_checksum(~total & 0xFFFFFFFF), f"HDU checksum updated {when}")
    return bytes(header.tostring().encode("ascii"))


# -- sources -------------------------------------------------------------------------------------


@dataclass
class _Hdu:
    """One HDU of a source file by its raw byte ranges."""

    index: int
    name: str
    header_offset: int
    data_offset: int
    data_span: int
    header: fits.Header

    @property
    def header_span(self) -> int:
        return self.data_offset - self.header_offset

    def label(self) -> str:
        return f"HDU {self.index}" + (f" ({self.name})" if self.name else "")


@dataclass
class _FitsSource:
    source: FitsFileSource
    where: str
    path: Path
    fd: int
    is_target: bool
    hdus: list[_Hdu]
    keywords: list[Keyword] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.where} {self.source.source_name!r}"


def read_hdus(path: Path, what: str) -> list[_Hdu]:
    """Every HDU of `path` with its raw offsets (tile-compressed HDUs as the tables they are)."""
    try:
        with warnings.catch_warnings():  # a truncated file is named below; astropy only warns
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, mode="readonly", memmap=False, disable_image_compression=True) as hdul:
                hdul.readall()
                out = []
                for i, hdu in enumerate(hdul):
                    info = hdu.fileinfo()
                    name = str(hdu.name if i else "")
                    out.append(_Hdu(i, name, info["hdrLoc"], info["datLoc"], info["datSpan"], hdu.header))
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise MergeError(f"{what}: cannot read {path} as a FITS file: {str(exc).splitlines()[0]}") from None
    size = os.stat(path).st_size
    for hdu in out:
        if hdu.data_offset + hdu.data_span > size:
            raise MergeError(f"{what}: {path} is truncated: {hdu.label()} ends after byte {size}")
    return out


def _open_source(spec: Specification, source: FitsFileSource, path: Path, log: MergeLog) -> _FitsSource:
    where, label = source_where(spec, source), source_label(spec, source, path)
    hdus = read_hdus(path, label)
    fd = os.open(path, os.O_RDONLY)
    opened = _FitsSource(source, where, path, fd, source is spec.target_source, hdus)
    keywords = []
    for kw in header_keywords(hdus[0].header):
        if kw.name in FITS_RESERVED:
            log.warning(
                f"source {source.source_name!r}: keyword {kw.name!r} is reserved for the merge; dropped"
            )
            continue
        keywords.append(kw)
    opened.keywords = apply_keyword_rules(keywords, source.keyword_rules, f"{where}.keywordRules", log)
    return opened


class _FitsReserved:
    """Names a source may not give a FITS product: the reserved and the structure keywords."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in FITS_RESERVED or STRUCTURE.fullmatch(name) is not None)


# -- the merge -----------------------------------------------------------------------------------


def merge_fits(
    spec: Specification,
    source_files: Mapping[str, Path],
    outfile: Path,
    log: MergeLog,
    dry_run: bool,
    started: float,
    dictionaries: DictionarySet | None = None,
) -> MergeResult:
    """Build the FITS product of `spec` at `outfile` (see the module docstring)."""
    opened: list[_FitsSource] = []
    try:
        for source in spec.fits_sources:
            opened.append(_open_source(spec, source, Path(source_files[source.source_name]), log))
        by_name = {o.source.source_name: o for o in opened}
        target = by_name[spec.target_source.source_name] if spec.target_source else None
        file_keywords = {name: o.keywords for name, o in by_name.items()}
        keywords = merge_keywords(keywords_by_priority(spec, file_keywords), log, reserved=_FitsReserved())
        apply_dictionaries(keywords, dictionaries, log)
        ordered = [o for o in opened if o.is_target] + [o for o in opened if not o.is_target]
        for o in ordered:
            if not o.is_target and o.hdus[0].data_span > 0:
                log.alert(
                    f"{UNMERGED_ALERT}{o.source.source_name}",
                    f"{o.label}: the primary HDU of {o.path} has data "
                    f"({o.hdus[0].data_span} bytes); only a target.source's primary data is merged, "
                    "so it is not in the product",
                )
        extensions = [(o, hdu) for o in ordered for hdu in o.hdus[1:]]
        check_copied_keywords(
            ((f"{o.label} {hdu.label()}", header_keywords(hdu.header)) for o, hdu in extensions), dictionaries
        )
        if dry_run:
            return _dry_run(spec, ordered, extensions, keywords, outfile, log, started)
        return _write(spec, target, extensions, keywords, outfile, log, started)
    finally:
        for o in opened:
            os.close(o.fd)


def _primary_header(
    spec: Specification, target: _FitsSource | None, keywords: MergedKeywords, outfile: Path, now: datetime
) -> fits.Header:
    header = fits.Header()
    if target is None:
        for card in (("SIMPLE", True, "conforms to FITS standard"), ("BITPIX", 8), ("NAXIS", 0)):
            header.append(card)
    else:
        for card in target.hdus[0].header.cards:
            if STRUCTURE.fullmatch(card.keyword) and card.keyword != "EXTEND":
                header.append(card)
    header.append(("EXTEND", True, "FITS dataset may contain extensions"))
    reserved = {
        ARCFILE: (outfile.name, "Archive file name"),
        ORIGFILE: (
            Path(target.source.location.path).name if target else spec.product_name,
            "Original file name",
        ),
        DATE: (utc_date(now), "Date the file was written"),
    }
    values = [Keyword(name, value, comment) for name, (value, comment) in reserved.items()]
    values += list(keywords.values.values())
    for kw in dicb_order(values):
        where = f"keyword {kw.name!r} of source {keywords.origin.get(kw.name, 'merge')!r}"
        try:
            header.append(dictionary_card(kw, render_card), end=True)
        except ValueError as exc:
            raise MergeError(f"{where}: {exc}") from None
    for name in ("HISTORY", "COMMENT"):
        try:
            for card in commentary_cards(name, keywords.commentary.get(name, [])):
                header.append(card, end=True)
        except ValueError as exc:
            raise MergeError(f"keyword {name}: {exc}") from None
    if any(len(card.image) > 80 for card in header.cards) and "LONGSTRN" not in header:  # CONTINUE cards
        header.insert(
            "EXTEND", ("LONGSTRN", "OGIP 1.0", "The OGIP long string convention is used"), after=True
        )
    return header


def _datasum(fd: int, offset: int, span: int) -> int:
    if span == 0:
        return 0
    with (
        mmap.mmap(
            fd,
            span + offset % mmap.ALLOCATIONGRANULARITY,
            access=mmap.ACCESS_READ,
            offset=offset - offset % mmap.ALLOCATIONGRANULARITY,
        ) as mm,
        memoryview(mm) as view,
    ):
        return ones_complement_sum(view[offset % mmap.ALLOCATIONGRANULARITY :])


def _verifies(header_bytes: bytes, header: fits.Header, datasum: int) -> bool:
    stored = header.get("DATASUM")
    if "CHECKSUM" not in header or stored is None or str(stored).strip() != str(datasum):
        return False
    return ones_complement_sum(header_bytes, datasum) == 0xFFFFFFFF


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Kernel copy of `count` bytes at `offset` of `src` to the end of `dst` (sendfile fallback)."""
    done = 0
    use_range = True
    while done < count:
        try:
            if use_range:
                n = os.copy_file_range(src, dst, count - done, offset + done)
            else:
                n = os.sendfile(dst, src, offset + done, count - done)
        except OSError as exc:
            if use_range and exc.errno in _FALL_BACK:
                use_range = False
                continue
            raise
        if n == 0:
            raise MergeError(f"source ends {count - done} bytes early")
        done += n
    return done


def _write(
    spec: Specification,
    target: _FitsSource | None,
    extensions: Sequence[tuple[_FitsSource, _Hdu]],
    keywords: MergedKeywords,
    outfile: Path,
    log: MergeLog,
    started: float,
) -> MergeResult:
    now = datetime.now(UTC)
    when = now.strftime("%Y-%m-%dT%H:%M:%S")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-datasum")
    copied = 0
    try:
        with product_output(outfile, f"{len(extensions)} extension(s)", log) as part:
            # Data sums are computed on a worker, one HDU ahead of the kernel copy.
            sums: list[Future[int]] = [
                pool.submit(_datasum, o.fd, h.data_offset, h.data_span) for o, h in extensions
            ]
            primary = target.hdus[0] if target else None
            primary_sum = (
                _datasum(target.fd, primary.data_offset, primary.data_span) if target and primary else 0
            )
            header = _primary_header(spec, target, keywords, outfile, now)
            with open(part, "wb") as out:
                dst = out.fileno()
                os.write(dst, checksummed_header(header, primary_sum, when))
                if target is not None and primary is not None and primary.data_span:
                    copied += _copy_range(target.fd, dst, primary.data_offset, primary.data_span)
                for (o, hdu), datasum in zip(extensions, sums, strict=True):
                    raw = os.pread(o.fd, hdu.header_span, hdu.header_offset)
                    total = datasum.result()
                    if _verifies(raw, hdu.header, total):
                        copied += _copy_range(o.fd, dst, hdu.header_offset, hdu.header_span)
                    else:
                        os.write(dst, checksummed_header(hdu.header.copy(), total, when))
                        log.info(
                            f"{o.label} {hdu.label()}: CHECKSUM/DATASUM missing or not valid; written afresh"
                        )
                    copied += _copy_range(o.fd, dst, hdu.data_offset, hdu.data_span)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    checksum = str(fits.getheader(outfile, 0).get("CHECKSUM", ""))
    n_hdus = 1 + len(extensions)
    contents = f"{n_hdus} HDUs, {keywords.count} keywords, CHECKSUM {checksum}"
    return product_written(outfile, contents, checksum, n_hdus, keywords.count, copied, log, started)


def _dry_run(
    spec: Specification,
    ordered: Sequence[_FitsSource],
    extensions: Sequence[tuple[_FitsSource, _Hdu]],
    keywords: MergedKeywords,
    outfile: Path,
    log: MergeLog,
    started: float,
) -> MergeResult:
    log.info(f"dry run: would write {outfile} ({spec.product_name}, id {spec.id})")
    for o in ordered:
        role = "target: primary HDU and extensions" if o.is_target else "extensions"
        log.info(f"source {o.source.source_name!r} ({o.where}) {o.path}: {role}")
        log.info(f"  keywords after rules: {', '.join(kw.name for kw in o.keywords) or 'none'}")
    for n, (o, hdu) in enumerate(extensions, start=1):
        log.info(f"  HDU {n}: {o.source.source_name} {hdu.label()}, {hdu.data_span} data bytes")
    for name, kw in keywords.values.items():
        log.info(f"keyword {name} = {kw.value!r} (from {keywords.origin[name]})")
    log.info(f"dry run: {1 + len(extensions)} HDUs, {keywords.count} keywords; nothing written")
    return MergeResult(
        product=outfile,
        bytes=0,
        datasets=1 + len(extensions),
        keywords=keywords.count,
        checksum="",
        duration_s=time.monotonic() - started,
        dry_run=True,
        log=log.lines,
        warnings=log.warnings,
        alerts=log.alerts,
    )


# -- verify --------------------------------------------------------------------------------------


def is_fits(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(9) == b"SIMPLE  ="
    return False


def verify_fits(path: Path) -> VerifyResult:
    """Recompute `DATASUM` and `CHECKSUM` of every HDU; the mismatches name the HDU."""
    try:
        hdus = read_hdus(path, str(path))
    except MergeError as exc:
        raise ProductUnreadableError(str(exc)) from None
    mismatches: list[str] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for hdu in hdus:
            mismatches.extend(_hdu_problems(fd, hdu))
    finally:
        os.close(fd)
    stored = str(hdus[0].header.get("CHECKSUM", ""))
    return VerifyResult(
        path=path,
        ok=not mismatches,
        stored=f"CHECKSUM {stored}",
        computed="",
        datasets=len(hdus),
        mismatches=mismatches,
        unit="HDUs",
    )


def _hdu_problems(fd: int, hdu: _Hdu) -> Iterator[str]:
    header = hdu.header
    if "CHECKSUM" not in header or "DATASUM" not in header:
        yield f"{hdu.label()}: no CHECKSUM/DATASUM keywords"
        return
    datasum = _datasum(fd, hdu.data_offset, hdu.data_span)
    if str(header["DATASUM"]).strip() != str(datasum):
        yield f"{hdu.label()}: data changed (DATASUM {header['DATASUM']}, computed {datasum})"
        return
    raw = os.pread(fd, hdu.header_span, hdu.header_offset)
    if ones_complement_sum(raw, datasum) != 0xFFFFFFFF:
        yield f"{hdu.label()}: header changed (CHECKSUM {header['CHECKSUM']} does not verify)"
