#!/usr/bin/env bash
# Set up (see tools/setup.sh) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --test
exec .venv/bin/python -m pytest "$@"
