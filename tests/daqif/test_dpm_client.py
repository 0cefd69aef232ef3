"""DpmClient and AsyncDpmClient against a real DPM server: calls work, errors arrive as
DaqException with the server's id, message and code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import h5py
import pytest

from daqif.dpm_client import AsyncDpmClient, DpmClient, substate_name
from daqif.errors import DaqException, ErrorCode
from daqif.testing import DpmServer
from daqif.v1 import dpm_pb2


def make_spec(server: DpmServer, daq_id: str) -> dict[str, Any]:
    source = server.data_root / "raw" / f"{daq_id}.src.h5"
    with h5py.File(source, "w") as f:
        f["data"] = list(range(16))
        f.attrs["OBJECT"] = "CLIENT"
    return {
        "id": daq_id,
        "target": {"fileId": daq_id},
        "sources": [{"type": "hdf5File", "sourceName": "det", "location": str(source)}],
        "receivers": [{"type": "olasReceiver", "path": str(server.receiver_dir)}],
    }


def test_sync_client_queues_waits_and_reports_errors(dpm_server: DpmServer) -> None:
    client = dpm_server.client
    seen: list[str] = []
    reply = client.queue_daq(make_spec(dpm_server, "CLIENT.SYNC"))
    assert (reply.id, reply.error) == ("CLIENT.SYNC", False)
    final = client.wait_for(reply.id, timeout=60, on_status=lambda s: seen.append(substate_name(s.substate)))
    assert final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
    assert seen[-1] == "COMPLETED"
    assert Path(final.result).name == "CLIENT.SYNC.h5"

    with pytest.raises(DaqException) as info:
        client.queue_daq(make_spec(dpm_server, "CLIENT.SYNC"))
    assert info.value.code is ErrorCode.ALREADY_EXISTS and info.value.id == "CLIENT.SYNC"
    with pytest.raises(DaqException) as info:
        client.get_daq_status("NO.SUCH.DAQ")
    assert info.value.code is ErrorCode.NOT_FOUND and info.value.id == "NO.SUCH.DAQ"
    assert "NO.SUCH.DAQ" in info.value.message
    storage = client.query_storage_status()
    assert storage.capacity >= storage.free >= storage.available > 0


def test_client_against_no_server_raises_unavailable() -> None:
    with DpmClient("127.0.0.1:1", timeout=2) as client, pytest.raises(DaqException) as info:
        client.get_active_daqs()
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_async_client_queues_and_follows_to_completed(dpm_server: DpmServer) -> None:
    spec = make_spec(dpm_server, "CLIENT.ASYNC")

    async def scenario() -> tuple[dpm_pb2.DaqStatus, DaqException]:
        async with AsyncDpmClient(dpm_server.address) as client:
            reply = await client.queue_daq(spec)
            final = await client.wait_for(reply.id, timeout=60)
            try:
                await client.abort_daq("CLIENT.UNKNOWN")
            except DaqException as exc:
                return final, exc
            raise AssertionError("abort of an unknown DAQ was accepted")

    final, error = asyncio.run(scenario())
    assert final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
    assert error.code is ErrorCode.NOT_FOUND and error.id == "CLIENT.UNKNOWN"


def test_a_finished_daq_answers_get_daq_status_only_with_include_archived(dpm_server: DpmServer) -> None:
    client = dpm_server.client
    reply = client.queue_daq(make_spec(dpm_server, "CLIENT.ARCHIVED"))
    streamed = client.wait_for(reply.id, timeout=60)
    with pytest.raises(DaqException) as seed:
        client.get_daq_status(reply.id)
    assert seed.value.code is ErrorCode.NOT_FOUND
    assert seed.value.message == "DAQ CLIENT.ARCHIVED is archived (completed or aborted)"
    final = client.get_daq_status(reply.id, include_archived=True)
    assert final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED and final.state == dpm_pb2.DAQ_STATE_COMPLETED
    assert (final.result, final.file_id) == (streamed.result, "CLIENT.ARCHIVED")
    with pytest.raises(DaqException) as never:
        client.get_daq_status("CLIENT.NEVER", include_archived=True)
    assert never.value.code is ErrorCode.NOT_FOUND


def test_wait_for_a_daq_that_finished_before_the_watch_returns_its_final_status(
    dpm_server: DpmServer,
) -> None:
    client = dpm_server.client
    reply = client.queue_daq(make_spec(dpm_server, "CLIENT.EARLY"))
    client.wait_for(reply.id, timeout=60)
    seen: list[dpm_pb2.DaqStatus] = []
    again = client.wait_for(reply.id, timeout=60, on_status=seen.append)  # the watch answers NOT_FOUND
    assert again.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED and seen == [again]

    async def follow() -> dpm_pb2.DaqStatus:
        async with AsyncDpmClient(dpm_server.address) as aclient:
            return await aclient.wait_for(reply.id, timeout=60)

    assert asyncio.run(follow()).substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
