#!/usr/bin/env bash
# Everything one GPU visit runs, inside one 10-minute command, from the repository root:
#   bash bench/gpu_suite.sh
# The GPU machine has no network and no pip index (its image: torch 2.11, Triton 3.6): nothing is
# installed; the package is imported from the checkout. Steps, each under its own time limit:
#   0. compile check: every epilogue kernel variant for this GPU (registers, spills, 128-bit loads)  <= 60 s
#   1. the Triton kernel tests (skipped, with the reason, when pytest is missing)                   <= 100 s
#   2. correctness sweep at real sizes: bf16 vs a float32 PyTorch reference, N = 8192..32768       <= 90 s
#   3. the benchmark table (bf16), the one-pass target first: GRPO + entropy at N=8192, d=4096,
#      V=151936 vs the three bare GEMMs; then the peers' shapes (no group starts after 230 s)      <= 280 s
# Each step's log goes to $OUT (when set; else bench/results/) as the step runs, so a run cut short
# still returns what it did; run.py writes its json/md/png there too.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-bench/results}"
mkdir -p "$DEST" bench/results
STAMP="$(date -u +%Y-%m-%d)"
GPU="$(python -c 'import torch; print(torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-"))' 2>/dev/null || echo nogpu)"
PREFIX="$DEST/${STAMP}_${GPU}"
t0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $DEST as it goes
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - t0 )) s elapsed)"
  timeout "$limit" "$@" > "${PREFIX}_${name}.log" 2>&1
  local rc=$?
  tail -n 30 "${PREFIX}_${name}.log"
  echo "$name exit status: $rc"
}

{
  echo "== gro_kernels GPU suite $(date -u +%FT%TZ) on $GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  python - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("triton", "pytest", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "installed"))
    except Exception as e:
        print(m, "not available:", type(e).__name__, e)
PY
} 2>&1 | tee "${PREFIX}_env.log"

step compile_check 60 env -u TRITON_INTERPRET python -m gro_kernels.kernels.compile_check
if python -c "import pytest" 2>/dev/null; then
  step kernel_tests 100 python -m pytest tests/test_triton_backend.py -q -p no:cacheprovider
else
  echo "== kernel_tests skipped: pytest is not installed on this machine" | tee "${PREFIX}_kernel_tests.log"
fi
step correctness 90 python bench/run.py --correctness --no-plots --out-dir bench/results
step benchmark 280 python bench/run.py --gpu --budget 230 --out-dir bench/results
echo "== done in $(( $(date +%s) - t0 )) s"
