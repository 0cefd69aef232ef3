"""The std_daq REST API (DESIGN §5), compatible with the published `std_daq_client` 1.3.x.

Every response is `{"status": "ok"|"error", "message": str, <payload key>: ...}`. A refused
request (`DaqException` from the core: busy, bad path, invalid config, writer failure) is HTTP 200
with `status: "error"` — the client raises `StdDaqAdminException`. A malformed request (not JSON,
a missing or mistyped field, `n_images < 1`) is HTTP 422 — the client raises `RuntimeError`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from daqif.errors import DaqException
from servers.writer.core import WriterCore, WriteRequest

_log = logging.getLogger(__name__)


class MalformedRequest(ValueError):
    """A request body that cannot be a valid request; answered with HTTP 422."""


def _ok(message: str, key: str, payload: Any) -> JSONResponse:
    return JSONResponse({"status": "ok", "message": message, key: payload})


def _error(message: str, http_status: int = 200) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message}, status_code=http_status)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise MalformedRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRequest(f"the request body is not valid JSON: {exc}") from exc


def parse_write_request(body: Any) -> WriteRequest:
    """The write request in `body`, or `MalformedRequest` naming the field that is wrong."""
    if not isinstance(body, dict):
        raise MalformedRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if "output_file" not in body:
        raise MalformedRequest("mandatory field missing: output_file")
    if "n_images" not in body:
        raise MalformedRequest("mandatory field missing: n_images")
    output_file, n_images, run_id = body["output_file"], body["n_images"], body.get("run_id")
    if not isinstance(output_file, str):
        raise MalformedRequest(
            f"output_file must be a string (an absolute path), got {json.dumps(output_file)}"
        )
    if isinstance(n_images, bool) or not isinstance(n_images, int):
        raise MalformedRequest(f"n_images must be an integer >= 1, got {json.dumps(n_images)}")
    if n_images < 1:
        raise MalformedRequest(f"invalid n_images={n_images}: must be an integer >= 1")
    if run_id is not None and (isinstance(run_id, bool) or not isinstance(run_id, int | str)):
        raise MalformedRequest(f"run_id must be an integer or a string, got {json.dumps(run_id)}")
    return WriteRequest(output_file=output_file, n_images=n_images, run_id=run_id)


def create_app(core: WriterCore) -> FastAPI:
    """The FastAPI application serving `core`; the core's lifecycle is the caller's."""
    app = FastAPI(title="daqif writer (std_daq REST API)", version="1.3")

    @app.exception_handler(DaqException)
    async def _refused(request: Request, exc: DaqException) -> JSONResponse:
        return _error(exc.message)

    @app.exception_handler(MalformedRequest)
    async def _malformed(request: Request, exc: MalformedRequest) -> JSONResponse:
        return _error(str(exc), 422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return _error(f"malformed request: {problems}", 422)

    def detector_name() -> str:
        return core.config.detector_name

    @app.get("/writer/status")
    async def get_status() -> JSONResponse:
        status = core.status()
        return _ok(f"Writer is {status.state.value}", "writer", status.to_json())

    @app.post("/writer/write_async")
    async def write_async(request: Request) -> JSONResponse:
        write = parse_write_request(await _json_body(request))
        status = await core.start_write(write)
        return _ok("Writing started.", "writer", status.to_json())

    @app.post("/writer/write_sync")
    async def write_sync(request: Request) -> JSONResponse:
        write = parse_write_request(await _json_body(request))
        status = await core.write_sync(write)
        return _ok("Writing finished.", "writer", status.to_json())

    @app.post("/writer/stop")
    async def stop() -> JSONResponse:
        # The body ({} from the client) carries nothing; it is not parsed so that any body works.
        status = await core.stop()
        return _ok("Writing stopped.", "writer", status.to_json())

    @app.get("/daq/config")
    async def get_config() -> JSONResponse:
        config = core.config
        return _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json())

    @app.post("/daq/config")
    async def set_config(request: Request) -> JSONResponse:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise MalformedRequest(f"the config must be a JSON object, got {type(body).__name__}")
        config = await core.set_config(body)
        return _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json())

    @app.get("/daq/stats")
    async def get_stats() -> JSONResponse:
        return _ok(f"DAQ statistics for {detector_name()}.", "stats", core.stats().to_json())

    @app.get("/daq/logs/{n_logs}")
    async def get_logs(n_logs: int) -> JSONResponse:
        if n_logs < 0:
            raise MalformedRequest(f"the number of logs must be >= 0, got {n_logs}")
        logs = [entry.to_json() for entry in core.logs(n_logs)]
        return _ok(f"DAQ logs for {detector_name()}.", "logs", logs)

    @app.get("/daq/deployment")
    async def get_deployment() -> JSONResponse:
        return _ok(f"Deployment status for {detector_name()}.", "deployment", core.deployment().to_json())

    return app
