"""Helpers of the DPM server tests: real server subprocesses, real HDF5 files, real rsync."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from daqif.dpm_client import DpmClient
from daqif.testing import wait_for
from servers.common.launch import DpmOptions, DpmProcess

# Stands in for ssh: rsync runs `<shell> [-l user] host rsync --server ...`; the shim drops the
# ssh-style options and the host and runs the "remote" rsync locally.
REMOTE_SHELL_SHIM = """#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -l) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift
exec "$@"
"""


def write_source(
    path: Path,
    group: str,
    *,
    frames: int = 4,
    shape: tuple[int, int] = (16, 16),
    seed: int = 0,
    attrs: dict[str, Any] | None = None,
) -> np.ndarray:
    """An HDF5 source like the writer's: `/<group>/data` one frame per chunk, root attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 4000, size=(frames, *shape), dtype=np.uint16)
    with h5py.File(path, "w") as f:
        f.create_dataset(f"{group}/data", data=data, chunks=(1, *shape))
        f.create_dataset(f"{group}/image_id", data=np.arange(frames, dtype=np.uint64))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return data


def hdf5_source(name: str, location: str | Path, **extra: Any) -> dict[str, Any]:
    return {"type": "hdf5File", "sourceName": name, "location": str(location), **extra}


def keyword_source(name: str = "ocm") -> dict[str, Any]:
    return {
        "type": "fitsKeywords",
        "sourceName": name,
        "keywords": [
            {"type": "valueKeyword", "name": "OBJECT", "value": "M31", "comment": "target"},
            {"type": "esoKeyword", "name": "DET DIT", "value": 0.5},
            {"type": "literalKeyword", "value": "COMMENT queued by the DPM tests"},
        ],
    }


def make_spec(
    daq_id: str,
    sources: list[dict[str, Any]],
    receivers: Sequence[str | Path | dict[str, Any]] = (),
    file_id: str | None = None,
) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": file_id or f"{daq_id}.product"},
        "sources": sources,
        "receivers": [
            r if isinstance(r, dict) else {"type": "olasReceiver", "path": str(r)} for r in receivers
        ],
    }


class DpmServerProcess(DpmProcess):
    """A DPM server of one test: workspace, settings file and log in `directory`.

    `config` (the server's JSON settings) is written to the settings file at every start, so a
    test changes a setting and restarts the server as an operator would.
    """

    def __init__(
        self,
        directory: Path,
        *,
        config: dict[str, Any] | None = None,
        workspace: Path | None = None,
        allowed_roots: Sequence[Path] = (),
        data_root: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.directory = directory
        self.workspace = workspace or directory / "dpm-workspace"
        self.config = dict(config or {})
        self.config_file = directory / "dpm-config.json"
        options = DpmOptions(
            workspace=self.workspace,
            allowed_roots=tuple(allowed_roots),
            data_root=data_root,
            config=self.config_file,
            metrics_port=metrics_port,
        )
        super().__init__(options, log_file=directory / "dpm-server.log")

    def start(self, timeout: float = 60.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config, indent=1))
        return super().start(timeout)


class DpmHarness:
    """Starts DPM servers for one test and stops every one of them afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir()
        self.receiver = self.data / "olas"
        self.receiver.mkdir()
        self.servers: list[DpmServerProcess] = []
        self.clients: list[DpmClient] = []

    def start(self, config: dict[str, Any] | None = None, **kwargs: Any) -> DpmServerProcess:
        kwargs.setdefault("allowed_roots", [self.data])
        server = DpmServerProcess(self.base / f"server{len(self.servers)}", config=config, **kwargs)
        self.servers.append(server)
        return server.start()

    def client(self, server: DpmServerProcess, timeout: float = 30.0) -> DpmClient:
        client = DpmClient(server.address, timeout=timeout)
        self.clients.append(client)
        return client

    def source(self, name: str, **kwargs: Any) -> Path:
        path = self.data / "raw" / f"{name}.h5"
        write_source(path, name, **kwargs)
        return path

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, harness: DpmHarness, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount_point` (created) for the test; skips if mounting fails.

    The harness's servers are stopped before it is unmounted (their files may be on it).
    """
    import pytest

    mount_point.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        harness.close()
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Take the free blocks of `directory`'s file system but about `leave` bytes; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):  # large writes, then the last partial blocks
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def substate(name: str) -> int:
    from daqif.v1 import dpm_pb2

    return int(dpm_pb2.DaqSubState.Value(f"DAQ_SUB_STATE_{name}"))


def visible_files(directory: Path) -> list[str]:
    """The entries of `directory`, hidden ones included, but the DPM's role marker (`.daqif-receiver`)."""
    from servers.common.roles import Role

    return sorted(name for name in os.listdir(directory) if name not in set(Role))


def archived_record(server: DpmServerProcess, daq_id: str) -> dict[str, Any]:
    """The final persisted record of an archived DAQ (GetDaqStatus answers NOT_FOUND for it)."""
    import json

    return json.loads((server.workspace / "archive" / daq_id / "daq.json").read_text())  # type: ignore[no-any-return]


def wait_archived(
    client: DpmClient, server: DpmServerProcess, daq_id: str, timeout: float = 90.0
) -> dict[str, Any]:
    """Wait until `daq_id` is archived; return its final record.

    Fails at once if the DAQ raises an ERROR alert on the way (it would wait for a retry).
    """
    from daqif.errors import DaqException, ErrorCode

    def archived() -> bool:
        try:
            status = client.get_daq_status(daq_id)
        except DaqException as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return True
            raise
        if status.error:
            alerts = "; ".join(f"{a.id}: {a.description}" for a in status.alerts)
            raise AssertionError(f"DAQ {daq_id} waits with an error instead of completing: {alerts}")
        return False

    wait_for(archived, timeout, f"DAQ {daq_id} to be archived")
    return archived_record(server, daq_id)


def complete_one(
    dpm: DpmHarness, daq_id: str, sources: list[dict[str, Any]], config: dict[str, Any] | None = None
) -> Path:
    """Start a server (with `config`), queue one DAQ of `sources` with the harness's receiver,
    wait until it is archived COMPLETED (failing at its first ERROR alert); its product at the
    receiver."""
    server = dpm.start(config)
    client = dpm.client(server)
    client.queue_daq(make_spec(daq_id, sources, [dpm.receiver]))
    record = wait_archived(client, server, daq_id)
    assert record["substate"] == "COMPLETED", record["alerts"]
    return dpm.receiver / f"{daq_id}.product.h5"


def wait_substate(client: DpmClient, daq_id: str, name: str, timeout: float = 60.0) -> Any:
    """Wait until `daq_id` is in substate `name`; return its status."""

    def reached() -> Any:
        status = client.get_daq_status(daq_id)
        return status if status.substate == substate(name) else None

    return wait_for(reached, timeout, f"DAQ {daq_id} in {name}")


def wait_alert(client: DpmClient, daq_id: str, alert_id: str, timeout: float = 60.0) -> Any:
    """Wait until `daq_id` has the alert `alert_id`; return its status."""

    def raised() -> Any:
        status = client.get_daq_status(daq_id)
        return status if any(a.id == alert_id for a in status.alerts) else None

    return wait_for(raised, timeout, f"alert {alert_id} on DAQ {daq_id}")


def error_of(call: Callable[[], Any]) -> Any:
    """The `DaqException` `call` raises (fails the test if it raises nothing)."""
    from daqif.errors import DaqException

    try:
        call()
    except DaqException as exc:
        return exc
    raise AssertionError("the call did not raise DaqException")


SENTINEL = "SENTINEL"


def follow_from_now(harness: DpmHarness, client: DpmClient) -> Any:
    """A `WatchDaqStatus("")` stream that is known to be subscribed before the caller goes on.

    A sentinel DAQ that waits in COLLECTING (its source does not exist) is queued first; once
    the stream has delivered it, every later change reaches the stream. Returns the iterator.
    """
    client.queue_daq(make_spec(SENTINEL, [hdf5_source("never", harness.data / "never" / "there.h5")]))
    stream = client.watch_daq_status("", timeout=120)
    for status in stream:
        if status.id == SENTINEL:
            return stream
    raise AssertionError("the watch stream ended before it delivered the sentinel")


def statuses_until_final(stream: Any, daq_id: str) -> list[Any]:
    """Statuses of `daq_id` from `stream` up to and including COMPLETED or ABORTED."""
    seen = []
    final = {substate("COMPLETED"), substate("ABORTED")}
    for status in stream:
        if status.id != daq_id:
            continue
        seen.append(status)
        if status.substate in final:
            return seen
    raise AssertionError(f"the watch stream ended before {daq_id} was final")


def substate_names(statuses: list[Any]) -> list[str]:
    """Substate names in order, consecutive repeats (alert changes) folded."""
    from daqif.dpm_client import substate_name

    names: list[str] = []
    for status in statuses:
        name = substate_name(status.substate)
        if not names or names[-1] != name:
            names.append(name)
    return names


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def freeze_running_merge(server_pid: int) -> int | None:
    """SIGSTOP a merge process of the server and return its pid, or None while none runs.

    The merge launcher's children are the merges; once a merge's output goes to merge.log it
    has set its death signal (so a frozen one still dies with the server)."""
    import signal

    for child in _children(server_pid):
        for grandchild in _children(child):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{grandchild}/fd/1").endswith("merge.log"):
                    os.kill(grandchild, signal.SIGSTOP)
                    return grandchild
    return None
