"""Real HDF5 source files and specifications for the merge tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

FRAME = (32, 48)


def frames(n: int, seed: int) -> np.ndarray[Any, Any]:
    """Detector-like uint16 frames (compressible, not constant)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 500, size=(n, *FRAME), dtype=np.uint16)


def write_detector_file(
    path: Path,
    detector: str,
    *,
    n: int = 4,
    seed: int = 1,
    compressed: bool = False,
    keywords: dict[str, Any] | None = None,
) -> Path:
    """A file laid out like the writer's: /<detector>/data [n,H,W] one frame per chunk,
    /<detector>/image_id and /status, root attributes run_id, detector_name, n_images."""
    filters: dict[str, Any] = dict(hdf5plugin.Bitshuffle(cname="lz4")) if compressed else {}
    with h5py.File(path, "w") as f:
        group = f.create_group(detector)
        group.create_dataset(
            "data", data=frames(n, seed), chunks=(1, *FRAME), maxshape=(None, *FRAME), **filters
        )
        group.create_dataset("image_id", data=np.arange(n, dtype=np.uint64), chunks=(max(n, 1),))
        group.create_dataset("status", data=np.zeros(n, dtype=np.uint64), chunks=(max(n, 1),))
        group["data"].attrs["units"] = "counts"
        f.attrs["run_id"] = 1000 + seed
        f.attrs["detector_name"] = detector
        f.attrs["n_images"] = n
        for name, value in (keywords or {}).items():
            f.attrs[name] = value
    return path


def hdf5_source(name: str, path: Path, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "hdf5File", "sourceName": name, "location": str(path)}
    if rules is not None:
        source["keywordRules"] = rules
    return source


def keyword_source(name: str, keywords: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "fitsKeywords", "sourceName": name, "keywords": keywords}


def spec_document(
    sources: list[dict[str, Any]],
    *,
    file_id: str = "TEST.2026-11-22T10:00:00.000",
    target_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    target: dict[str, Any] = {"fileId": file_id}
    if target_source is not None:
        target["source"] = target_source
    return {"id": file_id, "target": target, "sources": sources, "receivers": []}


def write_spec(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path
