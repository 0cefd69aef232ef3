"""The Data Product Specification: its JSON Schema, the one loader, and typed objects.

`load_specification(text)` is the only way a specification enters the system (the DPM server,
`daqif-dpm-merge` and the client CLI all call it). Every problem is reported as a
`SpecificationError` whose message starts with where it is (`sources[1].location: ...`).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import re2

from daqif.errors import quote

SCHEMA_RESOURCE = "data-product-specification.schema.json"


class SpecificationError(ValueError):
    """An invalid specification. `where` is the JSON path of the problem ("" for the document)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class Location:
    """A source location: a local absolute path, or `[user@]host:/path` fetched with rsync."""

    path: str
    host: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.host is not None

    @classmethod
    def parse(cls, text: str) -> Location:
        if text.startswith("/"):
            return cls(path=text)
        host, _, path = text.partition(":")
        return cls(path=path, host=host)

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path


class KeywordKind(enum.Enum):
    VALUE = "valueKeyword"
    ESO = "esoKeyword"
    LITERAL = "literalKeyword"


@dataclass(frozen=True)
class Keyword:
    """A FITS keyword. ESO keywords are named without the `ESO ` prefix (`DET DIT`); a literal
    keyword has no name and its `value` is the whole card text (e.g. `COMMENT free text`)."""

    kind: KeywordKind
    value: str | int | float | bool
    name: str = ""
    comment: str = ""

    @property
    def attribute_name(self) -> str:
        """The HDF5 root attribute name of this keyword (`OBJECT`, `ESO DET DIT`)."""
        return f"ESO {self.name}" if self.kind is KeywordKind.ESO else self.name


@dataclass(frozen=True)
class FilterRule:
    """Keep (+) or drop (-) ESO (`e`) or value (`v`) keywords by glob patterns, in order."""

    selection_patterns: tuple[str, ...]


@dataclass(frozen=True)
class TransformRule:
    """Rename the selected keywords with `re.sub(regex, format, name)` semantics, matched by RE2.

    RE2 runs in time linear in the name, so no rule can hold a merge (a backtracking pattern such as
    `(a+)+$` takes Python's `re` exponential time); it has no backreferences or lookaround, which
    `load_specification` refuses with the reason.
    """

    selection_patterns: tuple[str, ...]
    regex: str
    format: str

    def rename(self, name: str) -> str:
        """`name` with every match of `regex` replaced by `format` (`\\1`, `\\g<name>` as in `re.sub`)."""
        return str(compile_regex(self.regex).sub(self.format, name))


@cache
def compile_regex(pattern: str) -> Any:
    """`pattern` compiled by RE2; raises `re2.error` (its message as text) when RE2 cannot run it."""
    options = re2.Options()
    options.log_errors = False  # the error is raised and reported; RE2's own stderr line is noise
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise re2.error(reason) from None


KeywordRule = FilterRule | TransformRule


@dataclass(frozen=True)
class FitsKeywordsSource:
    source_name: str
    keywords: tuple[Keyword, ...]


@dataclass(frozen=True)
class Hdf5FileSource:
    """An HDF5 file. `keyword_rules` None: copy every user keyword; empty: copy none."""

    source_name: str
    location: Location
    keyword_rules: tuple[KeywordRule, ...] | None = None


@dataclass(frozen=True)
class FitsFileSource:
    """A FITS file: primary-HDU keywords through `keyword_rules` (None: copy every user keyword;
    empty: copy none), extensions copied verbatim."""

    source_name: str
    location: Location
    keyword_rules: tuple[KeywordRule, ...] | None = None


FileSource = Hdf5FileSource | FitsFileSource
Source = FitsKeywordsSource | Hdf5FileSource | FitsFileSource


class ProductFormat(enum.StrEnum):
    """The product's format, decided by its file sources (`Specification.product_format`)."""

    HDF5 = "hdf5"
    FITS = "fits"

    @property
    def suffix(self) -> str:
        return ".h5" if self is ProductFormat.HDF5 else ".fits"


@dataclass(frozen=True)
class Receiver:
    """An `olasReceiver`: a directory the product is released to (remote when `host` is set)."""

    path: str
    host: str | None = None
    allow_symlink: bool = False


@dataclass(frozen=True)
class Specification:
    """A validated Data Product Specification; `sources` ordered highest priority first."""

    id: str
    file_id: str
    sources: tuple[Source, ...]
    receivers: tuple[Receiver, ...] = ()
    target_source: FileSource | None = None
    keyword_dictionaries: tuple[str, ...] = ()
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def product_format(self) -> ProductFormat:
        """FITS when any source or the target is a `fitsFile` (the loader refuses a mix), else HDF5."""
        if any(isinstance(s, FitsFileSource) for s in self.file_sources):
            return ProductFormat.FITS
        return ProductFormat.HDF5

    @property
    def product_name(self) -> str:
        return f"{self.file_id}{self.product_format.suffix}"

    @property
    def file_sources(self) -> tuple[FileSource, ...]:
        """Every file source (collected before the merge), the target source first when there is one."""
        base = (self.target_source,) if self.target_source else ()
        return base + tuple(s for s in self.sources if isinstance(s, (Hdf5FileSource, FitsFileSource)))

    @property
    def hdf5_sources(self) -> tuple[Hdf5FileSource, ...]:
        """Every HDF5 source, the target source first when there is one."""
        return tuple(s for s in self.file_sources if isinstance(s, Hdf5FileSource))

    @property
    def fits_sources(self) -> tuple[FitsFileSource, ...]:
        """Every FITS file source, the target source first when there is one."""
        return tuple(s for s in self.file_sources if isinstance(s, FitsFileSource))

    def to_json(self) -> str:
        return json.dumps(self.document, sort_keys=True)


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema shipped in `daqif/schema/`."""
    text = resources.files("daqif").joinpath("schema", SCHEMA_RESOURCE).read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


@cache
def _fast_validator() -> Any | None:
    """The same schema compiled by `jsonschema_rs` (~10 µs a document against ~0.7 ms), or None.

    It only answers "valid": a document it refuses is validated again by `jsonschema`, whose
    errors name the problem, so messages (and, where the two differ, the verdict) stay
    `jsonschema`'s. It is never more lenient on this schema (no format assertions; its regexes
    are ECMA-262's, whose `$` does not match before a final newline as Python's does).
    """
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - a dependency; the slow path still validates
        return None
    return jsonschema_rs.Draft202012Validator(schema())


_NAME = re2.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def json_path(parts: Any) -> str:
    """`["sources", 1, "location"]` → `sources[1].location`; a key that is not a short plain name
    is quoted in brackets and cut (`extra['']`, `extra['a b']`), so the path stays unambiguous and
    leaves room for the problem in a bounded message."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif len(str(part)) > 64 or not _NAME.fullmatch(str(part)):
            out += f"[{quote(str(part), 40)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_problem(error: jsonschema.ValidationError) -> SpecificationError:
    where = json_path(error.absolute_path)
    keyword = error.validator
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        # Name the first unexpected key in the path itself (quoted and cut when long), so that
        # even a document-level typo says where it is.
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extras = [key for key in error.instance if key not in known]
        if extras:
            allowed = ", ".join(sorted(known)) or "none"
            more = f" (and {len(extras) - 1} more)" if len(extras) > 1 else ""
            return SpecificationError(
                json_path([*error.absolute_path, extras[0]]),
                f"unknown field{more}; the fields allowed here are: {quote(allowed, 300)}",
            )
        return SpecificationError(where, error.message)
    if keyword == "required":
        return SpecificationError(where, error.message)
    if keyword == "enum" and error.absolute_path and error.absolute_path[-1] == "type":
        expected = ", ".join(str(v) for v in error.validator_value)  # type: ignore[union-attr]
        return SpecificationError(where, f"unknown type {quote(error.instance)}; expected one of: {expected}")
    if keyword == "maxLength":
        return SpecificationError(
            where, f"{quote(error.instance)} is too long (at most {error.validator_value} characters)"
        )
    if keyword == "minLength":
        return SpecificationError(
            where, f"{quote(error.instance)} is too short (at least {error.validator_value})"
        )
    if keyword == "pattern":
        hint = _PATTERN_HINTS.get(str(error.validator_value), f"must match {error.validator_value}")
        return SpecificationError(where, f"{quote(error.instance)} is not valid: {hint}")
    if keyword == "type":
        return SpecificationError(where, f"{quote(error.instance)} is not of type {error.validator_value}")
    return SpecificationError(where, error.message)


_PATTERN_HINTS = {
    "^[A-Za-z0-9][A-Za-z0-9_.:+-]*$": "use letters, digits and _ . : + - (starting with a letter or digit)",
    "^[A-Za-z0-9_][A-Za-z0-9_.-]*$": "use letters, digits and _ . -",
    "^(([A-Za-z0-9_][A-Za-z0-9_.-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*:)?/": (
        "expected an absolute path or [user@]host:/absolute/path (a host starts with a letter or digit)"
    ),
    "^[A-Z0-9_-]+$": "FITS keyword names use upper-case letters, digits, _ and -",
    "^[A-Z0-9_-]+( [A-Z0-9_-]+)*$": "ESO keyword names are upper-case words separated by single spaces",
    "^[A-Za-z0-9][A-Za-z0-9_.+-]*$": (
        "a dictionary name is a file name of letters, digits and _ . + - such as ESO-VLT-DIC.TCS"
    ),
    "^[+-][ev] \\S.*$": (
        "a selection pattern is '+' or '-', then 'e' (ESO) or 'v' (value), a space and a glob"
    ),
    "^([A-Za-z0-9_][A-Za-z0-9_.-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*$": (
        "expected a host name, optionally user@host, starting with a letter or digit (never an option)"
    ),
}


_MAX_DEPTH = 16  # a specification is at most ~6 levels deep; deeper is not one
_INT64 = (-(2**63), 2**63 - 1)


def _check_values(value: Any, path: list[str | int], depth: int) -> None:
    """Refuse what the schema's types let through but nothing downstream can hold: NUL characters
    (C strings, file names, FITS cards), integers beyond 64 bits (HDF5 and FITS integers) and
    absurd nesting (recursive validators)."""
    if depth > _MAX_DEPTH:
        raise SpecificationError(json_path(path), f"nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise SpecificationError(json_path(path), "contains a NUL character")
    elif isinstance(value, bool):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise SpecificationError(json_path(path), f"{value} is not a finite number")
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise SpecificationError(json_path(path), f"integer {quote(value, 40)} does not fit in 64 bits")
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise SpecificationError(json_path([*path, key]), "the key contains a NUL character")
            _check_values(item, [*path, key], depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, [*path, i], depth + 1)


def _check_path(where: str, path: str) -> None:
    if not path.startswith("/"):
        raise SpecificationError(where, f"{quote(path)} is not an absolute path")
    if ".." in PurePosixPath(path).parts:
        raise SpecificationError(where, f"{quote(path)} contains '..'; give the path without it")
    if "\x00" in path:
        raise SpecificationError(where, "path contains a NUL byte")


def _rules(where: str, raw: list[dict[str, Any]] | None) -> tuple[KeywordRule, ...] | None:
    if raw is None:
        return None
    rules: list[KeywordRule] = []
    for i, rule in enumerate(raw):
        patterns = tuple(rule["selectionPatterns"])
        if rule["type"] == "filter":
            rules.append(FilterRule(patterns))
            continue
        try:
            compile_regex(rule["regex"])
        except re2.error as exc:
            raise SpecificationError(
                f"{where}[{i}].regex",
                f"{quote(rule['regex'])} is not a valid regular expression: {exc} (RE2 syntax: linear time, "
                "no backreferences or lookaround)",
            ) from None
        rules.append(TransformRule(patterns, rule["regex"], rule["format"]))
    return tuple(rules)


def _file_source(where: str, raw: dict[str, Any]) -> FileSource:
    location = Location.parse(raw["location"])
    _check_path(f"{where}.location", location.path)
    kind = Hdf5FileSource if raw["type"] == "hdf5File" else FitsFileSource
    return kind(
        source_name=raw["sourceName"],
        location=location,
        keyword_rules=_rules(f"{where}.keywordRules", raw.get("keywordRules")),
    )


def _check_one_format(target: FileSource | None, sources: list[Source]) -> None:
    """HDF5 and FITS file sources cannot make one product: refuse naming the first of each."""
    first: dict[type, str] = {}
    named: list[tuple[str, Source]] = [("target.source", target)] if target is not None else []
    named += [(f"sources[{i}]", s) for i, s in enumerate(sources)]
    for where, source in named:
        if isinstance(source, (Hdf5FileSource, FitsFileSource)):
            first.setdefault(type(source), f"{where} {quote(source.source_name)}")
    if len(first) == 2:
        raise SpecificationError(
            "sources",
            f"mixes hdf5File ({first[Hdf5FileSource]}) and fitsFile ({first[FitsFileSource]}) sources; "
            "a product is either HDF5 (<fileId>.h5) or FITS (<fileId>.fits)",
        )


def _keyword(raw: dict[str, Any]) -> Keyword:
    kind = KeywordKind(raw["type"])
    return Keyword(kind=kind, value=raw["value"], name=raw.get("name", ""), comment=raw.get("comment", ""))


def load_specification(text: str | bytes | dict[str, Any]) -> Specification:
    """Parse and validate a Data Product Specification; raise `SpecificationError` on any problem."""
    if isinstance(text, dict):
        document = text
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecificationError(
                "", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        except UnicodeDecodeError as exc:
            raise SpecificationError("", f"not valid UTF-8: {exc}") from None
        except RecursionError:
            raise SpecificationError("", "nested too deeply to be a specification") from None
    if not isinstance(document, dict):
        raise SpecificationError("", f"expected a JSON object, got {type(document).__name__}")
    _check_values(document, [], 0)
    fast = _fast_validator()
    errors = (
        []
        if fast is not None and fast.is_valid(document)
        else sorted(
            _validator().iter_errors(document),
            key=lambda e: (list(map(str, e.absolute_path)), str(e.validator)),
        )
    )
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise _schema_problem(best if best is not None else errors[0])

    target = document["target"]
    target_source = _file_source("target.source", target["source"]) if "source" in target else None
    sources: list[Source] = []
    seen: dict[str, str] = {}
    if target_source is not None:
        seen[target_source.source_name] = "target.source"
    for i, raw in enumerate(document["sources"]):
        where = f"sources[{i}]"
        name = raw["sourceName"]
        if name in seen:
            raise SpecificationError(f"{where}.sourceName", f"{quote(name)} is already used by {seen[name]}")
        seen[name] = where
        if raw["type"] in ("hdf5File", "fitsFile"):
            sources.append(_file_source(where, raw))
        else:
            sources.append(FitsKeywordsSource(name, tuple(_keyword(k) for k in raw["keywords"])))
    if not sources and target_source is None:
        raise SpecificationError("sources", "no sources: give at least one source or target.source")
    _check_one_format(target_source, sources)

    receivers: list[Receiver] = []
    for i, raw in enumerate(document.get("receivers", [])):
        _check_path(f"receivers[{i}].path", raw["path"])
        receivers.append(
            Receiver(
                path=raw["path"],
                host=raw.get("host"),
                allow_symlink=bool(raw.get("options", {}).get("allowSymlink", False)),
            )
        )
    return Specification(
        id=document["id"],
        file_id=target["fileId"],
        sources=tuple(sources),
        receivers=tuple(receivers),
        target_source=target_source,
        keyword_dictionaries=tuple(document.get("keywordDictionaries", [])),
        document=document,
    )
