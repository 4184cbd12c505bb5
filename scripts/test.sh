#!/usr/bin/env bash
# Set up everything the test suite needs and run it: the project venv (.venv), the real vLLM and
# llama.cpp servers (installed once into a cache outside the clone), lint, types, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k exactness`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
bash scripts/real-servers/setup.sh all
# The dashboard's browser tests drive Debian's chromium (never a browser Playwright downloads).
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
export QALIGN_REQUIRE_REAL_SERVERS="${QALIGN_REQUIRE_REAL_SERVERS:-1}"
# Without a browser the dashboard tests fail here instead of skipping (tests/test_dashboard.py).
export QALIGN_REQUIRE_BROWSER="${QALIGN_REQUIRE_BROWSER:-1}"
# Without root or `ip netns` the multi-host test fails here instead of skipping
# (tests/test_multihost.py).
export QALIGN_REQUIRE_NETNS="${QALIGN_REQUIRE_NETNS:-1}"
# A qalign* file left in the system temp folder fails the session (tests/tmpguard.py).
export QALIGN_TMP_GUARD="${QALIGN_TMP_GUARD:-fail}"
# the slowest tests are printed so the CI log shows where its time goes
exec .venv/bin/pytest --durations=15 "$@"
