"""The std_daq REST API (DESIGN §5), compatible with the published `std_daq_client` 1.3.x.

Every response is `{"status": "ok"|"error", "message": str, <payload key>: ...}`. A refused
request (`DaqException` from the core: busy, bad path, writer failure) and a body whose fields are
wrong (a missing or non-integer `n_images`, `n_images < 1`, an unknown key, a non-integer
`run_id`, an invalid config field) are HTTP 200 with `status: "error"` and a message naming the
field: the client raises `StdDaqAdminException` with it. Only a request that has no JSON object
to validate (not JSON, an array, no body) or a bad path parameter gets HTTP 422 (the client
raises `RuntimeError`).

The bodies are the pydantic models of `models.py`, so `/openapi.json` describes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from daqif.errors import DaqException
from servers.writer.core import WriterCore
from servers.writer.models import DaqConfig, WriteRequest, describe_errors

# What the body of each route is called in an error message.
_BODY_NAMES = {
    "/writer/write_async": "write request",
    "/writer/write_sync": "write request",
    "/daq/config": "config",
}


def _ok(message: str, key: str, payload: Any) -> JSONResponse:
    return JSONResponse({"status": "ok", "message": message, key: payload})


def _error(message: str, http_status: int = 200) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message}, status_code=http_status)


def _is_field_error(error: Mapping[str, Any]) -> bool:
    """An error about one field of a JSON object body (not about the body as a whole)."""
    loc: Sequence[Any] = error.get("loc", ())
    return len(loc) > 1 and loc[0] == "body" and error.get("type") != "json_invalid"


def create_app(core: WriterCore) -> FastAPI:
    """The FastAPI application serving `core`; the core's lifecycle is the caller's."""
    app = FastAPI(title="daqif writer (std_daq REST API)", version="1.3")

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

    @app.get("/writer/status")
    async def get_status() -> JSONResponse:
        status = core.status()
        return _ok(f"Writer is {status.state.value}", "writer", status.to_json())

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
    async def stop() -> JSONResponse:
        """Interrupt a running write; reset an UNKNOWN writer. Always accepted."""
        # The body ({} from the client) carries nothing; it is not parsed so that any body works.
        status = await core.stop()
        return _ok("Writing stopped.", "writer", status.to_json())

    @app.get("/daq/config")
    async def get_config() -> JSONResponse:
        config = core.config
        return _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json())

    @app.post("/daq/config")
    async def set_config(update: DaqConfig) -> JSONResponse:
        """Change the fields given (a partial or full config); refused while writing."""
        config = await core.set_config(update)
        return _ok(f"DAQ configured for bit_depth={config.bit_depth}.", "config", config.to_json())

    @app.get("/daq/stats")
    async def get_stats() -> JSONResponse:
        return _ok(f"DAQ statistics for {detector_name()}.", "stats", core.stats().to_json())

    @app.get("/daq/logs/{n_logs}")
    async def get_logs(n_logs: Annotated[int, Path(ge=0)]) -> JSONResponse:
        logs = [entry.to_json() for entry in core.logs(n_logs)]
        return _ok(f"DAQ logs for {detector_name()}.", "logs", logs)

    @app.get("/daq/deployment")
    async def get_deployment() -> JSONResponse:
        return _ok(f"Deployment status for {detector_name()}.", "deployment", core.deployment().to_json())

    return app
