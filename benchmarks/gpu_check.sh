#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine (see ../shared/device/README.md):
#
#   export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh [quick|full]
#
# Runs with the machine's python3 (PYTHON=... to change), writes everything under $OUT
# (default gpu_check_out/): the GPU tests, the targets benchmark on CUDA, the loader
# benchmark (DALI gpu vs cpu vs the CPU backend), a short default training run (DALI on the
# GPU, AMP, GPU batch cache) and the benchmark matrix (--quick, or the full one with `full`).
# Each step's output is kept even when a later one fails; the exit status is the number of
# failed steps.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
MODE=${1:-quick}
DATA=${DATA:-/tmp/gpu_check_data}
mkdir -p "$OUT"
failed=0

step() {  # step NAME COMMAND...: run, tee to $OUT/NAME.txt, count failures
  local name=$1; shift
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  local start=$SECONDS
  "$@" 2>&1 | tail -c 200000 >> "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

$PY -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name(0)) if torch.cuda.is_available() else sys.exit('no usable CUDA device')" || exit 99

step data $PY scripts/make_synthetic_data.py --root "$DATA" --no-progress
step tests $PY -m pytest -q -m gpu tests
step targets $PY benchmarks/targets_bench.py --device cuda --json "$OUT/targets_cuda.json"
step loader_val $PY benchmarks/loader_bench.py --root "$DATA" --split val --json "$OUT/loader_val.json"
step loader_train $PY benchmarks/loader_bench.py --root "$DATA" --split train --json "$OUT/loader_train.json"
step train $PY runners/train.py data.root="$DATA" trainer.max_epochs=3 trainer.enable_progress_bar=false \
  logger.wandb.enabled=false seed=42 hydra.run.dir="$OUT/train"
if [ "$MODE" = full ]; then
  step matrix $PY benchmarks/run_matrix.py --out "$OUT/matrix" data.root="$DATA"
else
  step matrix $PY benchmarks/run_matrix.py --quick --out "$OUT/matrix" data.root="$DATA"
fi
echo "gpu_check: $failed step(s) failed; results in $OUT"
exit "$failed"
