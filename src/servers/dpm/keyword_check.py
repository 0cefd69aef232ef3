"""QueueDaq's checks of a specification's keywords: FITS cards, and ESO keywords against its dictionaries.

`check_cards`: a `literalKeyword` card the merge cannot parse, or a keyword that cannot be written
as a FITS card unaltered (`merge.fits_cards`), is refused at QueueDaq, not as a merge failure later.

When a specification lists dictionaries, each of them must be found (in the DPM's
`dictionary_dirs`, then the built-in ones) and parse, and every ESO keyword a `fitsKeywords`
source gives (`esoKeyword`, and `literalKeyword` cards `HIERARCH ESO … = value`) must be defined
in one of them with a value of its type; else QueueDaq answers INVALID_ARGUMENT naming the
dictionary and the line, or the keyword (`sources[i].keywords[j]`) and its source. Keywords that
come from files are checked by the merge, when it has read them (an ERROR alert in MERGING).

The checks need astropy (cards) and numpy (dictionary types): ~0.7 s of imports the server does
not pay at start-up. They are imported at the first check, or before by `warm_up`, which the
server runs in a background thread once it serves (`main.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from daqif.errors import DaqException
from daqif.spec import FitsKeywordsSource, KeywordKind, ProductFormat, Specification

_HEAVY_MODULES = ("servers.dpm.merge.keywords", "servers.dpm.merge.fits_cards", "servers.dpm.dictionary")


def warm_up() -> None:
    """Import what the checks use (astropy, numpy), so that the first QueueDaq does not wait for it."""
    for name in _HEAVY_MODULES:
        importlib.import_module(name)


def check_cards(spec: Specification) -> None:
    """Raise INVALID_ARGUMENT when a `fitsKeywords` keyword cannot be a FITS card unaltered."""
    from servers.dpm.merge import check_keyword_cards, parse_card

    for i, source in enumerate(spec.sources):
        if not isinstance(source, FitsKeywordsSource):
            continue
        for j, keyword in enumerate(source.keywords):
            if keyword.kind is KeywordKind.LITERAL:
                try:
                    parse_card(str(keyword.value))
                except ValueError as exc:
                    raise DaqException.invalid_argument(
                        f"sources[{i}].keywords[{j}].value: {exc}", id=spec.id
                    ) from None
    try:
        check_keyword_cards(spec, with_comments=spec.product_format is ProductFormat.FITS)
    except ValueError as exc:
        raise DaqException.invalid_argument(str(exc), id=spec.id) from None


def check_keywords(spec: Specification, dictionary_dirs: Iterable[Path]) -> None:
    """Raise INVALID_ARGUMENT when a dictionary is missing or bad, or a keyword is not defined."""
    if not spec.keyword_dictionaries:
        return
    from servers.dpm.dictionary import DictionaryError, KeywordNotValid, load_dictionaries

    try:
        dictionaries = load_dictionaries(spec.keyword_dictionaries, dictionary_dirs)
    except DictionaryError as exc:
        raise DaqException.invalid_argument(str(exc), id=spec.id) from None
    for where, source, name, value in _eso_keywords(spec):
        try:
            dictionaries.check(name, value)
        except KeywordNotValid as exc:
            raise DaqException.invalid_argument(
                f"{where}: {exc.of_source(repr(source))}", id=spec.id
            ) from None


def _eso_keywords(spec: Specification) -> Iterator[tuple[str, str, str, Any]]:
    """(where, sourceName, ESO name without `ESO `, value) of each ESO keyword of the fitsKeywords sources."""
    for i, source in enumerate(spec.sources):
        if not isinstance(source, FitsKeywordsSource):
            continue
        for j, keyword in enumerate(source.keywords):
            where = f"sources[{i}].keywords[{j}]"
            if keyword.kind is KeywordKind.ESO:
                yield where, source.source_name, keyword.name, keyword.value
            elif keyword.kind is KeywordKind.LITERAL:
                from servers.dpm.merge import parse_card

                card = parse_card(str(keyword.value))  # refused before when it does not parse
                if not card.commentary and card.name.startswith("ESO "):
                    yield where, source.source_name, card.name[4:], card.value
