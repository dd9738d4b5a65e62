#!/usr/bin/env bash
# Every GPU check in one call on a lent GPU machine (see ../shared/device/README.md), under a
# hard total time budget:
#
#   export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh [--budget 360]
#   uv run bash benchmarks/gpu_check.sh --dry-run --budget 240    # the same mechanism on the CPU
#
# Options:
#   --budget S     total seconds, packing included (default 360). Each step is cut at
#                  min(its cap, what is left of the budget - a reserve for packing); a cut step
#                  is reported as "cut" and the next one still runs; a step that no longer fits
#                  is "skipped".
#   --dry-run      CPU substitutes of every step, to prove steps, budgets and packing without a
#                  GPU: pytest -m gpu (everything skips), host_overhead.py --quick --device cpu --repeats 1,
#                  loader_bench.py with DALI on the CPU, matrix cells cpu vs dali-cpu, tiny sizes.
#   --steps a,b    only these steps, in this order (default: stack,data,tests,host_overhead,loader,
#                  step_ratio,matrix; also selftest_slow and selftest_ok, which exercise the cut-off
#                  without real work)
#   --cap NAME=S   one step's cut-off in seconds (repeatable)
#   --out DIR      results folder (default: $OUT, else benchmarks/results/gpu_check)
# Environment: PYTHON (default python3: on the lent machine its own torch build with the staged
# DALI), WORK (scratch for everything that must not come back: data products, checkpoints,
# Hydra run folders; default a fresh mktemp folder), DATA (dataset root, kept between calls).
#
# Steps, in order of value (cap: the most seconds a step gets, GPU mode / --dry-run):
#   stack          60/30  python, torch (+ its CUDA build, cuDNN), DALI (+ its CUDA), driver, GPU and
#                         library versions: the lent machine runs its own torch build with the staged
#                         DALI, not our lock file's
#   data           60/30  the synthetic receipts (scripts/make_synthetic_data.py), kept in $DATA
#   tests         150/60  pytest -m gpu tests (junit XML packed); on the CPU they all skip
#   host_overhead 100/60  benchmarks/host_overhead.py --device cuda --skip steps: the training
#                         thread's host work per batch on every GPU path, validation scoring
#   loader         90/45  benchmarks/loader_bench.py: DALI on the GPU vs the CPU backend with worker
#                         processes, train and eval loaders, one round, a few batches (dry run: DALI
#                         on the CPU)
#   step_ratio     60/45  benchmarks/host_overhead.py --skip train,scoring: training step with the real
#                         loader vs a resident batch (step_with_real_loader_vs_resident); when
#                         host_overhead.py cannot skip sections, the host_overhead step measures it
#   matrix        200/120 benchmarks/run_matrix.py: two cells, cpu vs dali-gpu, 16-mixed, validation
#                         cache on, 2 epochs, limit_train_batches=15, limit_val_batches=5, each cell cut
#                         at half the step's time (dry run: cpu vs dali-cpu, 32-true, 1 epoch, tiny sizes)
#
# Results under $OUT, at most 3 files, packed after every step (a call killed at its limit still
# returns what was done): gpu_check.log (all output, written as it happens), results.json (stack,
# each step's status / exit / seconds / cut-off / log tail, the parsed JSON of each benchmark and a
# summary), results.tar.gz (benchmark JSON, pytest junit XML, the matrix report and each cell's run
# summary, per-step logs). Exit status: the number of steps that did not end "ok".
set -u

usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

BUDGET=360
DRY=0
STEPS=""
OUT_DIR=${OUT:-$REPO/benchmarks/results/gpu_check}
declare -A CAP_SET=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --steps) STEPS=${2:?--steps needs a list}; shift 2 ;;
    --steps=*) STEPS=${1#*=}; shift ;;
    --cap) CAP_SET[${2%%=*}]=${2#*=}; shift 2 ;;
    --cap=*) v=${1#*=}; CAP_SET[${v%%=*}]=${v#*=}; shift ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget must be whole seconds" >&2; exit 2 ;; esac
for k in "${!CAP_SET[@]}"; do
  case "${CAP_SET[$k]}" in ''|*[!0-9]*) echo "gpu_check: --cap $k=${CAP_SET[$k]}: whole seconds" >&2; exit 2 ;; esac
done

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
MODE=gpu; [ "$DRY" = 1 ] && MODE=dry-run
if [ "$DRY" = 1 ]; then DATA=${DATA:-/tmp/gpu_check_data_dry}; else DATA=${DATA:-/tmp/gpu_check_data}; fi
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
RESERVE=15   # seconds of the budget kept for the last packing
KILL_GRACE=5 # SIGTERM, then SIGKILL this much later (timeout -k)
MIN_STEP=5   # a step that would get less than this is skipped
T0=$(date +%s)

mkdir -p "$OUT_DIR" "$WORK/results" "$WORK/logs" "$WORK/cmd" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
rm -f "$LOG" "$OUT_DIR/results.json" "$OUT_DIR/results.tar.gz" "$WORK/steps.tsv"
touch "$WORK/steps.tsv"

# ----------------------------------------------------------------------------- steps
declare -A CAP
if [ "$DRY" = 1 ]; then
  CAP=([stack]=30 [data]=30 [tests]=60 [host_overhead]=60 [loader]=45 [step_ratio]=45 [matrix]=120)
else
  CAP=([stack]=60 [data]=60 [tests]=150 [host_overhead]=100 [loader]=90 [step_ratio]=60 [matrix]=200)
fi
CAP[selftest_slow]=3
CAP[selftest_ok]=30
for k in "${!CAP_SET[@]}"; do CAP[$k]=${CAP_SET[$k]}; done
DEFAULT_STEPS=stack,data,tests,host_overhead,loader,step_ratio,matrix
IFS=, read -r -a STEP_LIST <<< "${STEPS:-$DEFAULT_STEPS}"
# Each cmd_NAME TIMEOUT sets CMD (the command) or MISSING (why it cannot run).
cmd_stack() { CMD=("$PY" "$WORK/stack.py" "$WORK/results/stack.json"); }

cmd_data() {
  if [ "$DRY" = 1 ]; then
    CMD=("$PY" scripts/make_synthetic_data.py --root "$DATA" --num-train 8 --num-val 4 --num-test 1 --no-progress)
  else
    CMD=("$PY" scripts/make_synthetic_data.py --root "$DATA" --no-progress)
  fi
}

cmd_tests() {
  CMD=("$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs --durations=10
       --junitxml "$WORK/results/pytest_gpu.xml")
}

# host_overhead.py in two calls when it can skip sections (--skip): the host paths first, the
# step-with-real-loader ratio after the loader benchmark, each with its own cut-off.
ho_has() { grep -q -- "\"$1\"" benchmarks/host_overhead.py 2>/dev/null; }
ho_cmd() {  # ho_cmd JSON_NAME [ARGS...]
  local json=$1; shift
  if [ ! -f benchmarks/host_overhead.py ]; then MISSING="benchmarks/host_overhead.py does not exist"; return; fi
  CMD=("$PY" benchmarks/host_overhead.py)
  if [ "$DRY" = 1 ]; then
    CMD+=(--quick --device cpu); ho_has --repeats && CMD+=(--repeats 1)
  else
    CMD+=(--device cuda)
  fi
  ho_has --data && CMD+=(--data "$WORK/host_overhead_data")
  CMD+=("$@" --json "$WORK/results/$json.json")
}
cmd_host_overhead() {
  if ho_has --skip; then ho_cmd host_overhead --skip steps; else ho_cmd host_overhead; fi
}
cmd_step_ratio() {
  if ! ho_has --skip; then
    MISSING="host_overhead.py has no --skip: the host_overhead step measured the ratio"; return
  fi
  ho_cmd step_ratio --skip train,scoring
}

cmd_loader() {
  if [ "$DRY" = 1 ]; then
    CMD=("$PY" benchmarks/loader_bench.py --root "$DATA" --split train --only dali/cpu/helper,cpu/cpu/processes
         --loaders train --rounds 1 --batches 2 --warmup 1 --batch-size 2 --image-size 256
         --json "$WORK/results/loader.json")
  else
    CMD=("$PY" benchmarks/loader_bench.py --root "$DATA" --split train --only dali/gpu,cpu/cpu/processes
         --loaders train,eval --rounds 1 --batches 12 --warmup 3 --json "$WORK/results/loader.json")
  fi
}

cmd_matrix() {
  local t=$1 cell
  cell=$(( (t - 10) / 2 )); [ "$cell" -lt 10 ] && cell=10   # two cells share the step's time
  local common=(--caches on --force --repeats 1 --timeout "$cell" --out "$WORK/results/matrix"
                --cells-dir "$WORK/matrix_cells" "data.root=$DATA")
  if [ "$DRY" = 1 ]; then
    CMD=("$PY" benchmarks/run_matrix.py --loaders cpu,dali-cpu --precisions 32-true --epochs 2 --limit-train-batches 2
         --limit-val-batches 1 "${common[@]}" data.image_size=128 model.inner_channels=32 loader.batch_size=2
         loader.eval_batch_size=2)
  else
    CMD=("$PY" benchmarks/run_matrix.py --loaders cpu,dali-gpu --precisions 16-mixed --epochs 2 --limit-train-batches 15
         --limit-val-batches 5 "${common[@]}")
  fi
}

# Exercise the mechanism without real work (tests/benchmarks/test_gpu_check.py).
cmd_selftest_slow() { CMD=("$PY" -c "import time; print('selftest_slow: sleeping past the cut-off'); time.sleep(3600)"); }
cmd_selftest_ok() { CMD=("$PY" -c "print('selftest_ok: ran')"); }

for s in "${STEP_LIST[@]}"; do
  if ! declare -F "cmd_$s" >/dev/null; then
    echo "gpu_check: unknown step $s (steps: $DEFAULT_STEPS, selftest_slow, selftest_ok)" >&2; exit 2
  fi
  [ -n "${CAP[$s]:-}" ] || CAP[$s]=60
done

# ----------------------------------------------------------------------------- helpers (Python)
cat > "$WORK/stack.py" <<'PYEOF'
"""The machine's stack as JSON (argv[1]); one summary line on stdout."""
import importlib, json, os, platform, shutil, subprocess, sys, time

info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
        "executable": sys.executable, "platform": platform.platform(),
        "pythonpath": os.environ.get("PYTHONPATH"), "cpus": os.cpu_count()}
try:
    info["usable_cpus"] = len(os.sched_getaffinity(0))
except AttributeError:
    pass
try:
    with open("/proc/meminfo") as f:
        info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
except OSError:
    pass
# versions from the installed distributions (importing lightning or cleval takes ~15 s on a busy
# machine); where each module would load from, without importing it
DISTS = {"torch": ["torch"], "torchvision": ["torchvision"], "lightning": ["lightning"], "nvidia.dali": [],
         "hydra": ["hydra-core"], "omegaconf": ["omegaconf"], "numpy": ["numpy"],
         "cv2": ["opencv-python-headless", "opencv-python"], "pyclipper": ["pyclipper"], "shapely": ["shapely"],
         "cleval": ["cleval"], "pynvml": ["nvidia-ml-py", "pynvml"], "psutil": ["psutil"], "pytest": ["pytest"],
         "matplotlib": ["matplotlib"]}
from importlib import metadata, util
all_dists = {}
for d in metadata.distributions():
    try:
        all_dists.setdefault((d.metadata["Name"] or "").lower(), d.version)
    except Exception:  # noqa: BLE001 - a broken dist-info
        pass
info["dali_distributions"] = sorted(f"{n}=={v}" for n, v in all_dists.items() if n.startswith("nvidia-dali"))
versions = {}
for name, dists in DISTS.items():
    try:
        spec = util.find_spec(name)
    except Exception:  # noqa: BLE001
        spec = None
    names = dists or [n for n in all_dists if n.startswith("nvidia-dali")]
    version = next((all_dists[n] for n in names if n in all_dists), None)
    versions[name] = {"version": version, "path": os.path.dirname(spec.origin) if spec and spec.origin else None}
info["versions"] = versions
try:
    import nvidia.dali as dali
    versions["nvidia.dali"]["version"] = dali.__version__
    info["dali_cuda"] = getattr(dali, "__cuda_version__", None)
except Exception as exc:  # noqa: BLE001
    info["dali_cuda"] = None
    info["dali_error"] = f"{type(exc).__name__}: {exc}"[:300]
cuda = {"available": False}
try:
    import torch
    versions["torch"]["version"] = torch.__version__
    cuda["torch_cuda_build"] = torch.version.cuda
    cuda["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cuda["available"] = torch.cuda.is_available()
    if cuda["available"]:
        cuda["device_count"] = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        cuda.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
except Exception as exc:  # noqa: BLE001
    cuda["error"] = f"{type(exc).__name__}: {exc}"[:300]
try:
    import pynvml
    pynvml.nvmlInit()
    drv = pynvml.nvmlSystemGetDriverVersion()
    cuda["driver"] = drv.decode() if isinstance(drv, bytes) else drv
    v = pynvml.nvmlSystemGetCudaDriverVersion()
    cuda["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
    pynvml.nvmlShutdown()
except Exception as exc:  # noqa: BLE001
    cuda["nvml"] = f"{type(exc).__name__}: {exc}"[:200]
if shutil.which("nvidia-smi"):
    try:
        cuda["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,mig.mode.current", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        cuda["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
info["cuda"] = cuda
info["cuda_available"] = bool(cuda.get("available"))
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
v = lambda n: versions.get(n, {}).get("version")  # noqa: E731
print(f"stack: python {info['python']}, torch {v('torch')} (CUDA build {cuda.get('torch_cuda_build')}, cuDNN "
      f"{cuda.get('cudnn')}), DALI {v('nvidia.dali')} (CUDA {info['dali_cuda']}), lightning {v('lightning')}, "
      f"hydra {v('hydra')}; GPU {cuda.get('name', 'none')} ({cuda.get('memory_gb')} GB), driver "
      f"{cuda.get('driver')} (CUDA {cuda.get('driver_cuda')}); {info['cpus']} CPUs, {info.get('ram_gb')} GB RAM")
PYEOF

cat > "$WORK/pack.py" <<'PYEOF'
"""$OUT/results.json from the step table, the stack and the benchmarks' JSON (argv: work out mode
budget t0 finished)."""
import glob, json, os, sys, time

work, out, mode, budget, t0, finished = sys.argv[1:7]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"[:300]} if os.path.exists(path) else None


def tail(path, lines=12):
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n")[-300:] for line in f.readlines()[-lines:]]
    except OSError:
        return []


def find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        items = obj.values()
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    for item in items:
        found = find(item, key)
        if found is not None:
            return found
    return None


steps = []
with open(os.path.join(work, "steps.tsv")) as f:
    for line in f:
        name, status, code, seconds, timeout, cap, note = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
        cmd_path = os.path.join(work, "cmd", name + ".txt")
        steps.append({"name": name, "status": status, "exit": None if code == "" else int(code),
                      "seconds": float(seconds or 0), "timeout_s": int(timeout or 0), "cap_s": int(cap or 0),
                      "note": note or None, "command": open(cmd_path).read().strip() if os.path.exists(cmd_path) else None,
                      "log_tail": tail(os.path.join(work, "logs", name + ".log"))})
results = {}
for path in sorted(glob.glob(os.path.join(work, "results", "*.json"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name != "stack":
        results[name] = load(path)
matrix = load(os.path.join(work, "results", "matrix", "results.json"))
cells = {}
for path in sorted(glob.glob(os.path.join(work, "matrix_cells", "*", "run_summary.json"))):
    summary = load(path) or {}
    cells[os.path.basename(os.path.dirname(path))] = {
        k: summary.get(k) for k in ("status", "error", "wall_seconds", "precision", "backend", "epochs", "memory")}
if matrix is not None:
    results["matrix"] = matrix
elif cells:
    results["matrix_cells"] = cells  # the matrix was cut before its report: what its cells wrote

summary = {"steps": {s["name"]: s["status"] for s in steps}}
ratio = find(results.get("step_ratio"), "step_with_real_loader_vs_resident")
if ratio is None:
    ratio = find(results.get("host_overhead"), "step_with_real_loader_vs_resident")
for key in ("train_thread_ms_per_batch", "render_ms_per_batch", "val_scoring"):
    value = find(results.get("host_overhead"), key)
    if value is not None:
        summary[f"host_overhead_{key}"] = value
if ratio is not None:
    summary["step_with_real_loader_vs_resident"] = ratio
loader = results.get("loader") or {}
if isinstance(loader.get("results"), list):
    summary["loader_img_s"] = [
        {k: r.get(k) for k in ("name", "backend", "device", "cpu_loader", "num_workers", "dali_threads", "split", "img_s",
                               "reference", "reference_img_s", "ratio")} for r in loader["results"]]
    summary["loader_references_img_s"] = {k: v.get("img_s") for k, v in (loader.get("references") or {}).items()}
if matrix is not None:
    rows = [r for r in matrix.get("rows", []) if isinstance(r, dict)]
    keys = ("cell", "status", "reason", "train_s_later", "img_s_later", "epoch_s_first", "epoch_s_later", "val_s_first",
            "val_s_later", "cache_hit_rate", "peak_gpu_gb")
    summary["matrix"] = [{k: r.get(k) for k in keys if r.get(k) is not None} for r in rows]
    ok = {r.get("loader"): r for r in rows if r.get("status") == "ok"}
    base = ok.get("cpu")
    for r in ok.values():
        if base is None or r is base:
            continue
        for key in ("train_s_later", "epoch_s_first", "epoch_s_later"):
            if base.get(key) and r.get(key):
                summary.setdefault("matrix_speedup_vs_cpu", {}).setdefault(r.get("loader"), {})[key] = round(
                    base[key] / r[key], 2)
stack = load(os.path.join(work, "results", "stack.json"))
doc = {"kind": "gpu_check", "mode": mode, "budget_s": int(budget), "elapsed_s": int(time.time()) - int(t0),
       "finished": finished == "1", "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "stack": stack,
       "steps": steps, "summary": summary, "results": results,
       "packed": ["gpu_check.log", "results.json", "results.tar.gz"]}
tmp = os.path.join(out, "results.json.tmp")
with open(tmp, "w") as f:
    json.dump(doc, f, indent=1, default=str)
os.replace(tmp, os.path.join(out, "results.json"))
PYEOF

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

pack() {  # pack FINISHED: results.json and results.tar.gz into $OUT (a few hundred ms)
  local finished=$1 p="$WORK/pack"
  "$PY" "$WORK/pack.py" "$WORK" "$OUT_DIR" "$MODE" "$BUDGET" "$T0" "$finished" 2>>"$LOG" \
    || echo "gpu_check: writing results.json failed" | tee -a "$LOG"
  rm -rf "$p"; mkdir -p "$p/logs" "$p/cells"
  cp -r "$WORK/results" "$p/" 2>/dev/null
  local f d
  for f in "$WORK"/logs/*.log; do [ -f "$f" ] && tail -c 2000000 "$f" > "$p/logs/$(basename "$f")"; done
  for d in "$WORK"/matrix_cells/*/; do
    [ -d "$d" ] || continue
    mkdir -p "$p/cells/$(basename "$d")"
    for f in run_summary.json command.txt; do [ -f "$d$f" ] && cp "$d$f" "$p/cells/$(basename "$d")/"; done
    [ -f "${d}train.log" ] && tail -c 300000 "${d}train.log" > "$p/cells/$(basename "$d")/train.log"
  done
  # nothing big from the benchmarks' folders (checkpoints live in the cells, not in results/)
  find "$p" -type f -size +4M -delete
  if tar -czf "$WORK/results.tar.gz.tmp" -C "$p" . 2>>"$LOG"; then
    mv -f "$WORK/results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
  fi
}

record() {  # record NAME STATUS EXIT SECONDS TIMEOUT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${CAP[$1]}" "${6:-}" >> "$WORK/steps.tsv"
}

FAILED=0
run_step() {  # run_step NAME: cut at min(cap, budget left - reserve); status ok|failed|cut|skipped|missing
  local name=$1 cap=${CAP[$1]} left t start rc secs status note=""
  left=$(( BUDGET - $(elapsed) - RESERVE - KILL_GRACE ))
  t=$cap; [ "$left" -lt "$t" ] && t=$left
  if [ "$left" -lt "$MIN_STEP" ]; then
    log "=== $name: skipped (budget: ${left}s left of ${BUDGET}s after the reserve)"
    record "$name" skipped "" 0 0 "budget: ${left}s left"
    FAILED=$((FAILED + 1)); return
  fi
  CMD=(); MISSING=""
  "cmd_$name" "$t"
  if [ -n "$MISSING" ]; then
    log "=== $name: missing ($MISSING)"
    record "$name" missing "" 0 "$t" "$MISSING"
    FAILED=$((FAILED + 1)); return
  fi
  printf '%q ' "${CMD[@]}" > "$WORK/cmd/$name.txt"
  log "=== $name (cut-off ${t}s of cap ${cap}s, $(elapsed)s/${BUDGET}s used): $(cat "$WORK/cmd/$name.txt")"
  start=$(date +%s.%N)
  timeout -k "$KILL_GRACE" "$t" "${CMD[@]}" < /dev/null 2>&1 | tee -a "$LOG" "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    status=ok
  elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && awk -v s="$secs" -v t="$t" 'BEGIN { exit !(s >= t - 1) }'; then
    status=cut; note="over its ${t}s cut-off"
  else
    status=failed
  fi
  [ "$status" = ok ] || FAILED=$((FAILED + 1))
  log "=== $name: $status (exit $rc) in ${secs}s${note:+, $note}"
  record "$name" "$status" "$rc" "$secs" "$t" "$note"
}

on_signal() {
  log "gpu_check: interrupted after $(elapsed)s; packing what was done"
  pack 0
  exit 130
}
trap on_signal INT TERM

# ----------------------------------------------------------------------------- run
log "gpu_check ($MODE): budget ${BUDGET}s, steps ${STEP_LIST[*]}; python $PY; results -> $OUT_DIR; scratch $WORK; data $DATA"
pack 0
for name in "${STEP_LIST[@]}"; do
  if [ "$DRY" = 0 ] && [ "$name" != stack ] && [ -f "$WORK/results/stack.json" ] \
     && ! "$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("cuda_available") else 1)' \
          "$WORK/results/stack.json" 2>/dev/null; then
    log "=== $name: skipped (no usable CUDA device; --dry-run runs the CPU substitutes)"
    record "$name" skipped "" 0 0 "no usable CUDA device"
    FAILED=$((FAILED + 1)); continue
  fi
  run_step "$name"
  pack 0
done
log "gpu_check ($MODE): $FAILED of ${#STEP_LIST[@]} step(s) not ok, $(elapsed)s of ${BUDGET}s"
pack 1
"$PY" - "$OUT_DIR/results.json" <<'PYEOF' | tee -a "$LOG"
import json, sys
doc = json.load(open(sys.argv[1]))
for s in doc["steps"]:
    print(f"  {s['name']:<14} {s['status']:<8} exit {s['exit']!s:<5} {s['seconds']:7.1f}s / {s['timeout_s']}s"
          + (f"  ({s['note']})" if s.get("note") else ""))
for key, value in doc["summary"].items():
    if key != "steps":
        print(f"  {key}: {json.dumps(value, default=str)[:600]}")
PYEOF
log "packed: $(cd "$OUT_DIR" && ls -1 gpu_check.log results.json results.tar.gz 2>/dev/null | tr '\n' ' ')($(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR)"
exit "$FAILED"
