# Shared by the launch scripts in examples/ (sourced, not run):
#   COMPRESSION  the expert all-to-all: lsh (default) or none (dense), or any registered
#                compressor (cast, ...); LSH_FLAGS replaces the LSH settings below.
#   RUN_DIR      the run's folder (default runs/<script>-<compression>): checkpoints/,
#                tensorboard/, metrics.jsonl, train.log. Re-running resumes from its
#                newest checkpoint (--save and --load are the same folder).
#   DRY_RUN=1    print the exact command (shell-quoted) instead of running it.
# A script calls setup_run NAME, then run_cmd LAUNCHER... ENTRY_POINT FLAGS... "${RUN_FLAGS[@]}".

setup_run() {
  COMPRESSION=${COMPRESSION:-lsh}
  RUN_DIR=${RUN_DIR:-runs/$1-$COMPRESSION}
  RUN_FLAGS=(--moe-a2a-compression "$COMPRESSION"
             --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
             --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl")
  if [[ $COMPRESSION == lsh ]]; then
    # shellcheck disable=SC2206 - word splitting of the settings is intended
    RUN_FLAGS+=(${LSH_FLAGS:---moe-lsh-num-hashes 6})
  fi
}

run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  mkdir -p "$RUN_DIR"
  printf '> run folder %s (compression %s)\n' "$RUN_DIR" "$COMPRESSION"
  "$@" 2>&1 | tee -a "$RUN_DIR/train.log"
}
