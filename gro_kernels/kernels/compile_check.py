"""Compile every kernel variant for a GPU target without a GPU (ahead-of-time, through ptxas).

    python -m gro_kernels.kernels.compile_check [--arch 90] [--quick]

The interpreter (TRITON_INTERPRET=1) runs the kernels as numpy and never meets the compiler, so
this is the CPU-side check that the same source lowers to TTIR -> TTGIR -> LLVM -> PTX -> cubin for
sm_90 with the installed Triton. It prints each variant's register count, shared memory and spills.
Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _variants(quick: bool):
    dtypes = ("bf16", "fp32") if not quick else ("bf16",)
    for dt, has_ref, split in itertools.product(dtypes, (False, True), (1, 4)):
        yield "forward", dt, dict(HAS_BIAS=True, HAS_REF=has_ref, HAS_REF_BIAS=has_ref, SPLIT=split)
    for dt, has_kl, filt in itertools.product(dtypes, (False, True), (False, True)):
        common = dict(HAS_BIAS=True, HAS_REF_BIAS=has_kl, HAS_ENT=True, HAS_KL=has_kl, FILTER=filt)
        yield "dh", dt, dict(common, SPLIT=2)
        yield "dw", dt, dict(common, NEED_DW=True, NEED_DB=True)
        yield "atomic", dt, dict(common, NEED_DH=True, NEED_DW=True, NEED_DB=True)


def _resources(kernel) -> str:
    """Registers and spill bytes of the cubin, from the cuobjdump bundled with Triton."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", out)
        spill = re.search(r"STACK:(\d+)", out)
        return f"regs={regs.group(1) if regs else '?'} stack={spill.group(1) if spill else '?'}"
    except Exception:  # resource usage is informative only
        return "regs=? stack=?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bf16 only")
    ap.add_argument("--only", default=None, help="kernel name: forward, dh, dw or atomic")
    ap.add_argument("--config", default=None,
                    help="BLOCK_N,BLOCK_V,BLOCK_D,num_warps,num_stages instead of the table's large-N entry")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import backward, forward
    from .tuning import _BWD_TABLE, _FWD_TABLE

    kernels = {"forward": forward._forward_kernel, "dh": backward._dh_kernel, "dw": backward._dw_kernel,
               "atomic": backward._atomic_kernel}
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, dt, flags in _variants(args.quick):
        if args.only and name != args.only:
            continue
        fn = kernels[name]
        table = _FWD_TABLE if name == "forward" else _BWD_TABLE
        cfg = table["fp32" if dt == "fp32" else "half"]["large_n"]
        if args.config:
            keys = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")
            cfg = dict(zip(keys, (int(v) for v in args.config.split(","))))
        prec = "ieee" if dt == "fp32" else "tf32"
        constexprs = dict(flags, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                          UPCAST=False, PRECISION=prec, REF_PRECISION=prec)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                if arg in ("h_ptr", "w_ptr", "hr_ptr", "wr_ptr", "b_ptr", "br_ptr"):
                    signature[arg] = f"*{dt}"
                elif arg == "y_ptr":
                    signature[arg] = "*i64"
                else:
                    signature[arg] = "*fp32"
            elif arg == "inv_t":
                signature[arg] = "fp32"
            else:
                signature[arg] = "i64" if arg.startswith("stride") or arg == "v_per_split" else "i32"
        src = ASTSource(fn, signature, constexprs=constexprs)
        t0 = time.time()
        try:
            k = triton.compile(src, target=target, options=dict(num_warps=cfg["num_warps"],
                                                                 num_stages=cfg["num_stages"]))
            print(f"ok   {name:8s} {dt:5s} {flags}  {_resources(k)} smem={k.metadata.shared}  "
                  f"{time.time() - t0:.1f}s", flush=True)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {name:8s} {dt:5s} {flags}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
