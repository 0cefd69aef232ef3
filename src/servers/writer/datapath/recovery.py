"""Making an HDF5 file readable and consistent again after its writer was killed mid-write.

A data path killed during a write leaves ``data`` at its full extent (direct chunk writes need
it), ``image_id``/``status`` at the frames of the last flush, and the superblock flagged "open for
SWMR write" (plain readers refuse the file). `repair_file` clears the flag and shrinks every
dataset to the frames of the last flush: what a SWMR reader was told was valid; the NeXus
``/entry`` (`daqif.nexus`) is made again over the repaired datasets. It runs when the
handle sees its process die, and when a writer starts and its state file names a write that never
ended (the whole writer was killed).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from servers.writer.datapath.api import WriteJob
from servers.writer.datapath.output import add_nexus_view

log = logging.getLogger(__name__)


class RepairFailed(RuntimeError):
    """The file could not be repaired; the message says why."""


def repair_file(job: WriteJob) -> int:
    """Clear the SWMR flag of `job`'s file and shrink its datasets to the frames flushed.

    Returns the number of frames the file holds afterwards (the length of ``image_id``). The
    datasets are created empty if the process died before the first frame. `RepairFailed` says
    why the file cannot be repaired (it is missing, not HDF5, or not one of ours).
    """
    import h5py
    import numpy as np

    path = job.output_file
    if not os.path.exists(path):
        raise RepairFailed(f"{path} does not exist")
    clear_swmr_flags(path)  # else a non-SWMR open for writing is refused
    try:
        with h5py.File(path, "r+") as handle:
            group = handle.get(job.detector_name)
            if not isinstance(group, h5py.Group):
                raise RepairFailed(f"{path} has no group {job.detector_name!r}")
            image_id: Any = group.get("image_id")
            n_frames = 0 if image_id is None else int(image_id.shape[0])
            status: Any = group.get("status")
            if status is not None:
                n_frames = min(n_frames, int(status.shape[0]))
            data: Any = group.get("data")
            if data is None:
                data = group.create_dataset(
                    "data",
                    shape=(0, job.height, job.width),
                    maxshape=(None, job.height, job.width),
                    chunks=(1, job.height, job.width),
                    dtype=np.dtype(job.dtype),
                )
            n_frames = min(n_frames, int(data.shape[0]))
            for name in ("image_id", "status"):
                if name not in group:
                    group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(4096,), dtype=np.uint64)
            for dataset in (data, group["image_id"], group["status"]):
                if dataset.shape[0] != n_frames:
                    dataset.resize(n_frames, axis=0)
            # A file killed before its first frame has no /entry yet; one killed later keeps its
            # links (a resize changes the dataset, not the link), remade here all the same.
            add_nexus_view(handle, job)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RepairFailed(f"cannot repair {path}: {exc}") from None
    return n_frames


def clear_swmr_flags(path: str) -> bool:
    """Clear the "open for (SWMR) write" flags a killed writer leaves in an HDF5 superblock.

    Without this, only SWMR readers (or ``h5clear -s``) can open such a file. HDF5 does it with
    the file-access property ``clear_status_flags`` (what ``h5clear`` uses), reachable only through
    the generic ``H5Pset``, so it is called from the HDF5 library h5py has loaded. Returns False
    when that is not possible here.
    """
    import h5py

    library = _loaded_hdf5_library()
    if library is None:
        return False
    try:
        h5pset = library.H5Pset
        h5pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
        h5pset.restype = ctypes.c_int
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
        clear = ctypes.c_bool(True)
        if h5pset(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0:
            return False
        h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()
    except (OSError, AttributeError, ValueError):
        return False
    return True


def _loaded_hdf5_library() -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                name = os.path.basename(path)
                if name.startswith("libhdf5") and not name.startswith("libhdf5_hl") and ".so" in name:
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None
