"""`daqif.bluesky.DaqifDetector` under a real RunEngine, against the real simulator and writer of
`daqif.testing`: the documents name the files written, and the frames read through them are the
simulator's, pixel for pixel."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import h5py
import numpy as np
import pytest

pytest.importorskip("ophyd_async", reason="needs the daqif[bluesky] extra")

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky import RunEngine
from bluesky.plans import count
from bluesky.run_engine import RunEngineResult, call_in_bluesky_event_loop
from bluesky.utils import FailedStatus
from ophyd_async.core import NotConnectedError, TriggerInfo, init_devices

from daqif.bluesky import DaqifDetector, DaqifTriggerLogic, WriterLink
from daqif.defaults import DETECTOR_NAME
from daqif.errors import DaqException
from daqif.frame import expected_frame
from daqif.testing import Writer
from daqif.writer_client import WriterClient, writer_state_name
from servers.common.commands import WriterOptions
from servers.common.launch import WriterProcess

Documents = dict[str, list[dict[str, Any]]]


@pytest.fixture
def run_engine() -> Iterator[RunEngine]:
    yield RunEngine({}, call_returns_result=True)


@pytest.fixture
def det(run_engine: RunEngine, writer: Writer) -> Iterator[DaqifDetector]:
    with init_devices():
        det = DaqifDetector(writer.grpc_address, writer.raw_dir)
    yield det
    call_in_bluesky_event_loop(det.close())


def _recorder(documents: Documents) -> Callable[[str, Any], None]:
    def record(name: str, doc: Any) -> None:
        documents[name].append(doc)

    return record


def _collect(engine: RunEngine, plan: Any) -> Documents:
    documents: Documents = defaultdict(list)
    engine(plan, _recorder(documents))
    return documents


def _frames_of(documents: Documents, data_key: str) -> np.ndarray[Any, Any]:
    """The frames of `data_key`, read through the StreamResource/StreamDatum documents only."""
    resources = {doc["uid"]: doc for doc in documents["stream_resource"] if doc["data_key"] == data_key}
    parts = []
    for datum in documents["stream_datum"]:
        resource = resources.get(datum["stream_resource"])
        if resource is None:
            continue
        assert resource["mimetype"] == "application/x-hdf5"
        with h5py.File(urlparse(resource["uri"]).path, "r", swmr=True) as file:
            dataset = file[resource["parameters"]["dataset"]]
            assert dataset.chunks[1:] == tuple(resource["parameters"]["chunk_shape"])[1:]
            parts.append(dataset[datum["indices"]["start"] : datum["indices"]["stop"]])
    return np.concatenate(parts)


def _assert_simulator_frames(documents: Documents, data_key: str, n: int, shape: tuple[int, int]) -> None:
    frames = _frames_of(documents, data_key)
    image_ids = _frames_of(documents, f"{data_key}-image_id")
    assert frames.shape == (n, *shape) and image_ids.shape == (n,)
    for frame, image_id in zip(frames, image_ids, strict=True):
        np.testing.assert_array_equal(frame, expected_frame(int(image_id), shape, "uint16"))
    assert len(set(image_ids.tolist())) == n


def test_count_writes_one_file_per_trigger_and_the_documents_give_the_simulator_frames(
    run_engine: RunEngine, det: DaqifDetector, writer: Writer
) -> None:
    documents = _collect(run_engine, count([det], num=3))

    files = sorted({urlparse(doc["uri"]).path for doc in documents["stream_resource"]})
    assert [Path(f).parent for f in files] == [writer.raw_dir] * 3
    assert [Path(f).name[-10:] for f in files] == ["_000000.h5", "_000001.h5", "_000002.h5"]
    assert {doc["data_key"] for doc in documents["stream_resource"]} == {"det", "det-image_id"}
    assert [doc["parameters"]["dataset"] for doc in documents["stream_resource"]][:2] == [
        f"/{DETECTOR_NAME}/data",
        f"/{DETECTOR_NAME}/image_id",
    ]
    (descriptor,) = documents["descriptor"]
    assert descriptor["data_keys"]["det"]["shape"] == [1, 64, 64]
    assert descriptor["data_keys"]["det"]["external"] == "STREAM:"
    configuration = descriptor["configuration"]["det"]["data"]
    assert (configuration["det-detector_name"], configuration["det-bit_depth"]) == (DETECTOR_NAME, 16)
    # The soft signals the WatchStatus stream feeds: the last write (one frame) has ended.
    assert call_in_bluesky_event_loop(det.n_write_completed.get_value()) == 1
    assert call_in_bluesky_event_loop(det.acquisition_state.get_value()) == "FINISHED"
    assert len(documents["event"]) == 0 or all("det" not in e["data"] for e in documents["event"])
    _assert_simulator_frames(documents, "det", 3, (64, 64))


def test_a_fly_scan_writes_one_file_followed_to_its_end(
    run_engine: RunEngine, det: DaqifDetector, writer: Writer
) -> None:
    n = 40

    def fly() -> Any:
        yield from bps.stage(det)
        yield from bps.open_run()
        yield from bps.prepare(det, TriggerInfo(number_of_events=n), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing([det], [det], flush_period=0.05)
        yield from bps.close_run()
        yield from bps.unstage(det)

    documents = _collect(run_engine, fly())

    assert len({doc["uri"] for doc in documents["stream_resource"]}) == 1
    assert sum(d["indices"]["stop"] - d["indices"]["start"] for d in documents["stream_datum"]) == 2 * n
    _assert_simulator_frames(documents, "det", n, (64, 64))
    with WriterClient(writer.grpc_address) as client:
        assert client.get_logs(1)[0].message == "Completed."


def test_a_write_the_writer_refuses_fails_the_plan_with_its_message(
    run_engine: RunEngine, writer: Writer, tmp_path: Path
) -> None:
    with init_devices():
        outside = DaqifDetector(writer.grpc_address, tmp_path / "elsewhere")
    try:
        with pytest.raises(FailedStatus) as info:
            run_engine(count([outside], num=1))
    finally:
        call_in_bluesky_event_loop(outside.close())
    refusal = info.value.__cause__
    assert isinstance(refusal, DaqException)
    assert f"{tmp_path / 'elsewhere'}/" in refusal.message
    assert "is outside the allowed roots" in refusal.message


def test_a_plan_that_stops_stops_the_write(run_engine: RunEngine, det: DaqifDetector, writer: Writer) -> None:
    class OperatorStop(Exception):
        pass

    @bpp.stage_decorator([det])  # type: ignore[untyped-decorator]
    @bpp.run_decorator()  # type: ignore[untyped-decorator]
    def start_and_stop() -> Any:
        yield from bps.prepare(det, TriggerInfo(number_of_events=1_000_000), wait=True)
        yield from bps.kickoff(det, wait=True)
        raise OperatorStop

    with pytest.raises(OperatorStop):
        run_engine(start_and_stop())

    with WriterClient(writer.grpc_address) as client:
        assert writer_state_name(client.get_status().state) == "READY"
        (last,) = client.get_logs(1)
        assert last.message == "Interrupted."
        assert last.info.n_images == 1_000_000


def test_the_stop_after_its_own_write_ended_leaves_another_clients_write_running(
    det: DaqifDetector, writer: Writer
) -> None:
    """Issue 10: the device's write ended and another client started one before the device's status
    stream showed that end; the device's stop (what `unstage` does) must not stop the other write."""
    other_file = str(writer.raw_dir / "other_client.h5")

    async def scenario() -> Any:
        await det.stage()
        await det.prepare(TriggerInfo(number_of_events=5))
        await det.kickoff()
        own = det.link.current
        assert own is not None
        # Blocking calls: the event loop (and so the device's status stream) waits meanwhile.
        with WriterClient(writer.grpc_address) as other:
            ended = other.wait_until_ready()
            assert (ended.acquisition.info.output_file, ended.acquisition.message) == (
                str(own.path),
                "Completed.",
            )
            other.start_writer_async(other_file, 1_000_000)
        assert not own.ended.is_set(), "the device must not have seen its write end yet"
        await det.link.stop_own_write()  # DaqifAcquireLogic.ensure_stopped, called by unstage
        assert own.ended.is_set() and own.final is not None and own.final.message == "Completed."
        await det.unstage()
        return own

    own = call_in_bluesky_event_loop(scenario())
    with WriterClient(writer.grpc_address) as client:
        status = client.get_status()
        assert writer_state_name(status.state) == "WRITING"
        assert status.acquisition.info.output_file == other_file
        stopped = client.stop_writer(output_file=other_file)
        assert stopped.acquisition.message == "Interrupted."
        assert [entry.info.output_file for entry in client.get_logs(2)] == [other_file, str(own.path)]


def test_a_write_that_fails_fails_the_plan_with_the_writers_message(
    run_engine: RunEngine, det: DaqifDetector, writer: Writer
) -> None:
    with WriterClient(writer.grpc_address) as client:
        client.set_config({"image_pixel_height": 32, "image_pixel_width": 32})  # the simulator sends 64x64

    with pytest.raises(FailedStatus) as info:
        run_engine(count([det], num=2))

    cause = info.value.__cause__
    assert type(cause).__name__ == "WriteFailed"
    assert "ended after 0 of 1 frames: ERROR: frames are 64x64 uint16, the detector config says 32x32" in str(
        cause
    )


# bluesky's TiledWriter itself calls a tiled method deprecated in 0.2.20.
@pytest.mark.filterwarnings("ignore:The order of arguments has changed:DeprecationWarning")
def test_tiled_reads_the_frames_through_the_documents_with_no_custom_adapter(
    run_engine: RunEngine, det: DaqifDetector, writer: Writer, tmp_path: Path
) -> None:
    pytest.importorskip("tiled.server", reason="needs tiled[server] (the daqif[tiled] extra)")
    from bluesky.callbacks.tiled_writer import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    server = SimpleTiledServer(tmp_path / "tiled", readable_storage=[writer.raw_dir])
    try:
        client = from_uri(server.uri)
        documents: Documents = defaultdict(list)
        result = run_engine(count([det], num=3), [TiledWriter(client), _recorder(documents)])
        assert isinstance(result, RunEngineResult)
        (uid,) = result.run_start_uids

        stream = client[uid]["primary"]
        frames = stream["det"].read()
        image_ids = stream["det-image_id"].read()
        assert frames.shape == (3, 64, 64) and image_ids.shape == (3,)
        np.testing.assert_array_equal(frames, _frames_of(documents, "det"))
        for frame, image_id in zip(frames, image_ids, strict=True):
            np.testing.assert_array_equal(frame, expected_frame(int(image_id), (64, 64), "uint16"))
    finally:
        server.close()


def test_a_writer_that_does_not_answer_fails_init_devices_naming_it(run_engine: RunEngine) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(NotConnectedError) as info, init_devices(timeout=5):
        unanswered = DaqifDetector(address, "/data")
    assert unanswered.name == "unanswered"
    call_in_bluesky_event_loop(unanswered.close())
    assert f"unanswered: NotConnectedError: no daqif writer answers at {address}: failed to connect" in str(
        info.value
    )


@pytest.mark.parametrize(
    ("trigger_info", "problem"),
    [
        (TriggerInfo(livetime=0.1), "livetime 0.1 and deadtime 0.0: the daqif writer records the frames"),
        (TriggerInfo(number_of_events=0), "number_of_exposures 0: a daqif write needs at least 1 frame"),
    ],
)
def test_a_trigger_info_the_writer_cannot_honour_is_refused_naming_it(
    trigger_info: TriggerInfo, problem: str
) -> None:
    logic = DaqifTriggerLogic(WriterLink("127.0.0.1:1", None))
    with pytest.raises(ValueError, match=problem):
        asyncio.run(
            logic.prepare_internal(
                trigger_info.number_of_exposures, trigger_info.livetime, trigger_info.deadtime
            )
        )


def test_a_detector_that_sends_nothing_fails_after_the_exposure_timeout_and_the_write_is_stopped(
    run_engine: RunEngine, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a frame source nobody binds: a silent detector
        probe.bind(("127.0.0.1", 0))
        stream = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    silent = WriterProcess(WriterOptions(stream=stream, data_root=tmp_path), log_file=tmp_path / "writer.log")
    silent.start()
    try:
        with init_devices():
            quiet = DaqifDetector(silent.grpc_address, tmp_path)

        @bpp.stage_decorator([quiet])  # type: ignore[untyped-decorator]
        def one_trigger() -> Any:
            yield from bps.prepare(quiet, TriggerInfo(exposure_timeout=1.0), wait=True)
            yield from bps.trigger(quiet, wait=True)

        with pytest.raises(FailedStatus) as info:
            run_engine(one_trigger())
        assert isinstance(info.value.__cause__, TimeoutError)
        with WriterClient(silent.grpc_address) as client:
            assert writer_state_name(client.get_status().state) == "READY"
            assert client.get_logs(1)[0].message == "Interrupted."
        call_in_bluesky_event_loop(quiet.close())
    finally:
        silent.stop()
