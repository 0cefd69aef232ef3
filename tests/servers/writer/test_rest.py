"""The REST adapter's own pieces, in-process (the routes are proven through the std_daq client)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from servers.writer.rest import EncodedReply


def test_a_reply_is_encoded_once_per_snapshot_and_again_when_the_snapshot_changes() -> None:
    encoded = EncodedReply()
    builds: list[str] = []

    def build(value: str) -> JSONResponse:
        builds.append(value)
        return JSONResponse({"status": "ok", "value": value})

    first = encoded.reply(("READY", 0), lambda: build("a"))
    again = encoded.reply(("READY", 0), lambda: build("b"))
    changed = encoded.reply(("WRITING", 0), lambda: build("c"))

    assert builds == ["a", "c"]
    assert first.body == again.body == b'{"status":"ok","value":"a"}'
    assert changed.body == b'{"status":"ok","value":"c"}'
    assert changed.media_type == "application/json"
