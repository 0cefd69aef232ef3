"""Fixtures for the DPM server tests (helpers in `dpm_helpers.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .dpm_helpers import REMOTE_SHELL_SHIM, DpmHarness


@pytest.fixture
def dpm(tmp_path: Path) -> Iterator[DpmHarness]:
    harness = DpmHarness(tmp_path)
    yield harness
    harness.close()


@pytest.fixture
def remote_shell(tmp_path: Path) -> str:
    shim = tmp_path / "fake-ssh"
    shim.write_text(REMOTE_SHELL_SHIM)
    shim.chmod(0o755)
    return str(shim)
