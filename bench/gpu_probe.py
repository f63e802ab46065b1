#!/usr/bin/env python
"""What a GPU visit measures besides the benchmark table (`bench/gpu_suite.sh` runs each part):

    python bench/gpu_probe.py probe        # the fp32-output 16-bit GEMM overloads of this torch: dW-in-GEMM's answer
    python bench/gpu_probe.py race         # every autotune config of both kernels, 30 repeats, bf16 and fp16,
                                           # dz against an fp32 reference and against its own first repeat
    python bench/gpu_probe.py components   # gro_loss's parts timed at N=8192, d=4096, V=151936 bf16
    python bench/gpu_probe.py all --dry-run --out /tmp/x   # the same code at tiny sizes on the CPU

Each part writes `<part>.json` into --out (default bench/results) and prints what it found. A part
stops starting new work after --budget seconds and records what it did not reach. `--dry-run`
runs on the CPU (Triton's interpreter, tiny shapes): a check of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

QWEN = dict(n=8192, d=4096, v=151936)       # the one-pass target's shape
TINY = dict(n=16, d=16, v=1200)             # --dry-run: three vocabulary splits under the interpreter


def _env(dry: bool) -> dict:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(), "dry_run": dry}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


class Timer:
    """Median milliseconds of fn() over a few repeats: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device, repeat):
        self.device, self.repeat = device, repeat

    def __call__(self, fn) -> float:
        import torch

        fn()  # warm-up (autotuning, first launches)
        times = []
        for _ in range(self.repeat):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# probe: does this torch's addmm(out_dtype=float32, out=) accumulate into an fp32 sum?


def probe(device, dry, budget):
    import torch

    from gro_kernels.logprobs import engine

    res = {"mm_fp32_out_supported": {}, "addmm_accumulates_in_gemm": {}, "dh_rel_error": {}}
    dev = torch.device(device)
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).split(".")[1]
        res["mm_fp32_out_supported"][name] = engine._mm_fp32_out_supported(dev, dt)
        res["addmm_accumulates_in_gemm"][name] = engine._gemm_accumulates_fp32(dev, dt)
        if res["mm_fp32_out_supported"][name]:
            # dh's shape (M = a few rows, K = V): fp32 out vs 16-bit out, each against float64.
            g = torch.Generator(device=dev).manual_seed(0)
            k = 1024 if dry else 151936
            a = (torch.randn(64, k, generator=g, device=dev) * 1e-3).to(dt)
            b = torch.randn(k, 256, generator=g, device=dev).to(dt)
            ref = a.double() @ b.double()
            scale = ref.abs().max()
            res["dh_rel_error"][name] = {
                "out_dtype_float32": float(((torch.mm(a, b, out_dtype=torch.float32).double() - ref).abs().max()) / scale),
                "16-bit output": float(((a @ b).double() - ref).abs().max() / scale)}
    print("probe:", json.dumps(res))
    return res


def _name(cfg) -> str:
    return f"BLOCK_V={cfg.kwargs['BLOCK_V']} warps={cfg.num_warps}"


# ----------------------------------------------------------------------------------------------
# race: each autotune config, 30 repeats, dz vs an fp32 reference and vs its own first repeat


def race(device, dry, budget):
    import torch
    import triton

    from gro_kernels.kernels import launch, logits_grad, row_stats

    t0 = time.perf_counter()
    shape = TINY if dry else QWEN
    n, vocab = (4, shape["v"]) if dry else (768, shape["v"])
    repeats = 2 if dry else 30
    fast = device == "cuda"
    sv = launch.split_v()
    n_splits = triton.cdiv(vocab, sv)
    g = torch.Generator(device="cpu").manual_seed(0)
    z = (3 * torch.randn(n, vocab, generator=g)).to(device)
    zr = (z.cpu() + torch.randn(n, vocab, generator=g)).to(device)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    inv_t = 1 / 0.9
    u, ur = z.double() * inv_t, zr.double() * inv_t
    lse = u.logsumexp(1)
    gl, alpha, beta, gamma = (torch.randn(4, n, generator=g) * 1e-3).to(device)
    ref = torch.exp(u - lse[:, None]) * (alpha.double()[:, None] + beta.double()[:, None] * u
                                         + gamma.double()[:, None] * ur)
    ref[torch.arange(n), y] += gl.double()
    out, results = [], {"shape": [n, vocab], "repeats": repeats, "configs": []}
    for cfg in launch.CONFIGS:
        for dt in (torch.bfloat16, torch.float16):
            if time.perf_counter() - t0 > budget:
                results["configs"].append({"config": _name(cfg), "dtype": str(dt), "status": "not reached (budget)"})
                continue
            want = ref.to(dt)
            first, worst, differ = None, 0.0, 0
            for _ in range(repeats):
                dz = torch.empty(n, vocab, dtype=dt, device=device)
                inv = torch.full((n,), inv_t, device=device)
                logits_grad._logits_grad_kernel[(n * n_splits,)](
                    z, zr, dz, y, inv, inv, inv, lse.float(), gl, alpha, beta, gamma, gl, gl, gl, vocab, n_splits,
                    z.stride(0), zr.stride(0), dz.stride(0), 1.0, 0.0, 0.0, HAS_BETA=True, HAS_REF=True, HAS_CAP=False,
                    HAS_TAU=False, HAS_ETA=False, HAS_CW=False, DIV=0, SPLIT_V=sv, FAST=fast,
                    BLOCK_V=cfg.kwargs["BLOCK_V"] if not dry else launch.INTERPRETER_BLOCK_V, num_warps=cfg.num_warps)
                if first is None:
                    first = dz.clone()
                differ += int(not torch.equal(dz, first))
                # errors in units of the 16-bit spacing near each reference value (|ref| eps, 0.5-1 ulp)
                spacing = want.float().abs().clamp_min(torch.finfo(dt).tiny) * torch.finfo(dt).eps
                err = ((dz.float() - want.float()).abs() / spacing).max()
                worst = max(worst, float(err))
            results["configs"].append({"config": _name(cfg), "dtype": str(dt).split(".")[1], "max_error_ulp": worst,
                                       "repeats_differing_from_first": differ,
                                       "ok": worst <= 2 and differ == 0})
            out.append(f"{_name(cfg)} {dt}: max error {worst:.2f} ulp, {differ} repeats differ")
    # the statistics kernel per config: lse against float64
    results["row_partials"] = []
    for cfg in launch.CONFIGS:
        if time.perf_counter() - t0 > budget:
            break
        part = torch.empty(n, n_splits, row_stats.NF, device=device)
        inv = torch.full((n,), inv_t, device=device)
        row_stats._row_partials_kernel[(n * n_splits,)](
            z, zr, y, inv, inv, inv, part, vocab, n_splits, z.stride(0), zr.stride(0), 1.0, WANT_REL=True,
            HAS_REF=True, WANT_P2=True, HAS_CAP=False, HAS_TAU=False, WANT_MEAN=False, HAS_CW=False, DIV=0, SPLIT_V=sv,
            FAST=fast, BLOCK_V=cfg.kwargs["BLOCK_V"] if not dry else launch.INTERPRETER_BLOCK_V,
            num_warps=cfg.num_warps)
        outs = {k: torch.empty(n, device=device) for k in ("lse", "logp", "top1", "ent", "kl", "ekl", "sum_p2")}
        row_stats.finish_row_stats(part, z, y, inv_t, **outs)
        err = float((outs["lse"].double() - lse).abs().max())
        results["row_partials"].append({"config": _name(cfg), "lse_max_abs_error": err, "ok": err < 1e-4})
    results["ok"] = all(c.get("ok", True) for c in results["configs"] + results["row_partials"])
    print("race:\n  " + "\n  ".join(out) + f"\n  all ok: {results['ok']}")
    return results


# ----------------------------------------------------------------------------------------------
# components: gro_loss's parts at the one-pass target, each timed alone


def components(device, dry, budget):
    import torch

    from bench import cases, impls
    from gro_kernels.kernels import logits_grad, row_stats
    from gro_kernels.logprobs import engine

    t0 = time.perf_counter()
    s = TINY if dry else QWEN
    n, d, vocab = s["n"], s["d"], s["v"]
    dt = torch.bfloat16
    timer = Timer(device, 3 if dry else 10)
    shape = cases.Shape(n, d, vocab, n // 8, "bfloat16")
    inp = cases.make_inputs(cases.CASES["grpo_ent"], shape, device, seed=0)
    rows = impls.counted_rows(inp)
    h = inp["hidden"].detach().reshape(-1, d)[rows].contiguous()
    w = inp["weight"].detach()
    m = h.shape[0]
    lay = engine.layout(m, vocab, d, h.device, dt)
    ct = lay.chunk
    res = {"shape": {"rows": m, "of_tokens": n, "d": d, "V": vocab, "chunk": ct, "group": lay.group}, "ms": {}}
    ms = res["ms"]

    def timed(name, fn, times=1):
        if time.perf_counter() - t0 > budget:
            ms[name] = None
            return
        ms[name] = timer(fn) * times

    chunks = -(-m // ct)
    hc = h[:ct]
    fp32_out = device == "cuda"
    timed("z_gemm_fp32_out", lambda: torch.mm(hc, w.T, out_dtype=torch.float32) if fp32_out else hc.float() @ w.float().T,
          chunks)
    timed("z_gemm_bf16_out", lambda: hc @ w.T, chunks)
    z = (hc.float() @ w.float().T).contiguous()
    y = inp["targets"].reshape(-1)[rows][:ct].clamp_min(0)
    vec = {k: torch.empty(ct, device=device) for k in ("lse", "logp", "top1", "ent")}
    timed("row_stats_kernels", lambda: row_stats.row_stats(z, None, y, 1.0, **vec), chunks)
    coef = torch.randn(3, ct, device=device) * 1e-3
    dz_chunk = torch.empty(ct, vocab, dtype=dt, device=device)
    timed("logits_grad_kernel", lambda: logits_grad.logits_grad(z, None, y, 1.0, lse=vec["lse"], gl=coef[0],
                                                                   alpha=coef[1], beta=coef[2], out=dz_chunk), chunks)
    del z
    dz = (torch.randn(m, vocab, device=device) * 1e-4).to(dt)

    def mm32(a, b):
        return torch.mm(a, b, out_dtype=torch.float32) if fp32_out else a.float() @ b.float()

    timed("dh_gemm_fp32_out_and_cast", lambda: mm32(dz, w).to(dt))
    step = max(1, engine.DW_SLICE_ELEMENTS // d)

    def dw():
        out = torch.empty(vocab, d, dtype=dt, device=device)
        for a in range(0, vocab, step):
            out[a:a + step].copy_(mm32(dz[:, a:a + step].T, h))

    timed("dw_gemm_fp32_out_and_cast", dw)
    timed("three_bare_gemms_same_rows", lambda: (lambda g: (g @ w, g.T @ h))(h @ w.T))
    del dz
    case = cases.CASES["grpo_ent"]
    for impl in ("gro_loss_triton" if device == "cuda" else "gro_loss_torch",):
        step_fn = impls.build(impl, case, inp, device)

        def run():
            inp["hidden"].grad = inp["weight"].grad = None
            step_fn().backward()

        timed(impl, run)
    total = ms.get("gro_loss_triton") or ms.get("gro_loss_torch")
    parts = ("z_gemm_fp32_out", "row_stats_kernels", "logits_grad_kernel", "dh_gemm_fp32_out_and_cast",
             "dw_gemm_fp32_out_and_cast")
    if total and all(ms.get(p) for p in parts):
        ms["everything_else"] = total - sum(ms[p] for p in parts)
        if ms.get("three_bare_gemms_same_rows"):
            res["ratio_to_three_bare_gemms"] = total / ms["three_bare_gemms_same_rows"]
    print("components (ms):", json.dumps(res))
    return res


PARTS = {"probe": probe, "race": race, "components": components}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=sorted(PARTS) + ["all"])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds after which a part starts nothing new")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    status = 0
    for name in (sorted(PARTS) if args.part == "all" else [args.part]):
        t0 = time.perf_counter()
        try:
            res = PARTS[name](device, args.dry_run, args.budget)
        except Exception as e:  # noqa: BLE001 - record the failure, go on with the next part
            res, status = {"error": f"{type(e).__name__}: {e}"}, 1
            print(f"{name}: FAILED {res['error']}", file=sys.stderr)
        res.update(env=_env(args.dry_run), seconds=round(time.perf_counter() - t0, 1))
        if res.get("ok") is False:
            status = 1
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
