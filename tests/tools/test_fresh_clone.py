"""A fresh clone behaves on a plain PATH: code generation finds its plugins beside the interpreter, the
pinned npm packages install from the lock files without rewriting them, and building the package leaves
nothing git would see. The whole suite is not run twice: `.ci/run` does that on a fresh clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def run(argv: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = PLAIN_PATH
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def git_status(clone: Path) -> str:
    return run(["git", "status", "--porcelain", "--untracked-files=all"], clone)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fresh") / "daqif"
    run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(target)], ROOT)
    assert git_status(target) == ""
    return target


def test_the_venv_is_not_on_the_plain_path() -> None:
    """Guards the tests below: they prove nothing if the venv's scripts are on PATH anyway."""
    assert str(Path(sys.executable).parent) not in PLAIN_PATH.split(":")
    found = shutil.which("protoc-gen-mypy_grpc", path=PLAIN_PATH)
    assert found is None or Path(found).parent != Path(sys.executable).parent


def test_code_generation_on_a_plain_path_reproduces_the_committed_stubs(clone: Path) -> None:
    printed = run([sys.executable, "tools/gen_protos.py"], clone)
    assert "dpm_pb2_grpc.pyi" in printed
    assert git_status(clone) == "", "regenerated stubs differ from the committed ones"


@pytest.mark.parametrize("directory", ["tools/buf", "examples/node-client"])
def test_npm_ci_installs_from_the_lock_file_and_leaves_it_as_committed(clone: Path, directory: str) -> None:
    npm = shutil.which("npm", path=PLAIN_PATH)
    assert npm is not None, "npm is not installed"
    run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], clone / directory)
    assert (clone / directory / "node_modules").is_dir()
    assert git_status(clone) == ""


def test_building_the_package_leaves_nothing_git_sees(clone: Path, tmp_path: Path) -> None:
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(clone)], clone)
    assert list(tmp_path.glob("daqif-*.whl"))
    assert (clone / "src" / "daqif.egg-info").is_dir()
    assert git_status(clone) == ""
