"""The product's ESO keywords checked against the specification's keyword dictionaries.

Called once the merged keyword list of a product is final (`plan._merge_opened`, right after
`keywords.merge_keywords`), for HDF5 products and every other format alike. With
`keywordDictionaries` in the specification, every ESO keyword of the product must be defined in
one of them with a value of its type (`servers.dpm.dictionary`); the first that is not fails the
merge naming the keyword, the source it came from and the dictionaries (the DPM raises the ERROR
alert `merging`; fix the source file or the dictionary, then RetryMergeDaq). A keyword without a
comment gets the dictionary's `Comment Format`, and each value is written as its `Value Format`
makes it (`%.3f` of 0.12345 is held as 0.123; a double is held as a float, an integer as an int).
On a FITS card a number is written as its `Value Format` text (`0.5000`, `1.23457E+04`) when
that and the comment fit in the 80 characters (else as astropy writes the same value).
The keywords of `fitsKeywords` sources were checked at QueueDaq already; they are checked again
here (a dictionary may have changed since) and formatted the same way. The headers a FITS product
copies verbatim (every extension) are checked too (`check_copied_keywords`), but not formatted:
a copied HDU keeps its bytes, checksums included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from astropy.io import fits

from servers.dpm.dictionary import DictionarySet, KeywordNotValid, ParameterType
from servers.dpm.merge.common import MergeError, MergeLog
from servers.dpm.merge.keywords import Keyword, MergedKeywords

_NUMBERS = (ParameterType.INTEGER, ParameterType.DOUBLE)
# The HDF5 type of a source attribute is kept when it holds the dictionary's type.
_KINDS = {
    ParameterType.LOGICAL: "b",
    ParameterType.INTEGER: "iu",
    ParameterType.DOUBLE: "f",
    ParameterType.STRING: "SUO",
}


def apply_dictionaries(merged: MergedKeywords, dictionaries: DictionarySet | None, log: MergeLog) -> None:
    """Check, comment and format every ESO keyword of `merged` in place; `MergeError` names the first
    keyword that is not defined or not of its type."""
    if dictionaries is None:
        return
    problems: list[str] = []
    for name, kw in merged.values.items():
        if not kw.is_eso:
            continue
        try:
            definition = dictionaries.check(kw.short_name, kw.value, kw.comment)
        except KeywordNotValid as exc:
            problems.append(exc.of_source(repr(merged.origin[name])))
            continue
        parameter = definition.parameter
        dtype = _kept_dtype(kw, parameter.type, definition.value)
        text = (
            parameter.format_value(definition.value)
            if parameter.type in _NUMBERS and parameter.value_format
            else ""
        )
        defaulted = bool(definition.comment) and not kw.comment
        merged.values[name] = Keyword(kw.name, definition.value, definition.comment, dtype, text, defaulted)
    if problems:
        more = f" (and {len(problems) - 1} more ESO keywords)" if len(problems) > 1 else ""
        raise MergeError(f"{problems[0]}{more}; fix the source or the dictionary")
    log.info(f"keywords checked against {dictionaries.names}")


def check_copied_keywords(
    headers: Iterable[tuple[str, Iterable[Keyword]]], dictionaries: DictionarySet | None
) -> None:
    """Check the ESO keywords of headers the product copies verbatim (a FITS product's extensions),
    each given as (what it is, e.g. "source 'dcs1' HDU 1 (CHIP1)", its keywords). They are checked
    only, never commented or formatted: the bytes of a copied HDU stay the source's. `MergeError`
    names the first keyword that is not defined or not of its type, and where it is."""
    if dictionaries is None:
        return
    problems: list[str] = []
    for where, keywords in headers:
        for kw in keywords:
            if not kw.is_eso:
                continue
            try:
                dictionaries.check(kw.short_name, kw.value, kw.comment)
            except KeywordNotValid as exc:
                problems.append(exc.of_source(where))
    if problems:
        more = f" (and {len(problems) - 1} more ESO keywords)" if len(problems) > 1 else ""
        raise MergeError(f"{problems[0]}{more}; fix the source or the dictionary")


def dictionary_card(kw: Keyword, render: Callable[[str, Any, str], fits.Card]) -> fits.Card:
    """The FITS card of `kw` by `render` (`fits_cards.render_card`), with its Value Format text;
    a dictionary's default comment that cannot be on the card as it is (too long beside the value,
    not printable ASCII) is made ASCII and cut to fit, rather than failing the merge."""
    try:
        card = render(kw.name, kw.value, kw.comment)
    except ValueError:
        if not kw.comment_is_default:
            raise
        card = render(kw.name, kw.value, "")
        comment = kw.comment.encode("ascii", "replace").decode("ascii")
        comment = "".join(c if c.isprintable() else "?" for c in comment)
        room = 80 - len(card.image.rstrip()) - len(" / ")
        for cut in range(room, max(room - 4, 0), -1):  # astropy may lay the card out a little wider
            try:
                card = render(kw.name, kw.value, comment[:cut].rstrip())
                break
            except ValueError:
                continue
    return with_value_text(card, kw.text)


def with_value_text(card: fits.Card, text: str) -> fits.Card:
    """`card` with its value written as `text` (a number as its Value Format makes it: `0.5000`,
    `1.23457E+04`), when that still fits in one card; else `card` as astropy wrote it."""
    if not text:
        return card
    key = card.image.split("=", 1)[0]
    image = f"{key}= {text.strip()}" + (f" / {card.comment}" if card.comment else "")
    if len(image) > 80:
        return card  # the comment would not fit beside the formatted value: astropy's card keeps it
    try:
        formatted = fits.Card.fromstring(image.ljust(80))
        formatted.verify("exception")
    except (ValueError, fits.VerifyError):
        return card
    return formatted if formatted.value == card.value else card


def _kept_dtype(kw: Keyword, kind: ParameterType, value: Any) -> np.dtype[Any] | None:
    if kw.dtype is None or kw.dtype.kind not in _KINDS[kind]:
        return None
    if kind is ParameterType.STRING and value != _text(kw.value):
        return None  # a formatted string may not fit the source's fixed length
    return kw.dtype


def _text(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
