#!/usr/bin/env bash
# Set up daqif on a fresh machine: system packages, a virtual environment in .venv with daqif
# installed (editable, with the test extras when --test is given), and the pinned buf CLI.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v fitsverify >/dev/null 2>&1 || need_apt+=(fitsverify)  # checks FITS products in the tests
# The status page's tests drive a real headless browser (tests/servers/web/).
if ((want_test)) && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
# A DPM test loop-mounts a fresh XFS with reflinks (tests/servers/dpm/test_collect.py); so can
# tools/bench_dpm.py --filesystem xfs.
if ((want_test)) && ! PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.xfs >/dev/null 2>&1; then
  need_apt+=(xfsprogs)
fi
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: please install ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
  fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ((want_test)); then
  # The bluesky and tiled extras too, so that CI runs tests/daqif/test_bluesky.py (skipped without them).
  .venv/bin/python -m pip install -q -e '.[test,bluesky,tiled]'
  # Pinned npm packages: buf (lints proto/) and the Node.js example client's gRPC libraries.
  for dir in tools/buf examples/node-client; do
    # npm ci installs exactly the lock file and never rewrites it; skip it while node_modules is newer.
    if [[ ! -f $dir/node_modules/.package-lock.json || $dir/package-lock.json -nt $dir/node_modules/.package-lock.json ]]; then
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
  done
else
  .venv/bin/python -m pip install -q -e .
fi
echo "setup: ready (.venv)"
