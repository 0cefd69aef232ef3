"""`daqif-writer` as a process: command line, sync cap, clean shutdown on SIGTERM."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from std_daq_client import StdDaqAdminException, StdDaqClient

from daqif.testing import wait_for
from daqif.writer_client import WriterClient, writer_state_name
from servers.common.launch import ServerStartError, WriterOptions, WriterProcess

from .conftest import DETECTOR_NAME, Simulator, WriterFactory, start_simulator


def test_sync_write_longer_than_the_cap_is_refused_and_keeps_writing(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    writer = writer_factory(simulator.endpoint, sync_timeout=1.0)
    client = StdDaqClient(url_base=writer.rest_url)
    with pytest.raises(StdDaqAdminException, match="still running"):
        client.start_writer_sync({"output_file": str(data_root / "long.h5"), "n_images": 100_000})
    assert client.get_status()["state"] == "WRITING"
    assert client.stop_writer()["acquisition"]["message"] == "Interrupted."


def test_sigterm_closes_an_open_file_as_interrupted(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    writer = writer_factory(simulator.endpoint)
    client = StdDaqClient(url_base=writer.rest_url)
    output = data_root / "shutdown.h5"
    client.start_writer_async({"output_file": str(output), "n_images": 100_000})
    wait_for(lambda: client.get_status()["acquisition"]["stats"]["n_write_completed"] >= 10)
    children = writer.data_path_pids()
    assert writer.stop() == 0
    with h5py.File(output, "r") as f:  # closed cleanly: no SWMR flag left, datasets shrunk
        n_ids = f[DETECTOR_NAME]["image_id"].shape[0]
        assert n_ids >= 10
        assert f[DETECTOR_NAME]["data"].shape[0] == n_ids
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_bad_config_file_stops_the_writer_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text('{"bit_depth": 12}')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "servers.writer.main",
            "--stream",
            "tcp://127.0.0.1:1",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "bad.json: bit_depth: must be one of 8, 16, 32, got 12" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--rest-port", "--grpc-port"])
def test_busy_port_stops_the_writer_with_a_message_naming_it(tmp_path: Path, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        other = "--grpc-port" if flag == "--rest-port" else "--rest-port"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "servers.writer.main",
                "--stream",
                "tcp://127.0.0.1:1",
                flag,
                str(port),
                other,
                "0",
                "--data-root",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 2
    what = "REST API" if flag == "--rest-port" else "gRPC WriterControl"
    assert f"cannot bind the {what} to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_writer_on_a_busy_grpc_port_exits_non_zero_naming_the_port(
    writer_factory: WriterFactory, simulator: Simulator, data_root: Path
) -> None:
    # gRPC would share the port through SO_REUSEPORT unless the writer turns it off.
    first = writer_factory(simulator.endpoint)
    port = first.ready.port("grpc")
    second = WriterProcess(WriterOptions(stream=simulator.endpoint, data_root=data_root, grpc_port=port))
    with pytest.raises(ServerStartError):
        second.start()
    assert second.returncode == 2
    assert second.tail() == [
        f"daqif-writer: cannot bind the gRPC WriterControl to 127.0.0.1:{port}: "
        "address in use or not a local address"
    ]
    assert first.running
    with WriterClient(first.grpc_address) as client:
        assert writer_state_name(client.get_status().state) == "READY"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--group-member", "nohost"], "'nohost' is not HOST:PORT (or grpcs://HOST:PORT)"),
        (["--group-member", "h:99999"], "'h:99999' is not HOST:PORT"),
        (["--workers", "0"], "expected a whole number >= 1, not '0'"),
        (
            ["--group-member", "127.0.0.1:{grpc}"],
            "--group-member 127.0.0.1:{grpc} is this writer's own gRPC port",
        ),
    ],
)
def test_a_bad_writer_group_flag_stops_the_writer_naming_it(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    from servers.common.launch import free_port

    grpc = str(free_port())
    argv = [sys.executable, "-m", "servers.writer.main", "--stream", "tcp://127.0.0.1:1"]
    argv += ["--rest-port", "0", "--grpc-port", grpc, "--data-root", str(tmp_path / "data")]
    result = subprocess.run(
        argv + [f.format(grpc=grpc) for f in flags], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2
    assert message.format(grpc=grpc) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "direct"), [((), True), (("--datapath-io", "page-cache"), False)])
def test_datapath_io_chooses_how_aligned_frames_reach_the_file(
    writer_factory: WriterFactory, data_root: Path, tmp_path: Path, flag: tuple[str, ...], direct: bool
) -> None:
    shape = (64, 64)  # 8 KiB uint16 frames: direct I/O applies unless turned off
    config = tmp_path / "aligned.json"
    config.write_text(
        json.dumps(
            {
                "detector_name": DETECTOR_NAME,
                "detector_type": "eiger",
                "bit_depth": 16,
                "image_pixel_height": shape[0],
                "image_pixel_width": shape[1],
            }
        )
    )
    with start_simulator(shape=shape) as sim:
        writer = writer_factory(sim.endpoint, config=config, extra_args=flag)
        client = StdDaqClient(url_base=writer.rest_url)
        output = data_root / "aligned.h5"
        client.start_writer_async({"output_file": str(output), "n_images": 50})
        wait_for(lambda: client.get_status()["acquisition"]["state"] == "FINISHED", 60)
    with h5py.File(output, "r") as f:
        data = f[DETECTOR_NAME]["data"]
        assert data.shape == (50, *shape)
        early = data.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
        assert early is direct
