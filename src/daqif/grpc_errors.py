"""Mapping of `DaqException` to and from a gRPC status with rich details.

A failed call carries a canonical status code and a `daqif.v1.DaqException {id, message}`
packed in `google.rpc.Status.details` (grpcio-status).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from daqif.errors import DaqException, ErrorCode
from daqif.v1 import dpm_pb2


def to_rpc_status(exc: DaqException) -> grpc.Status:
    """The gRPC status (code, message, rich details) that carries `exc`."""
    detail = any_pb2.Any()
    detail.Pack(dpm_pb2.DaqException(id=exc.id, message=exc.message))
    status = status_pb2.Status(
        code=code_pb2.Code.Value(exc.code.name),
        message=exc.message,
        details=[detail],
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def from_rpc_error(error: grpc.RpcError, id: str = "") -> DaqException:
    """The `DaqException` a failed call carries; `id` is used when the server sent none."""
    code_enum = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    code = ErrorCode[code_enum.name] if code_enum.name in ErrorCode.__members__ else ErrorCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    try:
        status = rpc_status.from_call(error)
    except Exception:  # a status whose details do not match its code: keep code and text
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(dpm_pb2.DaqException.DESCRIPTOR):
                payload = dpm_pb2.DaqException()
                detail.Unpack(payload)
                return DaqException(payload.id or id, payload.message, code)
    return DaqException(id, message, code)
