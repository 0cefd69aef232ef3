"""The `daqif.testing` plugin, used the way an outside team uses it: from a test file in another
directory, with no conftest, through pytest's own `pytester`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from daqif.testing import wait_for

pytest_plugins = ["pytester"]

OUTSIDE_TEST = """
import h5py
from std_daq_client import StdDaqClient

from daqif.v1 import dpm_pb2


def test_dpm_server_fixture_completes_a_daq(dpm_server, tmp_path):
    source = dpm_server.data_root / "raw" / "src.h5"
    with h5py.File(source, "w") as f:
        f["x"] = [1, 2, 3]
        f.attrs["OBJECT"] = "PLUGIN"
    reply = dpm_server.client.queue_daq({
        "id": "PLUGIN.1", "target": {"fileId": "PLUGIN.1"},
        "sources": [{"type": "hdf5File", "sourceName": "s", "location": str(source)}],
        "receivers": [{"type": "olasReceiver", "path": str(dpm_server.receiver_dir)}],
    })
    final = dpm_server.client.wait_for(reply.id, timeout=60)
    assert final.substate == dpm_pb2.DAQ_SUB_STATE_COMPLETED
    assert (dpm_server.receiver_dir / "PLUGIN.1.h5").exists()


def test_writer_fixture_records_simulator_frames(writer, simulator):
    out = writer.raw_dir / "w.h5"
    status = StdDaqClient(writer.rest_url).start_writer_sync({"output_file": str(out), "n_images": 5})
    assert status["acquisition"]["message"] == "Completed."
    with h5py.File(out, "r") as f:
        assert f["SIM1/data"].shape == (5, *simulator.shape)


def test_dpm_server_killed_restarts_on_its_port_with_its_queue(dpm_server):
    address, pid = dpm_server.address, dpm_server.pid
    dpm_server.kill()
    dpm_server.restart()
    assert (dpm_server.address, dpm_server.pid != pid) == (address, True)
    assert dpm_server.client.get_active_daqs() == []
    assert "daqif-ready dpm" in (dpm_server.data_root / "logs" / "dpm.log").read_text()


def test_daq_system_fixture_shares_one_data_root(daq_system):
    assert daq_system.writer.data_root == daq_system.dpm.data_root == daq_system.data_root
    assert daq_system.dpm.client.get_active_daqs() == []
"""


def test_plugin_fixtures_work_from_an_outside_test_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_outside=OUTSIDE_TEST)
    result = pytester.runpytest_subprocess("-q", timeout=600)
    result.assert_outcomes(passed=4)


def test_wait_for_polls_until_a_truthy_value_and_returns_it() -> None:
    answers: Iterator[object] = iter([0, "", None, [], {"state": "READY"}, {"state": "later"}])
    assert wait_for(lambda: next(answers), timeout=60, interval=0) == {"state": "READY"}


def test_wait_for_names_what_it_waited_for_and_the_last_value() -> None:
    states = iter(["WRITING"] * 1000)
    with pytest.raises(AssertionError) as info:
        wait_for(lambda: next(states) == "READY", 0, "the writer READY", interval=0)
    assert str(info.value) == "the writer READY: not within 0 s (last value: False)"

    with pytest.raises(AssertionError) as info:
        wait_for(lambda: [], 0)
    assert re.fullmatch(
        r"test_wait_for_names_what_it_waited_for_and_the_last_value\.<locals>\.<lambda> "
        r"\(test_testing\.py:\d+\): not within 0 s \(last value: \[\]\)",
        str(info.value),
    ), str(info.value)


def test_wait_for_lets_an_exception_of_the_predicate_through() -> None:
    def refused() -> bool:
        raise ConnectionError("the server refused")

    with pytest.raises(ConnectionError, match="the server refused"):
        wait_for(refused, 60)
