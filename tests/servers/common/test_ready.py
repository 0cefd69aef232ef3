"""The one ready line: what a server prints is what the launcher reads; a malformed line is
refused saying what is wrong."""

from __future__ import annotations

import re

import pytest

from servers.common.ready import ReadyLineError, is_ready_line, parse_ready_line, ready_line


def test_writer_line_parses_into_named_endpoints_with_bound_ports() -> None:
    ready = parse_ready_line("daqif-ready writer rest=http://127.0.0.1:5000 grpc=127.0.0.1:12084")
    assert ready.server == "writer"
    assert ready.address("rest") == "http://127.0.0.1:5000"
    assert (ready.endpoint("grpc").host, ready.port("grpc")) == ("127.0.0.1", 12084)
    assert [e.name for e in ready.endpoints] == ["rest", "grpc"]


def test_ipv6_host_in_brackets_parses() -> None:
    ready = parse_ready_line("daqif-ready sim stream=tcp://[::1]:4000")
    assert (ready.endpoint("stream").host, ready.port("stream")) == ("::1", 4000)


def test_formatted_line_parses_back_to_itself() -> None:
    text = ready_line("dpm", grpc="127.0.0.1:40000")
    assert text == "daqif-ready dpm grpc=127.0.0.1:40000"
    assert parse_ready_line(text).format() == text


def test_missing_endpoint_names_what_the_line_has() -> None:
    ready = parse_ready_line("daqif-ready dpm grpc=127.0.0.1:1")
    with pytest.raises(KeyError, match="ready line of dpm has no endpoint 'rest' \\(it has grpc\\)"):
        ready.port("rest")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("daqif-dpm-server ready 127.0.0.1:1", "does not start with 'daqif-ready'"),
        ("daqif-ready dpm", "without a server name and an endpoint"),
        ("daqif-ready DPM grpc=127.0.0.1:1", "server name 'DPM' is not a lower-case word"),
        ("daqif-ready dpm 127.0.0.1:1", "'127.0.0.1:1' is not name=address"),
        ("daqif-ready dpm grpc=", "'grpc=' is not name=address"),
        ("daqif-ready dpm grpc=127.0.0.1:1 grpc=127.0.0.1:2", "endpoint 'grpc' appears twice"),
        ("daqif-ready dpm grpc=127.0.0.1", "grpc=127.0.0.1 is not HOST:PORT"),
        ("daqif-ready dpm grpc=127.0.0.1:0", "with a port 1-65535"),
        ("daqif-ready dpm grpc=127.0.0.1:99999", "with a port 1-65535"),
        ("daqif-ready dpm grpc=127.0.0.1:http", "grpc=127.0.0.1:http is not HOST:PORT"),
        ("daqif-ready dpm grpc=[::1:5", "grpc=[::1:5 is not HOST:PORT"),
    ],
)
def test_malformed_line_is_refused_saying_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(ReadyLineError, match=re.escape(message)):
        parse_ready_line(line)


def test_a_server_cannot_format_a_line_its_launcher_cannot_read() -> None:
    with pytest.raises(ReadyLineError, match="with a port 1-65535"):
        ready_line("dpm", grpc="127.0.0.1:0")


def test_only_lines_starting_with_the_prefix_claim_to_be_ready_lines() -> None:
    assert is_ready_line("daqif-ready dpm grpc=127.0.0.1:1")
    assert is_ready_line("daqif-ready garbage")
    assert not is_ready_line("INFO daqif-ready is mentioned here")
    assert not is_ready_line("")
