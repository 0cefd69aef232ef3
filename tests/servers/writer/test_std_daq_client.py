"""The published `std_daq_client` 1.3.5 against a real writer fed by the real simulator."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
from std_daq_client import StdDaqAdminException, StdDaqClient

from daqif.frame import expected_frame
from daqif.testing import wait_for
from servers.common.launch import WriterProcess

from .conftest import (
    DETECTOR_NAME,
    SHAPE,
    Simulator,
    WriterFactory,
    rest_status,
    start_simulator,
)


def assert_file_holds_simulator_frames(
    path: Path, n_images: int, run_id: Any, n_requested: int | None = None
) -> np.ndarray:
    """The file has `n_images` consecutive simulator frames, pixel for pixel (`n_requested`: the
    `n_images` attribute, when the write was interrupted); returns the image ids."""
    with h5py.File(path, "r") as f:
        group = f[DETECTOR_NAME]
        data, image_ids, status = group["data"], group["image_id"][:], group["status"][:]
        assert data.shape == (n_images, *SHAPE)
        assert data.dtype == np.uint16
        assert image_ids.shape == (n_images,) and status.shape == (n_images,)
        assert np.all(np.diff(image_ids.astype(np.int64)) == 1), "frames are consecutive"
        assert np.all(status == 0)
        for index, image_id in enumerate(image_ids):
            np.testing.assert_array_equal(data[index], expected_frame(int(image_id), SHAPE, "uint16"))
        assert f.attrs["detector_name"] == DETECTOR_NAME
        assert int(f.attrs["n_images"]) == (n_images if n_requested is None else n_requested)
        assert str(f.attrs["run_id"]) == str(run_id)
        return np.asarray(image_ids)


def test_published_client_drives_all_nine_methods(writer: WriterProcess, data_root: Path) -> None:
    client = StdDaqClient(url_base=writer.rest_url)

    status = client.get_status()
    assert status["state"] == "READY"
    assert status["acquisition"]["info"]["output_file"] is None
    assert status["acquisition"]["stats"]["start_time"] is None

    config = client.get_config()
    assert config["detector_name"] == DETECTOR_NAME
    assert (config["image_pixel_height"], config["image_pixel_width"], config["bit_depth"]) == (*SHAPE, 16)

    applied = client.set_config({"writer_user_id": 0, "bit_depth": 16})
    assert applied == {**config, "writer_user_id": 0}

    deployment = client.get_deployment_status()
    assert deployment["status"] == "SUCCESS"
    assert deployment["servers"] == {socket.gethostname(): "Done"}
    assert re.fullmatch(r"\d+-\d+", deployment["config_id"])
    assert deployment["stats"]["start_time"] <= deployment["stats"]["stop_time"]

    first = data_root / "sync.h5"
    status = client.start_writer_sync({"output_file": str(first), "n_images": 10})
    assert status["state"] == "READY"
    acquisition = status["acquisition"]
    assert (acquisition["state"], acquisition["message"]) == ("FINISHED", "Completed.")
    assert acquisition["stats"]["n_write_completed"] == 10 == acquisition["stats"]["n_write_requested"]
    assert acquisition["info"]["output_file"] == str(first)
    assert isinstance(acquisition["info"]["run_id"], int), "run_id defaults to time.time_ns()"
    assert acquisition["stats"]["start_time"] <= acquisition["stats"]["stop_time"]
    assert_file_holds_simulator_frames(first, 10, acquisition["info"]["run_id"])

    second = data_root / "async.h5"
    status = client.start_writer_async({"output_file": str(second), "n_images": 25, "run_id": 7})
    assert status["state"] == "WRITING"
    assert status["acquisition"]["info"] == {"n_images": 25, "output_file": str(second), "run_id": 7}
    wait_for(lambda: client.get_status()["state"] == "READY")
    assert client.get_status()["acquisition"]["message"] == "Completed."
    assert_file_holds_simulator_frames(second, 25, "7")

    logs = client.get_logs(5)
    assert [entry["info"]["output_file"] for entry in logs] == [str(second), str(first)], "newest first"
    assert client.get_logs(1) == logs[:1]
    assert logs[0]["info"]["run_id"] == 7

    stats = wait_for(  # refreshed once a second
        lambda: (
            (s := client.get_stats())["counters"]["written"] == 35
            and s["detector"]["images_per_second"] > 0
            and s
        )
    )
    assert set(stats["detector"]) == set(stats["writer"]) == {"bytes_per_second", "images_per_second"}
    assert (
        stats["detector"]["bytes_per_second"]
        >= stats["detector"]["images_per_second"] * SHAPE[0] * SHAPE[1] * 2
    )
    assert stats["counters"]["received"] >= 35

    status = client.stop_writer()
    assert status["state"] == "READY"
    assert status["acquisition"]["message"] == "Completed.", "stop while READY changes nothing"


def test_start_while_writing_is_refused(writer: WriterProcess, data_root: Path) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    client.start_writer_async({"output_file": str(data_root / "long.h5"), "n_images": 100_000})
    with pytest.raises(StdDaqAdminException, match="writer is busy"):
        client.start_writer_async({"output_file": str(data_root / "other.h5"), "n_images": 5})
    with pytest.raises(StdDaqAdminException, match="writer is busy"):
        client.start_writer_sync({"output_file": str(data_root / "other.h5"), "n_images": 5})
    with pytest.raises(StdDaqAdminException, match="cannot change during a write"):
        client.set_config({"bit_depth": 16})
    assert not (data_root / "other.h5").exists()
    client.stop_writer()


# Value errors in a write request: HTTP 200, status "error", the field named (the published
# client raises StdDaqAdminException with the message).
INVALID_WRITE_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"output_file": "/x.h5"}, "n_images: mandatory field missing"),
    ({"output_file": "/x.h5", "n_images": 0}, "n_images: Input should be greater than or equal to 1"),
    ({"output_file": "/x.h5", "n_images": -3}, "n_images: Input should be greater than or equal to 1"),
    ({"output_file": "/x.h5", "n_images": "x"}, 'n_images: Input should be a valid integer (got "x")'),
    ({"output_file": "/x.h5", "n_images": "10"}, 'n_images: Input should be a valid integer (got "10")'),
    ({"output_file": "/x.h5", "n_images": True}, "n_images: Input should be a valid integer (got true)"),
    ({"output_file": "/x.h5", "n_images": 2.5}, "n_images: Input should be a valid integer (got 2.5)"),
    ({"n_images": 5}, "output_file: mandatory field missing"),
    ({"output_file": 17, "n_images": 5}, "output_file: Input should be a valid string (got 17)"),
    ({"output_file": "/x.h5", "n_images": 5, "run_id": [1]}, "run_id: Input should be a valid integer"),
    ({"output_file": "/x.h5", "n_images": 5, "run_id": "r-1"}, "run_id: Input should be a valid integer"),
    ({"output_file": "/x.h5", "n_images": 5, "nimages": 5}, "nimages: unknown field"),
]


def test_value_errors_in_a_write_request_are_refused_naming_the_field(writer: WriterProcess) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    for body, expected in INVALID_WRITE_REQUESTS:
        for start in (client.start_writer_async, client.start_writer_sync):
            with pytest.raises(StdDaqAdminException) as info:
                start(body)
            assert str(info.value) == f"invalid write request: {expected}" or expected in str(info.value), (
                body
            )
            assert str(info.value).startswith("invalid write request: "), body
    assert client.get_status()["acquisition"]["info"]["output_file"] is None, "nothing was started"


def test_only_a_body_that_is_not_a_json_object_answers_422(writer: WriterProcess) -> None:
    url = writer.rest_url + "/writer/write_async"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"data": b"not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"json": [1, 2]}, "must be a JSON object"),
        ({"json": "text"}, "must be a JSON object"),
        ({}, "must be a JSON object"),
    ]
    for kwargs, expected in cases:
        response = requests.post(url, timeout=10, **kwargs)
        assert response.status_code == 422, kwargs
        assert response.json()["status"] == "error"
        assert expected in response.json()["message"], (kwargs, response.json())
    client = StdDaqClient(url_base=writer.rest_url)
    with pytest.raises(RuntimeError):
        client.start_writer_async([1, 2])
    assert requests.get(writer.rest_url + "/daq/logs/x", timeout=10).status_code == 422
    assert requests.post(writer.rest_url + "/daq/config", data=b"{", timeout=10).status_code == 422
    assert rest_status(writer)["state"] == "READY", "the writer stays up"


def test_openapi_describes_the_request_bodies(writer: WriterProcess) -> None:
    document = requests.get(writer.rest_url + "/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    write = schemas["WriteRequest"]
    assert set(write["properties"]) == {
        "output_file",
        "n_images",
        "run_id",
        "writer_user_id",
    }  # the last: daqif extension
    assert set(write["required"]) == {"output_file", "n_images"}
    assert write["properties"]["n_images"]["minimum"] == 1
    assert "description" in write["properties"]["n_images"]
    body = document["paths"]["/writer/write_sync"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/WriteRequest")
    config = document["paths"]["/daq/config"]["post"]["requestBody"]["content"]["application/json"]
    assert config["schema"]["$ref"].endswith("/DaqConfig")
    assert "module_positions" in schemas["DaqConfig"]["properties"]


def test_bad_output_paths_are_refused_saying_which(
    writer: WriterProcess, data_root: Path, tmp_path: Path
) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    (data_root / "adir").mkdir()
    cases = [
        ("relative/run.h5", "is not an absolute path"),
        (str(data_root / "missing" / "run.h5"), "folder"),
        (str(data_root / "adir"), "is a directory"),
        (str(tmp_path / "outside.h5"), "outside the allowed roots"),
        (str(data_root / ".." / "escape.h5"), "outside the allowed roots"),
    ]
    for output_file, expected in cases:
        with pytest.raises(StdDaqAdminException, match=expected):
            client.start_writer_async({"output_file": output_file, "n_images": 3})
    with pytest.raises(StdDaqAdminException, match="does not exist"):
        client.start_writer_sync({"output_file": str(data_root / "missing" / "run.h5"), "n_images": 3})
    assert not (tmp_path / "outside.h5").exists() and not (tmp_path / "escape.h5").exists()
    assert not (data_root / "missing").exists()
    assert client.get_status()["state"] == "READY"


def test_symlinks_cannot_lead_a_write_out_of_the_allowed_roots(
    writer: WriterProcess, data_root: Path, tmp_path: Path
) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (data_root / "link_dir").symlink_to(elsewhere)
    victim = tmp_path / "victim.h5"
    victim.write_bytes(b"precious")
    (data_root / "link_file.h5").symlink_to(victim)

    with pytest.raises(StdDaqAdminException, match="outside the allowed roots"):
        client.start_writer_async({"output_file": str(data_root / "link_dir" / "run.h5"), "n_images": 3})
    with pytest.raises(StdDaqAdminException, match="outside the allowed roots"):
        client.start_writer_sync({"output_file": str(data_root / "link_file.h5"), "n_images": 3})
    assert list(elsewhere.iterdir()) == []
    assert victim.read_bytes() == b"precious"
    assert client.get_logs(10) == []


def test_stop_mid_write_finishes_interrupted_and_shrinks_the_file(
    writer: WriterProcess, data_root: Path
) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    output = data_root / "interrupted.h5"
    client.start_writer_async({"output_file": str(output), "n_images": 100_000, "run_id": 42})
    wait_for(lambda: client.get_status()["acquisition"]["stats"]["n_write_completed"] >= 20)

    status = client.stop_writer()
    assert status["state"] == "READY"
    acquisition = status["acquisition"]
    assert (acquisition["state"], acquisition["message"]) == ("FINISHED", "Interrupted.")
    written = acquisition["stats"]["n_write_completed"]
    assert 20 <= written < 100_000
    with h5py.File(output, "r") as f:
        assert f[DETECTOR_NAME]["data"].shape[0] == written
        assert f[DETECTOR_NAME]["image_id"].shape[0] == written
    assert_file_holds_simulator_frames(output, written, 42, n_requested=100_000)
    logs = client.get_logs(1)
    assert logs[0]["message"] == "Interrupted." and logs[0]["info"]["run_id"] == 42


def _data_path_pid(writer: WriterProcess) -> int:
    """The writer's data path process: its child that is not a multiprocessing helper."""

    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    candidates = [pid for pid in writer.data_path_pids() if "resource_tracker" not in cmdline(pid)]
    assert len(candidates) == 1, [(pid, cmdline(pid)) for pid in writer.data_path_pids()]
    return candidates[0]


def test_data_path_killed_mid_write_reports_unknown_and_stop_recovers(
    writer: WriterProcess, data_root: Path
) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    output = data_root / "killed.h5"
    client.start_writer_async({"output_file": str(output), "n_images": 100_000})
    wait_for(lambda: client.get_status()["acquisition"]["stats"]["n_write_completed"] >= 50)
    os.kill(_data_path_pid(writer), signal.SIGKILL)

    status = wait_for(lambda: (s := client.get_status())["state"] == "UNKNOWN" and s)
    assert status["acquisition"]["state"] == "FAILED"
    assert status["acquisition"]["message"].startswith("ERROR:")
    with pytest.raises(StdDaqAdminException, match="UNKNOWN"):
        client.start_writer_async({"output_file": str(data_root / "refused.h5"), "n_images": 3})
    with h5py.File(output, "r") as f:  # what was flushed before the kill stays readable
        assert f[DETECTOR_NAME]["data"].dtype == np.uint16
    assert client.get_logs(5) == [], "a FAILED acquisition is not logged"

    status = client.stop_writer()
    assert status["state"] == "READY"
    assert status["acquisition"]["state"] == "FAILED", "stop resets the writer, not the failed record"
    after = data_root / "after.h5"
    status = client.start_writer_sync({"output_file": str(after), "n_images": 5})
    assert status["acquisition"]["message"] == "Completed."
    assert_file_holds_simulator_frames(after, 5, status["acquisition"]["info"]["run_id"])


INVALID_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"detector_type": "pilatus"}, "invalid config: detector_type: must be one of"),
    ({"bit_depth": 16.5}, "invalid config: bit_depth: Input should be a valid integer"),
    ({"image_pixel_height": "48"}, "invalid config: image_pixel_height: Input should be a valid integer"),
    ({"n_modules": False}, "invalid config: n_modules: Input should be a valid integer"),
    ({"bit_depth": 24}, "invalid config: bit_depth: must be one of 8, 16, 32"),
    (
        {"image_pixel_width": -1},
        "invalid config: image_pixel_width: Input should be greater than or equal to 1",
    ),
    ({"writer_user_id": 1.0}, "invalid config: writer_user_id: Input should be a valid integer"),
    ({"nonsense": 1}, "invalid config: nonsense: unknown field"),
]


def test_invalid_config_is_refused_with_a_message(writer: WriterProcess, detector_config: Path) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    before = client.get_config()
    file_before = detector_config.read_text()
    deployment_before = client.get_deployment_status()
    for update, expected in INVALID_CONFIGS:
        with pytest.raises(StdDaqAdminException, match=re.escape(expected)):
            client.set_config(update)
    assert client.get_config() == before
    assert detector_config.read_text() == file_before
    assert client.get_deployment_status() == deployment_before, "a refused config is not deployed"


def test_config_update_is_partial_persisted_and_deployed(
    writer_factory: WriterFactory, simulator: Simulator, detector_config: Path
) -> None:
    writer = writer_factory(simulator.endpoint, allowed_uids="12345")
    client = StdDaqClient(url_base=writer.rest_url)
    before = client.get_config()
    first_id = client.get_deployment_status()["config_id"]

    applied = client.set_config({"writer_user_id": 12345, "n_modules": 2})
    assert applied == {**before, "writer_user_id": 12345, "n_modules": 2}
    assert client.get_config() == applied
    assert json.loads(detector_config.read_text()) == applied, "persisted to the config file"

    deployment = client.get_deployment_status()
    assert deployment["status"] == "SUCCESS"
    assert deployment["config_id"] != first_id
    assert int(deployment["config_id"].split("-")[0]) >= int(first_id.split("-")[0])

    applied = client.set_config({"image_pixel_height": 64, "bit_depth": 32})  # new frame geometry
    assert (applied["image_pixel_height"], applied["bit_depth"]) == (64, 32)
    assert client.get_deployment_status()["status"] == "SUCCESS"
    assert client.get_status()["state"] == "READY", "the data path runs with the new geometry"


def test_data_path_dying_while_idle_makes_the_writer_unknown_until_stop(
    writer: WriterProcess, data_root: Path
) -> None:
    client = StdDaqClient(url_base=writer.rest_url)
    os.kill(_data_path_pid(writer), signal.SIGKILL)
    wait_for(lambda: client.get_status()["state"] == "UNKNOWN")
    with pytest.raises(StdDaqAdminException, match="call stop"):
        client.start_writer_sync({"output_file": str(data_root / "refused.h5"), "n_images": 3})
    assert not (data_root / "refused.h5").exists()
    assert client.stop_writer()["state"] == "READY"
    status = client.start_writer_sync({"output_file": str(data_root / "ok.h5"), "n_images": 3})
    assert status["acquisition"]["message"] == "Completed."


def test_frames_of_another_shape_than_the_config_fail_the_write_within_a_second(
    writer_factory: WriterFactory, data_root: Path
) -> None:
    sim = start_simulator(shape=(64, 64))
    try:
        client = StdDaqClient(url_base=writer_factory(sim.endpoint).rest_url)
        expected = f"ERROR: frames are 64x64 uint16, the detector config says {SHAPE[0]}x{SHAPE[1]} uint16"
        with pytest.raises(StdDaqAdminException) as info:
            client.start_writer_sync({"output_file": str(data_root / "wrong.h5"), "n_images": 10})
        assert str(info.value) == expected
        acquisition = client.get_status()["acquisition"]
        assert (acquisition["state"], acquisition["message"]) == ("FAILED", expected)
        stats = acquisition["stats"]
        assert stats["stop_time"] - stats["start_time"] < 1.0, "failed within a second of the file opening"
        assert stats["n_write_completed"] == 0
        counters = wait_for(lambda: (c := client.get_stats()["counters"])["malformed"] > 0 and c)
        assert counters["written"] == 0
        assert client.get_status()["state"] == "READY", "the next write may start"
    finally:
        sim.stop()
