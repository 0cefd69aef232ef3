"""The one gRPC error edge: what a handler raises becomes the call's status, never a bare UNKNOWN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from daqif.grpc_errors import to_rpc_status
from servers.common.commands import DpmOptions
from servers.common.grpc_server import edge, stream_edge
from servers.common.launch import DpmProcess


class AbortRecorded(Exception):
    pass


class FakeContext:
    """The seam `abort_with` uses: `abort_with_status` ends the call by raising, as grpc.aio's does."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.status = status
        raise AbortRecorded


class Service:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    @edge
    async def Unary(self, request: Any, context: Any) -> str:
        raise self.exc

    @stream_edge
    async def Stream(self, request: Any, context: Any) -> AsyncIterator[str]:
        yield "first"
        raise self.exc


def call_unary(exc: Exception) -> grpc.Status | None:
    context = FakeContext()
    with pytest.raises(AbortRecorded):
        asyncio.run(Service(exc).Unary(None, context))
    return context.status


def call_stream(exc: Exception) -> tuple[list[str], grpc.Status | None]:
    context = FakeContext()
    received: list[str] = []

    async def consume() -> None:
        async for message in Service(exc).Stream(None, context):
            received.append(message)

    with pytest.raises(AbortRecorded):
        asyncio.run(consume())
    return received, context.status


def test_a_daq_exception_becomes_its_own_status_with_details() -> None:
    exc = DaqException("X.1", "no such DAQ", ErrorCode.NOT_FOUND)
    status = call_unary(exc)
    assert status is not None
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.trailing_metadata == to_rpc_status(exc).trailing_metadata


def test_an_unexpected_error_becomes_internal_naming_the_method() -> None:
    status = call_unary(RuntimeError("disk on fire"))
    assert status is not None
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "Unary: RuntimeError: disk on fire"


def test_a_stream_keeps_what_it_sent_and_ends_with_the_mapped_status() -> None:
    received, status = call_stream(KeyError("k"))
    assert received == ["first"]
    assert status is not None
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "Stream: KeyError: 'k'"


def raw_call(address: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=10)
    return caught.value


def test_invalid_utf8_in_a_request_is_invalid_argument_and_the_dpm_keeps_serving(tmp_path: Path) -> None:
    with DpmProcess(DpmOptions(workspace=tmp_path / "ws")).start() as dpm:
        # QueueDaqRequest.specification (field 1, a string) holding the bytes ff fe.
        error = raw_call(dpm.address, "/daqif.v1.DpmDaqControl/QueueDaq", b"\x0a\x02\xff\xfe")
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            "QueueDaq: the request is not a valid message: String field had bad UTF-8 "
            "(a string field must be valid UTF-8)"
        )
        with DpmClient(dpm.address) as client:
            assert client.get_active_daqs() == []


def test_a_truncated_request_to_a_streaming_method_is_invalid_argument(tmp_path: Path) -> None:
    with (
        DpmProcess(DpmOptions(workspace=tmp_path / "ws")).start() as dpm,
        grpc.insecure_channel(dpm.address) as channel,
    ):
        call = channel.unary_stream(
            "/daqif.v1.DpmDaqControl/WatchDaqStatus",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(b"\x0a\x10ab", timeout=10))  # a 16-byte id field with 2 bytes
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("WatchDaqStatus: the request is not a valid message")
