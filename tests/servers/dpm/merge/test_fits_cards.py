"""FITS cards: the DICB order and the keywords QueueDaq refuses because no card can hold them."""

from __future__ import annotations

from typing import Any

import pytest

from daqif.spec import load_specification
from servers.dpm.merge.fits_cards import check_keyword_cards, dicb_order
from servers.dpm.merge.keywords import Keyword


def test_dicb_order_sorts_classes_and_eso_categories_and_keeps_arrival_within_a_class() -> None:
    arrival = [
        "COMMENT", "ESO DET DIT", "HISTORY", "FOO BAR", "ESO XYZ A", "ESO INS1 TEMP", "ESO DPR CATG",
        "MYKEY", "CRVAL1", "PC1_2", "OBJECT", "RA", "ESO TEL ALT", "ESO INS MODE", "ESO DPR TYPE",
        "RADECSYS", "DATE", "WCSAXES", "OTHER", "ESO OBS NAME", "ESO PRO CATG", "ESO GEN X", "ESO TPL ID",
        "ESO LOG A",
    ]  # fmt: skip
    ordered = [kw.name for kw in dicb_order(Keyword(n, "x") for n in arrival)]
    assert ordered == [
        "RA", "DATE", "OBJECT", "RADECSYS",  # descriptive, in DICB order
        "CRVAL1", "PC1_2", "WCSAXES",  # WCS, in arrival order
        "MYKEY", "OTHER",  # other value keywords
        "ESO DPR CATG", "ESO DPR TYPE", "ESO OBS NAME", "ESO TPL ID", "ESO GEN X", "ESO TEL ALT",
        "ESO INS1 TEMP", "ESO INS MODE",  # INS1 sorts as INS, arrival order kept
        "ESO DET DIT", "ESO LOG A", "ESO PRO CATG", "ESO XYZ A",
        "FOO BAR",  # non-ESO HIERARCH
        "HISTORY", "COMMENT",
    ]  # fmt: skip


def spec_with(keyword: dict[str, Any], fits_product: bool = False) -> Any:
    sources: list[dict[str, Any]] = [{"type": "fitsKeywords", "sourceName": "ocm", "keywords": [keyword]}]
    if fits_product:
        sources.append({"type": "fitsFile", "sourceName": "dcs", "location": "/data/dcs.fits"})
    return load_specification({"id": "K", "target": {"fileId": "K"}, "sources": sources})


LONG_ESO = " ".join(["ABCDEFGH"] * 7)  # 63 characters: HIERARCH ESO <name> = leaves 4 for a value


@pytest.mark.parametrize(
    ("keyword", "problem"),
    [
        (
            {"type": "esoKeyword", "name": LONG_ESO, "value": 1.25e-100},
            "does not fit in an 80-character card",
        ),
        ({"type": "esoKeyword", "name": LONG_ESO, "value": 123456}, "does not fit in an 80-character card"),
        ({"type": "valueKeyword", "name": "OBJECT", "value": "M31 é"}, "printable ASCII"),
        ({"type": "valueKeyword", "name": "OBJECT", "value": "a\tb"}, "printable ASCII"),
        ({"type": "valueKeyword", "name": "OBJECT", "value": "x" * 1025}, "at most 1024 are allowed"),
        ({"type": "esoKeyword", "name": "DET DIT", "value": 1, "comment": "naïve"}, "printable ASCII"),
        ({"type": "literalKeyword", "value": "OBJECT  = 'café' / a literal card"}, "printable ASCII"),
        ({"type": "literalKeyword", "value": "COMMENT déjà vu"}, "printable ASCII"),
    ],
)
def test_a_keyword_no_card_can_hold_unaltered_is_refused_naming_source_and_keyword(
    keyword: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=r"^sources\[0\] 'ocm' keywords\[0\] '[A-Z ]+': ") as info:
        check_keyword_cards(spec_with(keyword), with_comments=True)
    assert problem in str(info.value)
    assert len(str(info.value)) < 400


def test_a_comment_that_does_not_fit_is_refused_only_where_a_card_is_written() -> None:
    keyword = {"type": "esoKeyword", "name": "DET DIT", "value": 0.5, "comment": "c" * 80}
    check_keyword_cards(spec_with(keyword), with_comments=False)  # HDF5: the comment is stored whole
    with pytest.raises(ValueError, match="with its comment does not fit"):
        check_keyword_cards(spec_with(keyword, fits_product=True), with_comments=True)


def test_long_strings_and_long_eso_names_that_fit_are_accepted() -> None:
    check_keyword_cards(
        spec_with({"type": "esoKeyword", "name": "OBS NAME", "value": "y" * 1024}), with_comments=True
    )
    check_keyword_cards(spec_with({"type": "esoKeyword", "name": LONG_ESO, "value": 1}), with_comments=True)
