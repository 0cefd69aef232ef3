"""ESO keyword dictionaries: the Data Interface Dictionary text format (DICD §8), lookup, checks.

A dictionary file is a sequence of records separated by empty lines. A record is a list of
`Field Name: value` lines; a line that starts with a space or a tab continues the value of the
field above it (joined with one space, as ESO's multi-line `Description`s are written); a line
whose first non-blank character is `#` is a comment, wherever it is. The first record is the
identification record (`Dictionary Name: ESO-VLT-DIC.<scope>`, `Scope`, `Source`,
`Version Control`, `Revision`, `Date`, `Status`, `Description`); every other record defines one
parameter:

    Parameter Name:    DET CHIPi GAIN
    Class:             header|setup
    Context:           Detector
    Type:              double
    Value Format:      %.2f
    Unit:              e-/ADU
    Comment Format:    Gain of chip %d [e-/ADU]
    Description:       Conversion factor from ADU to electrons of
                       chip i.

Decisions where DICD leaves room (documented in `src/servers/dpm/README.md`):

- Names are upper-case words (`A-Z 0-9 _ -`) separated by spaces; a word ending in a lower-case
  `i` has an index there: `CHIPi` matches `CHIP` followed by one or more digits (`CHIP1`,
  `CHIP12`). An exact definition wins over an indexed one, and the first dictionary listed that
  defines a name wins over later ones.
- `Type` is one of `string`, `logical`, `integer`, `double`. A value matches it as: logical a
  bool; integer an int (not a bool); double an int or a float (not a bool); string a str. NumPy
  scalars (HDF5 attributes) count as their Python kind; arrays and empty attributes match nothing.
- `Value Format` is one printf conversion (`%s`, `%d`, `%.3f`, `%12.5E`, …; flags, width,
  precision and an `l`/`h` length modifier allowed) fitting the type: `s` for strings, `d i u`
  for integers, `d i u e E f F g G` for doubles; a logical's format is read but not used (a FITS
  logical is always T or F). `format_value` gives the text of the card; `formatted` gives that
  text back as a value of the type (`%.3f` of 0.12345 is 0.123), which is what the product holds.
  An empty `Value Format` leaves values as they are.
- `Comment Format` is the default comment: it is used when a keyword comes without one. Its
  conversions `%d`, `%i`, `%u`, `%s` (with an optional `-`/`0` flag and a width, e.g. `%02d`)
  are filled, in order, with the indexes of the keyword's name (`DET CHIP12 GAIN` with
  `Gain of chip %d` gives `Gain of chip 12`); `%%` is a percent sign and any other `%` is kept
  as text (`Humidity [%]`). A comment format with more conversions than the name has indexes
  is a dictionary error.
- Required fields: `Dictionary Name` in the first record, `Parameter Name` and `Type` in the
  others. Fields this module does not know (ESO dictionaries carry a few more) are kept in
  `Parameter.fields` and otherwise ignored; a field given twice in one record, a parameter
  defined twice, a line that is neither a field, a continuation nor a comment are errors. The file
  name is the dictionary's name (`find_dictionary`); a `Dictionary Name` that differs from it is
  accepted, as some of ESO's own files spell theirs differently.

Every error is a `DictionaryError` naming the file and the line (`ESO-VLT-DIC.X line 12: …`).
This module imports nothing of the servers: the DPM imports it at QueueDaq, the merge process
when it writes the product's keywords.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from daqif.errors import quote

BUILTIN_DIRECTORY = Path(str(resources.files("servers.dpm").joinpath("dictionaries")))
"""The dictionaries shipped with daqif (`ESO-VLT-DIC.DAQIF_*`), searched after the configured ones."""
MAX_DICTIONARY_BYTES = 16 << 20
"""A dictionary file larger than this is refused (ESO's largest are well below 1 MiB)."""
IDENTIFICATION_FIELD = "Dictionary Name"


class DictionaryError(ValueError):
    """A dictionary that cannot be found or parsed; the message names the file and the line."""


class ParameterType(enum.StrEnum):
    """The DICD value types."""

    STRING = "string"
    LOGICAL = "logical"
    INTEGER = "integer"
    DOUBLE = "double"


KNOWN_FIELDS = frozenset(
    {
        "Dictionary Name",
        "Scope",
        "Source",
        "Version Control",
        "Revision",
        "Date",
        "Status",
        "Description",
        "Parameter Name",
        "Class",
        "Context",
        "Type",
        "Value Format",
        "Unit",
        "Comment Format",
    }
)

_FIELD_LINE = re.compile(r"(?P<name>[A-Z][A-Za-z0-9 _-]*?)\s*:(?P<value>.*)")
_WORD = re.compile(r"[A-Z0-9_-]*[A-Z0-9_-](i)?|i")
_DIGITS = re.compile(r"[0-9]+")
_CONVERSION = re.compile(
    r"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?P<precision>\.\d*)?(?:hh|h|ll|l|L)?(?P<kind>[a-zA-Z%])"
)
_COMMENT_CONVERSION = re.compile(r"%%|%(?P<spec>-?\d*)(?P<kind>[dius])")
_VALUE_KINDS = {
    ParameterType.STRING: "s",
    ParameterType.INTEGER: "diu",
    ParameterType.DOUBLE: "diueEfFgG",
    ParameterType.LOGICAL: "cdsiu",
}


@dataclass(frozen=True)
class Parameter:
    """One parameter record. `name` as written in the dictionary (`DET CHIPi GAIN`)."""

    name: str
    type: ParameterType
    dictionary: str
    line: int
    value_format: str = ""
    comment_format: str = ""
    unit: str = ""
    classes: tuple[str, ...] = ()
    context: str = ""
    description: str = ""
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        """`ESO-VLT-DIC.X line 12`: where it is defined, for messages."""
        return f"{self.dictionary} line {self.line}"

    def type_problem(self, value: Any) -> str | None:
        """Why `value` is not of this parameter's type, or None when it is."""
        kind = value_kind(value)
        if kind in _ACCEPTED[self.type]:
            return None
        shown = "" if kind in ("array", "empty") else f" {quote(_plain(value), 60)}"
        return f"has {_ARTICLE[kind]} {kind} value{shown}, but {self.where} defines it as {self.type.value}"

    def format_value(self, value: Any) -> str:
        """The text of the value on a card, by `Value Format` (a logical is T or F)."""
        plain = _plain(value)
        if self.type is ParameterType.LOGICAL:
            return "T" if plain else "F"
        if not self.value_format:
            return str(plain)
        if self.type is ParameterType.DOUBLE:
            plain = float(plain)  # an int given for a double is formatted as one
        return str(self.value_format % plain)

    def formatted(self, value: Any) -> Any:
        """`value` as the product holds it: its `Value Format` text read back as the type (a
        double as a float, an integer as an int, a string as a str, a logical as a bool)."""
        plain = _plain(value)
        if self.type is ParameterType.LOGICAL:
            return bool(plain)
        text = self.format_value(plain) if self.value_format else plain
        if self.type is ParameterType.INTEGER:
            return int(text)
        if self.type is ParameterType.DOUBLE:
            return float(text)
        return str(text)

    def default_comment(self, keyword: str) -> str:
        """The `Comment Format` with its conversions filled by the indexes of `keyword`."""
        if not self.comment_format:
            return ""
        indexes = _indexes(self.name, keyword)
        return _fill_comment(self.comment_format, indexes)


@dataclass(frozen=True)
class Dictionary:
    """A parsed dictionary file: its identification fields and its parameters."""

    name: str
    path: Path
    identification: tuple[tuple[str, str], ...]
    parameters: tuple[Parameter, ...]
    sha256: str = ""
    """Of the file's bytes, for the merge log (what exactly a product was checked against)."""
    _exact: dict[str, Parameter] = field(default_factory=dict, init=False, repr=False, compare=False)
    _indexed: _Node = field(default_factory=lambda: _Node(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for p in self.parameters:
            if _is_indexed(p.name):
                self._indexed.add(p.name.split(" "), p)
            else:
                self._exact[p.name] = p

    @property
    def version(self) -> str:
        """The `Revision` (else `Version Control`) of the identification record, for the merge log."""
        found = dict(self.identification)
        return found.get("Revision") or found.get("Version Control") or ""

    def lookup(self, keyword: str) -> Parameter | None:
        """The parameter defining `keyword` (an ESO name without `ESO `, e.g. `DET CHIP1 GAIN`)."""
        exact = self._exact.get(keyword)
        if exact is not None:
            return exact
        return self._indexed.find(keyword.split(" "))


class _Node:
    """A word trie over indexed parameter names; an exact word is tried before an indexed one."""

    __slots__ = ("children", "parameter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.parameter: Parameter | None = None

    def add(self, words: Sequence[str], parameter: Parameter) -> None:
        node = self
        for word in words:
            node = node.children.setdefault(word, _Node())
        node.parameter = parameter

    def find(self, words: Sequence[str]) -> Parameter | None:
        if not words:
            return self.parameter
        word, rest = words[0], words[1:]
        # An index is any non-empty run of trailing digits: `A017` is `A017`, `Ai`, `A0i` or `A01i`.
        candidates = [word]
        stem = len(word.rstrip("0123456789"))
        candidates += [word[:k] + "i" for k in range(stem, len(word))]
        for candidate in candidates:
            child = self.children.get(candidate)
            if child is not None:
                found = child.find(rest)
                if found is not None:
                    return found
        return None


@dataclass(frozen=True)
class Definition:
    """What a dictionary says a keyword becomes: its value as written and its comment."""

    parameter: Parameter
    value: Any
    comment: str


class KeywordNotValid(ValueError):
    """An ESO keyword that no listed dictionary defines, or whose value is not of its type."""

    def __init__(self, keyword: str, problem: str) -> None:
        super().__init__(f"ESO keyword {quote(keyword, 80)} {problem}")
        self.keyword = keyword
        self.problem = problem

    def of_source(self, source: str) -> str:
        """The message naming the source the keyword comes from."""
        return f"ESO keyword {quote(self.keyword, 80)} of source {source} {self.problem}"


@dataclass(frozen=True)
class DictionarySet:
    """The dictionaries of one specification, in the order listed (the first definition wins)."""

    dictionaries: tuple[Dictionary, ...]

    @property
    def names(self) -> str:
        return ", ".join(d.name for d in self.dictionaries)

    def lookup(self, keyword: str) -> Parameter | None:
        for dictionary in self.dictionaries:
            found = dictionary.lookup(keyword)
            if found is not None:
                return found
        return None

    def check(self, keyword: str, value: Any, comment: str = "") -> Definition:
        """The definition of ESO keyword `keyword` (without `ESO `) with `value` and `comment`.

        Raises `KeywordNotValid` saying why when no dictionary defines it or the type differs.
        The comment is `comment`, else the dictionary's default; the value is formatted.
        """
        parameter = self.lookup(keyword)
        if parameter is None:
            raise KeywordNotValid(keyword, f"is not defined in {self.names}")
        problem = parameter.type_problem(value)
        if problem is not None:
            raise KeywordNotValid(keyword, problem)
        try:
            formatted = parameter.formatted(value)
        except (ValueError, OverflowError, TypeError) as exc:  # e.g. %d of NaN
            raise KeywordNotValid(
                keyword,
                f"value {quote(_plain(value), 60)} cannot be written as {parameter.value_format!r} "
                f"({parameter.where}): {exc}",
            ) from None
        return Definition(parameter, formatted, comment or parameter.default_comment(keyword))

    def describe(self) -> Iterator[str]:
        """One line per dictionary (name, file, revision, parameters), for the merge log."""
        for d in self.dictionaries:
            version = f", {d.version}" if d.version else ""
            digest = f", sha256 {d.sha256}" if d.sha256 else ""
            yield f"dictionary {d.name}: {d.path}{version}, {len(d.parameters)} parameters{digest}"


# -- values ------------------------------------------------------------------------------------------

_ACCEPTED = {
    ParameterType.LOGICAL: {"logical"},
    ParameterType.INTEGER: {"integer"},
    ParameterType.DOUBLE: {"integer", "double"},
    ParameterType.STRING: {"string"},
}
_ARTICLE = {"logical": "a", "integer": "an", "double": "a", "string": "a", "array": "an", "empty": "an"}


def _plain(value: Any) -> Any:
    """A NumPy scalar as its Python value; bytes decoded."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def value_kind(value: Any) -> str:
    """`logical`, `integer`, `double`, `string`, `array` or `empty` (an HDF5 attribute without data)."""
    plain = _plain(value)
    if isinstance(plain, bool):
        return "logical"
    if isinstance(plain, int):
        return "integer"
    if isinstance(plain, float):
        return "double"
    if isinstance(plain, str):
        return "string"
    if isinstance(plain, np.ndarray):
        return "array"
    return "empty"


# -- parsing -----------------------------------------------------------------------------------------


@dataclass
class _Record:
    line: int
    fields: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    last: str = ""


def _records(text: str, where: str) -> Iterator[_Record]:
    record: _Record | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip():
            if record is not None:
                yield record
                record = None
            continue
        if line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if record is None or not record.last:
                raise DictionaryError(
                    f"{where} line {number}: a continuation line (indented) with no field above it"
                )
            previous = record.fields[record.last]
            record.fields[record.last] = f"{previous} {line.strip()}" if previous else line.strip()
            continue
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise DictionaryError(
                f"{where} line {number}: {quote(line, 80)} is not 'Field Name: value', a comment (#) "
                "or an indented continuation line"
            )
        name = " ".join(match["name"].split())
        if record is None:
            record = _Record(number)
        if name in record.fields:
            raise DictionaryError(
                f"{where} line {number}: field {name!r} given twice in the record of line {record.line} "
                f"(first at line {record.lines[name]})"
            )
        record.fields[name] = match["value"].strip()
        record.lines[name] = number
        record.last = name
    if record is not None:
        yield record


def _check_value_format(fmt: str, kind: ParameterType, where: str) -> str:
    fmt = fmt.strip()
    if not fmt:
        return ""
    whole = _CONVERSION.fullmatch(fmt)
    if whole is None or whole["kind"] == "%":
        raise DictionaryError(
            f"{where}: Value Format {quote(fmt, 60)} is not one printf conversion such as %.3f"
        )
    if whole["kind"] not in _VALUE_KINDS[kind]:
        allowed = " ".join(f"%{k}" for k in _VALUE_KINDS[kind])
        raise DictionaryError(
            f"{where}: Value Format {quote(fmt, 60)} does not fit Type {kind.value} (use {allowed})"
        )
    return fmt  # Python's % takes printf's flags, width, precision and (ignored) length modifiers


def _check_comment_format(fmt: str, name: str, where: str) -> str:
    indexes = sum(1 for w in name.split(" ") if _is_index_word(w))
    wanted = sum(1 for m in _COMMENT_CONVERSION.finditer(fmt) if m["kind"])
    if wanted > indexes:
        raise DictionaryError(
            f"{where}: Comment Format {quote(fmt, 80)} has {wanted} conversion(s) but {name!r} has "
            f"{indexes} index(es) to fill them"
        )
    return fmt


def _fill_comment(fmt: str, indexes: Sequence[int]) -> str:
    values = iter(indexes)

    def fill(m: re.Match[str]) -> str:
        if not m["kind"]:
            return "%"
        index = next(values, None)
        if index is None:
            return m.group(0)
        return f"%{m['spec']}{'s' if m['kind'] == 's' else 'd'}" % index

    return _COMMENT_CONVERSION.sub(fill, fmt)


def _is_index_word(word: str) -> bool:
    return word.endswith("i")


def _is_indexed(name: str) -> bool:
    return any(_is_index_word(w) for w in name.split(" "))


def _indexes(pattern: str, keyword: str) -> list[int]:
    out: list[int] = []
    for p, k in zip(pattern.split(" "), keyword.split(" "), strict=False):
        if _is_index_word(p) and p != k:
            digits = k[len(p) - 1 :]
            if _DIGITS.fullmatch(digits):
                out.append(int(digits))
    return out


def _parameter(record: _Record, dictionary: str, where_file: str) -> Parameter:
    at = f"{where_file} line {record.line}"
    if "Parameter Name" not in record.fields:
        raise DictionaryError(f"{at}: the record has no 'Parameter Name' field")
    name = " ".join(record.fields["Parameter Name"].split())
    name_at = f"{where_file} line {record.lines['Parameter Name']}"
    if not name or not all(_WORD.fullmatch(w) for w in name.split(" ")):
        raise DictionaryError(
            f"{name_at}: Parameter Name {quote(name, 80)} is not upper-case words of A-Z 0-9 _ - (a word "
            "may end in a lower-case i for an index)"
        )
    if "Type" not in record.fields:
        raise DictionaryError(f"{at}: parameter {name!r} has no 'Type' field")
    type_at = f"{where_file} line {record.lines['Type']}"
    try:
        kind = ParameterType(record.fields["Type"].strip())
    except ValueError:
        allowed = ", ".join(t.value for t in ParameterType)
        raise DictionaryError(
            f"{type_at}: parameter {name!r} has Type {quote(record.fields['Type'], 40)}; "
            f"expected one of: {allowed}"
        ) from None
    value_format = _check_value_format(
        record.fields.get("Value Format", ""),
        kind,
        f"{where_file} line {record.lines.get('Value Format', record.line)}",
    )
    comment_format = _check_comment_format(
        record.fields.get("Comment Format", "").strip(),
        name,
        f"{where_file} line {record.lines.get('Comment Format', record.line)}",
    )
    classes = tuple(c.strip() for c in record.fields.get("Class", "").split("|") if c.strip())
    return Parameter(
        name=name,
        type=kind,
        dictionary=dictionary,
        line=record.line,
        value_format=value_format,
        comment_format=comment_format,
        unit=record.fields.get("Unit", ""),
        classes=classes,
        context=record.fields.get("Context", ""),
        description=record.fields.get("Description", ""),
        fields=tuple((k, v) for k, v in record.fields.items() if k not in KNOWN_FIELDS),
    )


def parse_dictionary(text: str, path: Path | str, name: str | None = None) -> Dictionary:
    """Parse dictionary text; `path` names it in errors, `name` defaults to the file name."""
    path = Path(path)
    dictionary = name or path.name
    where = str(path)
    records = _records(text, where)
    first = next(records, None)
    if first is None or IDENTIFICATION_FIELD not in first.fields:
        at = f"line {first.line}" if first is not None else "line 1"
        raise DictionaryError(
            f"{where} {at}: the first record is not an identification record ('{IDENTIFICATION_FIELD}: "
            "ESO-VLT-DIC.<scope>')"
        )
    parameters: dict[str, Parameter] = {}
    for record in records:
        if IDENTIFICATION_FIELD in record.fields:
            raise DictionaryError(
                f"{where} line {record.lines[IDENTIFICATION_FIELD]}: a second identification record"
            )
        parameter = _parameter(record, dictionary, where)
        if parameter.name in parameters:
            first_line = parameters[parameter.name].line
            raise DictionaryError(
                f"{where} line {record.line}: parameter {parameter.name!r} is already defined at line "
                f"{first_line}"
            )
        parameters[parameter.name] = parameter
    return Dictionary(
        name=dictionary,
        path=path,
        identification=tuple(first.fields.items()),
        parameters=tuple(parameters.values()),
    )


def load_dictionary(path: Path) -> Dictionary:
    """Read and parse one dictionary file (cached while the file is unchanged)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DictionaryError(f"{path}: cannot read: {exc.strerror}") from None
    return _load(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _load(path: str, _inode: int, size: int, _mtime_ns: int) -> Dictionary:
    if size > MAX_DICTIONARY_BYTES:
        raise DictionaryError(
            f"{path}: {size} bytes is more than a dictionary ({MAX_DICTIONARY_BYTES} at most)"
        )
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DictionaryError(f"{path}: cannot read: {exc.strerror}") from None
    parsed = parse_dictionary(raw.decode("utf-8", "replace"), Path(path))
    return dataclasses.replace(parsed, sha256=hashlib.sha256(raw).hexdigest())


def search_path(directories: Iterable[Path]) -> tuple[Path, ...]:
    """The directories searched: the given ones in order, then the built-in one."""
    return (*directories, BUILTIN_DIRECTORY)


def find_dictionary(name: str, directories: Iterable[Path]) -> Path:
    """The file of dictionary `name`: `<dir>/<name>` in the first directory that has it."""
    if not name or "/" in name or name.startswith("."):
        raise DictionaryError(
            f"{quote(name, 80)} is not a dictionary name (a file name such as ESO-VLT-DIC.TCS)"
        )
    searched = search_path(directories)
    for directory in searched:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in searched)
    raise DictionaryError(f"dictionary {name!r} not found in {where}")


def load_dictionaries(names: Sequence[str], directories: Iterable[Path]) -> DictionarySet:
    """Find and parse the dictionaries `names`; a `DictionaryError` names the one that failed."""
    directories = tuple(directories)
    loaded: list[Dictionary] = []
    for i, name in enumerate(names):
        try:
            path = find_dictionary(name, directories)
        except DictionaryError as exc:
            raise DictionaryError(f"keywordDictionaries[{i}]: {exc}") from None
        try:
            loaded.append(load_dictionary(path))
        except DictionaryError as exc:
            raise DictionaryError(f"keywordDictionaries[{i}]: dictionary {name!r}: {exc}") from None
    return DictionarySet(tuple(loaded))
