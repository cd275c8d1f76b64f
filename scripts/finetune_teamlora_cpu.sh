#!/usr/bin/env bash
# Fine-tune TeamLoRA (+ the projector) on CPU ranks under DeepSpeed ZeRO-2 (gloo): the demo's run by
# default, or any run config. Settings come from these variables (defaults in brackets):
#   RUN_CONFIG  the run YAML                      [data_configs/runs/demo_teamlora.yaml]
#   MODEL       a preset or checkpoint folder     [the run config's]
#   DATA        a mixture YAML                    [the run config's]
#   OUTPUT_DIR  the run folder                    [runs/finetune-teamlora-cpu]
#   NPROC       CPU ranks                         [2]
#   MAX_STEPS   optimizer steps                   [the run config's schedule]
#   MINUTES     wall-clock cap (a checkpoint at the stop; --resume auto continues)  [none]
#   PYTHON      the environment's python          [python3]
#   MASTER_PORT rendezvous port                   [29500]
# Further arguments are passed on: dotted overrides (optim.lr=1e-4) and --resume auto / --overwrite.
# Example (the tiny model, seconds): MODEL=tiny-random DATA=data_configs/fixtures.yaml MAX_STEPS=2 \
#   bash scripts/finetune_teamlora_cpu.sh --overwrite
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage_or_continue "$@"
cd "$(dirname "$0")/.."  # paths are relative to the repository root

RUN_CONFIG=${RUN_CONFIG:-data_configs/runs/demo_teamlora.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/finetune-teamlora-cpu}
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}

overrides=("output_dir=$OUTPUT_DIR" "deepspeed=2" "precision=fp32")
[[ -n "${MODEL:-}" ]] && overrides+=("model=$MODEL")
[[ -n "${DATA:-}" ]] && overrides+=("data=$DATA")
[[ -n "${MAX_STEPS:-}" ]] && overrides+=("optim.max_steps=$MAX_STEPS")
[[ -n "${MINUTES:-}" ]] && overrides+=("optim.max_minutes=$MINUTES")

export DS_ACCELERATOR=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}  # ranks share the cores
run "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
  --module mm_teamlora.train "$RUN_CONFIG" "${overrides[@]}" "$@"
