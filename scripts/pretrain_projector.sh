#!/usr/bin/env bash
# Stage 1 (LLaVA's projector pre-training): the projector alone, on caption data with the plain
# template, frozen LM and vision tower, bf16 on GPUs under ZeRO-2. Settings (defaults in brackets):
#   LM_PATH     a local Hugging Face causal LM folder          [checkpoints/lm]
#   VISION_PATH a local CLIP / SigLIP / DINOv2 folder          [checkpoints/clip-vit-large-patch14-336]
#   DATA        the caption mixture YAML                       [data_configs/llava_pretrain_558k.yaml]
#   OUTPUT_DIR  the run folder (stage 2 starts from it)        [runs/llava-pretrain]
#   NUM_GPUS    GPUs on this node                              [8]
#   GLOBAL_BATCH global batch (= micro-batch x accumulation x GPUs)  [256]
#   MICRO_BATCH per-GPU micro-batch                            [32]
#   PYTHON, MASTER_PORT                                        [python3, 29500]
# Further arguments are passed on as overrides (e.g. optim.lr=2e-3) or --resume auto.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage_or_continue "$@"
cd "$(dirname "$0")/.."  # paths are relative to the repository root

LM_PATH=${LM_PATH:-checkpoints/lm}
VISION_PATH=${VISION_PATH:-checkpoints/clip-vit-large-patch14-336}
DATA=${DATA:-data_configs/llava_pretrain_558k.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llava-pretrain}
NUM_GPUS=${NUM_GPUS:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
MICRO_BATCH=${MICRO_BATCH:-32}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}

GRAD_ACCUM=$(accumulation_steps "$GLOBAL_BATCH" "$MICRO_BATCH" "$NUM_GPUS")
run "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
  --module mm_teamlora.train data_configs/runs/llava_v1_5_pretrain.yaml \
  "model.language_model=hf:$(realpath -m "$LM_PATH")" "model.vision.path=$(realpath -m "$VISION_PATH")" \
  "data=$DATA" "output_dir=$OUTPUT_DIR" "optim.micro_batch_size=$MICRO_BATCH" \
  "optim.grad_accum=$GRAD_ACCUM" "$@"
