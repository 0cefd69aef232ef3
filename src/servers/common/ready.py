"""The one ready line every daqif server prints, and its one parser.

A server prints exactly one line on stdout once every port it serves is bound and answering:

    daqif-ready dpm grpc=127.0.0.1:40123
    daqif-ready writer rest=http://127.0.0.1:40124 grpc=127.0.0.1:40125
    daqif-ready sim stream=tcp://127.0.0.1:40126
    daqif-ready dpm grpc=grpcs://127.0.0.1:40127        (served over TLS)

The first word after the prefix names the server; each `name=address` pair is one endpoint with the
port actually bound (a server started on port 0 reports the port the system picked). An address is
`HOST:PORT` or `SCHEME://HOST:PORT`; an IPv6 host is written in brackets. A gRPC endpoint served
over TLS is written `grpcs://HOST:PORT`, which the daqif clients accept as is (`Endpoint.tls`).
The launcher learns the ports from this line (so a restart binds the same ones) and `daqif serve`
compares them with the ports it asked for.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "daqif-ready"

_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class ReadyLineError(ValueError):
    """A line starts with the ready prefix but is not a well-formed ready line."""


class Endpoint(BaseModel):
    """One bound endpoint of a server."""

    model_config = ConfigDict(frozen=True)

    name: str
    """What the endpoint serves, e.g. `grpc`, `rest`, `stream`."""
    address: str
    """The address as printed: `HOST:PORT` or `SCHEME://HOST:PORT`, usable by a client as is."""
    host: str
    """The host part (without IPv6 brackets)."""
    port: int = Field(ge=1, le=65535)
    """The port actually bound."""

    @property
    def tls(self) -> bool:
        """The endpoint is served over TLS (`grpcs://` or `https://`)."""
        return self.address.startswith(("grpcs://", "https://"))


class ReadyLine(BaseModel):
    """A parsed ready line: which server, and every endpoint it bound."""

    model_config = ConfigDict(frozen=True)

    server: str
    """The server's name, e.g. `dpm`."""
    endpoints: tuple[Endpoint, ...]
    """The endpoints in the order printed."""

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint called `name`; `KeyError` naming what the line does have otherwise."""
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        have = ", ".join(e.name for e in self.endpoints)
        raise KeyError(f"the ready line of {self.server} has no endpoint {name!r} (it has {have})")

    def address(self, name: str) -> str:
        """The address of endpoint `name`, as printed."""
        return self.endpoint(name).address

    def port(self, name: str) -> int:
        """The bound port of endpoint `name`."""
        return self.endpoint(name).port

    def format(self) -> str:
        """The line as a server prints it."""
        return " ".join([PREFIX, self.server, *(f"{e.name}={e.address}" for e in self.endpoints)])


def ready_line(server: str, **addresses: str) -> str:
    """The ready line of `server` with `addresses` (`name=address`, in order), checked by the parser."""
    text = " ".join([PREFIX, server, *(f"{name}={address}" for name, address in addresses.items())])
    parse_ready_line(text)  # a server must never print a line its launcher cannot read
    return text


def is_ready_line(line: str) -> bool:
    """True for a line that claims to be a ready line (well-formed or not)."""
    words = line.split(maxsplit=1)
    return bool(words) and words[0] == PREFIX


def parse_ready_line(line: str) -> ReadyLine:
    """Parse a ready line; `ReadyLineError` saying what is wrong for a malformed one."""
    words = line.split()
    if not words or words[0] != PREFIX:
        raise ReadyLineError(f"not a ready line (it does not start with {PREFIX!r}): {line!r}")
    if len(words) < 3:
        raise ReadyLineError(f"ready line without a server name and an endpoint: {line!r}")
    server = words[1]
    if not _NAME.fullmatch(server):
        raise ReadyLineError(f"ready line: server name {server!r} is not a lower-case word: {line!r}")
    endpoints: list[Endpoint] = []
    for word in words[2:]:
        name, sep, address = word.partition("=")
        if not sep or not _NAME.fullmatch(name) or not address:
            raise ReadyLineError(f"ready line of {server}: {word!r} is not name=address: {line!r}")
        if any(e.name == name for e in endpoints):
            raise ReadyLineError(f"ready line of {server}: endpoint {name!r} appears twice: {line!r}")
        endpoints.append(_endpoint(server, name, address, line))
    return ReadyLine(server=server, endpoints=tuple(endpoints))


def _endpoint(server: str, name: str, address: str, line: str) -> Endpoint:
    # urlsplit reads host and port only after a netloc marker; `HOST:PORT` gets one.
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        port = parts.port
    except ValueError:  # urlsplit refuses e.g. unbalanced IPv6 brackets, .port a non-number
        parts, port = None, None
    if parts is None or not parts.hostname or port is None or not 1 <= port <= 65535:
        raise ReadyLineError(
            f"ready line of {server}: {name}={address} is not HOST:PORT or SCHEME://HOST:PORT "
            f"with a port 1-65535: {line!r}"
        )
    return Endpoint(name=name, address=address, host=parts.hostname, port=port)
