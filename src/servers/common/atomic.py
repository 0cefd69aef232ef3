"""The servers' name of the one atomic-output helper and the one file copy (`daqif.atomic`).

The implementation lives in `daqif.atomic` because the client side (`daqif.vds`, `daqif join`)
writes files atomically too and `daqif` never imports `servers`; the servers import it from
here, so the writer and the DPM keep one import path of their own.
"""

from daqif.atomic import (
    CopyStopped,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    copy_file,
    fsync_directory,
    fsync_file,
    remove_quietly,
)

__all__ = [
    "CopyStopped",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "copy_file",
    "fsync_directory",
    "fsync_file",
    "remove_quietly",
]
