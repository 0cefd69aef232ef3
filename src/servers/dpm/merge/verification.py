"""`verify()`: recompute the checksums of a product, HDF5 (see `servers.dpm.merge`) or FITS (`fits.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/... so compressed sources can be read)

from servers.dpm.merge.checksum import ChunkBuffer, dataset_sum, manifest_digest
from servers.dpm.merge.common import DATASUM, ProductUnreadableError, VerifyResult, as_text
from servers.dpm.merge.fits import is_fits, verify_fits


def verify(path: Path) -> VerifyResult:
    """Recompute every dataset's and the root `DATASUM` of a product; `ok` when all match.
    A FITS product (by its first card): every HDU's `CHECKSUM` and `DATASUM`.

    Raises `ProductUnreadableError` when the file cannot be read as HDF5 (or FITS) at all.
    """
    path = Path(path)
    if is_fits(path):
        return verify_fits(path)
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
    stored_text = as_text(stored) if stored is not None else ""
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
    buffer = ChunkBuffer()
    for name in dataset_names:
        dset = f[name]
        datasets += 1
        want = dset.attrs.get(DATASUM)
        got = dataset_sum(dset, buffer).finish(dset)
        if want is None:
            mismatches.append(f"dataset /{name} has no {DATASUM} attribute")
        elif as_text(want) != got:
            mismatches.append(
                f"dataset /{name}: data or attributes changed ({DATASUM} {as_text(want)}, computed {got})"
            )
    computed = manifest_digest(f)
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
