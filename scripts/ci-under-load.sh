#!/usr/bin/env bash
# Run .ci/run on a fresh clone of this checkout's HEAD while two busy loops keep both cores
# busy (issue 10's robustness check). Usage: bash scripts/ci-under-load.sh [WORKDIR]
# The clone lives in WORKDIR/main beside a link to ../shared (the evaluation data), and is
# removed afterwards; the log stays in WORKDIR/ci.log.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/ci-under-load.XXXXXX)}
mkdir -p "$work"
ln -sfn "$(cd "$repo/.." && pwd)/shared" "$work/shared"
rm -rf "$work/main"
git clone -q "$repo" "$work/main"
hogs=()
for _ in 1 2; do
  timeout 3600 python3 -c "while True: pass" &
  hogs+=($!)
done
start=$(date +%s)
(cd "$work/main" && bash .ci/run) >"$work/ci.log" 2>&1
rc=$?
kill "${hogs[@]}" 2>/dev/null
commit=$(git -C "$work/main" rev-parse --short HEAD)
rm -rf "$work/main"
echo "rc=$rc seconds=$(($(date +%s) - start)) commit=$commit log=$work/ci.log" | tee -a "$work/ci.log"
exit $rc
