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

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def _emulate(func, args, kwargs):
    """What cuBLAS computes for the fp32-output overloads: fp32 products and sums, out_dtype result."""
    if func in (aten.mm.dtype, aten.mm.dtype_out):
        a, b, out_dtype = args[:3]
        res = (a.float() @ b.float()).to(out_dtype)
    else:
        c, a, b, out_dtype = args[:4]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        res = (beta * c.float() + alpha * (a.float() @ b.float())).to(out_dtype)
    out = kwargs.get("out")
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
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            a, b = mats[-2], mats[-1]   # addmm(c, a, b), mm(a, b), bmm(a, b)
            batch = a.shape[0] if a.dim() == 3 else 1
            self.gemms.append(Gemm(name, a.dtype, b.dtype, result.dtype, batch * a.shape[-2], a.shape[-1],
                                   b.shape[-1]))
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
