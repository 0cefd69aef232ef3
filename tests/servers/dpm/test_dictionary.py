"""The ESO Data Interface Dictionary parser: records, comments, continuations, indexes, checks, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servers.dpm.dictionary import (
    BUILTIN_DIRECTORY,
    DictionaryError,
    KeywordNotValid,
    ParameterType,
    find_dictionary,
    load_dictionaries,
    load_dictionary,
    parse_dictionary,
)

HEADER = """\
# E.S.O. - VLT project
#   a test dictionary
Dictionary Name:   ESO-VLT-DIC.TEST
Scope:             TEST
Source:            tests
Revision:          1.7
Description:       A dictionary of the tests,
                   on two lines.
"""

GAIN = """
Parameter Name:    DET CHIPi GAIN
Class:             header|setup
Context:           Detector
Type:              double
Value Format:      %.3f
Unit:              e-/ADU
Comment Format:    Gain of chip %d [e-/ADU], 100%
Description:       Conversion factor of chip i
                   from ADU to electrons.
"""


def parse(body: str, name: str = "ESO-VLT-DIC.TEST") -> object:
    return parse_dictionary(HEADER + body, Path("/dics") / name)


def test_records_fields_continuations_and_comments_are_read() -> None:
    d = parse_dictionary(HEADER + "\n# a comment between records\n" + GAIN, Path("/dics/ESO-VLT-DIC.TEST"))
    assert d.name == "ESO-VLT-DIC.TEST" and d.version == "1.7"
    assert dict(d.identification)["Description"] == "A dictionary of the tests, on two lines."
    (gain,) = d.parameters
    assert gain.name == "DET CHIPi GAIN" and gain.type is ParameterType.DOUBLE
    assert gain.classes == ("header", "setup") and gain.unit == "e-/ADU" and gain.context == "Detector"
    assert gain.description == "Conversion factor of chip i from ADU to electrons."
    assert gain.line == HEADER.count("\n") + 4  # the record's first line, after the comment and blanks


def test_an_index_matches_any_number_and_nothing_else() -> None:
    d = parse_dictionary(HEADER + GAIN, Path("/dics/ESO-VLT-DIC.TEST"))
    for name in ("DET CHIP1 GAIN", "DET CHIP12 GAIN", "DET CHIP007 GAIN"):
        found = d.lookup(name)
        assert found is not None and found.name == "DET CHIPi GAIN"
    ambiguous = parse_dictionary(HEADER + "\nParameter Name: INS A0i\nType: string\n", Path("/d/X"))
    found = ambiguous.lookup("INS A017")  # the index is any run of trailing digits: here 17
    assert found is not None and found.default_comment("INS A017") == ""
    for name in ("DET CHIP GAIN", "DET CHIPX GAIN", "DET CHIP1 GAIN X", "DET CHIP1", "DET CHIP1A GAIN"):
        assert d.lookup(name) is None, name


def test_an_exact_definition_wins_over_an_indexed_one_and_the_first_dictionary_over_later(
    tmp_path: Path,
) -> None:
    exact = "\nParameter Name: DET CHIP2 GAIN\nType: double\nComment Format: The special chip\n"
    (tmp_path / "ESO-VLT-DIC.A").write_text(HEADER + GAIN + exact)
    (tmp_path / "ESO-VLT-DIC.B").write_text(HEADER + "\nParameter Name: DET CHIPi GAIN\nType: string\n")
    both = load_dictionaries(["ESO-VLT-DIC.A", "ESO-VLT-DIC.B"], [tmp_path])
    assert both.check("DET CHIP2 GAIN", 1.0).comment == "The special chip"
    assert both.check("DET CHIP3 GAIN", 1.0).comment == "Gain of chip 3 [e-/ADU], 100%"
    reversed_ = load_dictionaries(["ESO-VLT-DIC.B", "ESO-VLT-DIC.A"], [tmp_path])
    with pytest.raises(
        KeywordNotValid, match=r"has a double value 1\.0, but ESO-VLT-DIC\.B line 10 defines it as string"
    ):
        reversed_.check("DET CHIP3 GAIN", 1.0)


def test_several_indexes_fill_the_comment_in_order() -> None:
    body = "\nParameter Name: DETi WINi BINX\nType: integer\nComment Format: Det %d window %02d\n"
    d = parse_dictionary(HEADER + body, Path("/dics/ESO-VLT-DIC.TEST"))
    p = d.lookup("DET2 WIN3 BINX")
    assert p is not None and p.default_comment("DET2 WIN3 BINX") == "Det 2 window 03"


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("logical", [True, False, np.bool_(True)], [1, 0.0, "T", np.int8(1)]),
        ("integer", [0, -5, np.int64(7), np.uint16(3)], [True, 1.5, "1", np.float32(1)]),
        ("double", [0.5, 3, np.float32(1.5), np.int32(2)], [False, "0.5", np.bool_(False)]),
        ("string", ["M31", b"bytes", np.bytes_(b"x"), np.str_("y")], [1, 1.0, True, np.array(["a", "b"])]),
    ],
)
def test_a_value_matches_its_type(kind: str, good: list[object], bad: list[object]) -> None:
    d = parse_dictionary(HEADER + f"\nParameter Name: X Y\nType: {kind}\n", Path("/dics/ESO-VLT-DIC.TEST"))
    p = d.lookup("X Y")
    assert p is not None
    for value in good:
        assert p.type_problem(value) is None, value
    for value in bad:
        problem = p.type_problem(value)
        assert problem is not None and problem.endswith(f"ESO-VLT-DIC.TEST line 10 defines it as {kind}"), (
            value
        )


@pytest.mark.parametrize(
    ("kind", "fmt", "value", "text", "held"),
    [
        ("double", "%.3f", 1.23456, "1.235", 1.235),
        ("double", "%.2f", 3, "3.00", 3.0),
        ("double", "%12.4E", 12345.678, "  1.2346E+04", 12346.0),
        ("double", "%ld", 7.9, "7", 7.0),
        ("integer", "%5d", np.int64(42), "   42", 42),
        ("string", "%-6s", "ab", "ab    ", "ab    "),
        ("logical", "%c", np.bool_(False), "F", False),
        ("string", "", "free", "free", "free"),
    ],
)
def test_the_value_format_makes_the_card_text_and_the_value_held(
    kind: str, fmt: str, value: object, text: str, held: object
) -> None:
    body = f"\nParameter Name: X Y\nType: {kind}\nValue Format: {fmt}\n"
    p = parse_dictionary(HEADER + body, Path("/dics/D")).lookup("X Y")
    assert p is not None
    assert p.format_value(value) == text.strip() if not fmt else p.format_value(value) == text
    assert p.formatted(value) == held and type(p.formatted(value)) is type(held)


def test_a_comment_given_wins_over_the_dictionary_default(tmp_path: Path) -> None:
    (tmp_path / "ESO-VLT-DIC.T").write_text(HEADER + GAIN)
    dictionaries = load_dictionaries(["ESO-VLT-DIC.T"], [tmp_path])
    assert dictionaries.check("DET CHIP4 GAIN", 2.0, "measured today").comment == "measured today"
    definition = dictionaries.check("DET CHIP4 GAIN", 2.0)
    assert (definition.comment, definition.value) == ("Gain of chip 4 [e-/ADU], 100%", 2.0)


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("\nParameter Name X\nType: double\n", 10, "'Parameter Name X' is not 'Field Name: value'"),
        ("\n   indented first\n", 10, "a continuation line (indented) with no field above it"),
        ("\nParameter Name: DET dit\nType: double\n", 10, "Parameter Name 'DET dit' is not upper-case words"),
        (
            "\nParameter Name: A B\nType: float\n",
            11,
            "Type 'float'; expected one of: string, logical, integer",
        ),
        ("\nParameter Name: A B\nClass: header\n", 10, "parameter 'A B' has no 'Type' field"),
        ("\nClass: header\nType: double\n", 10, "the record has no 'Parameter Name' field"),
        ("\nParameter Name: A B\nType: double\nType: string\n", 12, "field 'Type' given twice"),
        (
            "\nParameter Name: A B\nType: integer\nValue Format: %.3f\n",
            12,
            "does not fit Type integer (use %d %i %u)",
        ),
        ("\nParameter Name: A B\nType: double\nValue Format: %.3f m\n", 12, "is not one printf conversion"),
        ("\nParameter Name: A B\nType: string\nValue Format: %d\n", 12, "does not fit Type string (use %s)"),
        (
            "\nParameter Name: A Bi\nType: string\nComment Format: %d and %d\n",
            12,
            "has 2 conversion(s) but 'A Bi' has 1",
        ),
        (
            "\nParameter Name: A B\nType: string\n\nParameter Name: A B\nType: double\n",
            13,
            "already defined at line 10",
        ),
        ("\nDictionary Name: ESO-VLT-DIC.AGAIN\n", 10, "a second identification record"),
    ],
)
def test_a_bad_dictionary_is_an_error_naming_the_file_and_line(body: str, line: int, words: str) -> None:
    with pytest.raises(DictionaryError) as caught:
        parse_dictionary(HEADER + body, Path("/dics/ESO-VLT-DIC.BAD"))
    assert str(caught.value).startswith(f"/dics/ESO-VLT-DIC.BAD line {line}: ")
    assert words in str(caught.value)


def test_a_file_without_an_identification_record_is_refused() -> None:
    with pytest.raises(
        DictionaryError, match=r"^/d/X line 2: the first record is not an identification record"
    ):
        parse_dictionary("# no identification\nParameter Name: A B\nType: double\n", Path("/d/X"))
    with pytest.raises(DictionaryError, match=r"^/d/X line 1: the first record"):
        parse_dictionary("# only comments\n", Path("/d/X"))


def test_unknown_fields_are_kept_and_do_not_fail() -> None:
    body = "\nParameter Name: A B\nType: string\nRange: anything\n"
    p = parse_dictionary(HEADER + body, Path("/d/X")).lookup("A B")
    assert p is not None and p.fields == (("Range", "anything"),)


def test_dictionaries_are_found_by_file_name_in_order_then_built_in(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "ESO-VLT-DIC.TEST").write_text(HEADER)
    assert find_dictionary("ESO-VLT-DIC.TEST", [first, second]) == second / "ESO-VLT-DIC.TEST"
    (first / "ESO-VLT-DIC.TEST").write_text(HEADER)
    assert find_dictionary("ESO-VLT-DIC.TEST", [first, second]) == first / "ESO-VLT-DIC.TEST"
    assert find_dictionary("ESO-VLT-DIC.DAQIF_DCS", [first]) == BUILTIN_DIRECTORY / "ESO-VLT-DIC.DAQIF_DCS"
    with pytest.raises(
        DictionaryError,
        match=rf"^keywordDictionaries\[1\]: dictionary 'ESO-VLT-DIC.NONE' not found in {first}, ",
    ):
        load_dictionaries(["ESO-VLT-DIC.TEST", "ESO-VLT-DIC.NONE"], [first])
    (first / "ESO-VLT-DIC.BAD").write_text(HEADER + "\nParameter Name: A\nType: real\n")
    with pytest.raises(
        DictionaryError,
        match=rf"^keywordDictionaries\[0\]: dictionary 'ESO-VLT-DIC.BAD': {first}/ESO-VLT-DIC.BAD line 11: ",
    ):
        load_dictionaries(["ESO-VLT-DIC.BAD"], [first])


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "ESO-VLT-DIC.T"
    path.write_text(HEADER + "\nParameter Name: A B\nType: string\n")
    assert load_dictionary(path).lookup("A B") is not None
    path.write_text(HEADER + "\nParameter Name: A C\nType: string\n\n")
    assert load_dictionary(path).lookup("A B") is None and load_dictionary(path).lookup("A C") is not None


def test_the_built_in_dictionaries_parse_and_define_the_demo_keywords() -> None:
    names = ["ESO-VLT-DIC.DAQIF_OBS", "ESO-VLT-DIC.DAQIF_TCS", "ESO-VLT-DIC.DAQIF_DCS"]
    dictionaries = load_dictionaries(names, [])
    assert [d.name for d in dictionaries.dictionaries] == names
    assert dictionaries.check("DET CHIP2 GAIN", 1.23456).value == 1.235
    assert dictionaries.check("TEL AIRM START", 1.2).comment == "Airmass at start"
    assert dictionaries.check("OBS ID", 12345).value == 12345


_words = st.from_regex(r"\A[A-Z][A-Z0-9_]{0,6}\Z")
_kinds = st.sampled_from(list(ParameterType))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.lists(_words, min_size=1, max_size=4), _kinds, st.booleans(), st.text("abc ,.", max_size=30)
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda t: " ".join(t[0]),
    )
)
def test_written_dictionaries_parse_back(entries: list[tuple[list[str], ParameterType, bool, str]]) -> None:
    """A dictionary written in the format (indexed last words, multi-line descriptions) reads back."""
    records = []
    for words, kind, indexed, description in entries:
        name = " ".join(words) + ("i" if indexed else "")
        head, _, tail = description.partition(",")
        text = f"{head.strip()}\n                   {tail.strip()}" if tail.strip() else head.strip()
        records.append(
            f"Parameter Name:    {name}\nType:              {kind.value}\nDescription:       {text}\n"
        )
    d = parse_dictionary(HEADER + "\n" + "\n\n".join(records), Path("/d/ESO-VLT-DIC.H"))
    exact = {p.name: p for p in d.parameters}
    for (words, kind, indexed, description), p in zip(entries, d.parameters, strict=True):
        assert p.type is kind
        keyword = " ".join(words) + ("17" if indexed else "")
        assert d.lookup(keyword) is exact.get(keyword, p)  # an exact definition of the same name wins
        head, _, tail = description.partition(",")
        assert p.description == " ".join(x for x in (head.strip(), tail.strip()) if x)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(st.sampled_from("PTVDCN :%#i1a\n \t"), max_size=200))
def test_any_text_parses_or_is_a_dictionary_error_naming_a_line(body: str) -> None:
    try:
        parse_dictionary(HEADER + body, Path("/d/X"))
    except DictionaryError as exc:
        assert str(exc).startswith("/d/X line ")


def test_a_value_its_format_cannot_write_is_not_valid(tmp_path: Path) -> None:
    (tmp_path / "ESO-VLT-DIC.T").write_text(
        HEADER + "\nParameter Name: A B\nType: double\nValue Format: %d\n"
    )
    dictionaries = load_dictionaries(["ESO-VLT-DIC.T"], [tmp_path])
    assert dictionaries.check("A B", 2.7).value == 2.0
    with pytest.raises(KeywordNotValid, match=r"^ESO keyword 'A B' value nan cannot be written as '%d'"):
        dictionaries.check("A B", float("nan"))
