"""Join the files of several writers that shared one PUSH source into one virtual dataset.

Writers connected to one PUSH source each record the frames they were dealt, in their own file.
`join_writer_files` builds a small HDF5 file whose `/<detector>/data` is a virtual dataset over
all of them, ordered by image id, so a reader sees one acquisition:

    /<detector>/data       [N, H, W]  virtual: row k is the frame with the k-th smallest image id
    /<detector>/image_id   [N] uint64 the image ids, ascending
    /<detector>/status     [N] uint64 each frame's status, from its source file
    root attributes        detector_name, n_images (= N), source_files, run_ids
    /entry                 the NeXus view of `daqif.nexus`: hard links to the three datasets

No pixel is copied. Source paths are stored absolute, so the joined file can be linked or copied
anywhere on the host (the DPM collects it into its workspace); with `relative=True` they are
stored relative to the joined file (when in its directory or below), so the whole set can be
moved together — but a copy of the joined file alone then no longer finds its frames. Frames
are mapped with as few hyperslabs as possible: writers dealt frames in strict alternation need
one mapping each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from daqif.atomic import atomic_output
from daqif.nexus import add_nexus_entry


class JoinError(ValueError):
    """The files cannot be joined; the message names the file and the problem."""


@dataclass(frozen=True)
class JoinResult:
    output: Path
    detector_name: str
    n_images: int
    sources: tuple[Path, ...]
    mappings: int  # hyperslab mappings in the virtual dataset


@dataclass(frozen=True)
class _Source:
    path: Path
    detector: str
    ids: np.ndarray
    status: np.ndarray
    frame_shape: tuple[int, ...]
    dtype: np.dtype
    run_id: str
    rows: int = 0  # frames the file's dataset holds (more than `ids` once cut by a limit)


def _read_source(path: Path, detector: str | None) -> _Source:
    try:
        handle = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise JoinError(f"{path}: cannot open as HDF5 ({exc})") from None
    with handle:
        groups = [  # the NeXus /entry of a writer file (daqif.nexus) is no detector group
            name
            for name, obj in handle.items()
            if isinstance(obj, h5py.Group) and "data" in obj and "NX_class" not in obj.attrs
        ]
        name = detector if detector is not None else (groups[0] if len(groups) == 1 else None)
        if name is None:
            found = ", ".join(groups) or "none"
            raise JoinError(
                f"{path}: expected one /<detector>/data group (found: {found}); name the detector"
            )
        if name not in handle or "data" not in handle[name] or "image_id" not in handle[name]:
            raise JoinError(f"{path}: no /{name}/data and /{name}/image_id datasets")
        group = handle[name]
        data, ids = group["data"], group["image_id"][:]
        if data.ndim != 3:
            raise JoinError(f"{path}: /{name}/data has {data.ndim} dimensions, expected [n, H, W]")
        if data.shape[0] != ids.shape[0]:
            raise JoinError(
                f"{path}: /{name}/data holds {data.shape[0]} frames but /{name}/image_id {ids.shape[0]}"
                " (a file still being written? join it once the write has ended)"
            )
        status = group["status"][:] if "status" in group else np.zeros(ids.shape, dtype=np.uint64)
        return _Source(
            path=path,
            detector=name,
            ids=ids.astype(np.uint64),
            status=status.astype(np.uint64),
            frame_shape=tuple(data.shape[1:]),
            dtype=data.dtype,
            run_id=str(handle.attrs.get("run_id", "")),
            rows=int(data.shape[0]),
        )


def _progressions(positions: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split `positions` (ascending) into maximal arithmetic runs: (first index, count, start, step)."""
    runs: list[tuple[int, int, int, int]] = []
    i, n = 0, len(positions)
    while i < n:
        if i + 1 == n:
            runs.append((i, 1, int(positions[i]), 1))
            break
        step = int(positions[i + 1] - positions[i])
        j = i + 1
        while j + 1 < n and int(positions[j + 1] - positions[j]) == step:
            j += 1
        runs.append((i, j - i + 1, int(positions[i]), step))
        i = j + 1
    return runs


def _first_frames(sources: list[_Source], limit: int) -> list[_Source]:
    """The sources cut to the `limit` smallest image ids (each file's ids ascend: a prefix of each)."""
    all_ids = np.sort(np.concatenate([s.ids for s in sources]))
    if limit < 0:
        raise JoinError(f"limit {limit} is negative")
    if limit >= len(all_ids):
        return sources
    if limit == 0:
        return [replace(s, ids=s.ids[:0], status=s.status[:0]) for s in sources]
    last = all_ids[limit - 1]
    kept = [int(np.searchsorted(s.ids, last, side="right")) for s in sources]
    return [replace(s, ids=s.ids[:k], status=s.status[:k]) for s, k in zip(sources, kept, strict=True)]


def _stored_path(source: Path, output: Path, relative: bool) -> str:
    source, base = source.resolve(), output.resolve().parent
    return os.path.relpath(source, base) if relative and source.is_relative_to(base) else str(source)


def join_writer_files(
    output: Path,
    files: list[Path],
    *,
    detector: str | None = None,
    relative: bool = False,
    limit: int | None = None,
) -> JoinResult:
    """Write `output` with a virtual dataset over `files` ordered by image id; see the module doc.

    With `limit`, only the `limit` frames with the smallest image ids are mapped (a writer group
    stops its members once they wrote `n_images` in total; a member may have written a few more)."""
    if not files:
        raise JoinError("no files to join")
    output = Path(output)
    resolved = {Path(f).resolve() for f in files}
    if len(resolved) != len(files):
        raise JoinError("a file is named more than once")
    if output.resolve() in resolved:
        raise JoinError(f"{output}: the output is one of the files to join")
    sources = [_read_source(Path(f), detector) for f in files]
    if limit is not None:
        sources = _first_frames(sources, limit)
    first = sources[0]
    for src in sources[1:]:
        if src.detector != first.detector:
            raise JoinError(f"{src.path}: detector {src.detector!r}, but {first.path} has {first.detector!r}")
        if src.frame_shape != first.frame_shape or src.dtype != first.dtype:
            raise JoinError(
                f"{src.path}: frames {src.frame_shape} {src.dtype}, but {first.path} has "
                f"{first.frame_shape} {first.dtype}"
            )
    all_ids = np.concatenate([s.ids for s in sources])
    unique, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1][:5].tolist()
        raise JoinError(
            f"image ids recorded in more than one file (e.g. {twice}): these files did not share a source"
        )
    order = np.argsort(all_ids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    n = len(all_ids)
    layout = h5py.VirtualLayout(shape=(n, *first.frame_shape), dtype=first.dtype)
    mappings, offset = 0, 0
    for src in sources:
        count = len(src.ids)
        if count == 0:
            continue
        positions = rank[offset : offset + count]
        offset += count
        if not (np.diff(positions) > 0).all():
            raise JoinError(f"{src.path}: image ids are not ascending within the file")
        vsource = h5py.VirtualSource(
            _stored_path(src.path, output, relative),
            f"{src.detector}/data",
            shape=(src.rows, *first.frame_shape),
        )
        for index, length, start, step in _progressions(positions):
            layout[start : start + step * (length - 1) + 1 : step] = vsource[index : index + length]
            mappings += 1
    status = np.concatenate([s.status for s in sources])[order]
    with (
        atomic_output(output, temp_name=f".{output.name}.part") as tmp,
        h5py.File(tmp, "w", libver=("v110", "latest")) as out,
    ):
        group = out.create_group(first.detector)
        group.create_virtual_dataset("data", layout, fillvalue=0)
        group.create_dataset("image_id", data=all_ids[order])
        group.create_dataset("status", data=status)
        out.attrs["detector_name"] = first.detector
        out.attrs["n_images"] = n
        out.attrs["source_files"] = [_stored_path(s.path, output, relative) for s in sources]
        out.attrs["run_ids"] = [s.run_id for s in sources]
        add_nexus_entry(out, f"/{first.detector}")  # /entry over the virtual dataset
    return JoinResult(output, first.detector, n, tuple(s.path for s in sources), mappings)
