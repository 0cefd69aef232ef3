"""The HDF5 product: open sources, copy their objects, write keywords and checksums (see
`servers.dpm.merge` for the format)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/... so compressed sources can be read)
import numpy as np

from daqif.nexus import NexusError, add_nexus_entry, find_detector_groups
from daqif.spec import (
    Hdf5FileSource,
    Specification,
)
from servers.common.atomic import copy_file
from servers.dpm import references
from servers.dpm.merge.checksum import (
    ChunkBuffer,
    DatasetSum,
    FileDigests,
    chunk_prefix,
    dataset_sum,
    is_raw_copyable,
    leaf_digest,
    manifest_digest,
    slab_bytes,
    slab_prefix,
    slab_rows,
    sorted_chunks,
)
from servers.dpm.merge.common import (
    ARCFILE,
    COMMENTARY,
    DATASUM,
    DATE,
    KEYWORD_COMMENTS,
    ORIGFILE,
    RESERVED_ATTRIBUTES,
    MergeError,
    MergeLog,
    MergeResult,
    as_text,
    product_output,
    product_written,
    source_label,
    source_where,
    utc_date,
)
from servers.dpm.merge.keywords import Keyword, MergedKeywords, apply_keyword_rules, is_keyword_name


@dataclass
class OpenSource:
    source: Hdf5FileSource
    where: str
    path: Path
    file: h5py.File
    is_base: bool
    keywords: list[Keyword] = field(default_factory=list)
    other_attributes: list[str] = field(default_factory=list)
    references: Mapping[str, Path] | None = None
    """Stored file name → the file to read, for its virtual and external data; None: resolved
    next to `path` (the standalone merge of files in place)."""


def _copy_attributes(
    src: h5py.AttributeManager, dst: h5py.AttributeManager, names: Sequence[str], log: MergeLog
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

    def __init__(self, product: h5py.File, log: MergeLog) -> None:
        self.product = product
        self.references: Mapping[str, Path] | None = None  # of the source being copied, see OpenSource
        self.buffer = ChunkBuffer()
        self.log = log
        self.sums: dict[str, DatasetSum] = {}  # product dataset path -> its sum in the making
        self.after_copy: list[str] = []  # datasets whose sum is computed from the product
        self.bytes_copied = 0
        self._scratch: h5py.File | None = None
        self._views: tempfile.TemporaryDirectory[str] | None = None  # files of `value_view`s
        self._view_count = 0

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
            plain = _plain_dcpl(src, dcpl)
            did = h5py.h5d.create(dst.id, name.encode("utf-8"), tid, _fixed_space(src), dcpl=plain)
            if next(references.dataset_references(dcpl, src.name), None) is None:
                self._copy_values(src, h5py.Dataset(did), path, sparse=True)
            else:
                # Read only through the collected copies (a ReferenceError names dataset and file).
                view_path = self._view_path()
                try:
                    values = references.value_view(src, self.references, view_path)
                    try:
                        self._copy_values(values, h5py.Dataset(did), path)
                    finally:
                        values.file.close()
                finally:
                    view_path.unlink(missing_ok=True)
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

    def _view_path(self) -> Path:
        """A new file name for a `value_view`, in a temporary directory of this copier's."""
        if self._views is None:
            self._views = tempfile.TemporaryDirectory(prefix="daqif-merge-views-")
        self._view_count += 1
        return Path(self._views.name) / f"view-{self._view_count}.h5"

    def _next_name(self) -> str:
        return f"p{len(self._scratch_file())}"

    def _probe(self, tid: Any, space: Any, dcpl: Any) -> list[tuple[int, int, tuple[int, ...]]]:
        did = h5py.h5d.create(self._scratch_file().id, self._next_name().encode(), tid, space, dcpl=dcpl)
        return _filters(did.get_create_plist())

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        if self._views is not None:
            self._views.cleanup()
            self._views = None

    def _copy_chunks(self, src: h5py.Dataset, did: Any, path: str) -> None:
        total = self.sums[path] = DatasetSum("raw", src.dtype, src.shape, src.chunks)
        sid = src.id
        for info in sorted_chunks(sid):
            offset = tuple(info.chunk_offset)
            mask, data = sid.read_direct_chunk(offset, out=self.buffer.get(info.size))
            total.add(chunk_prefix(offset, mask, len(data)), leaf_digest(data))
            did.write_direct_chunk(offset, data, mask)
            self.bytes_copied += len(data)

    def _copy_values(self, src: h5py.Dataset, dst: h5py.Dataset, path: str, sparse: bool = False) -> None:
        """Copy `src` by value, by slabs; with `sparse`, storage `src` never allocated is not
        written either (its fill values are still summed), so a source declaring a large empty
        dataset does not make a large product."""
        total = self.sums[path] = DatasetSum("values", src.dtype, src.shape, src.chunks)
        if src.shape is None:
            return
        write = not (sparse and src.id.get_storage_size() == 0)
        if src.shape == ():
            arr = np.asarray(src[()])
            if write:
                dst[()] = arr
            slab = slab_bytes(arr)
            total.add(slab_prefix(0, len(slab)), leaf_digest(slab))
            return
        rows = slab_rows(src)
        for index, start in enumerate(range(0, src.shape[0], rows)):
            arr = np.asarray(src[start : start + rows])
            slab = slab_bytes(arr)
            total.add(slab_prefix(index, len(slab)), leaf_digest(slab))
            if write:
                dst[start : start + len(arr)] = arr
                self.bytes_copied += len(slab)


def _filters(dcpl: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    out = []
    for i in range(dcpl.get_nfilters()):
        fid, flags, values, _ = dcpl.get_filter(i)
        out.append((int(fid), int(flags), tuple(int(v) for v in values)))
    return out


def _fixed_space(src: h5py.Dataset) -> Any:
    """`src`'s dataspace at its current extent. A virtual dataset (or one in external files) may
    be extendible, which a contiguous dataset in the product cannot be: the product holds the
    data there is, so its maximum extent is its extent."""
    space = src.id.get_space()
    if space.get_simple_extent_type() != h5py.h5s.SIMPLE or space.shape == space.get_simple_extent_dims(True):
        return space
    return h5py.h5s.create_simple(space.shape, space.shape)


def _plain_dcpl(src: h5py.Dataset, dcpl: Any) -> Any:
    """A contiguous/compact creation list without external storage, keeping the fill value."""
    plain = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plain.set_layout(h5py.h5d.COMPACT if dcpl.get_layout() == h5py.h5d.COMPACT else h5py.h5d.CONTIGUOUS)
    if dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_USER_DEFINED:
        fill = np.zeros((1,), dtype=src.dtype)
        dcpl.get_fill_value(fill)
        plain.set_fill_value(fill)
    return plain


PRODUCT_LIBVER = ("v108", "latest")
"""The format bounds the product is written with (opened, created)."""


def open_source(
    spec: Specification, source: Hdf5FileSource, path: Path, log: MergeLog, writable: bool = False
) -> OpenSource:
    """Open a source and read its keywords. `writable`: a collected copy the product will be (see
    `clone_candidate`), opened as the product is (read-write, `PRODUCT_LIBVER`) so that it is not
    opened twice; read-only if that fails."""
    where, label = source_where(spec, source), source_label(spec, source, path)
    handle = None
    if writable:
        with contextlib.suppress(OSError):
            handle = h5py.File(path, "r+", libver=PRODUCT_LIBVER)
    try:
        handle = handle or h5py.File(path, "r")
    except OSError as exc:
        raise MergeError(f"{label}: cannot open {path} as an HDF5 file: {exc}") from None
    opened = OpenSource(source, where, path, handle, is_base=source is spec.target_source)
    try:
        _read_source_keywords(opened, log)
    except BaseException:
        handle.close()
        raise
    return opened


def clone_candidate(spec: Specification, source_files: Mapping[str, Path]) -> Path | None:
    """The file the HDF5 product starts as (`_build`): the base, else the largest HDF5 source (the
    first of equal ones); None if a size cannot be read (opening that source says why)."""
    if spec.target_source is not None:
        return Path(source_files[spec.target_source.source_name])
    paths = [Path(source_files[s.source_name]) for s in spec.hdf5_sources]
    try:
        return max(paths, key=lambda p: p.stat().st_size, default=None)
    except OSError:
        return None


def _read_source_keywords(src: OpenSource, log: MergeLog) -> None:
    attrs = src.file.attrs
    comments: dict[str, str] = {}
    if KEYWORD_COMMENTS in attrs:
        try:
            rows = np.asarray(attrs[KEYWORD_COMMENTS], dtype=object).reshape(-1, 2).tolist()
            comments = {as_text(name): as_text(comment) for name, comment in rows}
        except (ValueError, TypeError):
            log.warning(f"{src.where}: {KEYWORD_COMMENTS} is not an (N, 2) string array; comments ignored")
    keywords: list[Keyword] = []
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
            keywords.append(Keyword(name, attrs[name], comments.get(name, ""), dtype))
        else:
            src.other_attributes.append(name)
    src.keywords = apply_keyword_rules(keywords, src.source.keyword_rules, f"{src.where}.keywordRules", log)


def _write_keyword(attrs: h5py.AttributeManager, kw: Keyword) -> None:
    if kw.is_commentary:
        return
    if kw.dtype is not None and not isinstance(kw.value, h5py.Empty):
        attrs.create(kw.name, kw.value, dtype=kw.dtype)
    else:
        attrs[kw.name] = kw.value


def check_base_names(base: OpenSource, spec: Specification) -> None:
    names = set(base.file.keys())
    for source in spec.sources:
        if isinstance(source, Hdf5FileSource) and source.source_name in names:
            raise MergeError(
                f"{source_where(spec, source)} {source.source_name!r}: target.source {base.path} already "
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


def describe_plan(
    spec: Specification,
    opened: Sequence[OpenSource],
    keywords: MergedKeywords,
    outfile: Path,
    out: MergeLog,
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


def write_product(
    spec: Specification,
    opened: Sequence[OpenSource],
    base: OpenSource | None,
    keywords: MergedKeywords,
    outfile: Path,
    out: MergeLog,
    started: float,
    movable: Collection[Path] = (),
) -> MergeResult:
    with product_output(outfile, f"{len(opened)} HDF5 source(s)", out) as part:
        checksum, n_datasets, copied = _build(spec, opened, base, keywords, outfile, part, out, movable)
    contents = f"{n_datasets} datasets, {keywords.count} keywords, {checksum}"
    return product_written(outfile, contents, checksum, n_datasets, keywords.count, copied, out, started)


def _build(
    spec: Specification,
    opened: Sequence[OpenSource],
    base: OpenSource | None,
    keywords: MergedKeywords,
    outfile: Path,
    part: Path,
    out: MergeLog,
    movable: Collection[Path],
) -> tuple[str, int, int]:
    clone = base if base is not None else max(opened, key=lambda o: o.path.stat().st_size, default=None)
    digests = FileDigests(inline=clone is not None and clone.path.stat().st_size < FLUSH_FROM_BYTES)
    flusher = _Flusher(part)
    try:
        with contextlib.ExitStack() as stack:
            if clone is None:
                product = stack.enter_context(h5py.File(part, "w", libver=PRODUCT_LIBVER, track_order=True))
                copier = _Copier(product, out)
            else:
                product, copier = _clone_source(clone, part, digests, out, stack, clone.path in movable)
                flusher.kick()
            stack.callback(copier.close)
            root = product.attrs  # one AttributeManager: `File.attrs` opens the root group each time
            # Reserved attributes first so a reader sees them at the top; DATASUM comes last.
            root[ARCFILE] = outfile.name
            root[ORIGFILE] = Path(base.source.location.path).name if base else spec.product_name
            root[DATE] = utc_date(datetime.now(UTC))
            ordered = sorted(keywords.values.values(), key=lambda kw: kw.is_eso)  # value keywords, then ESO
            for kw in ordered:
                _write_keyword(root, kw)
            for name in COMMENTARY:
                if keywords.commentary.get(name):
                    root.create(name, keywords.commentary[name], dtype=h5py.string_dtype())
            rows = [[kw.name, kw.comment] for kw in ordered if kw.comment]
            if rows:
                root.create(KEYWORD_COMMENTS, np.array(rows, dtype=object), dtype=h5py.string_dtype())
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
            _add_nexus_view(product, copier, out)
            for path in copier.after_copy:  # HDF5-copied datasets: summed from the product
                copier.sums[path] = dataset_sum(product[path], copier.buffer)
            for path, total in copier.sums.items():
                dset = product[path]
                dset.attrs[DATASUM] = total.finish(dset)
            checksum = manifest_digest(product)
            root[DATASUM] = checksum
        return checksum, len(copier.sums), copier.bytes_copied
    finally:
        flusher.close()
        digests.close()


FLUSH_FROM_BYTES = 16 * 2**20
"""Part file size from which `_Flusher` writes it out in the background."""


class _Flusher:
    """Writes the part file's data out in the background while the merge goes on, so the fsync
    before the rename finds little left to write (the disk works while the CPU copies).

    Its thread starts at the first kick that finds `FLUSH_FROM_BYTES` in the part file: for a
    small product the thread (and its early fdatasync) would cost more than it saves."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wanted = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        if self._thread is None:
            try:
                if os.stat(self._path).st_size < FLUSH_FROM_BYTES:
                    return
            except OSError:
                return
            self._thread = threading.Thread(target=self._run, name="merge-flush", daemon=True)
            self._thread.start()
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
        if self._thread is not None:
            self._thread.join()


def _clone_source(
    src: OpenSource,
    part: Path,
    digests: FileDigests,
    out: MergeLog,
    stack: contextlib.ExitStack,
    movable: bool = False,
) -> tuple[h5py.File, _Copier]:
    """Start the product as a byte copy of `src` (the base, or the largest source), restructured.

    The kernel copies the bytes (`copy_file_range`, as `cp` does) while the hash thread reads
    the same chunks from the source for the checksums; a `movable` source (a collected copy the
    DPM server hands over, whose data all lie in the file) is renamed to the part file instead,
    so its bytes are not written again, and the hash thread reads them there; then the source's
    root links move under `/<sourceName>` (unless it is the base) and its root attributes are
    sorted out. Links and object addresses stay valid, so nothing of the source is decoded or
    rewritten.
    """
    name = src.source.source_name
    prefix = "" if src.is_base else f"/{name}"
    out.info(f"copying {name!r} ({src.path}) to {prefix or '/'} (file clone)")
    sums: dict[str, DatasetSum] = {}
    after_copy: list[str] = []
    recopy: list[str] = []
    fd = os.open(src.path, os.O_RDONLY)
    stack.callback(os.close, fd)
    stack.callback(digests.close)  # runs first: no worker may read `fd` once it is closed

    def plan(name: bytes, info: Any) -> None:
        # Low-level: only datasets are opened (h5py's `visititems` makes an object of each).
        if info.type != h5py.h5o.TYPE_DATASET:
            return
        obj = h5py.Dataset(h5py.h5d.open(src.file.id, name))
        path = name.decode("utf-8", "surrogateescape")
        target = f"{prefix}/{path}"
        dcpl = obj.id.get_create_plist()
        if dcpl.get_layout() == h5py.h5d.VIRTUAL or (
            dcpl.get_layout() == h5py.h5d.CONTIGUOUS and dcpl.get_external_count() > 0
        ):
            recopy.append(path)  # data outside the source file: bring it into the product
        elif is_raw_copyable(obj):
            total = sums[target] = DatasetSum("raw", obj.dtype, obj.shape, obj.chunks)
            for info in sorted_chunks(obj.id):
                fields = chunk_prefix(tuple(info.chunk_offset), info.filter_mask, info.size)
                total.add(fields, digests.digest(fd, info.byte_offset, info.size))
        else:
            after_copy.append(target)

    h5py.h5o.visit(src.file.id, plan, info=True)  # each object once, by name, as `visititems`
    soft_links = not src.is_base and has_soft_links(src.file)
    moved = movable and not recopy and _move(src, part, out)
    if moved:
        copied = os.fstat(fd).st_size
    else:
        _read_only(src)  # copied as it is on disk, and read for the recopy below
        copied = copy_file(src.path, part, durable=False)  # fsynced with the whole part file
    if moved and src.file.mode == "r+":
        product = stack.enter_context(src.file)  # opened as the product (`open_source`)
    else:
        product = stack.enter_context(h5py.File(part, "r+", libver=PRODUCT_LIBVER))
    copier = _Copier(product, out)
    stack.callback(copier.close)  # its scratch file, also when the recopy below fails
    copier.references = src.references
    copier.sums.update(sums)
    copier.after_copy.extend(after_copy)
    copier.bytes_copied += copied
    root = product.attrs  # one AttributeManager: `File.attrs` opens the root group each time
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
        if soft_links:  # else the walk would only read (the small DAQ's source has none)
            _reroot_soft_links(group, prefix)
        _copy_attributes(root, group.attrs, src.other_attributes, out)
    for attr in list(root):
        if not src.is_base or attr not in src.other_attributes:
            del root[attr]
    for path in recopy:
        where = f"{prefix}/{path}"
        parent_path, _, leaf = where.rpartition("/")
        aliases = [alias for alias in _hard_link_paths(product, product[where]) if alias != where]
        del product[where]
        try:
            copier.copy_dataset(src.file[path], product[parent_path or "/"], leaf, where)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"source {name!r}: cannot copy dataset /{path}: {exc}") from exc
        for alias in aliases:  # e.g. /entry/data/data of a joined file: the copy, not the old one
            del product[alias]
            product[alias] = product[where]
    return product, copier


def _move(src: OpenSource, part: Path, out: MergeLog) -> bool:
    """Make the collected copy `src.path` the part file by a rename; False if it cannot be.

    A source opened read-write (`open_source`) stays open: that handle becomes the product's. One
    opened read-only is closed first (HDF5 refuses to open one file twice with other flags). The
    hash thread keeps its own descriptor of the same file. Its bytes stay where they are: only
    the metadata the merge changes are written."""
    if src.file.mode != "r+":
        src.file.close()
    try:
        os.rename(src.path, part)
    except OSError as exc:
        out.info(f"cannot move {src.path} to the product ({exc.strerror}); copying it")
        _read_only(src)
        return False
    out.info(f"{src.path} (a collected copy) moved to the product: its bytes are not copied again")
    return True


def _read_only(src: OpenSource) -> None:
    """`src.file` open read-only (closed and opened again if it was read-write, or closed)."""
    if src.file.id.valid and src.file.mode == "r":
        return
    src.file.close()
    src.file = h5py.File(src.path, "r")


def _add_nexus_view(product: h5py.File, copier: _Copier, log: MergeLog) -> None:
    """`/entry` of the product (`daqif.nexus`) over its first detector group, if it has one;
    the datasets it creates are summed like the others."""
    groups = find_detector_groups(product)
    if not groups:
        return
    if len(groups) > 1:
        log.info(f"/entry/data shows {groups[0]}; the product also holds {', '.join(groups[1:])}")
    try:
        created = add_nexus_entry(product, groups[0])
    except NexusError as exc:  # e.g. a source named "entry": the product is fine without the view
        log.warning(f"no NeXus view in the product: {exc}")
        return
    for path in created:
        copier.sums.pop(path, None)  # a dataset of the base replaced: its sum is of the new one
        if path not in copier.after_copy:
            copier.after_copy.append(path)


def _hard_link_paths(product: h5py.File, obj: h5py.Dataset) -> list[str]:
    """Every path by which `obj` is reached through hard links only."""
    target = h5py.h5o.get_info(obj.id).addr
    found: list[str] = []
    seen: set[int] = set()

    def walk(group: h5py.Group, path: str) -> None:
        for link_name in group:
            if not isinstance(group.get(link_name, getlink=True), h5py.HardLink):
                continue
            child = group[link_name]
            child_path = f"{path}/{link_name}"
            addr = h5py.h5o.get_info(child.id).addr
            if addr == target:
                found.append(child_path)
            elif isinstance(child, h5py.Group) and addr not in seen:
                seen.add(addr)
                walk(child, child_path)

    walk(product, "")
    return found


def has_soft_links(f: h5py.File) -> bool:
    """Whether a link below the root of `f` is a soft link (one H5Lvisit: each group once)."""
    found = f.id.links.visit(lambda _name, info: info.type == h5py.h5l.TYPE_SOFT or None, info=True)
    return bool(found)


def _reroot_soft_links(group: h5py.Group, prefix: str) -> None:
    """Point the absolute soft links under `group` (moved to `prefix`) at their moved targets.

    Through h5py's low-level API (link types and values, groups opened through hard links, each
    once): the same walk as with `Group` objects, without making one per link (README "Cost per
    DAQ"). A link is made again as h5py makes it (UTF-8 name), at the end of its group's order."""
    lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
    root = prefix.encode("utf-8", "surrogateescape")
    seen: set[int] = set()
    stack = [group.id]
    while stack:
        gid = stack.pop()
        addr = h5py.h5o.get_info(gid).addr
        if addr in seen:
            continue
        seen.add(addr)
        for name in list(gid):
            kind = gid.links.get_info(name).type
            if kind == h5py.h5l.TYPE_SOFT:
                target = gid.links.get_val(name)
                if target.startswith(b"/"):
                    gid.unlink(name)
                    gid.links.create_soft(name, root + target, lcpl=lcpl)
            elif kind == h5py.h5l.TYPE_HARD:
                child = h5py.h5o.open(gid, name)
                if h5py.h5o.get_info(child).type == h5py.h5o.TYPE_GROUP:
                    stack.append(child)
