"""The DPM merge: build one data product from the sources of a specification.

`<fileId>.h5` from `hdf5File` sources (the format below), `<fileId>.fits` from `fitsFile` sources
(the format is in the docstring of `fits.py`): one pipeline, the writing chosen by
`Specification.product_format` in `plan.py`.

`merge()` (`plan.py`) is the one implementation; the DPM server runs it through `daqif-dpm-merge`
(`servers.dpm.merge_cli`), and nothing here knows about gRPC or the server's workspace beyond the
`resolve_sources()` naming convention. `verify()` checks a product's checksums.

Modules, one concern each: `common` (names, errors, results, the log), `keywords` (cards,
`keywordRules`, the priority merge: where the merged keyword list of a product is final),
`dictionaries` (the product's ESO keywords checked and formatted by the specification's
keyword dictionaries), `checksum` (per-dataset sums and the manifest digest), `hdf5` (copying
sources into the product), `fits` and `fits_cards` (the FITS product; cards, DICB order),
`verification` (`verify()`), `plan` (`merge()` and the resolution of source files). The
package imports nothing of the servers beyond `servers.common`, `servers.dpm.references` and
`servers.dpm.dictionary`:
it runs in the merge fork server (`merge_runner`), which preloads it.

HDF5 product format (DESIGN §3; the decisions below are part of the format)
----------------------------------------------------------------------------

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
    NeXus view (`daqif.nexus`): the product's `/entry` (NXentry, root attribute `default`) links
    the datasets of its first detector group in name order (a group with `data` [n, H, W] and
    `image_id` that has no `NX_class`); its NXdetector fields are datasets of the product like
    the others (summed, verified). A source's own `/entry` stays under `/<sourceName>/entry`, its
    links still valid (a virtual dataset copied in is linked again to the copy).

Data (nothing is ever decompressed or re-encoded)
    The base, or else the largest HDF5 source, is cloned: the product starts as a byte copy of
    that file made by the kernel (`copy_file_range`, as `cp` does), whose root links are then
    moved under `/<sourceName>` (`H5Lmove`, metadata only); a file the caller hands over
    (`merge(movable=...)`, `daqif-dpm-merge --consume-collected`: the DPM server's collected
    copies, never a user's file) is renamed into the part file instead of copied, so its bytes
    are not written twice, and its chunk sums are read from it. Its chunks, filters, object headers
    and file-format versions are therefore exactly the source's, free space included. Datasets
    of the clone whose data lie outside the file (external raw files, virtual datasets) are
    replaced by a copy of their values, so the product holds its data itself (such a clone is
    always copied, never moved). A moved snapshot is private to that merge attempt: every other
    attempt collects afresh (see `hdf5._move`).
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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servers.dpm.merge.common import (
        ARCFILE,
        CHECKSUM_PREFIX,
        COMMENTARY,
        DATASUM,
        DATE,
        KEYWORD_COMMENTS,
        ORIGFILE,
        RESERVED_ATTRIBUTES,
        MergeError,
        MergeResult,
        ProductUnreadableError,
        VerifyResult,
    )
    from servers.dpm.merge.fits_cards import check_keyword_cards
    from servers.dpm.merge.keywords import (
        ESO_NAME,
        FITS_NAME,
        Card,
        apply_keyword_rules,
        is_keyword_name,
        parse_card,
    )
    from servers.dpm.merge.plan import merge, resolve_references, resolve_sources
    from servers.dpm.merge.verification import verify

# The package's names are imported from their module on first use (PEP 562): the server checks
# keyword cards at QueueDaq (`keywords`, `fits_cards`) without importing h5py for `plan` and
# `verification`, and starts without importing any of them (astropy, numpy: ~0.7 s, see
# `servers/dpm/README.md`, "Start-up").
_MODULE_OF = {
    **dict.fromkeys(
        (
            "ARCFILE",
            "CHECKSUM_PREFIX",
            "COMMENTARY",
            "DATASUM",
            "DATE",
            "KEYWORD_COMMENTS",
            "ORIGFILE",
            "RESERVED_ATTRIBUTES",
            "MergeError",
            "MergeResult",
            "ProductUnreadableError",
            "VerifyResult",
        ),
        "common",
    ),
    "check_keyword_cards": "fits_cards",
    **dict.fromkeys(
        ("ESO_NAME", "FITS_NAME", "Card", "apply_keyword_rules", "is_keyword_name", "parse_card"), "keywords"
    ),
    **dict.fromkeys(("merge", "resolve_references", "resolve_sources"), "plan"),
    "verify": "verification",
}


def __getattr__(name: str) -> Any:
    # Called only for a name not bound yet. No submodule is named like a name it exports (the
    # import of a submodule binds its module under its name here, which would hide the name).
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ARCFILE",
    "CHECKSUM_PREFIX",
    "COMMENTARY",
    "DATASUM",
    "DATE",
    "ESO_NAME",
    "FITS_NAME",
    "KEYWORD_COMMENTS",
    "ORIGFILE",
    "RESERVED_ATTRIBUTES",
    "Card",
    "MergeError",
    "MergeResult",
    "ProductUnreadableError",
    "VerifyResult",
    "apply_keyword_rules",
    "check_keyword_cards",
    "is_keyword_name",
    "merge",
    "parse_card",
    "resolve_references",
    "resolve_sources",
    "verify",
]
