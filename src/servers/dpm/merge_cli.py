"""`daqif-dpm-merge`: the standalone merge the DPM server runs, and the product checker.

    daqif-dpm-merge SPEC.json --root DIR [--outfile F] [--dry-run] [--report R.json]
                    [--dictionary-dir DIR ...] [--consume-collected] [--collected-only]
    daqif-dpm-merge --verify FILE

The product is `<fileId>.h5` for HDF5 sources, `<fileId>.fits` for FITS sources. `--report`
writes what the DPM raises as WARNING alerts (`{"alerts": {"unmerged:<sourceName>": "..."},
"warnings": [...]}`) after a successful merge. `--consume-collected` (the DPM server's) says the files
under `<root>/sources/` are snapshots private to this merge: the one an HDF5 product is cloned
from is moved into the product, not copied, and is gone afterwards. `--collected-only` (the
server's too) reads every file source from its collected copy: a missing one is an error, never
a read of the original, which may have changed since the snapshot.

Log lines go to stdout (the server appends them to the DAQ's `logs/merge.log`); an error is one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path

from daqif.spec import Specification, SpecificationError, load_specification
from servers.common.atomic import atomic_write_json
from servers.dpm.dictionary import DictionaryError, DictionarySet, load_dictionaries
from servers.dpm.merge import (
    MergeError,
    ProductUnreadableError,
    merge,
    resolve_references,
    resolve_sources,
    verify,
)

EXIT_OK = 0
EXIT_FAILED = 1  # merge failed, or --verify found a mismatch
EXIT_UNREADABLE = 2  # --verify: the file cannot be read as an HDF5 or FITS product
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_BAD_SPEC = 3  # the specification is unreadable or invalid

_EPILOG = """\
exit codes:
  0  merged (or --dry-run passed, or --verify: checksums match)
  1  the merge failed (the message says what and where); --verify: checksum mismatch
  2  --verify: the file cannot be read as an HDF5 or FITS product; or a bad command line
  3  the specification file cannot be read or is invalid

The product is written as .<name>.part beside the output file and renamed when complete,
so the output file never holds a partial product. Sources are read from
<root>/sources/<sourceName>.h5 (.fits) when that exists (a DPM workspace), else from their
local location. Virtual and external data are read from the copies listed in
<root>/sources/<sourceName>.refs.json (written by the DPM when it collects), else from the
files they name, resolved next to the source file.
"""


@cache  # a merge worker runs many merges: the parser is built once (~1 ms)
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqif-dpm-merge",
        description=(
            "Merge the sources of a Data Product Specification into <fileId>.h5 or <fileId>.fits; "
            "verify a product."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("specification", nargs="?", type=Path, help="the Data Product Specification (JSON)")
    parser.add_argument(
        "--root", type=Path, help="directory with sources/<sourceName>.h5|.fits; default output directory"
    )
    parser.add_argument("--outfile", type=Path, help="product path (default <root>/<fileId>.h5|.fits)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and print what would be merged; write nothing"
    )
    parser.add_argument(
        "--dictionary-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="where the specification's keywordDictionaries are (<DIR>/<name>; repeatable, searched in "
        "order, then the built-in ones)",
    )
    parser.add_argument(
        "--consume-collected",
        action="store_true",
        help="the collected copies in <root>/sources/ may be consumed: the HDF5 product may start as "
        "one of them, renamed (the DPM server's merges; a retry collects afresh). Files outside "
        "<root>/sources/ are never moved",
    )
    parser.add_argument(
        "--collected-only",
        action="store_true",
        help="read every file source from its collected copy in <root>/sources/; a source without one "
        "is an error instead of being read from its location (the DPM server's merges: an original "
        "may have changed since the DAQ's snapshot was taken)",
    )
    parser.add_argument("--verify", type=Path, metavar="FILE", help="recompute the checksums of a product")
    parser.add_argument(
        "--report", type=Path, metavar="FILE", help="after a merge, write its alerts and warnings as JSON"
    )
    return parser


def _fail(message: str, code: int) -> int:
    print(f"daqif-dpm-merge: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if (
            args.specification is not None
            or args.root is not None
            or args.outfile
            or args.dry_run
            or args.report
        ):
            parser.error("--verify FILE takes no other arguments")
        return _verify(args.verify)
    if args.specification is None or args.root is None:
        parser.error("give SPEC.json and --root DIR (or --verify FILE)")
    try:
        text = args.specification.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read the specification {args.specification}: {exc.strerror}", EXIT_BAD_SPEC)
    try:
        spec = load_specification(text)
    except SpecificationError as exc:
        return _fail(f"{args.specification}: {exc}", EXIT_BAD_SPEC)
    outfile = args.outfile if args.outfile is not None else args.root / spec.product_name
    try:
        dictionaries = _dictionaries(spec, args.dictionary_dir)
        sources = resolve_sources(spec, args.root, collected_only=args.collected_only)
        refs = resolve_references(spec, sources)
        collected = args.root / "sources"
        movable = {p for p in sources.values() if args.consume_collected and p.parent == collected}
        result = merge(
            spec,
            sources,
            outfile,
            log=sys.stdout,
            dry_run=args.dry_run,
            source_references=refs,
            dictionaries=dictionaries,
            movable=movable,
        )
    except MergeError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted; no product written", EXIT_FAILED)
    if args.report is not None:
        try:
            # Not fsynced: the server reads it at once, and a restart merges again (a new report).
            atomic_write_json(
                args.report, {"alerts": result.alerts, "warnings": result.warnings}, durable=False
            )
        except OSError as exc:
            return _fail(f"cannot write the report {args.report}: {exc.strerror}", EXIT_FAILED)
    return EXIT_OK


def _dictionaries(spec: Specification, directories: list[Path]) -> DictionarySet | None:
    """The specification's dictionaries, read now (a fixed dictionary counts at the next attempt)."""
    if not spec.keyword_dictionaries:
        return None
    try:
        dictionaries = load_dictionaries(spec.keyword_dictionaries, directories)
    except DictionaryError as exc:
        raise MergeError(str(exc)) from None
    for line in dictionaries.describe():
        print(line, flush=True)
    return dictionaries


def _verify(path: Path) -> int:
    try:
        result = verify(path)
    except ProductUnreadableError as exc:
        return _fail(f"unreadable: {exc}", EXIT_UNREADABLE)
    if result.ok:
        print(result.message, flush=True)
        return EXIT_OK
    return _fail(result.message, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
