"""`merge()`: resolve the sources of a specification and build its product.

The product-format seam: one pipeline (sources resolved, opened, keywords through rules and
the priority merge), and the writing of the product by format: `hdf5.py` for `<fileId>.h5`,
`fits.py` for `<fileId>.fits` (`Specification.product_format`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TextIO

from daqif.spec import ProductFormat, Specification
from servers.dpm import references
from servers.dpm.dictionary import DictionarySet
from servers.dpm.merge.common import MergeError, MergeLog, MergeResult, source_where
from servers.dpm.merge.dictionaries import apply_dictionaries
from servers.dpm.merge.fits import merge_fits
from servers.dpm.merge.hdf5 import (
    OpenSource,
    check_base_names,
    clone_candidate,
    describe_plan,
    open_source,
    write_product,
)
from servers.dpm.merge.keywords import keywords_by_priority, merge_keywords


def resolve_sources(spec: Specification, root: Path) -> dict[str, Path]:
    """The file to read for each file source: `<root>/sources/<sourceName>.h5` (`.fits` for a
    FITS product) when it exists (a DPM workspace after collection), else the local `location`;
    a remote location without a collected copy is a `MergeError`."""
    files: dict[str, Path] = {}
    suffix = spec.product_format.suffix
    for source in spec.file_sources:
        collected = Path(root) / "sources" / f"{source.source_name}{suffix}"
        if collected.exists():
            files[source.source_name] = collected
        elif source.location.is_remote:
            raise MergeError(
                f"{source_where(spec, source)} {source.source_name!r}: remote location {source.location} "
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


def merge(
    spec: Specification,
    source_files: Mapping[str, Path],
    outfile: Path,
    log: logging.Logger | TextIO | None = None,
    dry_run: bool = False,
    source_references: Mapping[str, Mapping[str, Path]] | None = None,
    dictionaries: DictionarySet | None = None,
    movable: Collection[Path] = (),
) -> MergeResult:
    """Build the data product of `spec` at `outfile` (see the module docstring for the format).

    `source_files` maps every file source's `sourceName` (`target.source` included) to the file
    to read. The product is written as `.<name>.part` beside `outfile` and renamed when complete.
    With `dry_run`, every source is opened and the plan logged, and nothing is written.
    `source_references` maps a sourceName to the collected copies of the files its virtual and
    external datasets name (`references.read_manifest`); a source without an entry reads them
    next to its own file. `dictionaries` are the specification's `keywordDictionaries`
    (`servers.dpm.dictionary.load_dictionaries`): the product's ESO keywords are checked against
    them and formatted (`merge.dictionaries`). `movable` are source files the merge may consume:
    the HDF5 product may start as that file itself, renamed, instead of a copy of it (the DPM
    server's collected copies, which a retry collects afresh; never a user's file).
    Raises `MergeError` with a one-line message on any problem; `outfile` is then untouched.
    """
    started = time.monotonic()
    out = MergeLog(log)
    outfile = Path(outfile)
    for source in spec.file_sources:
        if source.source_name not in source_files:
            raise MergeError(
                f"{source_where(spec, source)} {source.source_name!r}: no file given for this source"
            )
    if spec.product_format is ProductFormat.FITS:
        try:
            return merge_fits(spec, source_files, outfile, out, dry_run, started, dictionaries)
        except MergeError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"merge of {spec.product_name} failed: {exc}") from exc
    opened: list[OpenSource] = []
    try:
        return _merge_opened(
            spec,
            source_files,
            outfile,
            out,
            dry_run,
            started,
            opened,
            source_references or {},
            dictionaries,
            movable,
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
    out: MergeLog,
    dry_run: bool,
    started: float,
    opened: list[OpenSource],
    source_references: Mapping[str, Mapping[str, Path]],
    dictionaries: DictionarySet | None,
    movable: Collection[Path],
) -> MergeResult:
    # The collected copy the product will be renamed from is opened as the product, once.
    clone = clone_candidate(spec, source_files) if movable and not dry_run else None
    for source in spec.hdf5_sources:
        path = Path(source_files[source.source_name])
        writable = path == clone and path in movable
        opened.append(open_source(spec, source, path, out, writable=writable))
        opened[-1].references = source_references.get(source.source_name)
    by_name = {o.source.source_name: o for o in opened}
    base = by_name[spec.target_source.source_name] if spec.target_source else None
    file_keywords = {name: o.keywords for name, o in by_name.items()}
    keywords = merge_keywords(keywords_by_priority(spec, file_keywords), out)
    apply_dictionaries(keywords, dictionaries, out)
    if base is not None:
        check_base_names(base, spec)
    if dry_run:
        return describe_plan(spec, opened, keywords, outfile, out, started)
    return write_product(spec, opened, base, keywords, outfile, out, started, movable)
