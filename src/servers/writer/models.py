"""The writer's configuration and write request: pydantic models declared once.

The REST app takes them as request bodies (so `/openapi.json` describes them), the gRPC service
builds them from its messages, the Redis streams and the config file carry their JSON. Field
names are those of the Standard DAQ REST API (the published `std_daq_client` 1.3.x).

Integer fields are strict: a JSON integer, not `"10"`, `10.0` or `true`. Unknown fields are
refused, so a typo does not pass silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daqif import defaults
from daqif.errors import DaqException

DETECTOR_TYPES: Final = ("eiger", "gigafrost", "jungfrau", "bsread")
BIT_DEPTH_DTYPES: Final = {8: "uint8", 16: "uint16", 32: "uint32"}
# How much of a refused value an error message quotes (DESIGN §5a: at most ~200 characters).
_QUOTE_LIMIT: Final = 200

# A detector name becomes an HDF5 group name and a file attribute, and appears in paths and logs:
# letters, digits, '_', '-' and '.', not starting with '.' or '-', at most 64 characters.
DETECTOR_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# Linux uids are 32-bit and (uid_t)-1 means "no change" to chown; -1 and 0 mean the service user.
MAX_UID: Final = 2**32 - 2
# Longest output_file accepted (Linux PATH_MAX); longer is refused before any file system call.
MAX_PATH_CHARS: Final = 4096

StrictInt = Annotated[int, Field(strict=True)]
Int64 = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
_M = TypeVar("_M", bound=BaseModel)
ModulePosition = Annotated[list[StrictInt], Field(min_length=4, max_length=4)]


class DaqConfig(BaseModel):
    """The DAQ configuration object of the Standard DAQ (`/daq/config`, Redis `daq:config`).

    As a request body it is a partial update: the fields given replace the current ones
    (`updated`); `module_positions`, when given, replaces the whole mapping.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    bit_depth: StrictInt = Field(default=defaults.BIT_DEPTH)
    """Bits per pixel: 8, 16 or 32 (uint8, uint16 or uint32 frames)."""
    detector_name: Annotated[str, Field(strict=True)] = Field(
        default=defaults.DETECTOR_NAME,
    )
    """Names the HDF5 group the frames are written to: 1-64 letters, digits, '_', '-', '.'
    (not starting with '.' or '-')."""
    detector_type: Annotated[str, Field(strict=True)] = Field(default=defaults.DETECTOR_TYPE)
    """One of eiger, gigafrost, jungfrau, bsread (the writer treats all alike)."""
    image_pixel_height: StrictInt = Field(default=defaults.IMAGE_PIXEL_HEIGHT, ge=1)
    """Height of an assembled frame in pixels."""
    image_pixel_width: StrictInt = Field(default=defaults.IMAGE_PIXEL_WIDTH, ge=1)
    """Width of an assembled frame in pixels."""
    n_modules: StrictInt = Field(default=1, ge=1)
    """Number of detector modules assembled into a frame."""
    start_udp_port: StrictInt = Field(default=50000, ge=0, le=65535)
    """First UDP port the detector streams modules to."""
    writer_user_id: StrictInt = Field(default=0, ge=-1, le=MAX_UID)
    """uid files are written for; -1 or 0 means the user the service runs as. The writer accepts
    only uids in its `--allowed-uids` range (default: the uid it runs as)."""
    module_positions: dict[str, ModulePosition] = Field(
        default_factory=lambda: {"0": [0, 511, 511, 0]},
    )
    """Module number -> [start_x, start_y, end_x, end_y] in the assembled frame."""

    @field_validator("bit_depth")
    @classmethod
    def _known_bit_depth(cls, value: int) -> int:
        if value not in BIT_DEPTH_DTYPES:
            raise ValueError(f"must be one of 8, 16, 32, got {value}")
        return value

    @field_validator("detector_type")
    @classmethod
    def _known_detector_type(cls, value: str) -> str:
        if value not in DETECTOR_TYPES:
            raise ValueError(f"must be one of {', '.join(DETECTOR_TYPES)}, got {_quote(value)}")
        return value

    @field_validator("detector_name")
    @classmethod
    def _usable_as_group_name(cls, value: str) -> str:
        if DETECTOR_NAME_PATTERN.fullmatch(value) is None:
            raise ValueError(
                "must be 1-64 letters, digits, '_', '-' or '.', not starting with '.' or '-' "
                f"(it names the HDF5 group), got {_quote(value)}"
            )
        return value

    @property
    def dtype(self) -> str:
        """The numpy dtype name of a frame pixel."""
        return BIT_DEPTH_DTYPES[self.bit_depth]

    @property
    def frame_nbytes(self) -> int:
        """Size of one uncompressed frame in bytes."""
        return self.image_pixel_height * self.image_pixel_width * (self.bit_depth // 8)

    @property
    def owner_uid(self) -> int | None:
        """The uid files are written for; None (< 1) means the user the service runs as."""
        return owner_uid(self.writer_user_id)

    def to_json(self) -> dict[str, Any]:
        """The JSON object with the Standard DAQ's keys."""
        return self.model_dump(mode="json")

    def updated(self, update: DaqConfig) -> DaqConfig:
        """This config with the fields `update` was given (`model_fields_set`) replaced."""
        return self.model_copy(update={name: getattr(update, name) for name in update.model_fields_set})


def owner_uid(writer_user_id: int) -> int | None:
    """The uid a `writer_user_id` gives files to; None (< 1) means the user the service runs as."""
    return writer_user_id if writer_user_id >= 1 else None


class WriteRequest(BaseModel):
    """A request to record the next `n_images` frames into `output_file` (REST body of
    `/writer/write_async` and `/writer/write_sync`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    output_file: Annotated[str, Field(strict=True)] = Field(
        examples=["/data/run_001.h5"],
    )
    """Absolute path of the HDF5 file, under the writer's allowed roots; its folder must exist
    (at most 4096 characters, each path component at most 255 bytes)."""

    @field_validator("output_file")
    @classmethod
    def _within_path_limits(cls, value: str) -> str:
        # Refused here, so no file system call ever sees it (ENAMETOOLONG) and no error echoes it.
        if len(value) > MAX_PATH_CHARS:
            raise ValueError(f"is {len(value)} characters long, the limit is {MAX_PATH_CHARS}")
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        try:
            encoded = os.fsencode(value)
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (it holds a lone surrogate)") from None
        for part in encoded.split(b"/"):
            if len(part) > 255:
                raise ValueError(f"has a path component of {len(part)} bytes, the limit is 255")
        return value

    n_images: StrictInt = Field(ge=1, examples=[100])
    """Number of frames to record (the next ones the detector sends)."""
    run_id: Int64 | None = Field(default=None)
    """Identifies the run (root attribute `run_id` of the file); None: the start time in ns."""
    writer_user_id: StrictInt | None = Field(default=None, ge=-1, le=MAX_UID)
    """daqif extension: the uid this write's file is created as, for this write only (-1 or 0:
    the user the service runs as); None: the config's `writer_user_id`. Only uids the writer
    accepts for the config (its own, `--allowed-uids`) are accepted."""


class UidRange(BaseModel):
    """The uids (`first`..`last`, inclusive) a writer may give files to (`--allowed-uids MIN-MAX`)."""

    model_config = ConfigDict(frozen=True)

    first: int = Field(ge=1, le=MAX_UID)
    last: int = Field(ge=1, le=MAX_UID)

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """`"MIN-MAX"` or a single `"UID"`; ValueError says what is wrong."""
        first, _, last = text.partition("-")
        try:
            uid_range = cls(first=int(first), last=int(last or first))
        except (ValueError, ValidationError):
            raise ValueError(f"expected MIN-MAX or UID, uids 1..{MAX_UID}, got {_quote(text)}") from None
        if uid_range.last < uid_range.first:
            raise ValueError(f"expected MIN-MAX with MIN <= MAX, got {_quote(text)}")
        return uid_range

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def parse_config(data: Any, *, source: str = "config") -> DaqConfig:
    """`data` (a JSON object of config fields, all or some) as a `DaqConfig`, or
    INVALID_ARGUMENT naming every field that is wrong and why."""
    return _parse(DaqConfig, data, source)


def parse_write_request(data: Any) -> WriteRequest:
    """`data` as a `WriteRequest`, or INVALID_ARGUMENT naming every field that is wrong and why."""
    return _parse(WriteRequest, data, "write request")


def load_config(path: Path | None) -> DaqConfig:
    """The embedded defaults, with the detector JSON file at `path` (full or partial) merged in."""
    config = DaqConfig()
    if path is None:
        return config
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DaqException.invalid_argument(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DaqException.invalid_argument(
            f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    return config.updated(parse_config(data, source=f"config file {path}"))


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic errors as one line naming each field: `n_images: Input should be … (got "x")`."""
    problems = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ())) or "body"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            problems.append(f"{where}: unknown field")
        elif error.get("type") == "missing":
            problems.append(f"{where}: mandatory field missing")
        elif "input" in error and "got " not in message:
            problems.append(f"{where}: {message} (got {_quote(error['input'])})")
        else:
            problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _parse(model: type[_M], data: Any, source: str) -> _M:
    if not isinstance(data, Mapping):
        raise DaqException.invalid_argument(f"{source} must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DaqException.invalid_argument(
            f"invalid {source}: {describe_errors(list(exc.errors()))}"
        ) from None


def _quote(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "…"
