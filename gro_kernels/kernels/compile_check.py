"""Compile every epilogue kernel variant for a GPU target without a GPU (ahead of time, through ptxas).

    python -m gro_kernels.kernels.compile_check [--arch 90] [--vocab 151936]

The interpreter (TRITON_INTERPRET=1) runs the kernels as numpy and never meets the compiler, so
this is the CPU-side check that the same source lowers to TTIR -> TTGIR -> LLVM -> PTX -> cubin for
sm_90 with the installed Triton (the GPU image has Triton 3.6; CI the newest). It compiles with the
specialization a real launch gets: 16-byte aligned pointers (torch's allocations) and the integer
arguments divisible by 16 when they are (V = 151936 and its row strides are), and reports for each
variant and autotuning config: registers, spilled bytes, shared memory, and whether the logits
loads are 128-bit vectors (`ld.global.v4`). Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time


def _resources(kernel) -> dict:
    """Registers and spill (stack) bytes of the cubin, from the cuobjdump bundled with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
        return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}
    except Exception:  # informative only
        return {"regs": None, "stack": None}


# The head's options (soft cap, kept-set threshold) on top of each variant; the mean log-prob (SFT's label
# smoothing, never with truncation) with and without class weights.
_HEAD = [dict(HAS_CAP=cap, HAS_TAU=tau) for cap, tau in itertools.product((False, True), (False, True))]


def _variants():
    """(kernel name, z dtype, dz dtype, constexpr flags) for every variant a launch can make."""
    for want_ent, has_ref, want_p2, head in itertools.product((False, True), (False, True), (False, True), _HEAD):
        yield "row_stats", "fp32", None, dict(WANT_ENT=want_ent, HAS_REF=has_ref, WANT_P2=want_p2, WANT_MEAN=False,
                                              HAS_CW=False, **head)
    for has_cw, cap in itertools.product((False, True), (False, True)):
        yield "row_stats", "fp32", None, dict(WANT_ENT=True, HAS_REF=False, WANT_P2=False, WANT_MEAN=True,
                                              HAS_CW=has_cw, HAS_CAP=cap, HAS_TAU=False)
    for dz, has_beta, has_ref, head in itertools.product(("fp32", "bf16", "fp16"), (False, True), (False, True), _HEAD):
        if has_ref and not has_beta:
            continue  # a KL coefficient always brings beta
        yield "logits_grad", "fp32", dz, dict(HAS_BETA=has_beta, HAS_REF=has_ref, HAS_ETA=False, HAS_CW=False, **head)
    for dz, has_cw in itertools.product(("fp32", "bf16"), (False, True)):
        yield "logits_grad", "fp32", dz, dict(HAS_BETA=True, HAS_REF=False, HAS_ETA=True, HAS_CW=has_cw,
                                              HAS_CAP=True, HAS_TAU=False)


def _signature(fn, constexprs, dz_dtype, vocab):
    """Argument types and the divisibility-16 hints a real launch passes."""
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = {"y_ptr": "*i64", "dz_ptr": f"*{dz_dtype}"}.get(arg, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "cap":
            signature[arg] = "fp32"
        else:  # V and the row strides
            signature[arg] = "i32" if arg == "V" else "i64"
            if vocab % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--vocab", type=int, default=151936, help="V the hints assume (divisible by 16 or not)")
    ap.add_argument("--quick", action="store_true", help="only the first autotuning config")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import epilogue

    kernels = {"row_stats": epilogue._row_stats_kernel, "logits_grad": epilogue._logits_grad_kernel}
    configs = epilogue._CONFIGS[:1] if args.quick else epilogue._CONFIGS
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}, V={args.vocab}")
    failures = scalar = spills = 0
    for (name, _, dz, flags), cfg in itertools.product(_variants(), configs):
        fn = kernels[name]
        constexprs = dict(flags, **cfg.kwargs)
        signature, attrs = _signature(fn, constexprs, dz or "fp32", args.vocab)
        t0 = time.time()
        try:
            k = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                               options=dict(num_warps=cfg.num_warps))
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {name:11s} dz={dz} {flags} {cfg}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
            continue
        res = _resources(k)
        ptx = k.asm["ptx"]
        v4 = bool(re.search(r"ld\.global(\.[a-z]+)*\.v4\.(f32|b32|u32)", ptx))
        scalar += not v4 and args.vocab % 4 == 0
        spills += bool(res["stack"])
        print(f"ok   {name:11s} dz={str(dz):4s} {flags} BLOCK_V={cfg.kwargs['BLOCK_V']} warps={cfg.num_warps}  "
              f"regs={res['regs']} stack={res['stack']} smem={k.metadata.shared} 128-bit loads={v4}  "
              f"{time.time() - t0:.1f}s", flush=True)
    print(f"{failures} failures, {spills} variants with spills, {scalar} without 128-bit loads")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
