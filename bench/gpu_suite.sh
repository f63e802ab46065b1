#!/usr/bin/env bash
# Everything one GPU visit runs, in one command of at most 10 minutes, from the repository root:
#
#   bash bench/gpu_suite.sh                  # on the GPU machine (no network, no pip index)
#   bash bench/gpu_suite.sh --dry-run        # on a CPU: every step at tiny sizes (Triton's interpreter)
#   bash bench/gpu_suite.sh --only probe,race   # some steps only
#
# Steps, in this order, each under its own time limit and a global deadline (570 s):
#   env          versions, GPU                                                              10 s
#   wheels       install the Liger / CCE wheels carried in .whl/ (pip --no-deps --no-index)  60 s
#   probe        does addmm(out_dtype=float32, out=) accumulate here (dW in the GEMM)?      30 s
#   race         every autotune config of both kernels, 30 repeats, bf16 and fp16: dz vs an
#                fp32 reference and vs its first repeat                                     60 s
#   compile      compile_check of the installed Triton (first config of every variant, the
#                head options' included, one process per core)                              60 s
#   tests        the Triton kernel tests on CUDA (the head options' too)                    90 s
#   components   z GEMM (fp32 vs bf16 out), the two epilogue kernels, dh and dW GEMMs,
#                everything else, at N=8192 d=4096 V=151936 bf16                             60 s
#   correctness  bf16 kernels vs a float32 reference at real sizes                          60 s
#   benchmark    the table; its first group is the one-pass target: gro_loss (grouped, and
#                1280 / 2048 / 4096-token chunks) against the three bare GEMMs on the same
#                rows, time and peak memory, with Liger and CCE rows                       rest
# Logs and results go to $OUT (else bench/results/) as each step runs: <date>_<gpu>_<step>.log,
# the probe's probe.json / race.json / components.json, compile_check.json, run.py's json / md /
# png. A step that fails or times out is logged and the suite goes on; the exit status is 1 if any
# step failed.
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY="${1:-}" ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PY="${PYTHON:-python}" WHEELS="${WHEEL_DIR:-.whl}" DRY
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
STAMP="$(date -u +%Y-%m-%d)"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  GPU="dry-run-cpu"
else
  GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-"))' 2>/dev/null || echo nogpu)"
fi
PREFIX="$DEST/${STAMP}_${GPU}"
T0=$(date +%s)
DEADLINE=570
FAILED=""

wanted() {  # wanted STEP: whether --only (if given) names it
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

step() {  # step NAME LIMIT_S COMMAND...: time-boxed, logged to $DEST while it runs
  local name=$1 limit=$2 left rc
  shift 2
  wanted "$name" || return 0
  left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 10 ]; then
    echo "== $name skipped: the suite's deadline ($DEADLINE s) is reached" | tee "${PREFIX}_${name}.log"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $(( $(date +%s) - T0 )) s elapsed)"
  # a fresh bash with this file's step functions, so that `timeout` can run those too
  timeout --kill-after=5 "$limit" bash -c "$(declare -f install_wheels kernel_tests)"'; "$@"' _ "$@" \
    > "${PREFIX}_${name}.log" 2>&1
  rc=$?
  tail -n 25 "${PREFIX}_${name}.log"
  [ "$rc" = 124 ] && echo "$name: timed out after ${limit}s" | tee -a "${PREFIX}_${name}.log"
  echo "$name exit status: $rc"
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
}

env_report() {
  echo "gro_kernels GPU suite $(date -u +%FT%TZ) on $GPU (dry run: $DRY)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
  [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("triton", "pytest", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "installed"))
    except Exception as e:
        print(m, "not available:", type(e).__name__, e)
PY
}

install_wheels() {  # the peers' wheels, without their dependencies (the image's torch stays)
  local found=0 w
  export PIP_QUIET=0  # the log says what was (or would be) installed, whatever the caller's pip config
  for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || continue
    found=1
    if [ "$DRY" = 1 ]; then
      echo "would run: $PY -m pip install --no-deps --no-index $w"
      "$PY" -m pip install --dry-run --no-deps --no-index "$w" || return 1
    else
      "$PY" -m pip install --no-deps --no-index --no-warn-script-location "$w" || return 1
    fi
  done
  [ "$found" = 1 ] || echo "no wheels in $WHEELS/: the Liger and CCE rows will be skipped with the import error (carry them: pip download liger-kernel cut-cross-entropy --no-deps -d .whl)"
  return 0
}

kernel_tests() {
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed on this machine: kernel tests skipped"
    return 0
  fi
  if [ "$DRY" = 1 ]; then  # one case, to exercise the step
    "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py -k fp32_matches_textbook
  else
    "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_triton_head_options.py
  fi
}

if [ "$DRY" = 1 ]; then
  PROBE=("$PY" bench/gpu_probe.py --dry-run --out "$DEST")
  BENCH=("$PY" bench/run.py --case grpo_ent --tokens 256 --hidden 64 --vocab 2048 --device cpu --no-plots
         --impls "matmul3_rows,gro_loss_torch,gro_loss_torch_c64,gro_loss_torch_c128_g256,matmul3,plain"
         --name dry_run --out-dir "$DEST")
  CORRECT=("$PY" bench/run.py --case logprob_entropy --tokens 256 --hidden 64 --vocab 2048 --device cpu
           --impls gro_torch --name dry_run_correctness --no-plots --out-dir "$DEST")
else
  PROBE=("$PY" bench/gpu_probe.py --out "$DEST")
  # the tables go to bench/results (to commit) and, by run.py, to $OUT too
  BENCH=("$PY" bench/run.py --gpu --budget 150 --out-dir bench/results)
  CORRECT=("$PY" bench/run.py --correctness --no-plots --out-dir bench/results)
fi

wanted env && env_report 2>&1 | tee "${PREFIX}_env.log"
step wheels 60 install_wheels
step probe 30 "${PROBE[@]}" probe --budget 20
step race 60 "${PROBE[@]}" race --budget 45
step compile 60 env -u TRITON_INTERPRET "$PY" -m gro_kernels.kernels.compile_check --quick --jobs "$(nproc)" \
  --json "$DEST/compile_check.json"
step tests 90 kernel_tests
step components 60 "${PROBE[@]}" components --budget 45
step correctness 60 "${CORRECT[@]}"
step benchmark 200 "${BENCH[@]}"
echo "== done in $(( $(date +%s) - T0 )) s; results in $DEST${FAILED:+; failed:$FAILED}"
[ -z "$FAILED" ]
