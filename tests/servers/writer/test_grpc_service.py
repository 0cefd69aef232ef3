"""gRPC WriterControl of a real writer, through `daqif.writer_client` (sync and asyncio)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daqif.errors import DaqException, ErrorCode
from daqif.testing import wait_for
from daqif.v1 import writer_pb2
from daqif.writer_client import AsyncWriterClient, WriterClient, acquisition_state_name, writer_state_name
from servers.common.launch import WriterProcess

from .conftest import DETECTOR_NAME, SHAPE, Simulator
from .test_std_daq_client import _data_path_pid, assert_file_holds_simulator_frames

SERVICE = "daqif.v1.WriterControl"


def test_every_rpc_works_through_the_writer_client(writer: WriterProcess, data_root: Path) -> None:
    with WriterClient(writer.grpc_address) as client:
        status = client.get_status()
        assert writer_state_name(status.state) == "READY"
        assert acquisition_state_name(status.acquisition.state) == "UNDEFINED"
        assert not status.acquisition.stats.HasField("start_time")

        config = client.get_config()
        assert (config.detector_name, config.image_pixel_height, config.image_pixel_width) == (
            DETECTOR_NAME,
            *SHAPE,
        )
        applied = client.set_config({"n_modules": 4})
        assert applied.n_modules == 4 and applied.detector_name == DETECTOR_NAME
        deployment = client.get_deployment_status()
        assert deployment.status == writer_pb2.DEPLOYMENT_STATE_SUCCESS
        assert dict(deployment.servers) == {socket.gethostname(): "Done"}

        output = data_root / "grpc_sync.h5"
        status = client.start_writer_sync(str(output), 6, run_id=1001)
        assert writer_state_name(status.state) == "READY"
        assert acquisition_state_name(status.acquisition.state) == "FINISHED"
        assert status.acquisition.message == "Completed."
        assert status.acquisition.stats.n_write_completed == 6
        assert_file_holds_simulator_frames(output, 6, "1001")

        seen: list[writer_pb2.WriterStatus] = []
        watcher_ready = threading.Event()

        def watch() -> None:
            for item in client.watch_status(timeout=60):
                seen.append(item)
                watcher_ready.set()
                if item.state == writer_pb2.WRITER_STATE_READY and item.acquisition.info.run_id == "1002":
                    return

        thread = threading.Thread(target=watch)
        thread.start()
        assert watcher_ready.wait(10)
        status = client.start_writer_async(str(data_root / "grpc_async.h5"), 12, run_id=1002)
        assert writer_state_name(status.state) == "WRITING"
        thread.join(60)
        assert not thread.is_alive()
        assert writer_pb2.WRITER_STATE_WRITING in [item.state for item in seen]
        assert seen[-1].acquisition.message == "Completed."

        logs = client.get_logs(5)
        assert [entry.info.run_id for entry in logs] == ["1002", "1001"]
        stats = wait_for(lambda: (s := client.get_stats()).counters.written == 18 and s)  # refreshed at 1 Hz
        assert stats.counters.received >= 18
        assert writer_state_name(client.stop_writer().state) == "READY"


def test_errors_carry_a_daq_exception(writer: WriterProcess, data_root: Path, tmp_path: Path) -> None:
    with WriterClient(writer.grpc_address) as client:
        with pytest.raises(DaqException) as info:
            client.start_writer_async("relative.h5", 3)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert "not an absolute path" in info.value.message
        with pytest.raises(DaqException) as info:
            client.start_writer_async(str(tmp_path / "outside.h5"), 3)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(DaqException) as info:
            client.start_writer_async(str(data_root / "x.h5"), 0)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT and "n_images" in info.value.message
        with pytest.raises(DaqException) as info:
            client.set_config({"detector_type": "pilatus"})
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert "invalid config: detector_type: must be one of" in info.value.message
        with pytest.raises(DaqException) as info:
            client.start_writer_async(str(data_root / "x.h5"), 3, run_id="g-1")
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert 'run_id: Input should be a valid integer (got "g-1")' in info.value.message
        for bad in ({"bit_depth": True}, {"bit_dept": 16}):
            with pytest.raises(DaqException) as info:
                client.set_config(bad)
            assert info.value.code is ErrorCode.INVALID_ARGUMENT

        client.start_writer_async(str(data_root / "long.h5"), 100_000)
        with pytest.raises(DaqException) as info:
            client.start_writer_async(str(data_root / "second.h5"), 3)
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        assert "busy" in info.value.message
        with pytest.raises(DaqException) as info:
            client.start_writer_sync(str(data_root / "second.h5"), 3)
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        status = client.stop_writer()
        assert status.acquisition.message == "Interrupted."


def test_a_stop_naming_a_write_stops_that_write_and_never_another(
    writer: WriterProcess, simulator: Simulator, data_root: Path
) -> None:
    with WriterClient(writer.grpc_address) as client:
        mine = client.start_writer_async(str(data_root / "mine.h5"), 100_000).acquisition.info.output_file
        assert mine == str(data_root / "mine.h5")
        stopped = client.stop_writer(output_file=mine)
        assert writer_state_name(stopped.state) == "READY"
        assert (stopped.acquisition.info.output_file, stopped.acquisition.message) == (mine, "Interrupted.")
        again = client.stop_writer(output_file=mine)  # it has ended: nothing to do
        assert writer_state_name(again.state) == "READY" and again.acquisition == stopped.acquisition

        # Another client's write: the simulator paused, so it surely still runs when the stop comes.
        other = str(data_root / "other.h5")
        os.kill(simulator.pid, signal.SIGSTOP)
        try:
            client.start_writer_async(other, 50, run_id=2)
            with pytest.raises(DaqException) as info:
                client.stop_writer(output_file=mine)
            assert info.value.code is ErrorCode.FAILED_PRECONDITION
            assert info.value.message == (
                f"writer is writing {other!r}, not {mine!r} (which is not running); nothing was stopped"
            )
            status = client.get_status()
            assert writer_state_name(status.state) == "WRITING"
            assert status.acquisition.info.output_file == other
        finally:
            os.kill(simulator.pid, signal.SIGCONT)
        ended = client.wait_until_ready()
        assert acquisition_state_name(ended.acquisition.state) == "FINISHED"
        assert (ended.acquisition.message, ended.acquisition.stats.n_write_completed) == ("Completed.", 50)
        assert_file_holds_simulator_frames(Path(other), 50, "2")

        with pytest.raises(DaqException) as info:
            client.stop_writer(output_file="")
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert "the output_file of the write to stop is empty" in info.value.message
        assert writer_state_name(client.get_status().state) == "READY"


def test_a_stop_naming_a_write_resets_unknown_only_after_that_write(
    writer: WriterProcess, data_root: Path
) -> None:
    with WriterClient(writer.grpc_address) as client:
        mine = client.start_writer_async(str(data_root / "killed.h5"), 100_000).acquisition.info.output_file
        os.kill(_data_path_pid(writer), signal.SIGKILL)
        wait_for(lambda: writer_state_name(client.get_status().state) == "UNKNOWN")
        untouched = client.stop_writer(output_file=str(data_root / "another.h5"))
        assert writer_state_name(untouched.state) == "UNKNOWN"
        assert untouched.acquisition.info.output_file == mine
        reset = client.stop_writer(output_file=mine)
        assert writer_state_name(reset.state) == "READY"
        assert acquisition_state_name(reset.acquisition.state) == "FAILED"


def test_sync_write_that_outlasts_its_timeout_is_deadline_exceeded(
    writer: WriterProcess, data_root: Path
) -> None:
    with WriterClient(writer.grpc_address) as client:
        with pytest.raises(DaqException) as info:
            client.start_writer_sync(str(data_root / "slow.h5"), 100_000, timeout=0.5)
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert "still running" in info.value.message
        assert writer_state_name(client.get_status().state) == "WRITING"
        client.stop_writer()


def test_async_client_and_watch_status(writer: WriterProcess, data_root: Path) -> None:
    async def scenario() -> list[int]:
        async with AsyncWriterClient(writer.grpc_address) as client:
            states: list[int] = []
            stream = client.watch_status()
            first = await anext(stream)
            states.append(first.state)
            await client.start_writer_async(str(data_root / "aio.h5"), 5, run_id=7)
            async for item in stream:
                states.append(item.state)
                if item.state == writer_pb2.WRITER_STATE_READY and item.acquisition.info.run_id == "7":
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            assert (await client.get_logs(1))[0].info.run_id == "7"
            assert (await client.get_config()).detector_name == DETECTOR_NAME
            return states

    states = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert states[0] == writer_pb2.WRITER_STATE_READY
    assert writer_pb2.WRITER_STATE_WRITING in states


def test_health_is_serving_and_reflection_lists_the_service(writer: WriterProcess) -> None:
    with grpc.insecure_channel(writer.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {
            service.name for response in responses for service in response.list_services_response.service
        }
        assert SERVICE in names
