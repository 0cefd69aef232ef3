"""The output file's NeXus view (`daqif.nexus` through `output.add_nexus_view`), written by a real
data path process fed by a real simulator, and kept valid by the repair of a killed write."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from nexusformat.nexus import nxload

from daqif.frame import expected_frame
from daqif.testing import wait_for
from servers.common.launch import SimProcess

from .. import test_datapath
from ..test_datapath import (
    DETECTOR,
    SHAPE,
    DataPathFactory,
    frames_a_swmr_reader_sees,
    job,
    wait_finished,
)

datapath_factory = test_datapath.datapath_factory  # the fixture, shared


def assert_entry_shows_the_frames(path: Path, n: int) -> None:
    with h5py.File(path, "r") as f:
        assert f.attrs["default"] == "entry" and f["entry"].attrs["default"] == "data"
        nxdata = f["entry/data"]
        assert nxdata.attrs["NX_class"] == "NXdata" and nxdata.attrs["signal"] == "data"
        for name in ("data", "image_id", "status"):
            assert nxdata[name].id == f[f"{DETECTOR}/{name}"].id  # hard links: one object
        ids = nxdata["image_id"][:]
        frames = nxdata["data"][:]
        assert frames.shape == (n, *SHAPE) and len(ids) == n
        for frame, image_id in zip(frames, ids, strict=True):
            np.testing.assert_array_equal(frame, expected_frame(int(image_id), SHAPE, "uint16"))
        det = f[f"entry/instrument/{DETECTOR}"]
        assert det.attrs["NX_class"] == "NXdetector"
        assert det["local_name"][()] == DETECTOR.encode() and det["type"][()] == b"jungfrau"
        assert det["bit_depth_readout"][()] == 16 and list(det["frame_shape"][()]) == list(SHAPE)
    plottable = nxload(str(path)).plottable_data
    assert plottable.nxpath == "/entry/data" and plottable.nxsignal.shape == (n, *SHAPE)


def test_a_written_file_has_the_image_stack_as_its_default_nexus_plot(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "2000")
    datapath = datapath_factory(sim.endpoint)
    path = tmp_path / "run.h5"
    datapath.open_write(job(path, 30, detector_type="jungfrau"))
    assert wait_finished(datapath).n_written == 30
    assert_entry_shows_the_frames(path, 30)


def test_a_file_repaired_after_kill_9_keeps_its_entry_valid(
    sim_factory: Callable[..., SimProcess], datapath_factory: DataPathFactory, tmp_path: Path
) -> None:
    sim = sim_factory("--shape", *map(str, SHAPE), "--rate", "500")
    datapath = datapath_factory(sim.endpoint, flush_interval=0.2)
    path = tmp_path / "killed.h5"
    datapath.open_write(job(path, 100_000, detector_type="jungfrau"))
    wait_for(lambda: frames_a_swmr_reader_sees(path) > 0, what="a flush")
    assert datapath.pid is not None
    os.kill(datapath.pid, signal.SIGKILL)
    wait_for(lambda: not datapath.is_alive(), what="the process to die")
    with h5py.File(path, "r") as f:
        n = int(f[f"{DETECTOR}/image_id"].shape[0])
    assert n > 0
    assert_entry_shows_the_frames(path, n)  # shrunk to the frames flushed, through /entry too
