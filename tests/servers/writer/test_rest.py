"""The REST adapter's own pieces, in-process (the std_daq routes are proven through the std_daq client,
`test_std_daq_client.py`), and its daqif extensions against a real writer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from daqif.testing import wait_for
from daqif.writer_rest import WriterRefused, WriterRestClient
from servers.common.launch import WriterProcess
from servers.writer.rest import EncodedReply, PolledGets

from .conftest import Simulator


def test_a_reply_is_encoded_once_per_snapshot_and_again_when_the_snapshot_changes() -> None:
    encoded = EncodedReply()
    builds: list[str] = []

    def build(value: str) -> JSONResponse:
        builds.append(value)
        return JSONResponse({"status": "ok", "value": value})

    first = encoded.reply(("READY", 0), lambda: build("a"))
    again = encoded.reply(("READY", 0), lambda: build("b"))
    changed = encoded.reply(("WRITING", 0), lambda: build("c"))

    assert builds == ["a", "c"]
    assert first.body == again.body == b'{"status":"ok","value":"a"}'
    assert changed.body == b'{"status":"ok","value":"c"}'
    assert changed.media_type == "application/json"


def asgi_get(app: Any, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP request through the ASGI app, in this process: (status, headers, body)."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_polled_gets_are_answered_with_their_bytes_and_everything_else_reaches_the_app() -> None:
    app = FastAPI()

    @app.get("/writer/status")
    def routed_status() -> dict[str, str]:
        return {"from": "fastapi"}

    @app.get("/daq/logs/{n}")
    def routed_logs(n: int) -> dict[str, int]:
        return {"logs": n}

    def failing() -> bytes:
        raise RuntimeError("a bug")

    bodies = {"/writer/status": lambda: b'{"status":"ok"}', "/daq/stats": failing}
    app.add_middleware(PolledGets, bodies=bodies)

    status, headers, body = asgi_get(app, "GET", "/writer/status")
    assert (status, body) == (200, b'{"status":"ok"}')
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == b"15"
    status, _headers, body = asgi_get(app, "GET", "/daq/logs/3")  # not polled: routed
    assert (status, json.loads(body)) == (200, {"logs": 3})
    assert asgi_get(app, "POST", "/writer/status")[0] == 405  # only GET takes the short way
    assert asgi_get(app, "GET", "/daq/stats")[0] == 404  # a failing body falls through to the app


def test_a_stop_body_naming_a_write_stops_that_write_and_never_another(
    writer: WriterProcess, simulator: Simulator, data_root: Path
) -> None:
    client = WriterRestClient(writer.rest_url)
    mine, other = str(data_root / "mine.h5"), str(data_root / "other.h5")
    client.start_writer_async({"output_file": mine, "n_images": 100_000})
    stopped = client.stop_writer(output_file=mine)
    assert (stopped["acquisition"]["info"]["output_file"], stopped["acquisition"]["message"]) == (
        mine,
        "Interrupted.",
    )

    # Another client's write, the simulator paused so that it surely still runs: a stop naming
    # the ended write is refused and stops nothing.
    os.kill(simulator.pid, signal.SIGSTOP)
    try:
        client.start_writer_async({"output_file": other, "n_images": 20})
        with pytest.raises(WriterRefused) as info:
            client.stop_writer(output_file=mine)
        assert info.value.message == (
            f"writer is writing {other!r}, not {mine!r} (which is not running); nothing was stopped"
        )
        refused = requests.post(writer.rest_url + "/writer/stop", json={"output_file": 7}, timeout=10).json()
        assert refused["status"] == "error"
        assert refused["message"].endswith(
            "output_file of the stop request must be the text of the write's output_file, got 7"
        )
        assert client.get_status()["state"] == "WRITING"
    finally:
        os.kill(simulator.pid, signal.SIGCONT)
    wait_for(lambda: client.get_status()["state"] == "READY")
    ended = client.get_status()["acquisition"]
    assert (ended["info"]["output_file"], ended["message"]) == (other, "Completed.")

    # Any other body is the std_daq stop, as before: it stops whatever runs.
    for body in (b"{}", b"", b"not json", b'["output_file"]', b'{"run_id": 1}'):
        client.start_writer_async({"output_file": str(data_root / "any.h5"), "n_images": 100_000})
        reply = requests.post(writer.rest_url + "/writer/stop", data=body, timeout=10).json()
        assert (reply["status"], reply["writer"]["acquisition"]["message"]) == ("ok", "Interrupted."), body
