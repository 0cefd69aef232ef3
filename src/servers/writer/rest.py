"""The std_daq REST API (DESIGN §5), compatible with the published `std_daq_client` 1.3.x.

Every response is `{"status": "ok"|"error", "message": str, <payload key>: ...}`. A refused
request (`DaqException` from the core: busy, bad path, writer failure) and a body whose fields are
wrong (a missing or non-integer `n_images`, `n_images < 1`, an unknown key, a non-integer
`run_id`, an invalid config field) are HTTP 200 with `status: "error"` and a message naming the
field: the client raises `StdDaqAdminException` with it. Only a request that has no JSON object
to validate (not JSON, an array, no body) or a bad path parameter gets HTTP 422 (the client
raises `RuntimeError`).

The bodies are the pydantic models of `models.py`, so `/openapi.json` describes them.

`GET /metrics` (not part of the std_daq API) serves the writer's Prometheus metrics
(`metrics.py`) in the text exposition format. `GET /daq/preview` (PNG, `?format=jpeg`) and
`GET /daq/live` (MJPEG) show the live stream (`preview.py`), when the writer has one; without
one they are HTTP 404, before the first frame `/daq/preview` is HTTP 503, in the usual envelope.

The server never answers 500 because of what a client sent: a body over `MAX_BODY_BYTES` is
HTTP 413 (refused before it is read, or as soon as it passes the limit); a body nested too deeply
for the JSON parser is HTTP 422; FastAPI's own refusals (unknown route, wrong method) keep their
code, in the same envelope; any other unexpected error is logged and answered as HTTP 200
`status: "error"` naming it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daqif.errors import DaqException, bounded, quote
from servers.writer.core import WriterCore
from servers.writer.models import DaqConfig, WriteRequest, describe_errors
from servers.writer.preview import MJPEG_BOUNDARY, LivePreview, mjpeg_parts

_log = logging.getLogger(__name__)

# The largest body a request may have. The biggest legitimate one, a full config, is a few KiB.
MAX_BODY_BYTES: Final = 1 << 20

# What the body of each route is called in an error message.
_BODY_NAMES = {
    "/writer/write_async": "write request",
    "/writer/write_sync": "write request",
    "/daq/config": "config",
}


def stop_target(body: bytes) -> str | None:
    """The `output_file` a ``POST /writer/stop`` body names, or None for the std_daq stop.

    The std_daq body (``{}`` from `std_daq_client`, or none) names nothing, and any body that is
    not a JSON object with an ``output_file`` key is taken as the std_daq stop, as before this
    extension. ``{"output_file": "<the write's output_file>"}`` stops that write only
    (`WriterCore.stop`; docs/writer.md, "Stopping only one's own write"); a value that is not a
    string is refused, naming it.
    """
    try:
        request = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict) or "output_file" not in request:
        return None
    output_file = request["output_file"]
    if not isinstance(output_file, str):
        raise DaqException.invalid_argument(
            "output_file of the stop request must be the text of the write's output_file, "
            f"got {quote(output_file)}"
        )
    return output_file


def _ok(message: str, key: str, payload: Any) -> JSONResponse:
    return JSONResponse({"status": "ok", "message": message, key: payload})


def _error(message: str, http_status: int = 200) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message}, status_code=http_status)


def _is_field_error(error: Mapping[str, Any]) -> bool:
    """An error about one field of a JSON object body (not about the body as a whole)."""
    loc: Sequence[Any] = error.get("loc", ())
    return len(loc) > 1 and loc[0] == "body" and error.get("type") != "json_invalid"


class EncodedReply:
    """The encoded body of a GET route, encoded again only when what it shows has changed.

    Many clients poll the status several times a second; answering them from bytes already made
    saves the JSON work of each poll (docs/writer.md, "Status polling"). `key` is the snapshot the
    body shows (the core's status objects are immutable values, so `==` says it changed).
    """

    def __init__(self) -> None:
        self._key: object = None
        self._body = b""

    def body(self, key: object, build: Callable[[], JSONResponse]) -> bytes:
        if not self._body or key != self._key:
            self._body = bytes(build().body)
            self._key = key
        return self._body

    def reply(self, key: object, build: Callable[[], JSONResponse]) -> Response:
        return Response(self.body(key, build), media_type="application/json")


class PolledGets:
    """ASGI middleware answering the polled GETs (`/writer/status`, `/daq/stats`, ...) with the
    bytes of their `EncodedReply`, before FastAPI's routing, dependency and exception layers:
    a status poll then costs the control plane the HTTP parsing and two ASGI sends, so 20
    clients polling as fast as they can take less of the CPU the data path needs. The same
    routes stay declared in FastAPI (OpenAPI, HEAD), answering the same bytes.
    """

    def __init__(self, app: ASGIApp, bodies: Mapping[str, Callable[[], bytes]]) -> None:
        self.app = app
        self.bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            body_of = self.bodies.get(scope["path"])
            if body_of is not None:
                try:
                    body = body_of()
                except Exception:  # a bug: FastAPI's route fails the same way and answers it
                    await self.app(scope, receive, send)
                    return
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """A request body passed `MAX_BODY_BYTES` while it was being read."""


class BodyLimit:
    """ASGI middleware refusing bodies over `limit` bytes with HTTP 413, before they are buffered."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(self.limit)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body without Content-Length
                raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(f"malformed request: the body is larger than {limit} bytes", 413)


def create_app(
    core: WriterCore, metrics: CollectorRegistry | None = None, preview: LivePreview | None = None
) -> FastAPI:
    """The FastAPI application serving `core` (and `metrics` at `GET /metrics`, when given);
    the core's lifecycle is the caller's."""
    app = FastAPI(title="daqif writer (std_daq REST API)", version="1.3")
    app.add_middleware(BodyLimit)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown route, wrong method, a body its parser gave up on) in
        # the std_daq envelope; a JSON body nested deeper than the parser's recursion limit is one.
        if isinstance(exc.__cause__, BodyTooLarge):
            return _too_large(MAX_BODY_BYTES)
        if isinstance(exc.__cause__, RecursionError):
            return _error("malformed request: the body is nested too deeply; send a flat JSON object", 422)
        return _error(f"malformed request: {bounded(str(exc.detail), 200)}", exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault; still an answer the std_daq client can show.
        _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(f"internal error in the writer: {type(exc).__name__}: {bounded(str(exc), 200)}")

    @app.exception_handler(DaqException)
    async def _refused(request: Request, exc: DaqException) -> JSONResponse:
        return _error(exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and all(_is_field_error(error) for error in errors):
            name = _BODY_NAMES.get(request.url.path, "request")
            fields = [{**error, "loc": tuple(error["loc"][1:])} for error in errors]
            return _error(f"invalid {name}: {describe_errors(fields)}")
        if any(error.get("type") == "json_invalid" for error in errors):
            return _error("malformed request: the body is not valid JSON; send a JSON object", 422)
        if any(tuple(error.get("loc", ())) == ("body",) for error in errors):
            return _error("malformed request: the body must be a JSON object", 422)
        return _error(f"malformed request: {describe_errors(errors)}", 422)

    def detector_name() -> str:
        return core.config.detector_name

    status_reply, config_reply, stats_reply, deployment_reply = (EncodedReply() for _ in range(4))

    def status_body() -> bytes:
        status = core.status()
        return status_reply.body(
            status, lambda: _ok(f"Writer is {status.state.value}", "writer", status.to_json())
        )

    def config_body() -> bytes:
        config = core.config
        return config_reply.body(
            config,
            lambda: _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json()),
        )

    def stats_body() -> bytes:
        stats, name = core.stats(), detector_name()
        return stats_reply.body(
            (stats, name), lambda: _ok(f"DAQ statistics for {name}.", "stats", stats.to_json())
        )

    def deployment_body() -> bytes:
        deployment, name = core.deployment(), detector_name()
        return deployment_reply.body(
            (deployment, name),
            lambda: _ok(f"Deployment status for {name}.", "deployment", deployment.to_json()),
        )

    polled = {
        "/writer/status": status_body,
        "/daq/config": config_body,
        "/daq/stats": stats_body,
        "/daq/deployment": deployment_body,
    }
    app.add_middleware(PolledGets, bodies=polled)

    @app.get("/writer/status")
    async def get_status() -> Response:
        return Response(status_body(), media_type="application/json")

    @app.post("/writer/write_async")
    async def write_async(write: WriteRequest) -> JSONResponse:
        """Start recording; answers once the output file is open."""
        status = await core.start_write(write)
        return _ok("Writing started.", "writer", status.to_json())

    @app.post("/writer/write_sync")
    async def write_sync(write: WriteRequest) -> JSONResponse:
        """Record and answer when the write has ended (at most `--sync-timeout`)."""
        status = await core.write_sync(write)
        return _ok("Writing finished.", "writer", status.to_json())

    @app.post("/writer/stop")
    async def stop(request: Request) -> JSONResponse:
        """Interrupt a running write; reset an UNKNOWN writer. Always accepted, unless the body
        names the write to stop (a daqif extension, see `stop_target`)."""
        status = await core.stop(stop_target(await request.body()))
        return _ok("Writing stopped.", "writer", status.to_json())

    @app.get("/daq/config")
    async def get_config() -> Response:
        return Response(config_body(), media_type="application/json")

    @app.post("/daq/config")
    async def set_config(update: DaqConfig) -> JSONResponse:
        """Change the fields given (a partial or full config); refused while writing."""
        config = await core.set_config(update)
        return _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json())

    @app.get("/daq/stats")
    async def get_stats() -> Response:
        return Response(stats_body(), media_type="application/json")

    @app.get("/daq/logs/{n_logs}")
    async def get_logs(n_logs: Annotated[int, Path(ge=0)]) -> JSONResponse:
        logs = [entry.to_json() for entry in core.logs(n_logs)]
        return _ok(f"DAQ logs for {detector_name()}.", "logs", logs)

    @app.get("/daq/deployment")
    async def get_deployment() -> Response:
        return Response(deployment_body(), media_type="application/json")

    def need_preview() -> LivePreview:
        if preview is None:
            raise StarletteHTTPException(404, "this writer has no live stream; start it with --live-stream")
        return preview

    @app.get("/daq/preview", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def get_preview(
        image_format: Annotated[Literal["png", "jpeg"], Query(alias="format")] = "png",
    ) -> Response:
        """daqif extension: the latest frame of the live stream, scaled for display (PNG or JPEG)."""
        image = await need_preview().image(image_format)
        if image is None:
            raise StarletteHTTPException(
                503, "no frame sampled yet: the detector has sent none since the writer started"
            )
        headers = {"Cache-Control": "no-store", "X-Frame-Id": str(image.image_id)}
        return Response(image.body, media_type=image.media_type, headers=headers)

    @app.get("/daq/live", response_class=StreamingResponse)
    async def get_live() -> StreamingResponse:
        """daqif extension: each new frame of the live stream as a JPEG part (MJPEG)."""
        return StreamingResponse(
            mjpeg_parts(need_preview()),
            media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
            headers={"Cache-Control": "no-store"},
        )

    if metrics is not None:
        registry = metrics

        @app.get("/metrics", include_in_schema=False)
        async def get_metrics() -> Response:
            """Prometheus text exposition of the writer's metrics."""
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
