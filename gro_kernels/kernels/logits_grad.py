"""The logits gradient of a chunk, written into its own buffer.

For the fp32 logits chunk z [n, V] (u = z / T, p = softmax(u) = exp(u - lse)) and per-row
coefficients, one read of z (and of the reference chunk zr) and one write of

    dz = gl * onehot(y) + p * (alpha + beta * u + gamma * ur)

in the dtype of `out` (16-bit for a 16-bit head, with fp32 math). `out` is a separate buffer, never
memory of z or zr (the launcher refuses one that shares their storage): a program's warps are not
ordered against each other, so a kernel that wrote over what other warps still read would race.
Grid: one program per (row, split of SPLIT_V vocabulary entries), as the row statistics.

    logits_grad(z, zr, y, inv_t, lse=..., gl=..., alpha=..., beta=..., gamma=..., out=dz)

`python -m gro_kernels.kernels.logits_grad` checks it against float64 torch (CUDA, or the CPU with
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CONFIGS, LOG2E, exp2, launch, rowmajor, softmax_input, split_v, warn_if_unaligned


@triton.jit
def _logits_grad_kernel(z_ptr, zr_ptr, dz_ptr, y_ptr, lse_ptr, gl_ptr, alpha_ptr, beta_ptr, gamma_ptr,
                        V, n_splits, stride_z, stride_zr, stride_dz, inv_t,
                        HAS_BETA: tl.constexpr, HAS_REF: tl.constexpr, SPLIT_V: tl.constexpr,
                        FAST: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // n_splits).to(tl.int64)
    v0 = (pid % n_splits) * SPLIT_V
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    dz_row = dz_ptr + row * stride_dz
    lse = tl.load(lse_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    gl = tl.load(gl_ptr + row)
    target = tl.load(y_ptr + row).to(tl.int32)   # V < 2^31: a 32-bit compare per logit, not 64
    beta = 0.0
    gamma = 0.0
    if HAS_BETA:
        beta = tl.load(beta_ptr + row)
    if HAS_REF:
        gamma = tl.load(gamma_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for i in range(0, SPLIT_V, BLOCK_V):
        idx = v0 + i + offs
        inside = idx < V
        u = softmax_input(tl.load(z_row + idx, mask=inside, other=0.0).to(tl.float32), inv_t)
        p = exp2((u - lse) * LOG2E, FAST)            # one exp per logit
        # The logits gradient, assembled: the softmax times the row's coefficients, plus the one-hot.
        t = alpha
        if HAS_BETA:
            t = t + beta * u
        if HAS_REF:
            ur = softmax_input(tl.load(zr_row + idx, mask=inside, other=0.0).to(tl.float32), inv_t)
            t = t + gamma * ur
        d = p * t + tl.where(idx == target, gl, 0.0)
        tl.store(dz_row + idx, d.to(dz_ptr.dtype.element_ty), mask=inside)


_logits_grad_tuned = triton.autotune(CONFIGS, key=["V", "HAS_BETA", "HAS_REF"])(_logits_grad_kernel)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def logits_grad(z, zr, y, inv_t, *, lse, gl, alpha, beta=None, gamma=None, out) -> torch.Tensor:
    """Write dz of every row of z [n, V] into `out` [n, V] (fp32 or 16-bit, rows contiguous) and
    return it. `zr` matters only with `gamma`. `out` may not share storage with z or zr."""
    zr = None if gamma is None else rowmajor(zr)
    z = rowmajor(z)
    n, vocab = z.shape
    if tuple(out.shape) != (n, vocab) or out.stride(-1) != 1:
        raise ValueError(f"out must be a [{n}, {vocab}] tensor with contiguous rows, got {tuple(out.shape)}")
    if _shares_storage(out, z) or (zr is not None and _shares_storage(out, zr)):
        raise ValueError("out shares memory with the logits it is computed from: dz needs its own buffer")
    warn_if_unaligned(vocab)
    if n == 0:
        return out
    sv = split_v()
    n_splits = triton.cdiv(vocab, sv)
    args = (z, z if zr is None else zr, out, y, lse, gl, alpha, lse if beta is None else beta,
            lse if gamma is None else gamma, vocab, n_splits, z.stride(0), 0 if zr is None else zr.stride(0),
            out.stride(0), float(inv_t))
    launch(_logits_grad_tuned, _logits_grad_kernel, (n * n_splits,), args,
           dict(HAS_BETA=beta is not None, HAS_REF=zr is not None, SPLIT_V=sv))
    return out


def check(n=7, vocab=1500, dtype=torch.bfloat16, device=None, seed=0) -> float:
    """The largest error of dz against float64 torch, relative to its largest entry (a random chunk
    with a reference head, several splits, a ragged last block). Returns it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (3 * torch.randn(n, vocab, generator=g)).to(device)
    zr = (z.cpu() + torch.randn(n, vocab, generator=g)).to(device)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    inv_t = 1 / 0.8
    lse = (z * inv_t).logsumexp(1)
    gl, alpha, beta, gamma = torch.randn(4, n, generator=g).to(device)
    out = torch.empty(n, vocab, dtype=dtype, device=device)
    logits_grad(z, zr, y, inv_t, lse=lse, gl=gl, alpha=alpha, beta=beta, gamma=gamma, out=out)
    u, ur = z.double() * inv_t, zr.double() * inv_t
    ref = torch.exp(u - lse.double()[:, None]) * (alpha.double()[:, None] + beta.double()[:, None] * u
                                                  + gamma.double()[:, None] * ur)
    ref[torch.arange(n), y] += gl.double()
    return float((out.double() - ref).abs().max() / ref.abs().max())


if __name__ == "__main__":
    worst = max(check(dtype=dt) / torch.finfo(dt).eps for dt in (torch.float32, torch.bfloat16, torch.float16))
    print(f"logits_grad: max error vs float64 torch {worst:.2f} ulp of the largest entry")
    raise SystemExit(0 if worst <= 4 else 1)
