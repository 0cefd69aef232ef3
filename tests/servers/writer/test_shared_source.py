"""Two whole writers connected to one PUSH simulator share its frames: together they record every
frame exactly once, each in its own file with its own image_id dataset, and `daqif.vds` joins the
two files into one virtual dataset in image id order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import requests

from daqif.frame import expected_frame
from daqif.testing import wait_for
from daqif.vds import join_writer_files

from .conftest import DETECTOR_NAME, SHAPE, WriterFactory, rest_status


def test_two_writers_on_one_push_source_record_every_frame_once(
    writer_factory: WriterFactory, sim_factory: Any, tcp_port: int, data_root: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{tcp_port}"
    writers = [writer_factory(endpoint), writer_factory(endpoint)]
    n = 300
    files = [data_root / "first.h5", data_root / "second.h5"]
    for writer, path in zip(writers, files, strict=True):
        reply = requests.post(
            writer.rest_url + "/writer/write_async",
            json={"output_file": str(path), "n_images": n},
            timeout=30,
        ).json()
        assert reply["status"] == "ok", reply
    # Paced so both writers' connections are up (ZeroMQ reconnects every 100 ms) before most frames go.
    sim = sim_factory("--shape", *map(str, SHAPE), "--count", str(n), "--rate", "1000", port=tcp_port)
    assert sim.wait_done().frames_sent == n

    def written() -> int:
        return sum(rest_status(w)["acquisition"]["stats"]["n_write_completed"] for w in writers)

    wait_for(lambda: written() == n)
    for writer in writers:  # a writer that got all n frames has already finished; stop is always fine
        stopped = requests.post(writer.rest_url + "/writer/stop", json={}, timeout=30).json()["writer"]
        assert stopped["state"] == "READY"
        assert stopped["acquisition"]["state"] == "FINISHED"

    recorded: list[np.ndarray] = []
    for path in files:
        with h5py.File(path, "r") as f:
            ids = f[f"{DETECTOR_NAME}/image_id"][:]
            data = f[f"{DETECTOR_NAME}/data"]
            assert data.shape == (len(ids), *SHAPE)
            for row, image_id in enumerate(ids[:5]):
                assert np.array_equal(data[row], expected_frame(int(image_id), SHAPE, "uint16"))
        assert len(ids) > 0, f"{path.name} got no frames: the source did not share them"
        recorded.append(ids)
    together = np.concatenate(recorded)
    assert sorted(together.tolist()) == list(range(1, n + 1))

    # One virtual dataset over both files reads as one acquisition, in image id order.
    joined = join_writer_files(data_root / "joined.h5", files)
    assert joined.n_images == n
    with h5py.File(data_root / "joined.h5", "r") as f:
        assert f[f"{DETECTOR_NAME}/image_id"][:].tolist() == list(range(1, n + 1))
        data = f[f"{DETECTOR_NAME}/data"]
        for image_id in (1, 2, n // 2, n):
            assert np.array_equal(data[image_id - 1], expected_frame(image_id, SHAPE, "uint16"))
