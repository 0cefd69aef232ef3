#!/usr/bin/env bash
# Set up (see tools/setup.sh) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --test
# Two workers (pytest-xdist), one test file each at a time (module fixtures stay shared): most tests
# wait on real servers rather than use the CPU. DAQIF_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${DAQIF_TEST_WORKERS:-2}" --dist loadfile "$@"
