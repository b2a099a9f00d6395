#!/usr/bin/env bash
# The GPU measurement of the speed issue, prepared as one command of under 10 minutes for a lent GPU
# (the device tool: `run` with command `bash bench/gpu_step.sh`; nothing to install: it needs torch,
# timm, PyYAML, tqdm and safetensors, which that machine's python3 has). regnety_320 and regnety_1280
# at SEER's crops (2x160 + 4x96), bf16 autocast + channels_last, eager then torch.compile; images/s and
# utilisation of the bf16 matmul peak measured in the same process. One JSON line per run, on stdout
# and appended to $OUT/gpu_step.jsonl (or ./gpu_step.jsonl). Each run has its own time limit, so a
# slow compile costs only its own line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-.}/gpu_step.jsonl
BATCH=${BATCH:-32}
STEPS=${STEPS:-10}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
run() {  # seconds config [--big-compile]
  local limit=$1; shift
  timeout "$limit" "$PY" bench/train_step.py --device cuda --big-batch "$BATCH" --big-steps "$STEPS" --configs "$@" \
    | grep '^{' | tee -a "$LOG" || echo "{\"bench\": \"train_step\", \"configs\": \"$*\", \"error\": \"failed or over ${limit} s\"}" | tee -a "$LOG"
}
run 90 rg32
run 120 rg128
run 150 rg32 --big-compile
run 180 rg128 --big-compile
