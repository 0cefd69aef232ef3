"""Settings of the Data Product Manager server.

Every setting has a default; a JSON file given with `--config FILE` overrides them, and the
command line overrides the file. Keys of the file (all optional):

| key | default | meaning |
|---|---|---|
| `workspace` | `<data_root>/dpm` | the DPM workspace (one directory per DAQ, archive, products) |
| `data_root` | parent of `workspace`, else `./data` | default allowed root |
| `allowed_roots` | `[data_root]` | local source and receiver paths must lie under one of these |
| `max_active_daqs` | 4 | DAQs past SCHEDULED at once; 0 holds every DAQ in SCHEDULED |
| `max_transfers` | 2 | concurrent source collections and receiver copies |
| `max_merges` | 1 | concurrent merge programs |
| `free_space_reserve_bytes` | 0 | a DAQ starts collecting only while the workspace has more available |
| `rsync_command` | `"rsync"` | rsync program for `host:/path` sources and remote receivers |
| `rsync_remote_shell` | `"ssh"` | passed to rsync as `-e`; a command line, split like a shell would |
| `storage_report_interval_s` | 1.0 | default WatchStorageStatus period and the free-space re-check period |
| `watch_queue_size` | 10000 | status changes buffered per WatchDaqStatus watcher before it is dropped |
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEBUG_DELAY_SUBSTATES = ("SCHEDULED", "COLLECTING", "MERGING", "RELEASING")


class ConfigError(ValueError):
    """An invalid setting; the message names the key (and the file)."""


@dataclass(frozen=True)
class DpmConfig:
    """Resolved server settings (see the module docstring for each key)."""

    workspace: Path
    data_root: Path
    allowed_roots: tuple[Path, ...]
    max_active_daqs: int = 4
    max_transfers: int = 2
    max_merges: int = 1
    free_space_reserve_bytes: int = 0
    rsync_command: str = "rsync"
    rsync_remote_shell: str = "ssh"
    storage_report_interval_s: float = 1.0
    watch_queue_size: int = 10000
    debug_delays: dict[str, float] = field(default_factory=dict)

    def debug_delay(self, substate: str) -> float:
        return self.debug_delays.get(substate, 0.0)


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"key {key!r}: expected an integer >= {minimum}, got {value!r}")
    return value


def _float(key: str, value: Any, minimum: float, *, exclusive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (value > minimum if exclusive else value >= minimum):
        return float(value)
    bound = f"> {minimum}" if exclusive else f">= {minimum}"
    raise ConfigError(f"key {key!r}: expected a number {bound}, got {value!r}")


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _abs_path(key: str, value: Any) -> Path:
    text = _str(key, value)
    if not os.path.isabs(text):
        raise ConfigError(f"key {key!r}: expected an absolute path, got {text!r}")
    return Path(text)


def _parse_file_settings(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object, got {type(raw).__name__}")
    known = {f.name for f in fields(DpmConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if key in ("workspace", "data_root"):
            out[key] = _abs_path(key, value)
        elif key == "allowed_roots":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"key {key!r}: expected a non-empty list of absolute paths, got {value!r}")
            out[key] = tuple(_abs_path(f"{key}[{i}]", v) for i, v in enumerate(value))
        elif key == "max_active_daqs":
            out[key] = _int(key, value, 0)
        elif key in ("max_transfers", "max_merges", "watch_queue_size"):
            out[key] = _int(key, value, 1)
        elif key == "free_space_reserve_bytes":
            out[key] = _int(key, value, 0)
        elif key == "rsync_command":
            out[key] = _str(key, value)
        elif key == "rsync_remote_shell":
            text = _str(key, value)
            try:
                shlex.split(text)
            except ValueError as exc:
                raise ConfigError(f"key {key!r}: cannot split {text!r} into a command line: {exc}") from None
            out[key] = text
        elif key == "storage_report_interval_s":
            out[key] = _float(key, value, 0.0, exclusive=True)
        elif key == "debug_delays":
            if not isinstance(value, dict):
                raise ConfigError(f"key {key!r}: expected an object {{substate: seconds}}, got {value!r}")
            delays: dict[str, float] = {}
            for name, seconds in value.items():
                if name not in DEBUG_DELAY_SUBSTATES:
                    expected = ", ".join(DEBUG_DELAY_SUBSTATES)
                    raise ConfigError(
                        f"key 'debug_delays.{name}': unknown substate; expected one of {expected}"
                    )
                delays[name] = _float(f"debug_delays.{name}", seconds, 0.0)
            out[key] = delays
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """The validated settings of a JSON config file (only the keys it sets)."""
    try:
        raw = json.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    try:
        return _parse_file_settings(raw)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def build_config(
    *,
    config_file: Path | None = None,
    workspace: Path | None = None,
    data_root: Path | None = None,
    allowed_roots: list[Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DpmConfig:
    """Resolve the settings: defaults, then `config_file`, then the explicit arguments.

    `overrides` takes file-style keys (validated the same way) — for embedding and tests.
    """
    settings: dict[str, Any] = load_config_file(config_file) if config_file else {}
    if overrides:
        settings.update(_parse_file_settings(overrides))
    if workspace is not None:
        settings["workspace"] = Path(workspace).absolute()
    if data_root is not None:
        settings["data_root"] = Path(data_root).absolute()
    if allowed_roots:
        settings["allowed_roots"] = tuple(Path(r).absolute() for r in allowed_roots)

    if "data_root" not in settings:
        settings["data_root"] = (
            settings["workspace"].parent if "workspace" in settings else Path("data").absolute()
        )
    if "workspace" not in settings:
        settings["workspace"] = settings["data_root"] / "dpm"
    if "allowed_roots" not in settings:
        settings["allowed_roots"] = (settings["data_root"],)
    return DpmConfig(**settings)


def with_changes(config: DpmConfig, **changes: Any) -> DpmConfig:
    """A copy of `config` with `changes` applied (no validation; for code, not users)."""
    return replace(config, **changes)
