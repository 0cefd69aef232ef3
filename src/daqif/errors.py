"""The one error type of the daqif interfaces.

Servers raise `DaqException` from their core; the gRPC edge maps it once to a canonical status
code with a `daqif.v1.DaqException` in the rich status details (`daqif.grpc_errors`), and the
client maps it back, so a caller sees the same `id`, `message` and `code` the server raised.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Canonical error codes; the names are those of `grpc.StatusCode`."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"


class DaqException(Exception):
    """A refused or failed DAQ interface call.

    `id` is the DAQ id the error refers to ("" when none applies), `message` says what was
    wrong and where, `code` is the canonical error code.
    """

    def __init__(self, id: str, message: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(f"{code.name}: {message}" + (f" (id {id!r})" if id else ""))
        self.id = id
        self.message = message
        self.code = code

    @classmethod
    def invalid_argument(cls, message: str, id: str = "") -> DaqException:
        return cls(id, message, ErrorCode.INVALID_ARGUMENT)

    @classmethod
    def already_exists(cls, message: str, id: str = "") -> DaqException:
        return cls(id, message, ErrorCode.ALREADY_EXISTS)

    @classmethod
    def not_found(cls, message: str, id: str = "") -> DaqException:
        return cls(id, message, ErrorCode.NOT_FOUND)

    @classmethod
    def failed_precondition(cls, message: str, id: str = "") -> DaqException:
        return cls(id, message, ErrorCode.FAILED_PRECONDITION)

    @classmethod
    def internal(cls, message: str, id: str = "") -> DaqException:
        return cls(id, message, ErrorCode.INTERNAL)
