#!/usr/bin/env bash
# Stop servers started by start.sh. Idempotent: stopping something that is not running is a no-op.
#
#   bash scripts/real-servers/stop.sh vllm|llamacpp|all
#   bash scripts/real-servers/stop.sh --name vllm-gen|vllm-rm|llamacpp
#
# Each server was started in its own process group (pgid == pid); the whole group gets SIGTERM
# (vLLM's API server, EngineCore and worker processes), then SIGKILL after QALIGN_STOP_TIMEOUT
# seconds (default 30). Pid files are only trusted if the process start time still matches.
set -euo pipefail

ROOT=${QALIGN_REALSRV_HOME:-$HOME/.cache/qalign/realsrv}
RUN=$ROOT/run
STOP_TIMEOUT=${QALIGN_STOP_TIMEOUT:-30}

case "${1:-}" in
  vllm) NAMES=(vllm-gen vllm-rm) ;;
  llamacpp) NAMES=(llamacpp) ;;
  all) NAMES=(llamacpp vllm-gen vllm-rm) ;;
  --name) NAMES=("${2:?--name needs a server name}") ;;
  *) echo "usage: $0 vllm|llamacpp|all | --name NAME" >&2; exit 2 ;;
esac

starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_one() {
  local name=$1 f=$RUN/$1.pid pid start
  if [ ! -f "$f" ]; then
    echo "[stop] $name: not running"
    return 0
  fi
  pid=$(cat "$f")
  start=$(cat "$RUN/$name.start" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(starttime "$pid")" = "$start" ]; then
    echo "[stop] $name: SIGTERM to process group $pid"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local t=0
    while group_alive "$pid" && (( t < STOP_TIMEOUT * 5 )); do
      sleep 0.2
      t=$((t + 1))
    done
    if group_alive "$pid"; then
      echo "[stop] $name: still alive after ${STOP_TIMEOUT}s, SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    echo "[stop] $name: stopped"
  elif [ -n "$pid" ] && group_alive "$pid" && [ -z "$(starttime "$pid")" ]; then
    # Leader gone but children of its group left over (e.g. a killed API server).
    echo "[stop] $name: leader gone, SIGKILL to leftover process group $pid"
    kill -KILL -- "-$pid" 2>/dev/null || true
  else
    echo "[stop] $name: not running (stale pid file)"
  fi
  rm -f "$f" "$RUN/$name.start" "$RUN/$name.port"
}

for n in "${NAMES[@]}"; do
  stop_one "$n"
done
