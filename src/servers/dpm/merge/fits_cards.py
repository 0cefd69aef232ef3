"""FITS cards: keywords read from a FITS header, rendered as cards, and put in ESO DICB order.

The keyword model is the one of `keywords.py` (`Keyword`: `ESO <words>` for ESO keywords, the
plain name for a value keyword, `COMMENT`/`HISTORY` for commentary); this module is where that
model meets the FITS format, through astropy.io.fits (cards, CONTINUE long strings, HIERARCH).

Card rules (the same at QueueDaq, `check_keyword_cards`, and in the merge, `render_card`)
    A keyword must be representable as a FITS card without losing anything: an ESO keyword is
    written `HIERARCH ESO <name> = value / comment`, a value keyword `NAME    = value / comment`;
    a string value longer than a card takes CONTINUE cards (the long-string convention), up to
    `MAX_STRING_CHARS` characters; a name, a number or a boolean that does not fit one 80-column
    card with its name is refused; so is any character outside printable ASCII (values and
    comments). In a FITS product the comment must fit too (in an HDF5 product it is stored whole
    in `KEYWORD_COMMENTS`, so only name and value are checked there).

DICB order (as ESO's pipeline library sorts a header; `dicb_order`)
    structure keywords (written by the merge, never copied); the descriptive keywords in the
    order of `DESCRIPTIVE`; WCS keywords; other value keywords; `HIERARCH ESO` keywords by their
    first word in the order of `ESO_CATEGORIES` (`INS1` sorts as `INS`), then other categories;
    non-ESO HIERARCH keywords; HISTORY; COMMENT. Within a class the order of arrival (priority,
    then each source's own order) is kept.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from daqif.spec import FitsKeywordsSource, KeywordKind, Specification
from servers.dpm.merge.keywords import Keyword, parse_card

MAX_STRING_CHARS = 1024
"""The longest string value of a keyword (about 17 CONTINUE cards)."""

STRUCTURE = re.compile(
    r"SIMPLE|BITPIX|NAXIS\d*|XTENSION|PCOUNT|GCOUNT|TFIELDS|TFORM\d+|TBCOL\d+|GROUPS|EXTEND|END"
)
"""Structure keywords: written by the merge from the data they describe, never copied by rules."""

FITS_RESERVED = frozenset({"ARCFILE", "ORIGFILE", "DATE", "CHECKSUM", "DATASUM"})
"""Written by the merge; a source keyword of one of these names is dropped with a warning."""

DESCRIPTIVE = (
    "RA",
    "DEC",
    "LST",
    "UTC",
    "DATE",
    "ORIGIN",
    "OBJECT",
    "PI-COI",
    "TELESCOP",
    "INSTRUME",
    "DATE-OBS",
    "DATE-END",
    "OBSERVER",
    "EXPTIME",
    "MJD-OBS",
    "MJD-END",
    "EQUINOX",
    "TIMESYS",
    "RADESYS",
    "BLANK",
)
_DESCRIPTIVE_RANK = {name: i for i, name in enumerate(DESCRIPTIVE)} | {
    "RADECSYS": DESCRIPTIVE.index("RADESYS")
}
_WCS = re.compile(
    r"(CRVAL|CRPIX|CDELT|CTYPE|CUNIT|CRDER|CSYER)\d+[A-Z]?|(PC|PV|PS|CD)\d+_\d+[A-Z]?|WCSAXES[A-Z]?|WCSNAME[A-Z]?"
)
ESO_CATEGORIES = ("DPR", "OBS", "TPL", "GEN", "TEL", "INS", "DET", "LOG", "PRO")

# Classes of `dicb_order`, in order.
_DESCRIPTIVE_CLASS, _WCS_CLASS, _VALUE_CLASS, _ESO_CLASS, _HIERARCH_CLASS, _HISTORY_CLASS, _COMMENT_CLASS = (
    range(7)
)


def is_hierarch(name: str) -> bool:
    """A keyword written with the HIERARCH convention (ESO keywords, names beyond 8 characters)."""
    return name.startswith("ESO ") or len(name) > 8 or " " in name


def card_keyword(name: str) -> str:
    return f"HIERARCH {name}" if is_hierarch(name) else name


def dicb_rank(kw: Keyword) -> tuple[int, int]:
    """The DICB class of a keyword (and its rank inside the class when the class is ordered)."""
    if kw.name == "HISTORY":
        return (_HISTORY_CLASS, 0)
    if kw.name == "COMMENT":
        return (_COMMENT_CLASS, 0)
    if kw.is_eso:
        category = re.sub(r"\d+$", "", kw.short_name.split(" ", 1)[0])
        if category in ESO_CATEGORIES:
            return (_ESO_CLASS, ESO_CATEGORIES.index(category))
        return (_ESO_CLASS, len(ESO_CATEGORIES))
    if is_hierarch(kw.name):
        return (_HIERARCH_CLASS, 0)
    if kw.name in _DESCRIPTIVE_RANK:
        return (_DESCRIPTIVE_CLASS, _DESCRIPTIVE_RANK[kw.name])
    if _WCS.fullmatch(kw.name):
        return (_WCS_CLASS, 0)
    return (_VALUE_CLASS, 0)


def dicb_order(keywords: Iterable[Keyword]) -> list[Keyword]:
    """`keywords` (in order of arrival) sorted into the DICB classes; stable within a class."""
    return sorted(keywords, key=dicb_rank)  # sorted() is stable


def header_keywords(header: fits.Header) -> list[Keyword]:
    """The keywords of a FITS header, in its order, without structure keywords.

    Blank-name commentary cards become COMMENT lines (as a blank-name `literalKeyword` does).
    """
    out: list[Keyword] = []
    for card in header.cards:
        name = card.keyword
        if name in ("COMMENT", "HISTORY", ""):
            out.append(Keyword(name or "COMMENT", [str(card.value)]))
            continue
        if STRUCTURE.fullmatch(name):
            continue
        out.append(Keyword(name, card.value, card.comment))
    return out


def plain_value(value: Any) -> Any:
    """A keyword value as astropy writes it (numpy scalars of `fitsKeywords` values as Python ones)."""
    return value.item() if isinstance(value, np.generic) else value


def render_card(name: str, value: Any, comment: str, *, with_comment: bool = True) -> fits.Card:
    """The card(s) of one keyword; raise `ValueError` saying why it cannot be written unaltered."""
    value = plain_value(value)
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise ValueError(
            f"the string value has {len(value)} characters; at most {MAX_STRING_CHARS} are allowed"
        )
    for text, what in ((name, "name"), (comment if with_comment else "", "comment")):
        if not text.isascii() or not text.isprintable():
            raise ValueError(f"the {what} contains characters that are not printable ASCII")
    card = _card(name, value, "")
    if with_comment and comment:
        card = _card(name, value, comment, what="with its comment")
    return card


def _card(name: str, value: Any, comment: str, what: str = "") -> fits.Card:
    with warnings.catch_warnings():
        warnings.simplefilter("error", VerifyWarning)
        try:
            card = fits.Card(card_keyword(name), value, comment)
            image = card.image
        except (ValueError, VerifyWarning) as exc:
            reason = str(exc).splitlines()[0]
            if "too long" in reason:
                reason = (
                    f"{card_keyword(name)!r} = {value!r} {what} does not fit in an 80-character card".replace(
                        "  ", " "
                    )
                )
            raise ValueError(reason) from None
    if len(image) > 80 and not isinstance(value, str):
        raise ValueError(f"{card_keyword(name)!r} = {value!r} does not fit in an 80-character card")
    return card


def check_keyword_cards(spec: Specification, *, with_comments: bool) -> None:
    """Refuse a `fitsKeywords` keyword that cannot be a FITS card unaltered (see the module
    docstring); raise `ValueError` naming the source and the keyword."""
    for i, source in enumerate(spec.sources):
        if isinstance(source, FitsKeywordsSource):
            _check_source(i, source, with_comments)


def _check_source(i: int, source: FitsKeywordsSource, with_comments: bool) -> None:
    for k, kw in enumerate(source.keywords):
        where = f"sources[{i}] {source.source_name!r} keywords[{k}]"
        if kw.kind is KeywordKind.LITERAL:
            card = parse_card(str(kw.value))  # already checked: it parses
            if card.commentary:
                if not str(card.value).isascii() or not str(card.value).isprintable():
                    raise ValueError(
                        f"{where} {card.commentary!r}: the text has characters that are not printable ASCII"
                    )
                continue
            name, value, comment = card.name, card.value, card.comment
        else:
            name, value, comment = kw.attribute_name, kw.value, kw.comment
        try:
            render_card(name, value, comment, with_comment=with_comments)
        except ValueError as exc:
            raise ValueError(f"{where} {name!r}: {exc}") from None


def commentary_cards(name: str, lines: Sequence[str]) -> list[fits.Card]:
    """COMMENT or HISTORY cards for `lines` (a line longer than a card continues on the next)."""
    header = fits.Header()
    for line in lines:
        if not line.isascii() or not line.isprintable():
            raise ValueError(f"{name} line {line[:40]!r} contains characters that are not printable ASCII")
        header.add_comment(line) if name == "COMMENT" else header.add_history(line)
    return list(header.cards)
