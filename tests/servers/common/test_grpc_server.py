"""The one gRPC error edge: what a handler raises becomes the call's status, never a bare UNKNOWN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import pytest

from daqif.errors import DaqException, ErrorCode
from daqif.grpc_errors import to_rpc_status
from servers.common.grpc_server import edge, stream_edge


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
