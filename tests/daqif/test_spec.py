"""The Data Product Specification loader: valid documents become typed objects; every invalid one
is refused with a message that starts with where the problem is."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from daqif.spec import (
    FilterRule,
    FitsFileSource,
    FitsKeywordsSource,
    Hdf5FileSource,
    KeywordKind,
    Location,
    ProductFormat,
    SpecificationError,
    TransformRule,
    load_specification,
    schema,
)

VALID: dict[str, Any] = {
    "id": "TEST.2026-11-22T10:00:00.000",
    "target": {"fileId": "TEST.2026-11-22T10:00:00.000"},
    "sources": [
        {
            "type": "fitsKeywords",
            "sourceName": "ocm",
            "keywords": [
                {"type": "valueKeyword", "name": "OBJECT", "value": "M31", "comment": "target"},
                {"type": "esoKeyword", "name": "DET DIT", "value": 0.5},
                {"type": "literalKeyword", "value": "COMMENT free text"},
            ],
        },
        {
            "type": "hdf5File",
            "sourceName": "det1",
            "location": "/data/det1.h5",
            "keywordRules": [
                {"type": "filter", "selectionPatterns": ["+e INS *", "-e INS TEMP[12] *", "+v OBJECT"]},
                {"type": "transform", "selectionPatterns": ["+e INS *"], "regex": "^INS ", "format": "INS2 "},
            ],
        },
        {"type": "hdf5File", "sourceName": "det2", "location": "user@daq-host:/data/det2.h5"},
    ],
    "receivers": [{"type": "olasReceiver", "path": "/data/olas", "options": {"allowSymlink": True}}],
    "keywordDictionaries": [],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """VALID with the value at dotted `path` (`sources.1.location`) replaced; `...` deletes it."""
    doc = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return doc


def test_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


def test_valid_specification_becomes_typed_objects() -> None:
    spec = load_specification(json.dumps(VALID))
    assert spec.id == VALID["id"]
    assert spec.product_name == "TEST.2026-11-22T10:00:00.000.h5"
    ocm, det1, det2 = spec.sources
    assert isinstance(ocm, FitsKeywordsSource)
    assert [k.kind for k in ocm.keywords] == [KeywordKind.VALUE, KeywordKind.ESO, KeywordKind.LITERAL]
    assert ocm.keywords[1].attribute_name == "ESO DET DIT"
    assert isinstance(det1, Hdf5FileSource) and det1.location == Location("/data/det1.h5")
    assert det1.keyword_rules is not None
    assert isinstance(det1.keyword_rules[0], FilterRule)
    assert isinstance(det1.keyword_rules[1], TransformRule)
    assert isinstance(det2, Hdf5FileSource) and det2.keyword_rules is None
    assert det2.location.is_remote and det2.location.host == "user@daq-host"
    assert str(det2.location) == "user@daq-host:/data/det2.h5"
    assert spec.receivers[0].allow_symlink is True
    assert [s.source_name for s in spec.hdf5_sources] == ["det1", "det2"]


def test_empty_rule_list_is_kept_apart_from_no_rules() -> None:
    spec = load_specification(with_change("sources.1.keywordRules", []))
    det1 = spec.sources[1]
    assert isinstance(det1, Hdf5FileSource) and det1.keyword_rules == ()


def test_target_source_is_the_first_hdf5_source() -> None:
    doc = with_change("target.source", {"type": "hdf5File", "sourceName": "base", "location": "/data/b.h5"})
    spec = load_specification(doc)
    assert [s.source_name for s in spec.hdf5_sources] == ["base", "det1", "det2"]


INVALID: list[tuple[str, Any, str, str]] = [
    ("bad JSON", "{", "", "not valid JSON"),
    ("not an object", "[1, 2]", "", "expected a JSON object"),
    ("missing id", with_change("id", ...), "", "'id' is a required property"),
    ("id of wrong type", with_change("id", 42), "id", "is not of type"),
    ("id with a slash", with_change("id", "a/b"), "id", "is not valid"),
    ("missing fileId", with_change("target.fileId", ...), "target", "'fileId' is a required property"),
    ("unknown top-level key", {**VALID, "colour": "red"}, "colour", "unknown field"),
    ("unknown source type", with_change("sources.0.type", "netcdfFile"), "sources[0].type", "unknown type"),
    (
        "relative location",
        with_change("sources.1.location", "data/det1.h5"),
        "sources[1].location",
        "absolute",
    ),
    (
        "traversing location",
        with_change("sources.1.location", "/data/../etc/passwd"),
        "sources[1].location",
        "'..'",
    ),
    (
        "remote traversing location",
        with_change("sources.2.location", "h:/data/../x"),
        "sources[2].location",
        "'..'",
    ),
    (
        "too long value keyword name",
        with_change("sources.0.keywords.0.name", "OBJECTNAME"),
        "sources[0].keywords[0].name",
        "too long (at most 8",
    ),
    (
        "lower-case keyword name",
        with_change("sources.0.keywords.0.name", "object"),
        "sources[0].keywords[0].name",
        "upper-case",
    ),
    (
        "keyword value of wrong type",
        with_change("sources.0.keywords.1.value", [1]),
        "sources[0].keywords[1].value",
        "is not of type",
    ),
    (
        "unknown keyword type",
        with_change("sources.0.keywords.2.type", "cardKeyword"),
        "sources[0].keywords[2].type",
        "unknown type",
    ),
    (
        "bad selection pattern",
        with_change("sources.1.keywordRules.0.selectionPatterns", ["INS *"]),
        "sources[1].keywordRules[0].selectionPatterns[0]",
        "selection pattern",
    ),
    (
        "bad transform regex",
        with_change("sources.1.keywordRules.1.regex", "(INS"),
        "sources[1].keywordRules[1].regex",
        "not a valid regular expression",
    ),
    (
        "transform regex with a backreference",
        with_change("sources.1.keywordRules.1.regex", "(INS)\\1"),
        "sources[1].keywordRules[1].regex",
        "no backreferences or lookaround",
    ),
    (
        "transform without format",
        with_change("sources.1.keywordRules.1.format", ...),
        "sources[1].keywordRules[1]",
        "'format' is a required property",
    ),
    (
        "unknown rule type",
        with_change("sources.1.keywordRules.0.type", "rename"),
        "sources[1].keywordRules[0].type",
        "unknown type",
    ),
    (
        "duplicate source name",
        with_change("sources.2.sourceName", "det1"),
        "sources[2].sourceName",
        "already used by sources[1]",
    ),
    ("relative receiver path", with_change("receivers.0.path", "olas"), "receivers[0].path", "absolute"),
    (
        "receiver option of wrong type",
        with_change("receivers.0.options", {"allowSymlink": "yes"}),
        "receivers[0].options.allowSymlink",
        "is not of type",
    ),
    ("no sources at all", with_change("sources", []), "sources", "no sources"),
    (
        "receiver host that is an rsync option",
        with_change("receivers.0.host", "-e"),
        "receivers[0].host",
        "never an option",
    ),
    (
        "receiver user that is an option",
        with_change("receivers.0.host", "-oProxyCommand=x@host"),
        "receivers[0].host",
        "never an option",
    ),
    (
        "remote location whose host is an option",
        with_change("sources.2.location", "-e:/data/det2.h5"),
        "sources[2].location",
        "a host starts with a letter or digit",
    ),
    (
        "NUL in a keyword value",
        with_change("sources.0.keywords.1.value", "a\x00b"),
        "sources[0].keywords[1].value",
        "NUL character",
    ),
    (
        "integer beyond 64 bits",
        with_change("sources.0.keywords.1.value", 2**64),
        "sources[0].keywords[1].value",
        "does not fit in 64 bits",
    ),
    ("NaN keyword value", '{"id": NaN}', "id", "not a finite number"),
    ("nested too deeply for the parser", "[" * 100_000 + "]" * 100_000, "", "nested too deeply"),
    (
        "nested deeper than a specification",
        {**VALID, "extra": json.loads("[" * 30 + "]" * 30)},
        "extra" + "[0]" * 16,
        "nested more than 16 levels",
    ),
]


@pytest.mark.parametrize(("case", "document", "where", "fragment"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specification_is_refused_with_where_and_what(
    case: str, document: Any, where: str, fragment: str
) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(SpecificationError) as info:
        load_specification(text)
    assert info.value.where == where, str(info.value)
    assert fragment in str(info.value)
    if where:
        assert str(info.value).startswith(f"{where}: ")


def test_an_error_about_a_huge_value_quotes_at_most_200_characters_of_it() -> None:
    with pytest.raises(SpecificationError) as info:
        load_specification(json.dumps(with_change("id", "a/" + "b" * 100_000)))
    assert info.value.where == "id"
    assert len(str(info.value)) < 400
    assert "more characters" in str(info.value)


def test_a_transform_renames_with_re_sub_semantics() -> None:
    rule = TransformRule(("+e INS *",), r"INS (?P<part>\w+) (\w+)", r"INSTR \g<part> \2")
    assert rule.rename("INS OPT1 NAME") == "INSTR OPT1 NAME"


def test_a_backtracking_pattern_runs_in_linear_time() -> None:
    """`(a+)+$` against 'aaa…b' takes Python's re 2^n steps: with n = 5,000 this test would never end."""
    rule = TransformRule(("+v *",), r"(A+)+$", "X")
    assert rule.rename("A" * 5000 + "B") == "A" * 5000 + "B"
    assert rule.rename("A" * 5000) == "X"


def fits_document() -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    doc["target"]["source"] = {"type": "fitsFile", "sourceName": "dcs", "location": "dcs-host:/data/dcs.fits"}
    doc["sources"][1]["type"] = "fitsFile"
    doc["sources"][2] = {
        "type": "fitsFile",
        "sourceName": "fcs",
        "location": "/data/fcs.fits",
        "keywordRules": [],
    }
    return doc


def test_fits_file_sources_and_target_make_a_fits_product() -> None:
    spec = load_specification(fits_document())
    assert isinstance(spec.target_source, FitsFileSource)
    assert spec.target_source.location == Location(path="/data/dcs.fits", host="dcs-host")
    assert spec.product_format is ProductFormat.FITS
    assert spec.product_name == "TEST.2026-11-22T10:00:00.000.fits"
    assert [s.source_name for s in spec.file_sources] == ["dcs", "det1", "fcs"]
    assert spec.hdf5_sources == ()
    det1 = spec.sources[1]
    assert (
        isinstance(det1, FitsFileSource) and det1.keyword_rules is not None and len(det1.keyword_rules) == 2
    )
    assert load_specification(VALID).product_name == "TEST.2026-11-22T10:00:00.000.h5"


def test_a_specification_mixing_hdf5_and_fits_sources_is_refused_naming_the_first_of_each() -> None:
    doc = fits_document()
    doc["sources"].append({"type": "hdf5File", "sourceName": "det9", "location": "/data/det9.h5"})
    doc["sources"].append({"type": "hdf5File", "sourceName": "det10", "location": "/data/det10.h5"})
    with pytest.raises(SpecificationError) as info:
        load_specification(doc)
    assert info.value.where == "sources"
    assert "hdf5File (sources[3] 'det9')" in info.value.problem
    assert "fitsFile (target.source 'dcs')" in info.value.problem


SCHEMA_INVALID = [
    (case, document)
    for case, document, _, _ in INVALID
    if isinstance(document, dict)
    and next(iter(jsonschema.Draft202012Validator(schema()).iter_errors(document)), None)
]


def test_the_fast_validator_refuses_every_document_the_schema_refuses() -> None:
    # `jsonschema_rs` only answers "valid" (daqif.spec._fast_validator): it must never be more
    # lenient than jsonschema, whose verdict and words stand for everything it refuses.
    from daqif.spec import _fast_validator

    fast = _fast_validator()
    assert fast is not None
    assert len(SCHEMA_INVALID) >= 10
    lenient = [case for case, document in SCHEMA_INVALID if fast.is_valid(document)]
    assert lenient == []
    assert fast.is_valid(VALID)


def test_where_the_fast_validator_is_stricter_jsonschema_decides() -> None:
    # Python's `$` matches before a final newline, ECMA-262's (jsonschema_rs) does not: the fast
    # path refuses such a value, and the verdict is jsonschema's, as it was before the fast path.
    from daqif.spec import _fast_validator

    document = with_change("sources.0.keywords.0.name", "OBJECT\n")
    fast = _fast_validator()
    assert fast is not None
    assert fast.is_valid(document) is False
    try:
        load_specification(document)
        accepted = True
    except SpecificationError:
        accepted = False
    assert accepted == jsonschema.Draft202012Validator(schema()).is_valid(document)
