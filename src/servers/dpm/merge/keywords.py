"""Keywords: cards, `keywordRules` and the priority merge (format: see `servers.dpm.merge`).

The merged keyword list of a product is final when `merge_keywords` returns it; nothing
after it adds or renames keywords, only writes them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import re2

from daqif.spec import (
    FilterRule,
    FitsKeywordsSource,
    KeywordKind,
    KeywordRule,
    Specification,
    TransformRule,
)
from servers.dpm.merge.common import COMMENTARY, RESERVED_ATTRIBUTES, MergeError, MergeLog, source_where

ESO_NAME = re.compile(r"[A-Z0-9_-]+( [A-Z0-9_-]+)*")
FITS_NAME = re.compile(r"[A-Z0-9_-]{1,8}")


@dataclass
class Keyword:
    """One keyword on its way into the product. `name` is the attribute name (`ESO DET DIT`)."""

    name: str
    value: Any
    comment: str = ""
    dtype: np.dtype[Any] | None = None  # the HDF5 source's type, kept in the product
    text: str = ""  # the value as a dictionary's Value Format writes it on a card (`0.5000`)
    comment_is_default: bool = False  # the comment is a dictionary's Comment Format (may be cut)

    @property
    def is_eso(self) -> bool:
        return self.name.startswith("ESO ")

    @property
    def is_commentary(self) -> bool:
        return self.name in COMMENTARY

    @property
    def short_name(self) -> str:
        """The name rules match against: ESO names without `ESO `."""
        return self.name[4:] if self.is_eso else self.name


def is_keyword_name(name: str) -> bool:
    """True when an HDF5 root attribute name is a FITS or ESO keyword name."""
    if name.startswith("ESO "):
        return ESO_NAME.fullmatch(name[4:]) is not None
    return FITS_NAME.fullmatch(name) is not None


def commentary_lines(value: Any) -> list[str]:
    items = value.tolist() if isinstance(value, np.ndarray) else [value]
    flat: list[str] = []
    for item in np.ravel(np.asarray(items, dtype=object)).tolist():
        flat.append(item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))
    return flat


@dataclass(frozen=True)
class Card:
    """A parsed literal keyword card: `name` is "" for commentary text (then `commentary` is set)."""

    name: str
    value: str | int | float | bool
    comment: str = ""
    commentary: str = ""  # COMMENT or HISTORY when the card is commentary


_CARD = re.compile(r"(?P<name>[^=]*?)\s*=\s?(?P<rest>.*)")
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?")


def parse_card(text: str) -> Card:
    """Parse a FITS card (`literalKeyword` value); raise `ValueError` saying what is wrong."""
    head = text[:8].rstrip()
    if head in COMMENTARY and (len(text) <= 7 or text[7] == " "):
        return Card(name=head, value=text[8:].rstrip(), commentary=head)
    if not head.strip():
        return Card(name="COMMENT", value=text.strip(), commentary="COMMENT")
    match = _CARD.fullmatch(text.rstrip())
    if match is None:
        raise ValueError(f"card {text!r} is neither commentary (COMMENT/HISTORY/blank name) nor NAME = value")
    raw_name = match["name"].strip()
    if raw_name.startswith("HIERARCH "):
        raw_name = raw_name[len("HIERARCH ") :].strip()
    if raw_name.startswith("ESO "):
        short = " ".join(raw_name[4:].split())
        if ESO_NAME.fullmatch(short) is None:
            raise ValueError(f"card {text!r}: {raw_name!r} is not a valid ESO keyword name")
        name = f"ESO {short}"
    elif FITS_NAME.fullmatch(raw_name):
        name = raw_name
    else:
        raise ValueError(
            f"card {text!r}: {raw_name!r} is not a valid keyword name (1-8 of A-Z 0-9 _ -, or ESO words)"
        )
    value, comment = _parse_card_value(text, match["rest"])
    return Card(name=name, value=value, comment=comment)


def _parse_card_value(card: str, rest: str) -> tuple[str | int | float | bool, str]:
    rest = rest.strip()
    if rest.startswith("'"):
        out: list[str] = []
        i = 1
        while True:
            end = rest.find("'", i)
            if end < 0:
                raise ValueError(f"card {card!r}: string value has no closing quote")
            out.append(rest[i:end])
            if rest[end + 1 : end + 2] == "'":  # '' is a quote inside the string
                out.append("'")
                i = end + 2
                continue
            tail = rest[end + 1 :].strip()
            break
        if tail and not tail.startswith("/"):
            raise ValueError(f"card {card!r}: unexpected {tail!r} after the string value")
        return "".join(out).rstrip(), tail[1:].strip()
    text, _, comment = rest.partition("/")
    text = text.strip()
    comment = comment.strip()
    if not text:
        raise ValueError(f"card {card!r} has no value (undefined values are not supported)")
    if text in ("T", "F"):
        return text == "T", comment
    if _INT.fullmatch(text):
        return int(text), comment
    if _REAL.fullmatch(text):
        return float(text.replace("D", "E").replace("d", "e")), comment
    raise ValueError(f"card {card!r}: value {text!r} is not a string, T/F, an integer or a real number")


def _selection(keywords: Sequence[Keyword], patterns: Sequence[str]) -> set[int]:
    """Indexes selected by `[+-][ev] GLOB` patterns applied in order to an empty selection."""
    selected: set[int] = set()
    for pattern in patterns:
        sign, kind, glob = pattern[0], pattern[1], pattern[3:]
        for i, kw in enumerate(keywords):
            if (kw.is_eso == (kind == "e")) and fnmatch.fnmatchcase(kw.short_name, glob):
                if sign == "+":
                    selected.add(i)
                else:
                    selected.discard(i)
    return selected


def apply_keyword_rules(
    keywords: Sequence[Keyword], rules: Sequence[KeywordRule] | None, where: str, log: MergeLog | None = None
) -> list[Keyword]:
    """Apply `keywordRules` in order; `where` names the rules in errors (`sources[0].keywordRules`)."""
    if rules is None:
        return list(keywords)
    if not rules:
        return []  # an explicit empty list: copy no keyword at all
    current = list(keywords)
    for r, rule in enumerate(rules):
        chosen = _selection(current, rule.selection_patterns)
        if isinstance(rule, FilterRule):
            current = [kw for i, kw in enumerate(current) if i in chosen]
            continue
        current = _transform(current, chosen, rule, f"{where}[{r}]", log)
    return current


def _transform(
    keywords: list[Keyword], chosen: set[int], rule: TransformRule, where: str, log: MergeLog | None
) -> list[Keyword]:
    result: list[tuple[Keyword, bool]] = []  # (keyword, was renamed)
    for i, kw in enumerate(keywords):
        if i not in chosen or kw.is_commentary:
            result.append((kw, False))
            continue
        try:
            new_short = rule.rename(kw.short_name)
        except (re.error, re2.error, IndexError) as exc:
            raise MergeError(f"{where}: transform of {kw.name!r} failed: {exc}") from None
        if kw.is_eso:
            if ESO_NAME.fullmatch(new_short) is None:
                raise MergeError(
                    f"{where}: transform renames {kw.name!r} to 'ESO {new_short}', which is not a valid ESO "
                    "keyword name (upper-case words of A-Z 0-9 _ - separated by single spaces)"
                )
            new_name = f"ESO {new_short}"
        else:
            if FITS_NAME.fullmatch(new_short) is None or new_short in RESERVED_ATTRIBUTES:
                raise MergeError(
                    f"{where}: transform renames {kw.name!r} to {new_short!r}, which is not a valid value "
                    "keyword name (1-8 characters of A-Z 0-9 _ -, not a reserved name)"
                )
            new_name = new_short
        result.append((Keyword(new_name, kw.value, kw.comment, kw.dtype), new_name != kw.name))
    # A renamed keyword replaces an untouched one of the same name; between two renamed ones (or
    # two untouched ones) the later one wins. The survivor keeps the first one's place.
    by_name: dict[str, tuple[Keyword, bool]] = {}
    for kw, was_renamed in result:
        existing = by_name.get(kw.name)
        if existing is not None:
            if log is not None:
                log.warning(
                    f"{where}: two keywords are named {kw.name!r} after the transform; one is dropped"
                )
            if existing[1] and not was_renamed:
                continue
        by_name[kw.name] = (kw, was_renamed)
    return [kw for kw, _ in by_name.values()]


def fits_keywords(source: FitsKeywordsSource, where: str) -> list[Keyword]:
    out: list[Keyword] = []
    for k, kw in enumerate(source.keywords):
        if kw.kind is KeywordKind.LITERAL:
            try:
                card = parse_card(str(kw.value))
            except ValueError as exc:
                raise MergeError(f"{where}.keywords[{k}]: {exc}") from None
            if card.commentary:
                out.append(Keyword(card.commentary, [str(card.value)]))
            else:
                out.append(
                    Keyword(card.name, _fits_value(card.value, f"{where}.keywords[{k}]"), card.comment)
                )
            continue
        out.append(Keyword(kw.attribute_name, _fits_value(kw.value, f"{where}.keywords[{k}]"), kw.comment))
    return out


def _fits_value(value: str | int | float | bool, where: str) -> Any:
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise MergeError(f"{where}: integer {value} does not fit in 64 bits")
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    return str(value)


@dataclass
class MergedKeywords:
    """The keywords of one product: value keywords by name (the winner of each collision, in
    order of arrival), commentary lines per name in priority order, and the source each value
    came from."""

    values: dict[str, Keyword] = field(default_factory=dict)
    commentary: dict[str, list[str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.values) + sum(len(lines) for lines in self.commentary.values())


def keywords_by_priority(
    spec: Specification, file_keywords: Mapping[str, list[Keyword]]
) -> list[tuple[str, list[Keyword]]]:
    """Each source's keywords in merge priority: `sources` in order (`fitsKeywords` from the
    specification, file sources from `file_keywords` by source name), `target.source` last."""
    per_source: list[tuple[str, list[Keyword]]] = []
    for entry in spec.sources:
        if isinstance(entry, FitsKeywordsSource):
            per_source.append((entry.source_name, fits_keywords(entry, source_where(spec, entry))))
        else:
            per_source.append((entry.source_name, file_keywords[entry.source_name]))
    if spec.target_source is not None:
        name = spec.target_source.source_name
        per_source.append((name, file_keywords[name]))
    return per_source


def merge_keywords(
    per_source: Sequence[tuple[str, list[Keyword]]],
    log: MergeLog,
    reserved: Container[str] = RESERVED_ATTRIBUTES,
) -> MergedKeywords:
    """Merge the keywords of every source by priority; `per_source` in priority order, highest first.

    This is the one place where the merged keyword list of a product becomes final: what it
    returns is written as it is (checks of the whole product's keywords belong here).
    `reserved`: names the merge writes itself (dropped with a warning), per product format.
    """
    merged = MergedKeywords()
    for source_name, keywords in per_source:
        for kw in keywords:
            if kw.name in reserved:
                log.warning(f"source {source_name!r}: keyword {kw.name!r} is reserved for the merge; dropped")
                continue
            if kw.is_commentary:
                merged.commentary.setdefault(kw.name, []).extend(commentary_lines(kw.value))
                continue
            if kw.name in merged.values:
                winner = merged.origin[kw.name]
                log.info(f"keyword {kw.name!r} of source {source_name!r} overridden by source {winner!r}")
                continue
            merged.values[kw.name] = kw
            merged.origin[kw.name] = source_name
    return merged
