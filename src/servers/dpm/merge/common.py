"""Names, errors, results and the log shared by the merge modules (format: see `servers.dpm.merge`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from daqif.spec import Source, Specification
from servers.common.atomic import atomic_output

ARCFILE = "ARCFILE"
ORIGFILE = "ORIGFILE"
DATE = "DATE"
DATASUM = "DATASUM"
KEYWORD_COMMENTS = "KEYWORD_COMMENTS"
RESERVED_ATTRIBUTES = frozenset({ARCFILE, ORIGFILE, DATE, DATASUM, KEYWORD_COMMENTS})
COMMENTARY = ("COMMENT", "HISTORY")
CHECKSUM_PREFIX = "xxh3-sha256:"


class MergeError(Exception):
    """The merge could not be done; the message says what is wrong and where (one line)."""


class ProductUnreadableError(MergeError):
    """`verify()` could not read the file as an HDF5 product at all."""


# -- results ---------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """What `merge()` did. With `dry_run`, nothing was written: `bytes` is 0 and `checksum` ""."""

    product: Path
    bytes: int
    datasets: int
    keywords: int
    checksum: str
    duration_s: float
    dry_run: bool = False
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    alerts: dict[str, str] = field(default_factory=dict)
    """WARNING alerts for the DAQ (key, e.g. `unmerged:<sourceName>` → message)."""


# -- the product file ------------------------------------------------------------------------------


@contextlib.contextmanager
def product_output(outfile: Path, what: str, log: MergeLog) -> Iterator[Path]:
    """The part file `.<name>.part` beside `outfile` to build the product in, made `outfile` when the
    block ends (`servers.common.atomic.atomic_output`: fsync, rename, fsync of the folder; the part
    file removed on any error; a fixed name, so the next attempt replaces a leftover). `what` says
    what is merged, for the log. Errors of the file system or the format library become one-line
    `MergeError`s naming `outfile`."""
    if not outfile.parent.is_dir():
        raise MergeError(f"output directory {outfile.parent} does not exist")
    part_name = f".{outfile.name}.part"
    log.info(f"merging {what} into {outfile} (writing {part_name})")
    try:
        with atomic_output(outfile, temp_name=part_name) as part:
            yield part
            if outfile.exists():
                log.warning(f"replacing the existing {outfile}")
    except MergeError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"merge failed writing {outfile}: {exc}") from exc


def product_written(
    outfile: Path,
    contents: str,
    checksum: str,
    datasets: int,
    keywords: int,
    copied: int,
    log: MergeLog,
    started: float,
) -> MergeResult:
    """Log what was written (`contents`: "3 datasets, 12 keywords, <checksum>") and return it."""
    size = outfile.stat().st_size
    duration = time.monotonic() - started
    log.info(
        f"wrote {outfile}: {size} bytes, {contents} "
        f"in {duration:.2f} s ({copied / 2**20 / max(duration, 1e-9):.0f} MiB/s)"
    )
    return MergeResult(
        product=outfile,
        bytes=size,
        datasets=datasets,
        keywords=keywords,
        checksum=checksum,
        duration_s=duration,
        log=log.lines,
        warnings=log.warnings,
        alerts=log.alerts,
    )


@dataclass
class VerifyResult:
    """The outcome of `verify()`: `ok`, or `mismatches` saying what differs."""

    path: Path
    ok: bool
    stored: str
    computed: str
    datasets: int
    mismatches: list[str] = field(default_factory=list)
    unit: str = "datasets"  # what `datasets` counts: "HDUs" for a FITS product

    @property
    def message(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.datasets} {self.unit}, {self.stored})"
        return f"{self.path}: checksum mismatch: " + "; ".join(self.mismatches)


# -- logging ---------------------------------------------------------------------------------------


class MergeLog:
    """Collects log lines for the result and forwards them to a logger or a text stream."""

    def __init__(self, sink: logging.Logger | TextIO | None) -> None:
        self.sink = sink
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.alerts: dict[str, str] = {}

    def info(self, message: str) -> None:
        self._emit("INFO", message)

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        self._emit("WARNING", message)

    def alert(self, key: str, message: str) -> None:
        """A warning that the DPM raises as a WARNING alert `key` on the DAQ."""
        self.alerts[key] = message
        self.warning(f"{key}: {message}")

    def _emit(self, level: str, message: str) -> None:
        self.lines.append(f"{level} {message}")
        if isinstance(self.sink, logging.Logger):
            self.sink.log(logging.WARNING if level == "WARNING" else logging.INFO, "%s", message)
        elif self.sink is not None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            self.sink.write(f"{stamp} {level} {message}\n")
            self.sink.flush()


def source_where(spec: Specification, source: Source) -> str:
    if source is spec.target_source:
        return "target.source"
    return f"sources[{spec.sources.index(source)}]"


def source_label(spec: Specification, source: Source, path: Path) -> str:
    """`sources[i] 'name'` of a file source whose collected copy `path` is a regular file, else
    `MergeError` saying what is wrong with it."""
    label = f"{source_where(spec, source)} {source.source_name!r}"
    if not path.exists():
        raise MergeError(f"{label}: file {path} does not exist")
    if not path.is_file():
        raise MergeError(f"{label}: {path} is not a regular file")
    return label


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def utc_date(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}"
