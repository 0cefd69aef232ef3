"""The README and docs are whole inside the repository: a clone has everything they point at."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("src/**/README.md"),
        *ROOT.glob("examples/*/README.md"),
    ]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert not broken, f"{doc.name} links outside the repository or to nothing: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_names_the_maintainers_shared_folder(doc: Path) -> None:
    assert "../shared" not in doc.read_text()


def test_readme_runs_tools_with_the_project_interpreter() -> None:
    bare = re.findall(r"(?<![/\w.])python3? tools/\S+", (ROOT / "README.md").read_text())
    assert not bare, f"use .venv/bin/python for: {bare}"


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith("./tools/setup.sh") and "daqif demo" in block[0]
    assert block[1].startswith("./tools/test.sh")
    assert "tools/test.sh" in (ROOT / ".ci" / "run").read_text()
