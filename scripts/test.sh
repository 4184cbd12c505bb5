#!/usr/bin/env bash
# Set up everything the test suite needs and run it: the project venv (.venv), the real vLLM and
# llama.cpp servers (installed once into a cache outside the clone), lint, types, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k exactness`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
bash scripts/real-servers/setup.sh all
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
export QALIGN_REQUIRE_REAL_SERVERS="${QALIGN_REQUIRE_REAL_SERVERS:-1}"
# A qalign* file left in the system temp folder fails the session (tests/tmpguard.py).
export QALIGN_TMP_GUARD="${QALIGN_TMP_GUARD:-fail}"
# the slowest tests are printed so the CI log shows where its time goes
exec .venv/bin/pytest --durations=15 "$@"
