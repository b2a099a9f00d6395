#!/usr/bin/env bash
# The GPU measurement of the speed issue, prepared as one command of under 10 minutes for a lent GPU
# (the device tool: `run` with command `bash bench/gpu_step.sh`, timeout_s 600; nothing to install: it
# needs torch, timm, PyYAML, tqdm and safetensors, which that machine's python3 has).
#  0. openseer's own step as a run of many GPUs takes it: `pretrain()` (what `openseer pretrain` runs) on
#     generated tar shards, CUDA, bf16, torch.compile, under torchrun with a process group opened for one
#     rank (OPENSEER_PROCESS_GROUP=1: cpu:gloo,cuda:nccl, every collective of the step goes through it):
#     images/s after the compiled first step and host syncs per step that is not a log step (counted
#     with torch.cuda.set_sync_debug_mode; the CPU test says at most 1: the step's verdict);
#  1. regnety_320 and regnety_1280 at SEER's crops (2x160 + 4x96), bf16 autocast + channels_last, eager,
#     at batch $BATCHES (default 128): images/s and utilisation of the bf16 matmul peak measured in the
#     same process (bench/train_step.py --device cuda);
#  2. the same under torch.compile, batch $COMPILE_BATCH (default 128), with limits (180 / 250 s) for a cold
#     inductor cache (2026-11-29: both compiles took over 130 s / 150 s cold); regnety_1280 compiled only
#     with ALL=1 (it would take the script past 10 minutes);
#     COMPILE_MODE=max-autotune-no-cudagraphs (or reduce-overhead: CUDA graphs) compiles with that mode
#     instead (untried on the H200 so far: a second call, as each cold compile needs its own minutes);
#  3. with CEILING=1, the eager runs also time each convolution / linear layer alone (--ceiling): the
#     utilisation the step cannot pass with these kernels;
#  4. with TINY=1, first: openseer's own training loop on CUDA, `openseer pretrain` with the tiny-cpu
#     recipe on Fashion-MNIST (the idx files carried in .fm/) for a fixed number of steps.
# Measured 2026-11-29 at batch 32 and 64: docs/benchmarks.md (training-step section, GPU).
# One JSON line per run, on stdout and appended to $OUT/gpu_step.jsonl (or ./gpu_step.jsonl). Each
# part has its own time limit, so a slow compile costs only its own line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
OUTDIR=${OUT:-.}
LOG=$OUTDIR/gpu_step.jsonl
STEPS=${STEPS:-10}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
big() {  # seconds configs batches [--big-compile]
  local limit=$1 configs=$2 batches=$3; shift 3
  timeout "$limit" "$PY" bench/train_step.py --device cuda --big-batch "$batches" --big-steps "$STEPS" \
    --configs "$configs" "$@" | grep '^{' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "{\"bench\": \"train_step\", \"configs\": \"$configs\", \"batches\": \"$batches\", \"args\": \"$*\", \"error\": \"exit $rc (124: over ${limit} s)\"}" | tee -a "$LOG"
}
BATCHES=${BATCHES:-128}
COMPILE_BATCH=${COMPILE_BATCH:-128}
if [ "${TINY:-0}" = 1 ] && [ -d .fm ]; then  # the real training loop on CUDA (auto: bf16 + compile), data included
  timeout 100 "$PY" -m openseer pretrain --data .fm --recipe tiny-cpu --out /tmp/gpu-tiny --max-steps 150 \
    device=cuda data.batch_size=512 data.num_workers=6 log.every=50 checkpoint.every=150 2>&1 | tail -n 25
  echo "pretrain exit ${PIPESTATUS[0]}"
  [ -f /tmp/gpu-tiny/metrics.jsonl ] && cp /tmp/gpu-tiny/metrics.jsonl "$OUTDIR/gpu_tiny_metrics.jsonl"
  [ -f /tmp/gpu-tiny/config.yaml ] && cp /tmp/gpu-tiny/config.yaml "$OUTDIR/gpu_tiny_config.yaml"
fi
# 0. the real loop through a 1-rank process group (first: it is the check many GPUs depend on)
OPENSEER_PROCESS_GROUP=1 timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  bench/train_step.py --configs pretrain --device cuda --steps "${PRETRAIN_STEPS:-60}" optim.precision=bf16 \
  model.compile=true "data.batch_size=${PRETRAIN_BATCH:-256}" data.num_workers=6 | grep '^{' | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || echo "{\"bench\": \"train_step\", \"configs\": \"pretrain\", \"error\": \"exit $rc (124: over 240 s)\"}" | tee -a "$LOG"
COMPILE=(--big-compile ${COMPILE_MODE:+--big-compile-mode "$COMPILE_MODE"})
big 120 rg32,rg128 "$BATCHES" $([ "${CEILING:-0}" = 1 ] && echo --ceiling)
big 180 rg32 "$COMPILE_BATCH" "${COMPILE[@]}"
[ "${ALL:-0}" = 1 ] && big 250 rg128 "$COMPILE_BATCH" "${COMPILE[@]}"
