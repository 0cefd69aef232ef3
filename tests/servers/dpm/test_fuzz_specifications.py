"""Generated Data Product Specifications against one real DPM server.

Documents of the schema's shape with hostile values (long strings, NUL, option-like ``-e``,
``..``, unicode, huge numbers, deep nesting), documents that break the shape, and texts that are
not JSON at all are queued one after the other. Every answer must be an acceptance or a clear
refusal (INVALID_ARGUMENT or ALREADY_EXISTS whose short message says where the problem is); never
INTERNAL or UNKNOWN. Afterwards the server still serves, and the DAQ queued before the fuzzing
completed with a product that verifies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daqif.dpm_client import DpmClient
from daqif.errors import DaqException, ErrorCode
from servers.dpm.merge import verify

from .dpm_helpers import (
    DpmHarness,
    DpmServerProcess,
    hdf5_source,
    keyword_source,
    make_spec,
    wait_archived,
)

# Huge generated documents make hypothesis warn about the size of their repr.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

# Where an answer's message must start: a JSON path (`sources[1].location: ...`), or the name of the
# document-level problem.
WHERE = re.compile(r"""^(?=[A-Za-z_[])([A-Za-z_]\w*)?(\.[A-Za-z_]\w*|\[\d+\]|\[['"].*?\])*: """)
MAX_MESSAGE = 1200
# What the loader says of a document as a whole (the server's parser may give up on a nesting
# this process still parses).
DOCUMENT_PROBLEMS = ("nested too deeply", "the specification is nested too deeply")
FIELDS = ("id", "target", "sources", "receivers", "keywordDictionaries", "fileId", "location", "path")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DpmHarness]:
    harness = DpmHarness(tmp_path_factory.mktemp("fuzz-dpm"))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def server(harness: DpmHarness) -> DpmServerProcess:
    # A remote location that gets through is fetched with this "ssh": it fails at once, and no
    # generated host name is ever looked up.
    return harness.start(config={"rsync_remote_shell": "/bin/false"})


@pytest.fixture(scope="module")
def client(harness: DpmHarness, server: DpmServerProcess) -> DpmClient:
    return harness.client(server)


HOSTILE_WORDS = [
    "",
    "-e",
    "--rsh=sh -c id",
    "-",
    "..",
    "../..",
    "/../../etc/passwd",
    "a\x00b",
    "\x00",
    "é✓𝄞\u202e",
    "\ud7ff\ue000",
    "x" * 5000,
    "/" * 300,
    " ",
    "\n",
    "$(id)",
    "`id`",
    "%s%n",
    "*",
    "-e sh",
]
hostile_text = st.one_of(st.sampled_from(HOSTILE_WORDS), st.text(max_size=40))
huge_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([2**63, -(2**63) - 1, 10**400]))
hostile_scalar = st.one_of(
    hostile_text, huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none()
)
hostile_json = st.recursive(
    hostile_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)),
    max_leaves=12,
)
identifiers = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:+-]{0,20}\Z")


def _maybe_hostile(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, hostile_json)


def specifications(root: Path) -> st.SearchStrategy[Any]:
    """Documents of the schema's shape, each value valid or hostile."""
    locations = st.one_of(
        st.builds(lambda tail: f"{root}/{tail}", hostile_text),
        st.sampled_from(
            [
                "/etc/passwd",
                f"{root}/../../etc/passwd",
                "-e:/x",
                "localhost:/etc/passwd",
                "user@127.0.0.1:/data/x.h5",
                "127.0.0.1:-e sh",
            ]
        ),
        hostile_text,
    )
    hdf5 = st.fixed_dictionaries(
        {"type": st.just("hdf5File"), "sourceName": _maybe_hostile(identifiers), "location": locations},
        optional={"keywordRules": _maybe_hostile(st.lists(hostile_json, max_size=2))},
    )
    keywords = st.fixed_dictionaries(
        {
            "type": st.just("fitsKeywords"),
            "sourceName": _maybe_hostile(identifiers),
            "keywords": st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["valueKeyword", "esoKeyword", "literalKeyword", "other"]),
                        "name": _maybe_hostile(st.from_regex(r"\A[A-Z0-9_-]{1,8}\Z")),
                        "value": hostile_scalar,
                    },
                    optional={"comment": hostile_text},
                ),
                max_size=3,
            ),
        }
    )
    receiver = st.fixed_dictionaries(
        {"type": _maybe_hostile(st.just("olasReceiver")), "path": _maybe_hostile(locations)}
    )
    return st.fixed_dictionaries(
        {
            "id": _maybe_hostile(identifiers),
            "target": _maybe_hostile(st.fixed_dictionaries({"fileId": _maybe_hostile(identifiers)})),
            "sources": _maybe_hostile(st.lists(st.one_of(hdf5, keywords, hostile_json), max_size=3)),
        },
        optional={
            "receivers": _maybe_hostile(st.lists(receiver, max_size=2)),
            "keywordDictionaries": _maybe_hostile(st.lists(hostile_text, max_size=2)),
            "extra": hostile_json,
        },
    )


def texts(root: Path) -> st.SearchStrategy[str]:
    """What is sent: a document as JSON, with a field dropped, cut short, deeply nested, or not JSON."""

    def dropped(doc: dict[str, Any], key: str) -> str:
        doc.pop(key, None)
        return json.dumps(doc)

    documents = specifications(root)
    return st.one_of(
        documents.map(json.dumps),
        documents.map(json.dumps),
        st.builds(dropped, documents, st.sampled_from(["id", "target", "sources"])),
        st.builds(lambda doc, cut: json.dumps(doc)[:cut], documents, st.integers(0, 200)),
        hostile_json.map(json.dumps),
        st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(1, 5_000).map(lambda depth: '{"id": ' + '{"a": ' * depth + "1" + "}" * depth + "}"),
        st.text(max_size=200),
    )


def assert_clear_answer(client: DpmClient, text: str) -> None:
    try:
        client.queue_daq(text)
    except DaqException as exc:
        assert exc.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.ALREADY_EXISTS), (exc, text[:500])
        assert len(exc.message) < MAX_MESSAGE, (len(exc.message), text[:500])
        assert exc.message, text[:500]
        if exc.code is ErrorCode.ALREADY_EXISTS:
            assert exc.id and f"DAQ {exc.id} " in exc.message, exc.message
            return
        document = parsed(text)
        if isinstance(document, dict) and not exc.message.startswith(DOCUMENT_PROBLEMS):
            # The problem is inside the document: the message says where.
            names = (*FIELDS, *(repr(key) for key in document))
            assert WHERE.match(exc.message) or any(name in exc.message for name in names), (
                exc.message,
                text[:500],
            )


def parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def test_generated_specifications_are_accepted_or_refused_clearly_and_a_queued_daq_stays_intact(
    harness: DpmHarness, server: DpmServerProcess, client: DpmClient
) -> None:
    source = harness.source("det1")
    client.queue_daq(make_spec("BEFORE", [hdf5_source("det1", source), keyword_source()], [harness.receiver]))

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(text=texts(harness.data))
    def queue(text: str) -> None:
        assert_clear_answer(client, text)

    queue()

    final = wait_archived(client, server, "BEFORE")
    assert final["substate"] == "COMPLETED"
    product = harness.receiver / "BEFORE.product.h5"
    assert verify(product).ok
    client.queue_daq(make_spec("AFTER", [keyword_source()], [harness.receiver]))
    assert wait_archived(client, server, "AFTER")["substate"] == "COMPLETED"
