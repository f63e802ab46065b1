"""What the head options cost: head_precision, soft cap, per-token temperature, truncation.

    python bench/head_options.py                       # CPU, N=1024 d=512 V=32768, a few minutes on 2 cores
    python bench/head_options.py --tokens 2048 --repeat 5 --out bench/results/<date>_cpu-2cores_head_options

Every row is one forward + backward (`loss.backward()`), timed side by side in one process: the rows
take turns in each repeat, and the median is reported, so that load from other processes hits them
alike. Two tables:

- precision: gro_loss(method="sft") on 16-bit inputs with head_precision "native" and "fp32" (and
  fp32 inputs, and the three bare fp32 GEMMs of the shape as the floor);
- head options: token_logprobs (log-prob + entropy, fwd + bwd, fp32) with none, a soft cap, a
  per-token temperature tensor, top_k, top_p, min_p, and all of them; `kept` is the mean size of the
  kept sets (the truncated rows' share of the vocabulary the sampler keeps).

Logits have std `--logit-std` (2.5: peaked, as bench/cases.py; the kept sets of top_p grow with it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gro_kernels import gro_loss, token_logprobs  # noqa: E402
from gro_kernels.logprobs import transform  # noqa: E402


def inputs(n, d, v, dtype, logit_std, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (logit_std / math.sqrt(d))
    y = torch.randint(0, v, (n,), generator=g)
    return h.to(dtype), w.to(dtype), y


def timed(fn, h, w):
    h.grad = w.grad = None
    t0 = time.perf_counter()
    loss = fn(h, w)
    if loss is not None:
        loss.backward()
    return (time.perf_counter() - t0) * 1e3


def side_by_side(rows, make, repeat, warmup):
    """{name: median ms} of each row's fwd+bwd, the rows interleaved in every repeat."""
    times = {name: [] for name in rows}
    leaves = {name: make(spec) for name, spec in rows.items()}
    for it in range(warmup + repeat):
        for name, (fn, _) in rows.items():
            h, w = leaves[name]
            ms = timed(fn, h, w)
            if it >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def bare_gemms(h, w):
    z = h @ w.T
    _ = z @ w
    _ = z.T @ h
    return None


def precision_table(args):
    n, d, v = args.tokens, args.hidden, args.vocab
    y = inputs(n, d, v, torch.float32, args.logit_std)[2][None]

    def sft(precision):
        return lambda h, w: gro_loss(h[None], w, y, method="sft", head_precision=precision, backend="torch").loss

    rows = {
        "fp32 inputs (native)": (sft("native"), torch.float32),
        "bf16 inputs, head_precision=native": (sft("native"), torch.bfloat16),
        "bf16 inputs, head_precision=fp32": (sft("fp32"), torch.bfloat16),
        "three bare fp32 GEMMs (floor)": (bare_gemms, torch.float32),
    }

    def make(spec):
        h, w, _ = inputs(n, d, v, spec[1], args.logit_std)
        return h.requires_grad_(), w.requires_grad_()

    return side_by_side(rows, make, args.repeat, args.warmup)


def options_table(args):
    n, d, v = args.tokens, args.hidden, args.vocab
    y = inputs(n, d, v, torch.float32, args.logit_std)[2]
    temp = 0.6 + torch.rand(n, generator=torch.Generator().manual_seed(1))
    configs = {
        "none": {},
        "softcap=30": dict(softcap=30.0),
        "temperature [N] tensor": dict(temperature=temp),
        "top_k=50": dict(top_k=50),
        "top_p=0.9": dict(top_p=0.9),
        "top_p=0.99": dict(top_p=0.99),
        "min_p=0.05": dict(min_p=0.05),
        "softcap + temperature + top_k=50 + top_p=0.9 + min_p=0.05": dict(softcap=30.0, temperature=temp, top_k=50,
                                                                         top_p=0.9, min_p=0.05),
    }

    def row(kw):
        def fn(h, w):
            st = token_logprobs(h, w, y, return_entropy=True, backend="torch", **kw)
            return -(st.logp.mean() + 0.01 * st.entropy.mean())
        return fn

    rows = {name: (row(kw), torch.float32) for name, kw in configs.items()}

    def make(spec):
        h, w, _ = inputs(n, d, v, torch.float32, args.logit_std)
        return h.requires_grad_(), w.requires_grad_()

    times = side_by_side(rows, make, args.repeat, args.warmup)
    h, w, _ = inputs(n, d, v, torch.float32, args.logit_std)
    kept, threshold_ms = {}, {}
    with torch.no_grad():
        z = h @ w.T
        for name, kw in configs.items():
            tf = transform.check_head_options(temperature=kw.get("temperature", 1.0), softcap=kw.get("softcap"),
                                              top_k=kw.get("top_k"), top_p=kw.get("top_p"), min_p=kw.get("min_p"),
                                              head_precision="native", lead=(n,), device=z.device, dtype=z.dtype,
                                              vocab=v)
            if not tf.truncates:
                continue
            t0 = time.perf_counter()
            tau = transform.kept_threshold(z, tf)   # the whole batch as one chunk (its default CPU chunk is 128 rows)
            threshold_ms[name] = (time.perf_counter() - t0) * 1e3
            kept[name] = float((z >= tau[:, None]).sum(1).float().mean())
    return times, kept, threshold_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--logit-std", type=float, default=2.5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = f"N={args.tokens} d={args.hidden} V={args.vocab}, logit std {args.logit_std}"
    prec = precision_table(args)
    opts, kept, threshold_ms = options_table(args)
    lines = [f"# Head options, CPU ({torch.get_num_threads()} threads), {shape}", "",
             f"`python bench/head_options.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"median of {args.repeat} fwd+bwd, rows interleaved", "",
             "| precision (gro_loss sft) | ms | vs fp32 inputs |", "|---|---:|---:|"]
    base = prec["fp32 inputs (native)"]
    for name, ms in prec.items():
        lines.append(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    lines += ["", "| token_logprobs (logp + entropy) | ms | vs none | kept tokens (mean) | kept-set search alone, ms |",
              "|---|---:|---:|---:|---:|"]
    for name, ms in opts.items():
        k = f"{kept[name]:.0f}" if name in kept else "-"
        s = f"{threshold_ms[name]:.1f}" if name in threshold_ms else "-"
        lines.append(f"| {name} | {ms:.1f} | {ms / opts['none']:.2f}x | {k} | {s} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(dict(shape=vars(args), precision_ms=prec, options_ms=opts, kept=kept,
                           threshold_ms=threshold_ms, torch=torch.__version__), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
