"""Confinement of user-supplied paths to configured roots.

A specification or a write request names files; it must not be able to read or overwrite
anything outside the roots the operator allowed. A path is checked after resolving every
symlink and `..`, so neither can lead out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class PathNotAllowed(ValueError):
    """A path that is relative or lies outside the allowed roots; the message says which."""


def resolve_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """The allowed roots, resolved (symlinks followed) once at start-up."""
    return tuple(Path(root).resolve() for root in roots)


def confine(path: str | os.PathLike[str], roots: Sequence[Path], *, what: str = "path") -> Path:
    """Return `path` resolved, or raise `PathNotAllowed` if it is relative or leads outside `roots`.

    `path` need not exist (an output file): the longest existing prefix is resolved with its
    symlinks and the rest appended, so a symlinked parent cannot lead out either.
    """
    text = os.fspath(path)
    if not text:
        raise PathNotAllowed(f"{what} is empty")
    if "\x00" in text:
        raise PathNotAllowed(f"{what} {text!r} contains a NUL byte")
    candidate = Path(text)
    if not candidate.is_absolute():
        raise PathNotAllowed(f"{what} {text!r} is not an absolute path")
    resolved = candidate.resolve(strict=False)
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    via = "" if resolved == Path(os.path.normpath(text)) else f" (it resolves to {resolved})"
    raise PathNotAllowed(f"{what} {text!r} is outside the allowed roots{via}; allowed: {allowed}")
