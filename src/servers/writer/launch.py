"""Start a `daqif-writer` subprocess on free ports, wait until it is ready, stop it.

For test harnesses (the `daqif.testing` plugin, this project's tests) and scripts:

    with start_writer("tcp://127.0.0.1:9999", data_root=tmp_path) as writer:
        StdDaqClient(writer.rest_url).get_status()
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

READY_PATTERN = re.compile(r"^daqif-writer ready rest=(?P<rest>\S+) grpc=(?P<grpc>\S+)")


class WriterStartError(RuntimeError):
    """The writer exited or did not become ready; the message holds the end of its log."""


@dataclass
class WriterProcess:
    """A running `daqif-writer` subprocess."""

    process: subprocess.Popen[str]
    rest_url: str  # e.g. http://127.0.0.1:40123
    grpc_target: str  # e.g. 127.0.0.1:40124
    log_file: Path | None = None
    _stdout_lines: queue.Queue[str] = field(default_factory=queue.Queue, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def data_path_pids(self) -> list[int]:
        """Pids of the writer's child processes (the data path, and helpers multiprocessing started)."""
        return _children(self.process.pid)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after `timeout`); return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.data_path_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> WriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(p) for p in handle.read().split())
    return children


def writer_command(
    stream: str,
    *,
    data_root: Path,
    config: Path | None = None,
    allowed_roots: Sequence[Path] = (),
    socket_type: str = "pull",
    redis_url: str | None = None,
    redis_maxlen: int | None = None,
    sync_timeout: float | None = None,
    host: str = "127.0.0.1",
    rest_port: int = 0,
    grpc_port: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of a writer (ports 0: the writer picks free ones and reports them)."""
    command = [
        sys.executable,
        "-m",
        "servers.writer.main",
        "--host",
        host,
        "--rest-port",
        str(rest_port),
        "--grpc-port",
        str(grpc_port),
        "--stream",
        stream,
        "--socket",
        socket_type,
        "--data-root",
        str(data_root),
    ]
    if config is not None:
        command += ["--config", str(config)]
    for root in allowed_roots:
        command += ["--allowed-root", str(root)]
    if redis_url is not None:
        command += ["--redis-url", redis_url]
    if redis_maxlen is not None:
        command += ["--redis-maxlen", str(redis_maxlen)]
    if sync_timeout is not None:
        command += ["--sync-timeout", str(sync_timeout)]
    return command + list(extra_args)


def start_writer(
    stream: str,
    *,
    data_root: Path,
    log_file: Path | None = None,
    ready_timeout: float = 60.0,
    **options: Any,
) -> WriterProcess:
    """Start a writer (options: those of `writer_command`) and return once it prints its ready line.

    Its log (stderr) is appended to `log_file` (default: this process's stderr). Raises
    `WriterStartError` if it exits or is not ready within `ready_timeout`.
    """
    command = writer_command(stream, data_root=data_root, **options)
    log_handle: IO[str] | None = open(log_file, "a") if log_file is not None else None  # noqa: SIM115
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_handle,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        if log_handle is not None:
            log_handle.close()
    lines: queue.Queue[str] = queue.Queue()

    def pump(stdout: IO[str]) -> None:  # keeps the pipe drained for the writer's lifetime
        for line in stdout:
            lines.put(line)
        lines.put("")

    assert process.stdout is not None
    threading.Thread(target=pump, args=(process.stdout,), daemon=True).start()
    deadline = time.monotonic() + ready_timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.01))
        except queue.Empty:
            line = None
        if line:
            match = READY_PATTERN.match(line)
            if match:
                return WriterProcess(process, match["rest"], match["grpc"], log_file, lines)
            continue
        if line == "" or process.poll() is not None or remaining <= 0:
            process.kill()
            process.wait()
            tail = log_file.read_text()[-3000:] if log_file is not None and log_file.exists() else ""
            why = (
                f"exited with code {process.returncode}"
                if line == ""
                else f"not ready after {ready_timeout} s"
            )
            raise WriterStartError(f"daqif-writer {why}: {' '.join(command)}\n{tail}")


@contextlib.contextmanager
def running_writer(stream: str, *, data_root: Path, **options: Any) -> Iterator[WriterProcess]:
    """`start_writer` as a context manager that always stops the writer."""
    writer = start_writer(stream, data_root=data_root, **options)
    try:
        yield writer
    finally:
        writer.stop()
