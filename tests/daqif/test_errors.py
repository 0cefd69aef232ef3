"""`DaqException` texts stay bounded whatever value they are about."""

from __future__ import annotations

from daqif.errors import MAX_ID_CHARS, MAX_MESSAGE_CHARS, DaqException, ErrorCode, bounded, quote
from daqif.grpc_errors import to_rpc_status


def test_a_short_text_is_kept_as_it_is() -> None:
    assert bounded("abc", 3) == "abc"


def test_a_long_text_is_cut_and_says_how_much_was_cut() -> None:
    assert bounded("x" * 10, 4) == "xxxx… (6 more characters)"


def test_quote_bounds_the_repr_of_a_value() -> None:
    quoted = quote("a" * 5000)
    assert quoted.startswith("'aaa") and quoted.endswith("(4802 more characters)")


def test_an_exception_about_a_huge_id_has_bounded_id_and_message() -> None:
    exc = DaqException("i" * 100_000, "bad id " + "i" * 100_000, ErrorCode.INVALID_ARGUMENT)
    assert len(exc.id) <= MAX_ID_CHARS + 40
    assert len(exc.message) <= MAX_MESSAGE_CHARS + 40
    assert exc.message.startswith("bad id iii")
    assert exc.code is ErrorCode.INVALID_ARGUMENT


def test_the_grpc_status_of_a_huge_error_fits_in_the_default_metadata_limit() -> None:
    status = to_rpc_status(DaqException("i" * 100_000, "m" * 100_000, ErrorCode.INVALID_ARGUMENT))
    size = sum(len(key) + len(value) for key, value in status.trailing_metadata) + len(status.details)
    assert size < 8 * 1024


def test_error_codes_are_str_enums_named_as_grpc_status_codes() -> None:
    assert ErrorCode.RESOURCE_EXHAUSTED == "RESOURCE_EXHAUSTED"
    assert all(code.name == code.value for code in ErrorCode)
