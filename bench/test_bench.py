"""pytest-benchmark view of the same cases and implementations as `bench/run.py`, at the smallest
`--quick` shape (CUDA: the same shape in bf16).

    pytest bench/ --benchmark-only                 # all cases x implementations
    pytest bench/ --benchmark-only -k dapo         # one case
    BENCH_COMPILE=1 pytest bench/ --benchmark-only # include torch.compile rows on CPU (~30 s each)

Each test times fwd+bwd (`benchmark.pedantic`, 1 warm-up round + 3 rounds), then checks the
loss and gradients against the float32 plain-PyTorch reference and stores the differences in
`extra_info`. A peer that cannot run here is skipped with its reason. `pytest tests/` never
collects this directory (pyproject's testpaths is `tests`).
"""
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from bench import impls  # noqa: E402
from bench.cases import CASE_IMPLS, CASES, Shape, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = Shape(256, 256, 8192, 128, "float32" if DEVICE == "cpu" else "bfloat16")
COMPILED = {"torch_compile", "cce_compile"}
PARAMS = [(c, i) for c in CASES for i in CASE_IMPLS[c]]


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("case_name,impl", PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_bench(benchmark, references, case_name, impl):
    if DEVICE == "cpu" and impl in COMPILED and not os.environ.get("BENCH_COMPILE"):
        pytest.skip("torch.compile on CPU costs ~30 s per test; set BENCH_COMPILE=1 to include it")
    case = CASES[case_name]
    inp = make_inputs(case, SHAPE, DEVICE, seed=0)
    try:
        step = impls.build(impl, case, inp, DEVICE)
    except impls.Skip as e:
        pytest.skip(str(e))

    def run():
        inp["hidden"].grad = None
        inp["weight"].grad = None
        loss = step()
        if loss is not None:
            loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    try:
        run()  # first call: does this implementation run here at all?
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot run on {DEVICE}: {type(e).__name__}: {str(e)[:300]}")
    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({"case": case_name, "impl": impl, "shape": SHAPE.to_dict(), "note": step.note})
    if not step.comparable:
        return
    if case_name not in references:
        references[case_name] = impls.reference(case, inp)
    agree = impls.agreement(loss, inp, references[case_name])
    benchmark.extra_info.update(agree)
    tol = 1e-4 if SHAPE.dtype == "float32" else 3e-2
    assert agree["loss_abs_diff"] <= tol * max(1.0, abs(agree["ref_loss"])), agree
    assert agree["grad_hidden_rel_diff"] <= tol, agree
    assert agree["grad_weight_rel_diff"] <= tol, agree
