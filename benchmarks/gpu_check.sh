#!/usr/bin/env bash
# What one CUDA GPU can check of the estimate, predicted vs measured, in under 8 minutes:
#   1. matmul efficiency at the shapes of three plans (benchmarks/gpu_check.py matmul);
#   2. a one-process training step of a ~1B Llama with bf16 autocast (`shardwise check`): peak
#      allocator memory and step time against the estimate;
#   3. the same step time against the estimate with `shardwise calibrate`'s hardware file.
# Run from the repository root: bash benchmarks/gpu_check.sh [--gpu CATALOG_NAME] [--dry-run]
# --dry-run prints the commands without running them. Each part has its own time limit.
set -euo pipefail
PY=${PYTHON:-python}
GPU_FLAG=()
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) GPU_FLAG=(--gpu "$2"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --gpu NAME, --dry-run)" >&2; exit 2 ;;
  esac
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
CONFIG="$OUT/step.toml"
HW="$OUT/calibrated.toml"
run() {  # limit_s, command...
  local limit=$1; shift
  echo "+ $*"
  if [ "$DRY" = 0 ]; then timeout "$limit" "$@"; fi
}
run 90 "$PY" benchmarks/gpu_check.py matmul "${GPU_FLAG[@]}"
run 30 "$PY" benchmarks/gpu_check.py config --out "$CONFIG"
# check exits 1 when a verdict fails: the figures are the point, so go on
run 150 "$PY" -m shardwise check "$CONFIG" --device cuda --steps 10 "${GPU_FLAG[@]}" || echo "(check: exit $?)"
run 150 "$PY" -m shardwise calibrate --out "$HW" --device cuda --nproc 1 --quick --config "$CONFIG"
run 150 "$PY" -m shardwise check "$CONFIG" --device cuda --steps 10 --hardware "$HW" || echo "(check: exit $?)"
