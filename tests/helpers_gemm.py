"""Every GEMM a computation makes, seen from the dispatcher; the CUDA-only fp32-output GEMMs on the CPU.

`GemmAudit` is a TorchDispatchMode that records each matrix product (mm / addmm / bmm in every
form: in place, out=, out_dtype=) with its operand dtypes, output dtype and m, k, n. With
`emulate_cuda=True` it also computes the overloads that only CUDA has (`mm(a, b, out_dtype=)`,
`addmm(c, a, b, out_dtype=, out=)`) on the CPU, as cuBLAS does: the 16-bit products accumulated
in fp32, then the output dtype. `native_16bit_path(monkeypatch)` then lets the engine take its
CUDA path for 16-bit heads (16-bit dz, fp32-output gradient GEMMs) on CPU tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "dot", "mv", "addmv"}
_CUDA_ONLY = {aten.mm.dtype, aten.mm.dtype_out, aten.addmm.dtype, aten.addmm.dtype_out}


@dataclass
class Gemm:
    op: str
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    out_dtype: torch.dtype
    m: int
    k: int
    n: int
    fp32_reduction: bool = False   # torch told cuBLAS to add split-K pieces in fp32 (16-bit inputs)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def _emulate(func, args, kwargs):
    """What cuBLAS computes for the fp32-output overloads: fp32 products and sums, out_dtype result.
    In 64 x 64 tiles, into the output itself where there is one, so that the CPU allocator's
    profile of a run sees the real GEMM's output and only small temporaries besides."""
    if func in (aten.mm.dtype, aten.mm.dtype_out):
        a, b, out_dtype = args[:3]
        c, beta, alpha = None, 0, 1
    else:
        c, a, b, out_dtype = args[:4]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = kwargs.get("out")
    if out is not None and out_dtype == torch.float32 and out.dtype == torch.float32:
        acc = out
        if c is None or beta == 0:
            acc.zero_()
        elif c.data_ptr() != out.data_ptr():
            acc.copy_(c).mul_(beta)
        elif beta != 1:
            acc.mul_(beta)
    else:
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        if c is not None and beta != 0:
            acc.add_(c.float(), alpha=beta)
    B = 64   # tiles of 64 x 64: every temporary is small next to the GEMM's own output
    for i in range(0, a.shape[0], B):
        for j in range(0, b.shape[1], B):
            for k in range(0, a.shape[1], B):
                acc[i:i + B, j:j + B].addmm_(a[i:i + B, k:k + B].float(), b[k:k + B, j:j + B].float(), alpha=alpha)
    if acc is out:
        return out
    res = acc.to(out_dtype)
    return res if out is None else out.copy_(res)


class GemmAudit(TorchDispatchMode):
    def __init__(self, emulate_cuda: bool = False):
        super().__init__()
        self.emulate_cuda = emulate_cuda
        self.gemms: list[Gemm] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        if self.emulate_cuda and func in _CUDA_ONLY:
            result = _emulate(func, args, kwargs)
        else:
            result = func(*args, **kwargs)
        if name in _GEMMS:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]   # addmm(c, a, b), mm(a, b), bmm(a, b)
            # mv(a, x), addmv(c, a, x), dot(x, y): a vector is a one-column (or one-row) matrix
            a, b = (a if a.dim() >= 2 else a[None]), (b if b.dim() >= 2 else b[:, None])
            batch = a.shape[0] if a.dim() == 3 else 1
            flags = torch.backends.cuda.matmul
            allowed = {torch.bfloat16: flags.allow_bf16_reduced_precision_reduction,
                       torch.float16: flags.allow_fp16_reduced_precision_reduction}.get(a.dtype, False)
            self.gemms.append(Gemm(name, a.dtype, b.dtype, result.dtype, batch * a.shape[-2], a.shape[-1],
                                   b.shape[-1], fp32_reduction=not allowed))
        return result

    @property
    def flops(self) -> int:
        return sum(g.flops for g in self.gemms)


def native_16bit_path(monkeypatch) -> None:
    """Make the engine believe this device has the fp32-output 16-bit GEMMs (run under
    `GemmAudit(emulate_cuda=True)`)."""
    from gro_kernels.logprobs import engine

    monkeypatch.setattr(engine, "_mm_fp32_out_supported",
                        lambda device, dtype: dtype in (torch.float16, torch.bfloat16))
    # The probe of addmm(out_dtype=, out=) would run (and be counted) inside the audit: the emulation
    # above accumulates, as the probe would find.
    monkeypatch.setattr(engine, "_ACCUMULATE_PROBE", {("cpu", torch.float16): True, ("cpu", torch.bfloat16): True})
