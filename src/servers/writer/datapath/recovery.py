"""Making an HDF5 file readable again after its writer was killed mid-write."""

from __future__ import annotations

import ctypes
import os


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
