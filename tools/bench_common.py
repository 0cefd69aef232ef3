"""What every benchmark under tools/ prints beside its numbers: the facts of the machine it ran on."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import zmq


def machine_facts(directory: Path) -> dict[str, Any]:
    """CPU, memory, load, library versions and the file system of `directory`."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs_type = ""
    try:
        best = ""
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _dev, mount, kind = line.split()[:3]
                if str(directory.resolve()).startswith(mount) and len(mount) > len(best):
                    best, fs_type = mount, kind
    except OSError:
        pass
    usage = shutil.disk_usage(directory)
    mem_total = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "load_average": os.getloadavg(),
        "memory_gib": round(mem_total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "hdf5plugin": hdf5plugin.version,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "directory": str(directory),
        "filesystem": fs_type,
        "disk_free_gib": round(usage.free / 2**30, 1),
    }


def process_times(pid: int) -> tuple[float, float, float, float]:
    """CPU seconds of `pid` from ``/proc/PID/stat``: user, system, and the user and system time of
    its reaped children. `OSError` once `pid` is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(v) / tick for v in fields[11:15])
    return utime, stime, cutime, cstime
