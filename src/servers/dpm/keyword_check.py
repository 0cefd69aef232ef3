"""QueueDaq's check of a specification's own ESO keywords against its `keywordDictionaries`.

When a specification lists dictionaries, each of them must be found (in the DPM's
`dictionary_dirs`, then the built-in ones) and parse, and every ESO keyword a `fitsKeywords`
source gives (`esoKeyword`, and `literalKeyword` cards `HIERARCH ESO … = value`) must be defined
in one of them with a value of its type; else QueueDaq answers INVALID_ARGUMENT naming the
dictionary and the line, or the keyword (`sources[i].keywords[j]`) and its source. Keywords that
come from files are checked by the merge, when it has read them (an ERROR alert in MERGING).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from daqif.errors import DaqException
from daqif.spec import FitsKeywordsSource, KeywordKind, Specification
from servers.dpm.dictionary import DictionaryError, KeywordNotValid, load_dictionaries
from servers.dpm.merge import parse_card


def check_keywords(spec: Specification, dictionary_dirs: Iterable[Path]) -> None:
    """Raise INVALID_ARGUMENT when a dictionary is missing or bad, or a keyword is not defined."""
    if not spec.keyword_dictionaries:
        return
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
                card = parse_card(str(keyword.value))  # refused before when it does not parse
                if not card.commentary and card.name.startswith("ESO "):
                    yield where, source.source_name, card.name[4:], card.value
