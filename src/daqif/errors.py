"""The one error type of the daqif interfaces.

Servers raise `DaqException` from their core; the gRPC edge maps it once to a canonical status
code with a `daqif.v1.DaqException` in the rich status details (`daqif.grpc_errors`), and the
client maps it back, so a caller sees the same `id`, `message` and `code` the server raised.
"""

from __future__ import annotations

import enum

MAX_ID_CHARS = 200
"""An id longer than this is cut in an error: the id travels in gRPC trailers, which are size-limited."""
MAX_MESSAGE_CHARS = 1000
"""An error message longer than this is cut (with the count of what was cut), so that an error about a huge
value is never itself huge: a status whose trailers pass gRPC's 8 KiB metadata limit reaches the client as
RESOURCE_EXHAUSTED instead of the real code."""
MAX_QUOTE_CHARS = 200
"""How much of a value an error message quotes (`quote`)."""


def bounded(text: str, limit: int) -> str:
    """`text`, or its first characters and how many more there were when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    suffix = f"… ({len(text) - limit} more characters)"
    return text[:limit] + suffix


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """`repr(value)` for an error message, at most `limit` characters of it."""
    return bounded(repr(value), limit)


class ErrorCode(enum.StrEnum):
    """Canonical error codes; the names are those of `grpc.StatusCode`."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"


class DaqException(Exception):
    """A refused or failed DAQ interface call.

    `id` is the DAQ id the error refers to ("" when none applies), `message` says what was
    wrong and where, `code` is the canonical error code. Both texts are bounded
    (`MAX_ID_CHARS`, `MAX_MESSAGE_CHARS`) whatever the caller passes.
    """

    def __init__(self, id: str, message: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        id = bounded(id, MAX_ID_CHARS)
        message = bounded(message, MAX_MESSAGE_CHARS)
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
