#!/usr/bin/env bash
# GPU smoke test of the model and the training room: one command on a freshly lent GPU machine, under
# 5 minutes on one H200. It installs nothing and reads no weight file: it builds, in a temp folder, a
# random-weight model with the embedded default's shapes (a SmolLM2-135M-shaped Llama and a DINOv2
# ViT-S/14 at 224 px, the preset's tower options: 64 tokens per image; the preset's projector; the
# offline tiny tokenizer), generated image-text and text-only records, and one run YAML per method
# (adapter and learning rates as data_configs/runs/demo_METHOD.yaml), then runs these stages, each
# for every method in turn:
#   model   STEPS steps of MultimodalLM.forward(supervised_only=True) + AdamW in the driver process
#           (no DeepSpeed needed), then save_pretrained / from_pretrained: equal tensors, equal loss
#   room    `python -m mm_teamlora.train` on one process (DeepSpeed, ZeRO stage 0), STEPS steps with
#           a checkpoint halfway, then --resume from that checkpoint into a second run folder: the
#           same batches (supervised tokens per logged step) and losses within RESUME_RTOL
#   zero2   the same run under ZeRO-2 on NUM_GPUS GPUs (`mm-teamlora train --nproc N` when N > 1)
# and prints a table of tokens/s (the project's: non-padding tokens the LM ran, image tokens
# included, per second; for room runs the median of the logged windows after the first) and peak
# memory (GPU: max allocated; CPU: RSS), then a `RESULT key=value ...` line.
# Exit status: 0 every stage ran and passed; 1 a check failed; 2 bad settings; 3 no CUDA GPU (nothing
# was run; documented skip); 4 the Python lacks a module; 5 what ran passed, but a stage was skipped
# (no DeepSpeed or matplotlib for the training room, or TIME_BUDGET_S ran out).
# Settings (defaults in brackets):
#   PYTHON        a Python with torch and the project's dependencies; the repository itself needs
#                 no install (it goes on PYTHONPATH)  [python3]
#   METHODS       adapter methods, each with a data_configs/runs/demo_METHOD.yaml  [lora teamlora]
#   STAGES        the stages to run, of: model room zero2  [model room zero2]
#   STEPS         optimizer steps per run (the resumed run does the second half)  [50]
#   MICRO_BATCH   micro-batch per GPU (no accumulation)  [16]
#   SEQ_TOKENS    the mixture's max_length: records are drawn at 40-90% of it, image tokens included  [512]
#   RECORDS       generated records, three quarters with an image  [800]
#   PRECISION     bf16 | fp32  [bf16; fp32 with GPU_SMOKE_ALLOW_CPU=1]
#   NUM_GPUS      ranks of the ZeRO-2 run  [every visible GPU]
#   RESUME_RTOL   largest relative loss difference between the resumed and the uninterrupted run  [0.02]
#   TIME_BUDGET_S a run that would start after this many seconds is skipped  [270]
#   WORK_DIR      where everything is built and run (a given one is kept)  [a new temp folder,
#                 removed at the end unless KEEP=1]
#   KEEP          1: keep WORK_DIR  [0]
#   RESULTS_DIR   copy gpu_smoke.log (every run's output) and summary.json there, e.g. $OUT  [none]
#   GPU_SMOKE_ALLOW_CPU  1: run without a GPU (DeepSpeed on CPU, gloo), for tests  [0]
#   GPU_SMOKE_TINY       1: tiny shapes (2-layer Llama, 2-layer DINOv2) instead of the default's  [0]
#   PRINT_SHAPES  1: print the model's shapes as JSON and exit (needs no GPU)  [0]
#   DRY_RUN       1: print the driver command instead of running it  [0]
# Example: bash scripts/gpu_smoke.sh; on a lent machine, RESULTS_DIR=$OUT bash scripts/gpu_smoke.sh.
# Tiny CPU run (about a minute): GPU_SMOKE_ALLOW_CPU=1 GPU_SMOKE_TINY=1 METHODS=teamlora STEPS=4 \
#   MICRO_BATCH=2 RECORDS=16 SEQ_TOKENS=96 bash scripts/gpu_smoke.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage_or_continue "$@"
cd "$(dirname "$0")/.."  # the repository root goes on PYTHONPATH
REPO=$(pwd)

PYTHON=${PYTHON:-python3}
METHODS=${METHODS:-lora teamlora}
STAGES=${STAGES:-model room zero2}
STEPS=${STEPS:-50}
MICRO_BATCH=${MICRO_BATCH:-16}
SEQ_TOKENS=${SEQ_TOKENS:-512}
RECORDS=${RECORDS:-800}
GPU_SMOKE_ALLOW_CPU=${GPU_SMOKE_ALLOW_CPU:-0}
GPU_SMOKE_TINY=${GPU_SMOKE_TINY:-0}
PRECISION=${PRECISION:-$([[ "$GPU_SMOKE_ALLOW_CPU" == 1 ]] && echo fp32 || echo bf16)}
NUM_GPUS=${NUM_GPUS:-0}  # 0: every visible GPU
RESUME_RTOL=${RESUME_RTOL:-0.02}
TIME_BUDGET_S=${TIME_BUDGET_S:-270}
WORK_DIR=${WORK_DIR:-}
KEEP=${KEEP:-0}
RESULTS_DIR=${RESULTS_DIR:-}
PRINT_SHAPES=${PRINT_SHAPES:-0}

args=(--repo "$REPO" --methods "$METHODS" --stages "$STAGES" --steps "$STEPS" --micro-batch "$MICRO_BATCH"
      --seq-tokens "$SEQ_TOKENS" --records "$RECORDS" --precision "$PRECISION" --num-gpus "$NUM_GPUS"
      --resume-rtol "$RESUME_RTOL" --time-budget "$TIME_BUDGET_S" --allow-cpu "$GPU_SMOKE_ALLOW_CPU"
      --tiny "$GPU_SMOKE_TINY" --print-shapes "$PRINT_SHAPES" --results-dir "$RESULTS_DIR")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  run "$PYTHON" "$REPO/scripts/gpu_smoke_driver.py" --work "${WORK_DIR:-<temp>}" "${args[@]}"
  exit 0
fi
if [[ -z "$WORK_DIR" ]]; then
  WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX")
  [[ "$KEEP" == 1 ]] || trap 'rm -rf "$WORK_DIR"' EXIT
fi
mkdir -p "$WORK_DIR"
"$PYTHON" "$REPO/scripts/gpu_smoke_driver.py" --work "$WORK_DIR" "${args[@]}"
