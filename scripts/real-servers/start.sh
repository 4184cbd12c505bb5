#!/usr/bin/env bash
# Start the REAL inference servers in the background and wait until /health answers 200.
#
#   bash scripts/real-servers/start.sh vllm|llamacpp|all
#
# Needs `setup.sh MODE` first. Pid files and logs go to $QALIGN_REALSRV_HOME/run/ (<name>.pid,
# <name>.log); each server runs in its own process group so stop.sh can take vLLM's children down.
# A server whose pid file points at a live process is not started twice.
#
# vllm (vLLM 0.32 CPU, SmolLM2-135M fp32, --enforce-eager, max-model-len 2048):
#   generator on QALIGN_GEN_PORT (8000), names QALIGN_GEN_NAMES
#     (default "meta-llama/Llama-3.1-8B-Instruct smollm2"; first name is echoed in responses)
#   reward model on QALIGN_RM_PORT (8001), names QALIGN_RM_NAMES
#     (default "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 smollm2-rm"), /classify /pooling /score
# llamacpp (llama.cpp server via xllamacpp, SmolLM2-135M Q4_1 GGUF):
#   on QALIGN_LLAMACPP_PORT (8081), alias QALIGN_LLAMACPP_ALIAS (smollm2),
#   QALIGN_LLAMACPP_PARALLEL (4) slots, QALIGN_LLAMACPP_CTX (4096) total context
# Other env: QALIGN_REALSRV_HOST (127.0.0.1), QALIGN_START_TIMEOUT seconds (600),
#   QALIGN_VLLM_MAX_MODEL_LEN (2048), QALIGN_VLLM_EXTRA_ARGS (appended to both vLLM command lines).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=${1:-}
ROOT=${QALIGN_REALSRV_HOME:-$HOME/.cache/qalign/realsrv}
RUN=$ROOT/run
HOST=${QALIGN_REALSRV_HOST:-127.0.0.1}
TIMEOUT=${QALIGN_START_TIMEOUT:-600}
GEN_PORT=${QALIGN_GEN_PORT:-8000}
RM_PORT=${QALIGN_RM_PORT:-8001}
GEN_NAMES=${QALIGN_GEN_NAMES:-meta-llama/Llama-3.1-8B-Instruct smollm2}
RM_NAMES=${QALIGN_RM_NAMES:-Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 smollm2-rm}
MAX_LEN=${QALIGN_VLLM_MAX_MODEL_LEN:-2048}
XL_PORT=${QALIGN_LLAMACPP_PORT:-8081}
XL_ALIAS=${QALIGN_LLAMACPP_ALIAS:-smollm2}
XL_PARALLEL=${QALIGN_LLAMACPP_PARALLEL:-4}
XL_CTX=${QALIGN_LLAMACPP_CTX:-4096}

case "$MODE" in
  vllm|llamacpp|all) ;;
  *) echo "usage: $0 vllm|llamacpp|all" >&2; exit 2 ;;
esac

mkdir -p "$RUN"
T0=$SECONDS
say() { printf '[start %4ss] %s\n' "$((SECONDS - T0))" "$*"; }

need_marks() {
  local m
  for m in "$@"; do
    if [ ! -f "$ROOT/markers/$m.ok" ]; then
      echo "not installed (missing $ROOT/markers/$m.ok): run bash $HERE/setup.sh $MODE" >&2
      exit 1
    fi
  done
}

# starttime PID : kernel start time of a process (field 22 of /proc/PID/stat), guards against pid reuse
starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

# alive NAME : the pid file points at the live process we started
alive() {
  local f=$RUN/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ "$(starttime "$pid")" = "$(cat "$RUN/$1.start" 2>/dev/null)" ]
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
healthy() { curl -sf -o /dev/null --max-time 5 "http://$HOST:$1/health"; }

STARTED=()
# launch NAME PORT CMD... : start CMD in a new session (process group id == pid)
launch() {
  local name=$1 port=$2; shift 2
  if alive "$name"; then
    say "$name already running (pid $(cat "$RUN/$name.pid")), port $port"
    return 0
  fi
  rm -f "$RUN/$name.pid" "$RUN/$name.port" "$RUN/$name.start"
  if port_busy "$port"; then
    echo "port $port is already in use by another process; set the QALIGN_*_PORT env var" >&2
    exit 1
  fi
  setsid "$@" > "$RUN/$name.log" 2>&1 < /dev/null &
  local pid=$!
  starttime "$pid" > "$RUN/$name.start"
  echo "$port" > "$RUN/$name.port"
  echo "$pid" > "$RUN/$name.pid"
  STARTED+=("$name")
  say "$name started (pid $pid), port $port, log $RUN/$name.log"
}

# wait_healthy NAME PORT : poll /health until 200, the process dies, or the timeout
wait_healthy() {
  local name=$1 port=$2
  while (( SECONDS - T0 < TIMEOUT )); do
    if healthy "$port"; then
      say "$name healthy at http://$HOST:$port"
      return 0
    fi
    if ! alive "$name"; then
      echo "$name exited before becoming healthy; last log lines:" >&2
      tail -n 40 "$RUN/$name.log" >&2 || true
      return 1
    fi
    sleep 1
  done
  echo "$name not healthy after ${TIMEOUT}s; last log lines:" >&2
  tail -n 40 "$RUN/$name.log" >&2 || true
  return 1
}

fail() {
  # Stop only what this invocation started, so a failed start leaves nothing behind.
  local n
  for n in "${STARTED[@]}"; do
    QALIGN_REALSRV_HOME=$ROOT bash "$HERE/stop.sh" --name "$n" || true
  done
  exit 1
}

start_vllm() {
  need_marks venv-vllm model-gen model-rm
  local V=$ROOT/venv-vllm M=$ROOT/models
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
  export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
  local common=(--host "$HOST" --dtype float32 --max-model-len "$MAX_LEN" --enforce-eager)
  local extra=()
  # shellcheck disable=SC2206
  [ -n "${QALIGN_VLLM_EXTRA_ARGS:-}" ] && extra=($QALIGN_VLLM_EXTRA_ARGS)
  local gen_names rm_names
  read -r -a gen_names <<< "$GEN_NAMES"
  read -r -a rm_names <<< "$RM_NAMES"
  # A large token budget per engine step keeps prompts from being prefilled in chunks: vLLM 0.32's
  # CPU path crashes the engine ("CPU Generator does not use offset") when a seeded request's
  # partial-prefill sample is rewound, which many concurrent seeded requests trigger.
  launch vllm-gen "$GEN_PORT" "$V/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$M/smollm2-135m-instruct" --served-model-name "${gen_names[@]}" --port "$GEN_PORT" \
    --max-num-batched-tokens 65536 "${common[@]}" "${extra[@]}"
  # LlamaForSequenceClassification resolves to the pooling runner (task "classify") by itself;
  # --runner pooling just makes that explicit.
  launch vllm-rm "$RM_PORT" "$V/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$M/smollm2-135m-rm" --served-model-name "${rm_names[@]}" --port "$RM_PORT" \
    --runner pooling "${common[@]}" "${extra[@]}"
  say "waiting for vLLM /health (about 1-2 min; timeout ${TIMEOUT}s)"
  wait_healthy vllm-gen "$GEN_PORT" || fail
  wait_healthy vllm-rm "$RM_PORT" || fail
}

start_llamacpp() {
  need_marks venv-xl
  launch llamacpp "$XL_PORT" "$ROOT/venv-xl/bin/python" "$HERE/xl_serve.py" --host "$HOST" \
    --port "$XL_PORT" --alias "$XL_ALIAS" --parallel "$XL_PARALLEL" --ctx "$XL_CTX"
  wait_healthy llamacpp "$XL_PORT" || fail
}

case "$MODE" in
  vllm) start_vllm ;;
  llamacpp) start_llamacpp ;;
  all) start_llamacpp; start_vllm ;;
esac
say "ready ($MODE)"
