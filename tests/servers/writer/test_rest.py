"""The REST adapter's own pieces, in-process (the routes are proven through the std_daq client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from servers.writer.rest import EncodedReply, PolledGets


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
