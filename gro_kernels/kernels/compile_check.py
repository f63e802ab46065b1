"""Compile every kernel variant and autotuning config for a GPU target without a GPU (through ptxas).

    python -m gro_kernels.kernels.compile_check [--arch 90] [--vocab 151936] [--quick] [--jobs N] [--json FILE]

The interpreter (TRITON_INTERPRET=1) runs the kernels as numpy and never meets the compiler, so
this is the CPU-side check that the same source lowers to TTIR -> TTGIR -> LLVM -> PTX -> cubin for
sm_90 with the installed Triton (the GPU image has Triton 3.6; CI the newest). It compiles with the
specialization a real launch gets: 16-byte aligned pointers (torch's allocations) and the integer
arguments divisible by 16 when they are (V = 151936 and its row strides are), and reports for
each variant and config, from the cubin's SASS (the disassembler bundled with Triton):

    regs, stack (spilled bytes: must be 0), smem, whether the logits loads are 128-bit vectors
    (`ld.global.v4` in the PTX), and per logit of a program's SPLIT_V the SASS instructions and
    MUFU.EX2 it issues: the whole kernel once (prologue, final reductions) plus the main loop's
    steady-state iteration SPLIT_V / BLOCK_V - 1 more times, divided by each thread's logits.

Exit status 1 when a variant fails to compile, spills, or (V % 4 == 0) loads logits in scalars.
Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_file(kernel) -> str:
    f = tempfile.NamedTemporaryFile(suffix=".cubin", delete=False)
    f.write(kernel.asm["cubin"])
    f.close()
    return f.name


def _resources(path: str) -> dict:
    """Registers and spill (stack) bytes of the cubin, from cuobjdump."""
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def _sass(path: str):
    """The SASS of the cubin (nvdisasm): (opcodes with modifiers, the instructions of one steady-state
    iteration of its main loop, or None). The main loop is the longest body closed by a backward
    branch; its steady state follows every forward branch inside it (the kernels branch only
    around the rare rescale of a running max that grew; loads and stores are predicated)."""
    out = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    ops, targets, labels, loop = [], [], {}, None
    for line in out.splitlines():
        label = re.match(r"(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if not m:
            continue
        target = re.search(r"\((\.L_x_\d+)\)", m.group(2)) if m.group(1).startswith("BRA") else None
        ops.append(m.group(1))
        targets.append(target.group(1) if target else None)
        if target and target.group(1) in labels:   # a backward branch: a loop
            start = labels[target.group(1)]
            if len(ops) - start > 1 and (loop is None or len(ops) - start > loop[1] - loop[0]):
                loop = (start, len(ops))
    if loop is None:
        return ops, None
    steady, i = [], loop[0]
    while i < loop[1]:
        steady.append(ops[i])
        t = labels.get(targets[i]) if targets[i] else None
        i = t if t is not None and i < t <= loop[1] else i + 1
    return ops, steady


# The head's options on top of each variant: the soft cap, the kept-set threshold of top_k / top_p /
# min_p, and the mean log-prob (SFT's label smoothing: statistics WANT_MEAN, gradient HAS_ETA) with or
# without class weights (HAS_CW), which api.check_mean_logp refuses with truncation.
_MEAN = [dict(), dict(mean=True, cw=False), dict(mean=True, cw=True)]


def _variants():
    """(kernel, dz dtype or None, constexpr flags) for every variant a launch can make: a reference
    head always brings the relative sums (statistics) and beta (gradient); class weights only come
    with the mean log-prob, and the mean log-prob never with truncation. A teacher's forward KL / JSD
    (DIV 1 / 2) is a second head without the soft cap and truncation (api.py refuses them), and its
    gradient term replaces the reference's gamma (one second head per sweep)."""
    for want_rel, has_ref, want_p2, cap, tau, mean in itertools.product(
            (False, True), (False, True), (False, True), (False, True), (False, True), _MEAN):
        if (has_ref and not want_rel) or (tau and mean):
            continue
        yield "row_partials", None, dict(WANT_REL=want_rel, HAS_REF=has_ref, WANT_P2=want_p2, HAS_CAP=cap,
                                         HAS_TAU=tau, WANT_MEAN=bool(mean), HAS_CW=mean.get("cw", False), DIV=0)
    for div, want_p2, mean in itertools.product((1, 2), (False, True), _MEAN):
        yield "row_partials", None, dict(WANT_REL=True, HAS_REF=True, WANT_P2=want_p2, HAS_CAP=False, HAS_TAU=False,
                                         WANT_MEAN=bool(mean), HAS_CW=mean.get("cw", False), DIV=div)
    for want_ent, has_ref, want_p2, cap, want_mean in itertools.product(*[(False, True)] * 5):
        yield "row_finish", None, dict(WANT_ENT=want_ent, HAS_REF=has_ref, WANT_P2=want_p2, HAS_CAP=cap,
                                       WANT_MEAN=want_mean, DIV=0)
    for div, want_ent, want_p2, want_mean in itertools.product((1, 2), *[(False, True)] * 3):
        yield "row_finish", None, dict(WANT_ENT=want_ent, HAS_REF=True, WANT_P2=want_p2, HAS_CAP=False,
                                       WANT_MEAN=want_mean, DIV=div)
    yield "jsd_partials", None, dict()
    for dz, has_beta, has_ref, cap, tau, mean in itertools.product(
            ("fp32", "bf16", "fp16"), (False, True), (False, True), (False, True), (False, True), _MEAN):
        if (has_ref and not has_beta) or (tau and mean):
            continue
        yield "logits_grad", dz, dict(HAS_BETA=has_beta, HAS_REF=has_ref, HAS_CAP=cap, HAS_TAU=tau,
                                      HAS_ETA=bool(mean), HAS_CW=mean.get("cw", False), DIV=0)
    for div, dz, has_beta, mean in itertools.product((1, 2), ("fp32", "bf16", "fp16"), (False, True), _MEAN):
        yield "logits_grad", dz, dict(HAS_BETA=has_beta, HAS_REF=False, HAS_CAP=False, HAS_TAU=False,
                                      HAS_ETA=bool(mean), HAS_CW=mean.get("cw", False), DIV=div)


_INTS = {"V": "i32", "n_splits": "i32"}


def _signature(fn, constexprs, dz_dtype, vocab):
    """Argument types and the divisibility-16 hints a real launch passes."""
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = {"y_ptr": "*i64", "dz_ptr": f"*{dz_dtype}"}.get(arg, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("cap", "log_1mb", "log_b"):
            signature[arg] = "fp32"
        else:  # V, n_splits and the row strides
            signature[arg] = _INTS.get(arg, "i64")
            divisible = vocab % 16 == 0 if arg != "n_splits" else False
            if divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _tasks(vocab: int, quick: bool) -> list:
    """(kernel, dz dtype, flags, constexprs, warps, BLOCK_V or None) of every compile to make."""
    import triton

    from . import launch

    configs = launch.CONFIGS[:1] if quick else launch.CONFIGS
    n_splits = triton.cdiv(vocab, launch.SPLIT_V)
    tasks = []
    for name, dz, flags in _variants():
        if name == "row_finish":  # one small program per row, launched with the defaults
            tasks.append((name, dz, flags, dict(flags, BLOCK_S=triton.next_power_of_2(n_splits)), 4, None))
        else:
            tasks += [(name, dz, flags, dict(flags, SPLIT_V=launch.SPLIT_V, FAST=True, **c.kwargs), c.num_warps,
                       c.kwargs["BLOCK_V"]) for c in configs
                      if launch.launchable(c, flags)]   # what the autotuner may run
    return tasks


def _compile_one(task, arch: int, vocab: int) -> dict:
    """Compile one task for sm_<arch> and read its cubin: the result dict (ok False with the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import launch, logits_grad, row_stats

    kernels = {"row_partials": row_stats._row_partials_kernel, "row_finish": row_stats._row_finish_kernel,
               "jsd_partials": row_stats._jsd_partials_kernel, "logits_grad": logits_grad._logits_grad_kernel}
    name, dz, flags, constexprs, warps, block_v = task
    signature, attrs = _signature(kernels[name], constexprs, dz or "fp32", vocab)
    rec = {"kernel": name, "dz": dz, "flags": flags, "block_v": block_v, "warps": warps}
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(kernels[name], signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    except Exception as exc:  # report every variant, then fail
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:1500]}")
        return rec
    path = _cubin_file(k)
    try:
        rec.update(_resources(path))
        ops, body = _sass(path)
    finally:
        os.unlink(path)
    ptx = k.asm["ptx"]

    def ex2(seq):
        return sum(op.startswith("MUFU.EX2") for op in seq)

    rec.update(ok=True, smem=k.metadata.shared, v4_loads=bool(re.search(r"ld\.global(\.[a-z]+)*\.v4\.(f32|b32|u32)", ptx)),
               sass=len(ops), ex2=ex2(ops))
    if block_v:  # per logit of one program's split: the loop body runs SPLIT_V / BLOCK_V times
        body = body or []
        extra = launch.SPLIT_V // block_v - 1 if body else 0
        per_thread = launch.SPLIT_V / (32 * warps)
        rec.update(loop_sass=len(body), loop_ex2=ex2(body), logits_per_thread_per_iteration=block_v / (32 * warps),
                   sass_per_logit=(len(ops) + extra * len(body)) / per_thread,
                   ex2_per_logit=(rec["ex2"] + extra * ex2(body)) / per_thread)
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def _line(rec) -> str:
    head = f"{rec['kernel']:12s} dz={str(rec['dz']):4s} {rec['flags']} BLOCK_V={rec['block_v']} warps={rec['warps']}"
    if not rec["ok"]:
        return f"FAIL {head}: {rec['error']}"
    per = (f"  SASS/logit={rec['sass_per_logit']:.2f} EX2/logit={rec['ex2_per_logit']:.3f}"
           if rec["block_v"] else f"  SASS={rec['sass']} EX2={rec['ex2']}")
    return (f"ok   {head}  regs={rec['regs']} stack={rec['stack']} smem={rec['smem']} "
            f"128-bit loads={rec['v4_loads']}{per}  {rec['seconds']}s")


def compile_all(arch: int = 90, vocab: int = 151936, quick: bool = False, log=print, jobs: int = 1) -> list:
    """Compile every (variant, config), in `jobs` processes; one result dict each, in order."""
    import functools

    tasks = _tasks(vocab, quick)
    one = functools.partial(_compile_one, arch=arch, vocab=vocab)
    if jobs <= 1:
        results = []
        for t in tasks:
            results.append(one(t))
            log(_line(results[-1]))
        return results
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = []
        for rec in pool.map(one, tasks):
            results.append(rec)
            log(_line(rec))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--vocab", type=int, default=151936, help="V the hints assume (divisible by 16 or not)")
    ap.add_argument("--quick", action="store_true", help="only the first autotuning config")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}, V={args.vocab}", flush=True)
    results = compile_all(args.arch, args.vocab, args.quick, log=lambda s: print(s, flush=True), jobs=args.jobs)
    failures = sum(not r["ok"] for r in results)
    spills = sum(bool(r.get("stack")) for r in results)
    scalar = sum(r["ok"] and r["kernel"] != "row_finish" and not r["v4_loads"] for r in results) if args.vocab % 4 == 0 else 0
    print(f"{len(results)} compiled: {failures} failures, {spills} with spills, {scalar} without 128-bit loads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "vocab": args.vocab, "results": results}, f,
                      indent=1)
    return 1 if failures or spills or scalar else 0


if __name__ == "__main__":
    sys.exit(main())
