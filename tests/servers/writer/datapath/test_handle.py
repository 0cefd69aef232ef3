"""The data path's memory stays within its budget whatever the config (`handle.resize_for`)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import requests

from servers.common.launch import SimOptions, SimProcess, free_port
from servers.writer.datapath.handle import datapath_rss_budget

from ..conftest import WriterFactory
from ..test_integrity import datapath_pid

SMALL, LARGE = (256, 128), (2048, 1024)  # 64 KiB and 4 MiB uint16 frames


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def write_sync(rest_url: str, output: Path, n_images: int) -> None:
    reply = requests.post(
        rest_url + "/writer/write_sync", json={"output_file": str(output), "n_images": n_images}, timeout=120
    ).json()
    assert (reply["status"], reply["writer"]["acquisition"]["message"]) == ("ok", "Completed."), reply


def push_simulator(endpoint: str, shape: tuple[int, int]) -> SimProcess:
    """As fast as it can: the writer's receive queue is full for the whole write."""
    options = SimOptions(endpoint=endpoint, shape=shape, dtype="uint16", rate=0, header="stddaq", linger=0)
    return SimProcess(options).start(timeout=30)


def test_4_mib_frames_after_a_64_kib_config_keep_the_data_path_within_its_memory_budget(
    writer_factory: WriterFactory, data_root: Path, tmp_path: Path
) -> None:
    config = tmp_path / "small.json"
    config.write_text(
        json.dumps({"detector_name": "MEM", "image_pixel_height": SMALL[0], "image_pixel_width": SMALL[1]})
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    writer = writer_factory(endpoint, config=config)
    pid = datapath_pid(writer)
    with push_simulator(endpoint, SMALL):  # a queue of 64 KiB frames: thousands of them
        write_sync(writer.rest_url, data_root / "small.h5", 2000)
    reply = requests.post(
        writer.rest_url + "/daq/config",
        json={"image_pixel_height": LARGE[0], "image_pixel_width": LARGE[1]},
        timeout=60,
    ).json()
    assert reply["status"] == "ok", reply
    assert datapath_pid(writer) == pid  # the queue was resized in place, not by a restart
    peak = 0
    writing = threading.Event()

    def sample() -> None:
        nonlocal peak
        while writing.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    with push_simulator(endpoint, LARGE):
        writing.set()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            write_sync(writer.rest_url, data_root / "large.h5", 100)  # 400 MiB through a 256 MiB queue
        finally:
            writing.clear()
            sampler.join()
        after = rss_bytes(pid)
    print(f"data path RSS: peak {peak >> 20} MiB, after {after >> 20} MiB")
    budget = datapath_rss_budget(LARGE[0] * LARGE[1] * 2)
    assert max(peak, after) <= budget, (
        f"data path RSS {max(peak, after) >> 20} MiB > budget {budget >> 20} MiB"
    )
