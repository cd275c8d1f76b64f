#!/usr/bin/env bash
# Stage 2 on GPUs: TeamLoRA on the language model + the projector, from the stage-1 run, ZeRO-3, with
# the paper's LLaVA-1.5 settings (lr 2e-4, cosine, 3% warm-up, alpha 32, dropout 0.05, bf16, k = 4).
# Settings (defaults in brackets):
#   PRETRAIN_RUN the stage-1 run folder (its latest checkpoint)  [runs/llava-pretrain]
#   DATA         the instruction mixture YAML       [data_configs/llava_v1_5_665k_text.yaml]
#   OUTPUT_DIR   the run folder                     [runs/llava-teamlora]
#   LORA_RANK    total rank r: 64 or 128 (r / k per expert)  [64]
#   NUM_EXPERTS  k                                  [4]
#   ZERO         a ZeRO JSON                        [scripts/zero3.json; zero3_offload.json to offload]
#   NUM_GPUS     GPUs on this node                  [8]
#   GLOBAL_BATCH global batch                       [128]
#   MICRO_BATCH  per-GPU micro-batch                [16]
#   PYTHON, MASTER_PORT                             [python3, 29500]
# Further arguments are passed on as overrides (adapter.method=lora, optim.epochs=2, ...) or
# --resume auto.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage_or_continue "$@"
cd "$(dirname "$0")/.."  # paths are relative to the repository root

PRETRAIN_RUN=${PRETRAIN_RUN:-runs/llava-pretrain}
DATA=${DATA:-data_configs/llava_v1_5_665k_text.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llava-teamlora}
LORA_RANK=${LORA_RANK:-64}
NUM_EXPERTS=${NUM_EXPERTS:-4}
ZERO=${ZERO:-scripts/zero3.json}
NUM_GPUS=${NUM_GPUS:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
MICRO_BATCH=${MICRO_BATCH:-16}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}

GRAD_ACCUM=$(accumulation_steps "$GLOBAL_BATCH" "$MICRO_BATCH" "$NUM_GPUS")
run "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
  --module mm_teamlora.train data_configs/runs/llava_v1_5_teamlora.yaml \
  "model=$(realpath -m "$PRETRAIN_RUN")" "data=$DATA" "output_dir=$OUTPUT_DIR" "deepspeed=$(realpath -m "$ZERO")" \
  "adapter.r=$LORA_RANK" "adapter.num_experts=$NUM_EXPERTS" "optim.micro_batch_size=$MICRO_BATCH" \
  "optim.grad_accum=$GRAD_ACCUM" "$@"
