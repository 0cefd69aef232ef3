"""Settings of the Data Product Manager server.

Every setting has a default; a JSON file given with `--config FILE` overrides them, and the
command line overrides the file. `DpmConfig` (pydantic) validates them all: an unknown key, a
value of the wrong type or out of bounds is refused with a message naming the file and the key
(`config file dpm.json: key 'max_merges': Input should be greater than or equal to 1`). Keys of
the file (all optional):

| key | default | meaning |
|---|---|---|
| `workspace` | `<data_root>/dpm` | the DPM workspace (one directory per DAQ, archive, products) |
| `data_root` | parent of `workspace`, else `./data` | default allowed root |
| `allowed_roots` | `[data_root]` | local source and receiver paths must lie under one of these |
| `max_active_daqs` | 4 | DAQs past SCHEDULED at once; 0 holds every DAQ in SCHEDULED |
| `max_transfers` | 2 | concurrent source collections and receiver copies |
| `max_merges` | 1 | concurrent merge programs |
| `free_space_reserve_bytes` | 0 | collect only while more is free; merge once the product fits above it |
| `merge_timeout_s` | 3600.0 | a longer merge is killed (ERROR `merging`; RetryMergeDaq runs it again) |
| `rsync_command` | `"rsync"` | rsync program for `host:/path` sources and remote receivers |
| `rsync_remote_shell` | `"ssh"` | passed to rsync as `-e`; a command line, split like a shell would |
| `storage_report_interval_s` | 1.0 | default WatchStorageStatus period and the free-space re-check period |
| `watch_queue_size` | 10000 | status changes buffered per WatchDaqStatus watcher before it is dropped |
| `dictionary_dirs` | `[]` | keyword dictionaries `<dir>/<name>` (`ESO-VLT-DIC.TCS`), then the built-in ones |
| `debug_delays` | `{}` | TEST HOOK, see below |

`debug_delays` is a test hook and nothing else: `{"COLLECTING": 5.0}` makes every DAQ wait that
many seconds after it entered the substate (persisted) and before it does the work, so a test can
abort it or `kill -9` the server while it is there. Keys: SCHEDULED, COLLECTING, MERGING,
RELEASING. Never set it in production.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DebugSubState = Literal["SCHEDULED", "COLLECTING", "MERGING", "RELEASING"]


class ConfigError(ValueError):
    """An invalid setting; the message names the key (and the file)."""


def _absolute(path: Path) -> Path:
    if not os.path.isabs(path):
        raise ValueError(f"expected an absolute path, got {str(path)!r}")
    return path


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]
Count = Annotated[int, Field(strict=True)]


class DpmConfig(BaseModel):
    """Resolved server settings (the table in the module docstring says what each one does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workspace: AbsolutePath
    """The DPM workspace: one directory per DAQ, the archive, the products."""
    data_root: AbsolutePath
    """The default allowed root."""
    allowed_roots: tuple[AbsolutePath, ...] = Field(min_length=1)
    """Local source and receiver paths must lie under one of these."""
    max_active_daqs: Count = Field(4, ge=0)
    """DAQs past SCHEDULED at once; 0 holds every DAQ in SCHEDULED."""
    max_transfers: Count = Field(2, ge=1)
    """Concurrent source collections and receiver copies."""
    max_merges: Count = Field(1, ge=1)
    """Concurrent merge programs."""
    free_space_reserve_bytes: Count = Field(0, ge=0)
    """A DAQ starts collecting only while the workspace has more bytes available, and merging only
    once its product (as large as the collected sources) fits above it."""
    merge_timeout_s: float = Field(3600.0, gt=0, strict=True)
    """A merge running longer is killed: ERROR alert `merging`, RetryMergeDaq runs it again."""
    rsync_command: str = Field("rsync", min_length=1)
    """rsync program for `host:/path` sources and remote receivers."""
    rsync_remote_shell: str = Field("ssh", min_length=1)
    """Given to rsync as `-e`; a command line, split like a shell would."""
    storage_report_interval_s: float = Field(1.0, gt=0, strict=True)
    """Default WatchStorageStatus period and the free-space re-check period."""
    watch_queue_size: Count = Field(10000, ge=1)
    """Status changes buffered per WatchDaqStatus watcher before it is dropped."""
    dictionary_dirs: tuple[AbsolutePath, ...] = ()
    """Directories of ESO keyword dictionaries (`<dir>/<name>`), searched in order, then the built-in ones."""
    debug_delays: dict[DebugSubState, Annotated[float, Field(ge=0, strict=True)]] = Field(
        default_factory=dict
    )
    """TEST HOOK: seconds each DAQ waits after entering the substate (see the module docstring)."""

    @model_validator(mode="before")
    @classmethod
    def _derive_roots(cls, raw: Any) -> Any:
        """data_root: the workspace's parent, else ./data; workspace: <data_root>/dpm; roots: [data_root]."""
        if not isinstance(raw, dict):
            return raw
        settings = dict(raw)
        if "data_root" not in settings:
            workspace = settings.get("workspace")
            settings["data_root"] = Path(workspace).parent if workspace else Path("data").absolute()
        if "workspace" not in settings:
            settings["workspace"] = Path(settings["data_root"]) / "dpm"
        settings.setdefault("allowed_roots", (settings["data_root"],))
        return settings

    @field_validator("rsync_remote_shell")
    @classmethod
    def _splits_like_a_shell(cls, text: str) -> str:
        try:
            shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot split {text!r} into a command line: {exc}") from None
        return text

    def debug_delay(self, substate: str) -> float:
        return next((s for name, s in self.debug_delays.items() if name == substate), 0.0)


def _describe(error: ValidationError) -> str:
    """Every problem of `error` in one line, each naming its key (`allowed_roots[1]`, `a.b`)."""
    known = ", ".join(sorted(DpmConfig.model_fields))
    problems = []
    for item in error.errors():
        key = ""
        for part in item["loc"]:
            if part == "[key]":
                continue
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}; known keys: {known}")
        else:
            problems.append(f"key {key!r}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _validated(settings: dict[str, Any]) -> DpmConfig:
    try:
        return DpmConfig.model_validate(settings)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a JSON config file (only the keys it sets; validated by `build_config`)."""
    try:
        raw = json.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def build_config(
    *,
    config_file: Path | None = None,
    workspace: Path | None = None,
    data_root: Path | None = None,
    allowed_roots: list[Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DpmConfig:
    """Resolve the settings: defaults, then `config_file`, then `overrides`, then the arguments.

    `overrides` takes file-style keys (validated the same way) — for embedding and tests.
    """
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings = load_config_file(config_file)
        try:
            _validated(settings)  # the file alone, so that its errors name the file
        except ConfigError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
    settings.update(overrides or {})
    if workspace is not None:
        settings["workspace"] = Path(workspace).absolute()
    if data_root is not None:
        settings["data_root"] = Path(data_root).absolute()
    if allowed_roots:
        settings["allowed_roots"] = tuple(Path(r).absolute() for r in allowed_roots)
    return _validated(settings)
