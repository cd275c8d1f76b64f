# Shared by the launch scripts: `--help` prints the calling script's header comment; DRY_RUN=1
# prints the command instead of running it. Sourced, not run.
usage_or_continue() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
  fi
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}
