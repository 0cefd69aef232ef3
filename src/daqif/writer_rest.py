"""A small typed client of the std_daq REST API (DESIGN §5), for the command-line tools.

The wire calls are those of the published `std_daq_client` 1.3.x (same paths, bodies and
envelope); the difference is the errors: a refused request raises `WriterRefused` with the
writer's message, anything else (unreachable, HTTP error, not the envelope) `WriterRequestError`.
"""

from __future__ import annotations

import os
from typing import Any

import requests

from daqif import defaults

DEFAULT_URL = defaults.WRITER_REST_URL
URL_ENV = "STD_DAQ_API_URL"


def default_url() -> str:
    """`STD_DAQ_API_URL`, else http://127.0.0.1:5000."""
    return os.environ.get(URL_ENV) or DEFAULT_URL


class WriterRestError(Exception):
    """A std_daq REST call that did not succeed; `message` is one line for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WriterRefused(WriterRestError):
    """The writer refused the request (HTTP 200, `status: "error"`): busy, bad path, bad config…"""


class WriterRequestError(WriterRestError):
    """The request failed before the writer could answer it: unreachable, malformed (HTTP 422), …"""


class WriterRestClient:
    """Calls of the std_daq REST API; each returns the payload of the envelope."""

    def __init__(self, url_base: str | None = None, timeout: float = 10.0) -> None:
        self.url_base = (url_base or default_url()).rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, key: str, body: Any = None, timeout: float | None = None) -> Any:
        url = self.url_base + path
        try:
            response = requests.request(method, url, json=body, timeout=timeout or self.timeout)
        except requests.ConnectionError as exc:
            raise WriterRequestError(f"cannot reach the writer at {self.url_base}: {_reason(exc)}") from exc
        except requests.Timeout as exc:
            raise WriterRequestError(
                f"the writer at {self.url_base} did not answer {method} {path} in time"
            ) from exc
        except requests.RequestException as exc:
            raise WriterRequestError(f"{method} {url} failed: {exc}") from exc
        try:
            envelope = response.json()
        except ValueError:
            envelope = None
        message = envelope.get("message") if isinstance(envelope, dict) else None
        if response.status_code != 200:
            detail = message or response.reason or "no message"
            raise WriterRequestError(f"{method} {path} failed with HTTP {response.status_code}: {detail}")
        if not isinstance(envelope, dict) or "status" not in envelope:
            raise WriterRequestError(
                f"{method} {path}: the answer is not a std_daq response: {response.text[:200]!r}"
            )
        if envelope["status"] != "ok":
            raise WriterRefused(str(message or "the writer refused the request"))
        return envelope.get(key)

    def get_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/writer/status", "writer")
        return result

    def get_config(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/daq/config", "config")
        return result

    def set_config(self, daq_config: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/daq/config", "config", daq_config, timeout=60.0)
        return result

    def get_logs(self, n_last_logs: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/daq/logs/{n_last_logs}", "logs")
        return result

    def get_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/daq/stats", "stats")
        return result

    def get_deployment_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/daq/deployment", "deployment")
        return result

    def start_writer_async(self, write_request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/writer/write_async", "writer", write_request, timeout=30.0
        )
        return result

    def start_writer_sync(self, write_request: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/writer/write_sync", "writer", write_request, timeout=timeout
        )
        return result

    def stop_writer(self, output_file: str | None = None) -> dict[str, Any]:
        """The std_daq stop; with `output_file` (a daqif extension) only the write of that file
        is stopped, and the writer refuses while another write runs (docs/writer.md)."""
        body = {} if output_file is None else {"output_file": output_file}
        result: dict[str, Any] = self._call("POST", "/writer/stop", "writer", body, timeout=60.0)
        return result


def _reason(exc: Exception) -> str:
    # requests nests the OS error several levels deep; its innermost text is what a user recognises.
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    return str(inner) or type(inner).__name__
