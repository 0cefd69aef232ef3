"""What every daqif gRPC server has: health checking, reflection, and the error edge."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daqif.errors import DaqException
from daqif.grpc_errors import to_rpc_status


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Register `grpc.health.v1` (every service SERVING) and server reflection on `server`."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def mark_serving(servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    """Set the overall status ("") and every named service to SERVING."""
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def abort_with(context: grpc.aio.ServicerContext, exc: DaqException) -> NoReturn:
    """End the call with the status and rich details that carry `exc`."""
    await context.abort_with_status(to_rpc_status(exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover
