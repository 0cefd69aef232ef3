#!/usr/bin/env bash
# The conventions CI enforces (and .pre-commit-config.yaml runs locally): ruff, ruff format, mypy strict.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
"$py" -m ruff check src tests tools
"$py" -m ruff format --check src tests tools
"$py" -m mypy                 # strict on src/ (pyproject.toml [tool.mypy])
"$py" -m mypy tests tools     # the same strictness for the tests and tools
echo "lint: clean"
