"""Errors about huge values stay errors about them: the real code, a bounded message, the server up."""

from __future__ import annotations

from typing import Any

import pytest

from daqif.errors import MAX_MESSAGE_CHARS, DaqException, ErrorCode


def spec(daq_id: str, location: str, receiver: str) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": "BOUNDED.1"},
        "sources": [{"type": "hdf5File", "sourceName": "det", "location": location}],
        "receivers": [{"type": "olasReceiver", "path": receiver}],
    }


@pytest.mark.parametrize("what", ["id", "location"])
def test_a_huge_value_is_invalid_argument_with_a_bounded_message(dpm_server: Any, what: str) -> None:
    huge = "x" * 100_000
    receiver = str(dpm_server.receiver_dir)
    location = str(dpm_server.data_root / "raw" / "frames.h5")
    bad = spec(huge, location, receiver) if what == "id" else spec("BOUNDED.1", "/" + huge, receiver)
    with pytest.raises(DaqException) as caught:
        dpm_server.client.queue_daq(bad)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert len(caught.value.message) <= MAX_MESSAGE_CHARS + 40
    assert "more characters" in caught.value.message or len(caught.value.message) < 400
    # The server is still serving.
    assert dpm_server.client.get_active_daqs() == []


@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("DATE-OBS= '2026-12-01", "string value has no closing quote"),
        ("lower = 1", "is not a valid keyword name"),
        ("JUST SOME WORDS", "neither commentary"),
    ],
)
def test_an_unparseable_literal_card_is_invalid_argument_at_queue_time(
    dpm_server: Any, card: str, problem: str
) -> None:
    source = {
        "type": "fitsKeywords",
        "sourceName": "ocm",
        "keywords": [{"type": "literalKeyword", "value": card}],
    }
    document = {"id": "CARD.1", "target": {"fileId": "CARD.1"}, "sources": [source]}
    with pytest.raises(DaqException) as caught:
        dpm_server.client.queue_daq(document)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("sources[0].keywords[0].value: card ")
    assert problem in caught.value.message
    assert dpm_server.client.get_active_daqs() == []
