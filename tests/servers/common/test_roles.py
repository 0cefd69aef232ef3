"""Role markers (servers/common/roles.py): a bare `daqif-writer` and a bare `daqif-dpm-server`,
each started by hand with its own roots, can never write into each other's directories.

Real writer and DPM processes on loopback ports, in the test's directory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.testing import wait_for
from servers.common import roles
from servers.common.launch import DpmOptions, DpmProcess, ServerStartError, WriterOptions, WriterProcess

NO_STREAM = "tcp://127.0.0.1:1"  # nothing is written here: the paths are refused first


def _spec(daq_id: str, source: Path, receiver: Path) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": daq_id},
        "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
        "receivers": [{"type": "olasReceiver", "path": str(receiver)}],
    }


def _release_alert(client: DpmClient, daq_id: str) -> str:
    status = client.get_daq_status(daq_id)
    return next((a.description for a in status.alerts if a.id == "releasing:0"), "")


class Servers:
    """The servers of one test, all stopped afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir()
        self.started: list[DpmProcess | WriterProcess] = []
        self.clients: list[DpmClient] = []

    def dpm(self, workspace: Path) -> DpmProcess:
        n = len(self.started)
        server = DpmProcess(
            DpmOptions(workspace=workspace, allowed_roots=(self.data,)), log_file=self.base / f"dpm{n}.log"
        )
        self.started.append(server)
        return server.start()

    def writer(self, *allowed_roots: Path) -> WriterProcess:
        n = len(self.started)
        writer = WriterProcess(
            WriterOptions(
                stream=NO_STREAM,
                data_root=self.data,
                allowed_roots=allowed_roots,
                state_dir=self.base / f"writer{n}-state",
            ),
            log_file=self.base / f"writer{n}.log",
        )
        self.started.append(writer)
        return writer.start()

    def client(self, server: DpmProcess) -> DpmClient:
        client = DpmClient(server.address, timeout=30)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.started:
            server.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.close()


def _owner(server: DpmProcess | WriterProcess, program: str) -> str:
    return f"{program} pid {server.pid} on {socket.gethostname()}"


def test_a_bare_writer_refuses_an_allowed_root_that_contains_is_or_lies_inside_a_dpm_directory(
    servers: Servers,
) -> None:
    dpm = servers.dpm(servers.data / "dpm")
    client = servers.client(dpm)
    olas = servers.data / "olas"
    olas.mkdir()
    # QueueDaq marks the receiver directory (the source need not exist for that).
    client.queue_daq(_spec("MARK1", servers.data / "raw" / "det.h5", olas))
    owner = _owner(dpm, "daqif-dpm-server")
    assert (servers.data / "dpm" / ".daqif-dpm-workspace").read_text() == f"{owner}\n"
    assert (olas / ".daqif-receiver").read_text() == f"{owner}\n"

    inside = olas / "incoming"
    inside.mkdir()
    workspace = servers.data / "dpm"
    expected = {
        workspace: f"allowed root {workspace} is {workspace}, the DPM workspace of {owner}",
        inside: f"allowed root {inside} lies inside {olas}, a DPM receiver directory of {owner}",
        servers.data: f"allowed root {servers.data} contains ",
    }
    for root, message in expected.items():
        with pytest.raises(ServerStartError):
            servers.writer(root)
        writer = servers.started[-1]
        assert writer.returncode == 2
        (line,) = writer.tail()  # one line, naming both paths
        assert line.startswith(f"daqif-writer: {message}")
        assert line.endswith("the writer could overwrite it; give directories apart")
    assert dpm.running and client.get_daq_status("MARK1").id == "MARK1"


def test_a_bare_dpm_refuses_a_workspace_or_receiver_overlapping_a_writer_root(servers: Servers) -> None:
    raw = servers.data / "raw"
    raw.mkdir()
    writer = servers.writer(raw)
    owner = _owner(writer, "daqif-writer")
    assert (raw / ".daqif-writer-root").read_text() == f"{owner}\n"

    with pytest.raises(ServerStartError):
        servers.dpm(raw / "dpm")
    (line,) = servers.started[-1].tail()
    assert servers.started[-1].returncode == 2
    assert line == (
        f"daqif-dpm-server: workspace {raw / 'dpm'} lies inside {raw}, a writer's allowed root of {owner}: "
        "a writer could overwrite what the DPM makes there; give directories apart"
    )

    dpm = servers.dpm(servers.data / "dpm")
    client = servers.client(dpm)
    (raw / "out").mkdir()
    for receiver, where in ((raw / "out", f"lies inside {raw}"), (servers.data, f"contains {raw}")):
        spec = _spec("OVER1", raw / "det.h5", receiver)
        with pytest.raises(DaqException) as refused:
            client.queue_daq(spec)
        assert refused.value.code is ErrorCode.INVALID_ARGUMENT
        assert f"receivers[0].path: receiver directory {receiver} {where}, a writer's allowed root" in str(
            refused.value
        )
    assert not (raw / "out" / ".daqif-receiver").exists()
    assert client.get_active_daqs() == []
    assert writer.running


def test_a_directory_marked_after_the_writer_started_is_refused_at_write_time(servers: Servers) -> None:
    raw = servers.data / "raw"
    raw.mkdir()
    writer = servers.writer(raw)
    # The writer's marker is lost (removed by hand, or it could not be written): a DPM then
    # starts with its workspace in the writer's root and marks it.
    os.unlink(raw / ".daqif-writer-root")
    dpm = servers.dpm(raw / "dpm")
    target = raw / "dpm" / "daqs" / "x.h5"
    reply = requests.post(
        writer.rest_url + "/writer/write_async", json={"output_file": str(target), "n_images": 1}, timeout=10
    ).json()
    assert reply["status"] == "error"
    assert (
        f"lies in {raw / 'dpm'}, the DPM workspace of {_owner(dpm, 'daqif-dpm-server')}" in reply["message"]
    )
    assert "the writer never writes there" in reply["message"]
    assert not target.exists()
    assert requests.get(writer.rest_url + "/writer/status", timeout=10).json()["writer"]["state"] == "READY"


def test_a_receiver_a_writer_marked_after_queue_daq_is_a_release_error_and_nothing_is_released(
    servers: Servers,
) -> None:
    dpm = servers.dpm(servers.data / "dpm")
    client = servers.client(dpm)
    source = servers.data / "src" / "det.h5"
    source.parent.mkdir()
    with h5py.File(source, "w") as f:
        f["det/data"] = np.zeros((2, 4, 4), dtype=np.uint16)
    later = servers.data / "later"  # does not exist yet at QueueDaq: not marked then
    client.queue_daq(_spec("LATE1", source, later))
    wait_for(lambda: _release_alert(client, "LATE1"), what="the release to fail")

    later.mkdir()
    writer = servers.writer(later)  # nothing marked there: the writer starts and marks it
    client.retry_merge_daq("LATE1")
    description = wait_for(
        lambda: d if "allowed root" in (d := _release_alert(client, "LATE1")) else "",
        what="the release refused",
    )
    owner = _owner(writer, "daqif-writer")
    assert f"receiver directory {later} lies in {later}, a writer's allowed root of {owner}" in description
    assert os.listdir(later) == [".daqif-writer-root"]  # no product, no DPM marker


# -- in-process ------------------------------------------------------------------------------------


def test_markers_below_are_found_through_subdirectories_but_not_through_symlinks(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    roles.mark(deep, roles.Role.DPM_WORKSPACE, "someone")
    found = roles.marked_below(tmp_path, roles.WRITER_KEEPS_OUT)
    assert found is not None and (found.directory, found.role, found.owner) == (
        deep,
        roles.Role.DPM_WORKSPACE,
        "someone",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "link").symlink_to(tmp_path / "a")
    assert roles.marked_below(other, roles.WRITER_KEEPS_OUT) is None
    assert roles.marked_at_or_above(deep / "x" / "y", roles.WRITER_KEEPS_OUT) == found
    assert roles.marked_at_or_above(tmp_path, roles.WRITER_KEEPS_OUT) is None
