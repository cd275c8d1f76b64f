#!/usr/bin/env bash
# MMBench-style evaluation of a checkpoint (likelihood scoring, CircularEval), one shard per process
# when NPROC > 1, then the shards scored together. Settings (defaults in brackets):
#   CHECKPOINT  a checkpoint folder or a preset    [runs/llava-teamlora/<its latest>]
#   DATA_TSV    an MMBench TSV                     [playground/data/eval/mmbench/mmbench_dev_20230712.tsv]
#   OUT         the report folder                  [<CHECKPOINT>/eval-mmbench]
#   MODE        likelihood | generate              [likelihood]
#   NPROC       processes (GPUs), one shard each   [1]
#   PYTHON, MASTER_PORT                            [python3, 29500]
# Further arguments go to `mm-teamlora eval` (e.g. --batch-size 16).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage_or_continue "$@"
cd "$(dirname "$0")/.."  # paths are relative to the repository root

RUN=runs/llava-teamlora
CHECKPOINT=${CHECKPOINT:-$RUN/$(cat "$RUN/latest" 2>/dev/null || echo checkpoint-missing)}
DATA_TSV=${DATA_TSV:-playground/data/eval/mmbench/mmbench_dev_20230712.tsv}
OUT=${OUT:-$CHECKPOINT/eval-mmbench}
MODE=${MODE:-likelihood}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}

if (( NPROC == 1 )); then
  run "$PYTHON" -m mm_teamlora.cli eval --model "$CHECKPOINT" --data "$DATA_TSV" --mode "$MODE" --circular \
    --out "$OUT" "$@"
else
  run "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" \
    -m mm_teamlora.cli eval --model "$CHECKPOINT" --data "$DATA_TSV" --mode "$MODE" --circular \
    --num-shards 0 --out "$OUT" "$@"
  shards=()
  for k in $(seq 0 $((NPROC - 1))); do shards+=(--predictions "$OUT/predictions.shard-$k-of-$NPROC.tsv"); done
  run "$PYTHON" -m mm_teamlora.cli eval-score "${shards[@]}" --data "$DATA_TSV" --out "$OUT"
fi
