"""Each daqif server's command line, built in one place from typed options.

`DpmOptions`, `WriterOptions` and `SimOptions` mirror the servers' flags (`None`: the server's own
default, so each default lives in one place, the server); `Command` is any other program that prints
a ready line. `pinned(ready)` gives the same options asking for the ports a ready line reported,
which is how the launcher (`servers.common.launch`) restarts a server on the same ports;
`with_ports(choose)` gives them with every port left to the server (0, `*`) chosen by `choose`,
which is how the launcher picks the ports of a first start (`launch.free_port`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field

from servers.common.ready import ReadyLine
from servers.common.tls import ServerTls

PortChooser = Callable[[str | None], int]
"""A free port on an interface (`None`: the server's default, loopback)."""


class ServerOptions(Protocol):
    """What the launcher needs of a server's options."""

    @property
    def server(self) -> str:
        """The name the server gives itself in its ready line."""
        ...

    def command(self) -> list[str]:
        """The command line."""
        ...

    def pinned(self, ready: ReadyLine) -> Self:
        """These options with every port replaced by the one `ready` reports (for a restart)."""
        ...

    def with_ports(self, choose: PortChooser) -> Self:
        """These options with every port left to the server (0, `*`) replaced by `choose(host)`."""
        ...


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _chosen(port: int | None, host: str | None, choose: PortChooser) -> int | None:
    return choose(host) if port == 0 else port


def _flag(argv: list[str], flag: str, value: object) -> None:
    if value is not None:
        argv += [flag, str(value)]


class DpmOptions(_Options):
    """The command line of `daqif-dpm-server` (`None`: the server's own default)."""

    server: ClassVar[str] = "dpm"

    host: str | None = None
    """Interface to bind (server default: loopback)."""
    port: int = Field(default=0, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    workspace: Path | None = None
    """Workspace directory (server default: `<data root>/dpm`)."""
    data_root: Path | None = None
    """Data root."""
    allowed_roots: tuple[Path, ...] = ()
    """Directories sources and receivers must lie under."""
    config: Path | None = None
    """JSON settings file (`servers.dpm.config`)."""
    log_level: str | None = None
    """Logging level."""
    tls: ServerTls | None = None
    """Serve gRPC over TLS (mutual TLS with a client CA); `None`: plain text."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on this port (0: a free one); `None`: no metrics endpoint."""

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "servers.dpm.main", "--port", str(self.port)]
        _flag(argv, "--metrics-port", self.metrics_port)
        _flag(argv, "--host", self.host)
        _flag(argv, "--workspace", self.workspace)
        _flag(argv, "--data-root", self.data_root)
        for root in self.allowed_roots:
            argv += ["--allowed-root", str(root)]
        _flag(argv, "--config", self.config)
        _flag(argv, "--log-level", self.log_level)
        return argv + (self.tls.flags() if self.tls is not None else [])

    def pinned(self, ready: ReadyLine) -> Self:
        update = {"port": ready.port("grpc")}
        if self.metrics_port is not None:
            update["metrics_port"] = ready.port("metrics")
        return self.model_copy(update=update)

    def with_ports(self, choose: PortChooser) -> Self:
        return self.model_copy(
            update={
                "port": _chosen(self.port, self.host, choose),
                "metrics_port": _chosen(self.metrics_port, self.host, choose),
            }
        )


class WriterOptions(_Options):
    """The command line of `daqif-writer` (`None`: the writer's own default)."""

    server: ClassVar[str] = "writer"

    stream: str
    """ZeroMQ endpoint of the frame source."""
    data_root: Path
    """Data root (output files must lie under it unless `allowed_roots` says otherwise)."""
    host: str | None = None
    """Interface REST and gRPC bind (writer default: loopback)."""
    rest_port: int = Field(default=0, ge=0, le=65535)
    """std_daq REST port; 0 picks a free one."""
    grpc_port: int = Field(default=0, ge=0, le=65535)
    """gRPC WriterControl port; 0 picks a free one."""
    config: Path | None = None
    """Detector config JSON (the writer saves config changes to it)."""
    allowed_roots: tuple[Path, ...] = ()
    """Directories output files must lie under."""
    socket: Literal["pull", "sub"] | None = None
    """ZeroMQ socket type to connect with."""
    redis_url: str | None = None
    """Publish the Redis streams there."""
    redis_maxlen: int | None = None
    """Approximate length the streams are trimmed to."""
    sync_timeout: float | None = None
    """Longest wait of a write_sync call, seconds."""
    log_level: str | None = None
    """Logging level."""
    state_dir: Path | None = None
    """The writer's own directory (write journal, lock); default under the data root, per REST port."""
    allowed_uids: str | None = None
    """`MIN-MAX`: the uids `writer_user_id` may give files to, besides the service user."""
    tls: ServerTls | None = None
    """Serve gRPC WriterControl over TLS (mutual TLS with a client CA); REST stays plain HTTP."""
    workers: int | None = Field(default=None, ge=1)
    """Data path processes of this writer (a writer group on one host when > 1)."""
    group_members: tuple[str, ...] = ()
    """`HOST:PORT` gRPC addresses of the other writers of its group (this one coordinates)."""
    extra_args: tuple[str, ...] = ()
    """Further flags, appended as given."""

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "servers.writer.main", "--stream", self.stream]
        argv += ["--rest-port", str(self.rest_port), "--grpc-port", str(self.grpc_port)]
        argv += ["--data-root", str(self.data_root)]
        _flag(argv, "--host", self.host)
        _flag(argv, "--config", self.config)
        for root in self.allowed_roots:
            argv += ["--allowed-root", str(root)]
        _flag(argv, "--socket", self.socket)
        _flag(argv, "--redis-url", self.redis_url)
        _flag(argv, "--redis-maxlen", self.redis_maxlen)
        _flag(argv, "--sync-timeout", self.sync_timeout)
        _flag(argv, "--log-level", self.log_level)
        _flag(argv, "--state-dir", self.state_dir)
        _flag(argv, "--allowed-uids", self.allowed_uids)
        _flag(argv, "--workers", self.workers)
        for member in self.group_members:
            argv += ["--group-member", member]
        if self.tls is not None:
            argv += self.tls.flags()
        return argv + list(self.extra_args)

    def pinned(self, ready: ReadyLine) -> Self:
        return self.model_copy(update={"rest_port": ready.port("rest"), "grpc_port": ready.port("grpc")})

    def with_ports(self, choose: PortChooser) -> Self:
        return self.model_copy(
            update={
                "rest_port": _chosen(self.rest_port, self.host, choose),
                "grpc_port": _chosen(self.grpc_port, self.host, choose),
            }
        )


class SimOptions(_Options):
    """The command line of `daqif-sim` (`None`: the simulator's own default)."""

    server: ClassVar[str] = "sim"

    endpoint: str = "tcp://127.0.0.1:*"
    """Address to bind; port `*` picks a free one."""
    shape: tuple[int, int] | None = None
    """Frame (height, width)."""
    dtype: str | None = None
    """numpy dtype name of the pixels."""
    rate: float | None = None
    """Frames per second; 0 = as fast as possible."""
    count: int | None = None
    """Frames to send; 0 = until stopped."""
    header: Literal["stddaq", "daqif"] | None = None
    """Header format."""
    compress: Literal["none", "bslz4"] | None = None
    """Compression of the data part."""
    socket: Literal["push", "pub"] | None = None
    """ZeroMQ socket type."""
    first_id: int | None = None
    """Image id of the first frame."""
    linger: float | None = None
    """Seconds queued frames may still be delivered after the last send."""
    extra_args: tuple[str, ...] = ()
    """Further `daqif-sim` flags, appended as given (a later flag wins)."""

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "servers.sim.main", "--endpoint", self.endpoint]
        if self.shape is not None:
            argv += ["--shape", str(self.shape[0]), str(self.shape[1])]
        _flag(argv, "--dtype", self.dtype)
        _flag(argv, "--rate", self.rate)
        _flag(argv, "--count", self.count)
        _flag(argv, "--header", self.header)
        _flag(argv, "--compress", self.compress)
        _flag(argv, "--socket", self.socket)
        _flag(argv, "--first-id", self.first_id)
        _flag(argv, "--linger", self.linger)
        return argv + list(self.extra_args)

    def pinned(self, ready: ReadyLine) -> Self:
        return self.model_copy(update={"endpoint": ready.address("stream")})

    def with_ports(self, choose: PortChooser) -> Self:
        # Only `tcp://HOST:*` (or `:0`) leaves the port to the simulator; ipc:// and inproc:// have none.
        scheme, _, rest = self.endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or port not in ("*", "0"):
            return self
        interface = "0.0.0.0" if host == "*" else host.strip("[]")
        return self.model_copy(update={"endpoint": f"tcp://{host}:{choose(interface)}"})


class WebOptions(_Options):
    """The command line of the status page (`python -m servers.web.main`, what `daqif web` runs)."""

    server: ClassVar[str] = "web"

    dpm: str
    """The DPM's gRPC address."""
    writer: str
    """The writer's gRPC WriterControl address."""
    host: str | None = None
    """Interface to serve on (default: loopback)."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port of the page; 0 picks a free one."""
    writer_preview: str | None = None
    """The writer's REST URL: the page shows its `/daq/live` (a writer with `--live-stream`)."""

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "servers.web.main", "--dpm", self.dpm, "--writer", self.writer]
        argv += ["--port", str(self.port)]
        _flag(argv, "--host", self.host)
        _flag(argv, "--writer-preview", self.writer_preview)
        return argv

    def pinned(self, ready: ReadyLine) -> Self:
        return self.model_copy(update={"port": ready.port("http")})

    def with_ports(self, choose: PortChooser) -> Self:
        return self.model_copy(update={"port": _chosen(self.port, self.host, choose)})


class Command(_Options):
    """Any program that prints a ready line naming itself `server` (tools, tests of the launcher)."""

    server: str
    """The server name its ready line carries."""
    argv: tuple[str, ...]
    """The command line; a restart runs it unchanged."""

    def command(self) -> list[str]:
        return list(self.argv)

    def pinned(self, ready: ReadyLine) -> Self:
        return self

    def with_ports(self, choose: PortChooser) -> Self:
        return self
