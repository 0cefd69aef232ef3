"""Start and stop a `daqif-dpm-server` subprocess (tests, benchmarks, `daqif.testing`).

    with DpmServerProcess(tmp_path, allowed_roots=[data]) as server:
        client = DpmClient(server.address)
        ...
        server.kill()      # SIGKILL, as a crash
        server.start()     # same workspace, same port

The server's stdout and stderr go to `<directory>/dpm-server.log`; `start()` waits for the ready
line and a SERVING health check.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.dpm.main import READY_PREFIX

_READY = re.compile(re.escape(READY_PREFIX) + r" (\S+):(\d+)")


class ServerStartError(RuntimeError):
    """The server did not become ready; the message holds the end of its log."""


class DpmServerProcess:
    """A DPM server subprocess with its workspace in `directory` (unless `workspace` is given)."""

    def __init__(
        self,
        directory: Path,
        *,
        workspace: Path | None = None,
        allowed_roots: Sequence[Path] = (),
        data_root: Path | None = None,
        config: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.workspace = Path(workspace) if workspace else self.directory / "dpm-workspace"
        self.allowed_roots = [Path(r) for r in allowed_roots]
        self.data_root = data_root
        self.config = dict(config or {})
        self.host = host
        self.port = port
        self.env = env
        self.log_path = self.directory / "dpm-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "servers.dpm.main", "--host", self.host, "--port", str(self.port)]
        argv += ["--workspace", str(self.workspace)]
        for root in self.allowed_roots:
            argv += ["--allowed-root", str(root)]
        if self.data_root is not None:
            argv += ["--data-root", str(self.data_root)]
        if self.config:
            config_path = self.directory / "dpm-config.json"
            config_path.write_text(json.dumps(self.config, indent=1))
            argv += ["--config", str(config_path)]
        return argv

    def start(self, timeout: float = 30.0) -> DpmServerProcess:
        """Start the server (again: same workspace and, once known, same port); wait until ready."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        deadline = time.monotonic() + timeout
        while True:
            match = _READY.search(self._log_from(offset))
            if match:
                self.port = int(match.group(2))
                break
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"daqif-dpm-server exited with {self.process.returncode}:\n{self._tail(offset)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"daqif-dpm-server not ready within {timeout} s:\n{self._tail(offset)}"
                )
            time.sleep(0.02)
        self._wait_serving(deadline)
        return self

    def _wait_serving(self, deadline: float) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(f"daqif-dpm-server at {self.address} is not SERVING")
                time.sleep(0.05)

    def _log_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _tail(self, offset: int = 0, lines: int = 30) -> str:
        return "\n".join(self._log_from(offset).splitlines()[-lines:])

    def log_text(self) -> str:
        """Everything the server wrote so far (all runs)."""
        return self._log_from(0)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout`; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server (a crash); its children die with it (PR_SET_PDEATHSIG)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> DpmServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
