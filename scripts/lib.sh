# Shared by the launch scripts: `--help` prints the calling script's header comment; DRY_RUN=1
# prints the command instead of running it. Sourced, not run.
usage_or_continue() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
  fi
}

# accumulation_steps GLOBAL MICRO GPUS: the gradient accumulation that makes the global batch, or exit 2
accumulation_steps() {
  if (( $1 % ($2 * $3) )); then
    echo "GLOBAL_BATCH=$1 is not a multiple of MICRO_BATCH x NUM_GPUS = $(($2 * $3))" >&2
    exit 2
  fi
  echo $(($1 / ($2 * $3)))
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}
