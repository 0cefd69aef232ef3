"""The files an HDF5 source reaches besides itself, found without letting HDF5 open any of them.

An HDF5 file can make a reader open other files: a virtual dataset maps data from source
files, a contiguous dataset may keep its raw data in external files, and an external link
names an object in another file. `find_references` lists every one of them by reading link
and creation-property metadata only: links are read with `getlink=True` (never traversed),
datasets are opened through hard links only, and opening a virtual or external dataset
does not open its files (its data is never read here).

A stored name is resolved against the directory of the source's own location (the original
file, not the DPM's collected copy), the way HDF5 would have resolved it for the original:
`resolve` turns `"."` (a virtual dataset mapping from its own file) into the source itself.

The DPM confines and collects every file found (`phases.py`); the merge then reads virtual
and external data only through the collected copies (`merge/hdf5.py`, `value_view`), so HDF5 never
opens a file that was not checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import numpy as np

MAX_REFERENCES = 10_000
"""More referenced files than this in one source is refused (a join of 10,000 writer files is rare)."""


class ReferenceError(ValueError):
    """A source whose references cannot be listed or are not allowed; the message says which."""


class ReferenceKind(StrEnum):
    VIRTUAL = "virtual dataset"
    EXTERNAL_STORAGE = "dataset with external raw storage"
    EXTERNAL_LINK = "external link"


@dataclass(frozen=True)
class Reference:
    """One file reached from a source: `name` as stored in the file, by `object_path`."""

    kind: ReferenceKind
    object_path: str
    name: str

    @property
    def is_read_by_merge(self) -> bool:
        """Virtual and external data are copied by value; external links are kept as links."""
        return self.kind is not ReferenceKind.EXTERNAL_LINK

    def describe(self) -> str:
        return f"{self.kind.value} {self.object_path} refers to {self.name!r}"


def resolve(name: str, source_location: Path) -> Path:
    """The file a stored `name` means for the source at `source_location` (absolute, not resolved)."""
    if name == ".":
        return source_location
    return Path(os.path.normpath(Path(source_location).parent / name))


def find_references(path: Path) -> list[Reference]:
    """Every file reference in the HDF5 file `path`; [] when it is not an HDF5 file at all.

    Raises `ReferenceError` when the file is HDF5 but its metadata cannot be read.
    """
    if not h5py.is_hdf5(path):
        return []  # not ours to judge: the merge says what is wrong with it
    found: list[Reference] = []
    try:
        fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=_unlocked_fapl())
        try:
            for reference in _walk(fid):
                found.append(reference)
                if len(found) > MAX_REFERENCES:
                    raise ReferenceError(f"{path} refers to more than {MAX_REFERENCES} files")
        finally:
            fid.close()
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ReferenceError(f"cannot list the files {path} refers to: {exc}") from None
    return found


def _unlocked_fapl() -> Any:
    """A file access list without HDF5's file locking (`h5py.File(..., locking=False)`): the DPM
    only reads its own collected copy, which nothing else writes."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, ignore_when_disabled=True)
    return fapl


def _walk(fid: Any) -> Iterator[Reference]:
    """The references below the root of the open file `fid`, through HDF5's low-level API.

    The same walk as the high-level one it replaced (`Group.get(name, getlink=True)`, then the
    object): links are read by type, never traversed; groups and datasets are opened through hard
    links only, each object once (by file number and address); a soft link names a path in this
    file, whose target is walked there. The low-level calls make no `h5py.Group`/`Dataset` per
    object, which is most of the cost for the small files a DAQ collects (README "Cost per DAQ").
    """
    seen: set[tuple[int, int]] = set()
    root = h5py.h5g.open(fid, b"/")
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        group, group_path = stack.pop()
        for raw in group:
            path = f"{group_path}/{os.fsdecode(raw)}"
            kind = group.links.get_info(raw).type
            if kind == h5py.h5l.TYPE_EXTERNAL:
                filename = group.links.get_val(raw)[0]
                yield Reference(ReferenceKind.EXTERNAL_LINK, path, os.fsdecode(filename))
                continue
            if kind != h5py.h5l.TYPE_HARD:
                continue  # a soft link names a path in this file; its target is walked there
            obj = h5py.h5o.open(group, raw)
            info = h5py.h5o.get_info(obj)
            key = (info.fileno, info.addr)
            if key in seen:
                continue
            seen.add(key)
            if info.type == h5py.h5o.TYPE_GROUP:
                stack.append((obj, path))
            elif info.type == h5py.h5o.TYPE_DATASET:
                yield from dataset_references(obj.get_create_plist(), path)


def dataset_references(dcpl: Any, path: str) -> Iterator[Reference]:
    """The files one dataset's creation properties name (virtual sources, external storage)."""
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        for i in range(dcpl.get_virtual_count()):
            yield Reference(ReferenceKind.VIRTUAL, path, dcpl.get_virtual_filename(i))
    elif dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
        for i in range(dcpl.get_external_count()):
            name = dcpl.get_external(i)[0]
            yield Reference(ReferenceKind.EXTERNAL_STORAGE, path, os.fsdecode(name))


# -- the manifest the DPM writes beside a collected source -----------------------------------------


def manifest_path(collected: Path) -> Path:
    """`sources/<name>.h5` → `sources/<name>.refs.json`."""
    return collected.with_name(f"{collected.stem}.refs.json")


def references_dir(collected: Path) -> Path:
    """Where the files a collected source refers to are collected (`sources/<name>.refs/`)."""
    return collected.with_name(f"{collected.stem}.refs")


def manifest_bytes(location: str, files: Mapping[str, Path]) -> bytes:
    """The manifest: the source's original location and, per stored name, its collected copy."""
    document = {"location": location, "files": {name: str(p) for name, p in sorted(files.items())}}
    return json.dumps(document, indent=1).encode()


def read_manifest(path: Path) -> dict[str, Path]:
    """Stored name → collected copy, from a manifest written by `manifest_bytes`."""
    try:
        document = json.loads(path.read_bytes())
        return {str(name): Path(p) for name, p in document["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReferenceError(f"cannot read the reference manifest {path}: {exc}") from None


# -- reading virtual and external data through the collected copies --------------------------------


def value_view(dset: h5py.Dataset, files: Mapping[str, Path] | None, path: Path) -> h5py.Dataset:
    """A dataset that reads like `dset` but only from the files of `files`, in a new file `path`.

    `dset` is virtual or keeps its raw data in external files. The view has the same type,
    shape and fill value, and the same mappings, each pointing at the collected copy of the
    file it names (`files`: stored name → copy; None: resolved next to `dset`'s own file, for
    the standalone merge). Every file is named by an absolute path, so HDF5 searches no prefix
    and opens nothing else; a virtual source that is itself virtual, external or reached
    through an external link is refused, because HDF5 would follow it unchecked.

    The view is written to `path` and returned open read-only (the caller closes `view.file`
    and removes `path`): HDF5 opens a virtual dataset's sources with the access of the file that
    holds the mapping, so sources are opened read-only, and a mapping from `dset`'s own file
    (stored as ``"."``) reaches the file already open instead of opening it a second time with
    other flags, which HDF5 refuses. A mapping that selects all of its source is stored without
    the source's extent; the view gives it the extent the source dataset has.
    Raises `ReferenceError` naming the dataset and the file.
    """
    own = Path(dset.file.filename)
    dcpl = dset.id.get_create_plist()
    view = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_USER_DEFINED:
        fill = np.zeros((1,), dtype=dset.dtype)
        dcpl.get_fill_value(fill)
        view.set_fill_value(fill)

    kind = ReferenceKind.VIRTUAL if dcpl.get_layout() == h5py.h5d.VIRTUAL else ReferenceKind.EXTERNAL_STORAGE

    def copy_of(stored: str) -> Path:
        path = resolve(stored, own) if files is None else files.get(stored)
        if path is None:
            raise ReferenceError(f"{kind.value} {dset.name} refers to {stored!r}, which was not collected")
        if not path.is_file():
            raise ReferenceError(
                f"{kind.value} {dset.name} refers to {stored!r}, which is not a file at {path}"
            )
        return path.absolute()

    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        for i in range(dcpl.get_virtual_count()):
            stored, source_dset = dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)
            if "%" in stored or "%" in source_dset:
                raise ReferenceError(
                    f"virtual dataset {dset.name} maps {stored!r}:{source_dset!r}, a printf-style pattern of "
                    "file or dataset names; only fixed names can be checked"
                )
            source = copy_of(stored)  # "." without a manifest: `resolve` gives `dset`'s own file
            srcspace = dcpl.get_virtual_srcspace(i)
            if _same_file(source, own):
                space = _plain_source_space(dset.file, source_dset, dset.name)
            else:
                with h5py.File(source, "r") as f:
                    space = _plain_source_space(f, source_dset, dset.name)
            if srcspace.get_select_type() == h5py.h5s.SEL_ALL:
                srcspace = space  # all of the source, at the extent it has
            try:
                vspace = dcpl.get_virtual_vspace(i)
                view.set_virtual(vspace, os.fsencode(source), source_dset.encode(), srcspace)
            except ValueError as exc:
                raise ReferenceError(
                    f"virtual dataset {dset.name}: mapping {i} from {source_dset!r} in {source} "
                    f"(source shape {space.shape}): {exc}"
                ) from None
    else:
        for i in range(dcpl.get_external_count()):
            stored, offset, size = dcpl.get_external(i)
            view.set_external(os.fsencode(copy_of(os.fsdecode(stored))), offset, size)
    with h5py.File(path, "w") as holder:
        h5py.h5d.create(holder.id, b"view", dset.id.get_type(), dset.id.get_space(), dcpl=view).close()
    held = h5py.File(path, "r")
    view_dset = held.get("view")
    if not isinstance(view_dset, h5py.Dataset):
        held.close()
        raise ReferenceError(f"the view of {dset.name} in {path} cannot be read back")
    return view_dset


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _plain_source_space(f: h5py.File, source_dset: str, virtual: str) -> Any:
    """The dataspace of `source_dset` in the open file `f`, checked to be reached by hard links
    and to keep its data in `f` itself."""
    where = f"virtual dataset {virtual}: source {source_dset!r} in {f.filename}"
    group: h5py.Group = f
    parts = [p for p in source_dset.split("/") if p]
    for i, part in enumerate(parts):
        link = group.get(part, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = "does not exist" if link is None else f"is reached through a {type(link).__name__}"
            raise ReferenceError(f"{where} {kind}")
        obj = group.get(part)
        if i < len(parts) - 1:
            if not isinstance(obj, h5py.Group):
                raise ReferenceError(f"{where} does not exist")
            group = obj
        elif not isinstance(obj, h5py.Dataset):
            raise ReferenceError(f"{where} is not a dataset")
        elif next(dataset_references(obj.id.get_create_plist(), obj.name), None) is not None:
            raise ReferenceError(f"{where} is itself virtual or external; merge its own sources instead")
        else:
            return obj.id.get_space()
    raise ReferenceError(f"{where} does not exist")  # an empty name
