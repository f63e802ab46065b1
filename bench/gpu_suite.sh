#!/usr/bin/env bash
# Everything one GPU visit runs, in about 9 minutes on an H200, from the repository root:
#   bash bench/gpu_suite.sh
# 1. the Triton kernel tests                       (<= 120 s)
# 2. a correctness sweep at real sizes: bf16 kernels vs a float32 PyTorch reference,
#    N = 8192..32768, d = 4096, V = 151936          (<= 120 s)
# 3. the full benchmark table (bf16): the triton target (N=16384, d=4096, V=151936, log-prob +
#    entropy fwd+bwd vs the three bare matmuls, plain PyTorch, Liger GRPO; memory; N up to 131072),
#    the peers' own shapes (Liger GRPO: T=1024 d=4096 V=128256; CCE: N=8192 d=2304 V=256000)
#    (<= 300 s: no group starts after 250 s; those not reached are listed as skipped)
# Results: bench/results/<date>_<gpu>_{correctness,gpu}.{json,md} + _time.png/_memory.png, the test
# log and this script's log; the same files are copied to $OUT when it is set (at most 8 files).
# Peers that are not installed are reported as skipped; wheels found in $BENCH_WHEELS (default
# .whl/) are installed first with --no-deps, so the GPU image's torch is never replaced.
set -u
cd "$(dirname "$0")/.."
# The GPU machine has no network: import the package from the checkout instead of pip-installing it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP="$(date -u +%Y-%m-%d)"
GPU="$(python -c 'import torch; print(torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-"))' 2>/dev/null || echo nogpu)"
LOG="$RESULTS/${STAMP}_${GPU}_gpu_suite.log"
TESTLOG="$RESULTS/${STAMP}_${GPU}_triton_tests.log"
t0=$(date +%s)
exec > >(tee "$LOG") 2>&1

echo "== gro_kernels GPU suite $(date -u +%FT%TZ) on $GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("triton", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "installed"))
    except Exception as e:
        print(m, "not available:", type(e).__name__, e)
EOF

WHEELS="${BENCH_WHEELS:-.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  for pkg in liger_kernel cut_cross_entropy; do
    if ! python -c "import $pkg" 2>/dev/null; then
      whl=$(ls "$WHEELS"/${pkg}-*.whl 2>/dev/null | head -n1)
      [ -n "$whl" ] && timeout 60 python -m pip install --no-deps --no-index -q "$whl" && echo "installed $whl"
    fi
  done
fi

echo "== 0. compile check: every kernel variant for this GPU (registers, spills, shared memory)"
timeout 120 python -m gro_kernels.kernels.compile_check 2>&1 | tail -n 40

echo "== 1. kernel tests"
timeout 120 python -m pytest tests/test_triton_backend.py -q 2>&1 | tee "$TESTLOG" | tail -n 25
echo "kernel tests exit status: ${PIPESTATUS[0]}"

echo "== 2. correctness sweep (bf16 vs float32 reference)"
timeout 120 python bench/run.py --correctness --no-plots
echo "correctness exit status: $?"

echo "== 3. benchmark table"
timeout 300 python bench/run.py --gpu --budget 250
echo "benchmark exit status: $?"

echo "== done in $(( $(date +%s) - t0 )) s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  # run.py already wrote its json/md/png files to $OUT; add the logs
  cp "$TESTLOG" "$OUT"/ 2>/dev/null || true
  sleep 1
  cp "$LOG" "$OUT"/ 2>/dev/null || true
fi
