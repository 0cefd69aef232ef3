"""The DPM's gRPC edge from a real client: error codes, invalid specifications, storage, Exit."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daqif.errors import ErrorCode
from daqif.testing import wait_for
from daqif.v1 import dpm_pb2

from .dpm_helpers import (
    DpmHarness,
    DpmServerProcess,
    error_of,
    hdf5_source,
    keyword_source,
    make_spec,
    wait_alert,
    wait_archived,
    wait_substate,
)


def test_every_error_code_comes_with_the_daq_id_and_a_message(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    missing = dpm.data / "raw" / "missing.h5"

    exc = error_of(lambda: client.queue_daq("{not json"))
    assert exc.code is ErrorCode.INVALID_ARGUMENT
    assert "not valid JSON" in exc.message

    exc = error_of(lambda: client.queue_daq(make_spec("BAD1", [hdf5_source("d", "/etc/passwd")])))
    assert (exc.code, exc.id) == (ErrorCode.INVALID_ARGUMENT, "BAD1")
    assert "sources[0].location" in exc.message and "outside the allowed roots" in exc.message

    client.queue_daq(make_spec("WAIT1", [hdf5_source("d", missing)], [dpm.receiver]))
    wait_alert(client, "WAIT1", "collecting:d")

    exc = error_of(lambda: client.queue_daq(make_spec("WAIT1", [keyword_source()])))
    assert (exc.code, exc.id) == (ErrorCode.ALREADY_EXISTS, "WAIT1")
    assert "queued before" in exc.message

    exc = error_of(lambda: client.get_daq_status("NOPE"))
    assert (exc.code, exc.id) == (ErrorCode.NOT_FOUND, "NOPE")
    assert "no DAQ with id 'NOPE'" in exc.message

    # FAILED_PRECONDITION: a DAQ held in SCHEDULED (no active slots) has no step to retry.
    held_server = dpm.start({"max_active_daqs": 0})
    held_client = dpm.client(held_server)
    held_client.queue_daq(make_spec("HELD", [hdf5_source("d", missing)], [dpm.receiver]))
    exc = error_of(lambda: held_client.retry_merge_daq("HELD"))
    assert (exc.code, exc.id) == (ErrorCode.FAILED_PRECONDITION, "HELD")
    assert "SCHEDULED" in exc.message and "has not started" in exc.message

    # INTERNAL: an abort whose cleanup fails (fail-fast). The collected-sources directory is
    # replaced by a regular file, so removing it fails; the DAQ stays ABORTING with an alert.
    sources = server.workspace / "daqs" / "WAIT1" / "sources"
    shutil.rmtree(sources)
    sources.write_text("in the way")
    exc = error_of(lambda: client.abort_daq("WAIT1"))
    assert (exc.code, exc.id) == (ErrorCode.INTERNAL, "WAIT1")
    assert "abort cleanup failed" in exc.message
    status = client.get_daq_status("WAIT1")
    assert status.substate == dpm_pb2.DAQ_SUB_STATE_ABORTING
    assert status.error and [a.id for a in status.alerts] == ["aborting"]
    exc = error_of(lambda: client.retry_merge_daq("WAIT1"))
    assert exc.code is ErrorCode.FAILED_PRECONDITION and "AbortDaq again" in exc.message

    sources.unlink()
    assert client.abort_daq("WAIT1").id == "WAIT1"
    assert wait_archived(client, server, "WAIT1")["substate"] == "ABORTED"
    exc = error_of(lambda: client.get_daq_status("WAIT1"))
    assert (exc.code, exc.id) == (ErrorCode.NOT_FOUND, "WAIT1")
    assert "archived" in exc.message


def _base(dpm: DpmHarness) -> dict[str, Any]:
    return make_spec(
        "INVALID", [hdf5_source("det1", dpm.data / "raw" / "det1.h5"), keyword_source()], [dpm.receiver]
    )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        last = keys[-1]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return apply


_DELETE = object()

# (case, change to a valid specification or raw text, words the message must contain)
INVALID: list[tuple[str, Any, list[str]]] = [
    ("bad JSON", '{"id": ', ["not valid JSON"]),
    ("not an object", "[1, 2]", ["expected a JSON object"]),
    ("missing id", _set("id", _DELETE), ["'id' is a required property"]),
    ("id not a string", _set("id", 42), ["id", "not of type"]),
    ("id with a slash", _set("id", "a/b"), ["id", "letters, digits"]),
    ("missing target", _set("target", _DELETE), ["'target' is a required property"]),
    ("unknown source type", _set("sources.1.type", "fitsTable"), ["sources[1].type", "unknown type"]),
    ("location missing", _set("sources.0.location", _DELETE), ["sources[0]", "'location'"]),
    ("relative location", _set("sources.0.location", "raw/det1.h5"), ["sources[0].location", "absolute"]),
    ("traversing location", _set("sources.0.location", "/data/../etc/passwd"), ["sources[0].location", ".."]),
    ("location outside roots", _set("sources.0.location", "/etc/passwd"), ["sources[0].location", "outside"]),
    ("symlink leading out", "SYMLINK", ["sources[0].location", "outside the allowed roots", "resolves to"]),
    (
        "value keyword name too long",
        _set("sources.1.keywords.0.name", "LONGNAME9"),
        ["sources[1].keywords[0].name", "too long"],
    ),
    ("keyword value not scalar", _set("sources.1.keywords.0.value", [1]), ["sources[1].keywords[0].value"]),
    (
        "bad filter pattern",
        _set("sources.0.keywordRules", [{"type": "filter", "selectionPatterns": ["INS *"]}]),
        ["sources[0].keywordRules[0].selectionPatterns[0]", "selection pattern"],
    ),
    (
        "bad transform regex",
        _set(
            "sources.0.keywordRules",
            [{"type": "transform", "selectionPatterns": ["+e INS *"], "regex": "(", "format": "X"}],
        ),
        ["sources[0].keywordRules[0].regex", "regular expression"],
    ),
    ("unknown rule type", _set("sources.0.keywordRules", [{"type": "sort"}]), ["keywordRules[0].type"]),
    ("duplicate sourceName", _set("sources.1.sourceName", "det1"), ["sources[1].sourceName", "already used"]),
    ("no sources", _set("sources", []), ["sources", "no sources"]),
    ("relative receiver", _set("receivers.0.path", "olas"), ["receivers[0].path", "absolute"]),
    ("receiver outside roots", _set("receivers.0.path", "/tmp"), ["receivers[0].path", "outside"]),
    ("unknown receiver type", _set("receivers.0.type", "ftpReceiver"), ["receivers[0].type", "unknown type"]),
    ("receiver in the workspace", "WORKSPACE", ["receivers[0].path", "inside the DPM workspace"]),
    ("unknown property", _set("extra", True), ["extra: unknown field", "allowed here are"]),
]


def invalid_text(case: str, dpm: DpmHarness, server: DpmServerProcess) -> tuple[str, str]:
    """The specification text of `case` and the DAQ id its error must carry."""
    change = next(c[1] for c in INVALID if c[0] == case)
    doc = _base(dpm)
    if change == "SYMLINK":
        link = dpm.data / "outside"
        if not link.is_symlink():
            link.symlink_to("/etc")
        doc["sources"][0]["location"] = str(link / "passwd")
    elif change == "WORKSPACE":
        doc["receivers"][0]["path"] = str(server.workspace / "daqs")
    elif isinstance(change, str):
        return change, ""
    else:
        change(doc)
    daq_id = doc.get("id")
    return json.dumps(doc), daq_id if isinstance(daq_id, str) else ""


@pytest.mark.parametrize("case", [c[0] for c in INVALID])
def test_invalid_specification_is_refused_naming_the_problem(dpm: DpmHarness, case: str) -> None:
    # The workspace lies under the allowed root, as by default, so that the workspace case applies.
    server = dpm.start(workspace=dpm.data / "dpm")
    client = dpm.client(server)
    text, daq_id = invalid_text(case, dpm, server)
    exc = error_of(lambda: client.queue_daq(text))
    assert exc.code is ErrorCode.INVALID_ARGUMENT, exc
    for word in next(c[2] for c in INVALID if c[0] == case):
        assert word in exc.message, (word, exc.message)
    assert exc.id == daq_id


def test_server_keeps_serving_after_every_invalid_specification(dpm: DpmHarness) -> None:
    server = dpm.start(workspace=dpm.data / "dpm")
    client = dpm.client(server)
    for case, _, _ in INVALID:
        text, _ = invalid_text(case, dpm, server)
        assert error_of(lambda t=text: client.queue_daq(t)).code is ErrorCode.INVALID_ARGUMENT, case  # type: ignore[misc]
    for text in ["", "null", "\x00\xff"]:
        assert error_of(lambda t=text: client.queue_daq(t)).code is ErrorCode.INVALID_ARGUMENT  # type: ignore[misc]
    assert client.get_active_daqs() == []
    source = dpm.source("det1")
    client.queue_daq(make_spec("GOOD", [hdf5_source("det1", source), keyword_source()], [dpm.receiver]))
    final = wait_archived(client, server, "GOOD")
    assert final["substate"] == "COMPLETED"
    assert (dpm.receiver / "GOOD.product.h5").is_file()


def test_storage_status_reports_the_workspace_file_system(dpm: DpmHarness) -> None:
    server = dpm.start({"storage_report_interval_s": 0.05})
    client = dpm.client(server)
    status = client.query_storage_status()
    st = os.statvfs(server.workspace)
    assert status.path == str(server.workspace)
    assert status.capacity == st.f_blocks * st.f_frsize
    assert 0 < status.available <= status.free <= status.capacity

    reports = []
    for report in client.watch_storage_status(interval=0.05):
        reports.append(report)
        if len(reports) == 3:
            break
    assert [r.path for r in reports] == [str(server.workspace)] * 3
    assert reports[0].timestamp < reports[1].timestamp < reports[2].timestamp


def test_health_and_reflection_list_both_dpm_services(dpm: DpmHarness) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = dpm.start()
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "daqif.v1.DpmControl", "daqif.v1.DpmDaqControl"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"daqif.v1.DpmControl", "daqif.v1.DpmDaqControl"} <= names


def test_exit_replies_then_stops_the_server(dpm: DpmHarness) -> None:
    server = dpm.start()
    client = dpm.client(server)
    assert "exiting" in client.exit()
    assert server.wait(timeout=30) == 0


def test_watch_of_one_daq_starts_with_its_current_status(dpm: DpmHarness) -> None:
    server = dpm.start({"max_active_daqs": 0})
    client = dpm.client(server)
    client.queue_daq(make_spec("HELD", [keyword_source()]))
    first = next(client.watch_daq_status("HELD"))
    assert (first.id, first.substate) == ("HELD", dpm_pb2.DAQ_SUB_STATE_SCHEDULED)
    assert first.state == dpm_pb2.DAQ_STATE_MERGING
    assert [d.id for d in client.get_active_daqs()] == ["HELD"]
    wait_substate(client, "HELD", "SCHEDULED")


def test_get_active_daqs_answers_with_10000_daqs_each_with_a_long_alert(dpm: DpmHarness) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from servers.dpm.model import MAX_ALERT_CHARS

    # Each source path is 4,000 characters long and does not exist: the collecting alert quotes it.
    long_dir = "/".join(["d" * 200] * 19)
    server = dpm.start({"max_transfers": 8})
    client = dpm.client(server, timeout=120)

    def queue(i: int) -> None:
        location = dpm.data / long_dir / f"det{i}.h5"
        client.queue_daq(make_spec(f"MANY{i}", [hdf5_source("det", location)]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(queue, range(10_000)))
    wait_for(lambda: sum(1 for s in client.get_active_daqs() if s.error) == 10_000, 300, "10,000 alerts")
    daqs = client.get_active_daqs()
    assert len(daqs) == 10_000
    (alert,) = daqs[0].alerts
    assert alert.id == "collecting:det" and alert.description.startswith(f"source {dpm.data}")
    assert len(alert.description) <= MAX_ALERT_CHARS + 40 and "more characters)" in alert.description


def test_the_get_active_daqs_reply_is_the_librarys_encoding_and_follows_every_change() -> None:
    from servers.dpm.grpc_service import StatusMessages
    from servers.dpm.model import Alert, DaqStatusView, Severity, SubState

    def view(daq_id: str, message: str, alerts: int = 0) -> DaqStatusView:
        return DaqStatusView(
            id=daq_id,
            file_id=f"{daq_id}.f",
            substate=SubState.MERGING,
            alerts=tuple(Alert(f"a{i}", Severity.ERROR, "x" * 400, 1.0) for i in range(alerts)),
            result="",
            message=message,
            timestamp=2.5,
        )

    # Entries of 1-byte, 2-byte and 3-byte lengths (a DaqStatus of < 128, < 16,384 and more bytes).
    views = [view("A", "q"), view("B", "m" * 200), view("C", "long", alerts=50)]
    messages = StatusMessages()
    current = list(views)
    reply = messages.active_reply(lambda: current)
    library = dpm_pb2.GetActiveDaqsResponse(daqs=[messages(v) for v in views]).SerializeToString()
    assert reply == library
    assert len(messages(views[2]).SerializeToString()) >= 1 << 14
    current[0] = view("A", "collecting")
    assert messages.active_reply(lambda: current) == reply  # nothing published: the same reply
    messages.changed(current[0])
    decoded = dpm_pb2.GetActiveDaqsResponse.FromString(messages.active_reply(lambda: current))
    assert [(d.id, d.message) for d in decoded.daqs] == [("A", "collecting"), ("B", "m" * 200), ("C", "long")]
    del current[1]
    messages.changed(views[1])
    decoded = dpm_pb2.GetActiveDaqsResponse.FromString(messages.active_reply(lambda: current))
    assert [d.id for d in decoded.daqs] == ["A", "C"]
