"""The status page's HTTP app: the page, its static files and the server-sent events feeding it.

Read-only: every route is a GET, none reaches a server except through the board the feeds fill.

- `GET /`: the page (`static/index.html`), which loads `static/app.js` and `static/style.css`
  (everything is served from this package: no CDN);
- `GET /events`: `text/event-stream`; `snapshot` first, then each change of the board
  (`board.py`), one JSON `data:` line per event, a comment every `KEEPALIVE_S` so that proxies
  keep the stream open. The browser's `EventSource` reconnects by itself if this server restarts;

The live preview: the snapshot's `preview` field (`board.py`) is the URL of the writer's
`GET /daq/live` (MJPEG) when the page was started with `--writer-preview URL`, else `null`. The
page shows that stream in an `<img>` (the browser reads the URL itself; this server only names it),
and says "no live preview" while it is not set or the writer serves none (tried again every 5 s).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Final

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from servers.web.board import StatusBoard

KEEPALIVE_S: Final = 15.0


def _static_dir() -> str:
    return str(resources.files("servers.web") / "static")


def encode_event(kind: str, data: object) -> bytes:
    """One server-sent event (`data` as one line of JSON)."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def create_app(board: StatusBoard) -> FastAPI:
    app = FastAPI(title="daqif status page", docs_url=None, redoc_url=None, openapi_url=None)
    static = _static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{static}/index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(f"{static}/favicon.svg", media_type="image/svg+xml")

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            async with board.subscribe() as queue:
                yield b"retry: 1000\n\n"  # the browser reconnects after 1 s if the stream breaks
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield encode_event(kind, data)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
