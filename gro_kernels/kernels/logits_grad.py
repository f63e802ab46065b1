"""The logits gradient of a chunk, written into its own buffer.

For the fp32 logits chunk z [n, V] (u = softcap(z) / T per row, p = exp(u - lse) on the row's kept
set, 0 elsewhere: `row_stats.py`) and per-row coefficients, one read of z (and of the reference
chunk zr) and one write of

    dz = (gl * onehot(y) + p * (alpha + beta * u + gamma * ur) + eta * w) * (1 - tanh^2(z / c))

in the dtype of `out` (16-bit for a 16-bit head, with fp32 math), plus a teacher head's term when zr is
a teacher's chunk whose divergence is the forward KL or the generalized JSD (q = exp(ur - lse_r),
m = (1 - b) p + b q; their row terms are in alpha, `logprobs/engine.py`):

    forward_kl   - delta * q                   jsd   + delta * p * (log p - log m)
 `out` is a separate buffer, never
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

from .launch import (CONFIGS, DIVERGENCES, JSD, LOG2E, PRUNE, exp2, launch, log_mixture, mixture_logs, per_row,
                     program_split, rowmajor, softmax_input, split_v, tanh, vec, warn_if_unaligned)


@triton.jit
def _logits_grad_kernel(z_ptr, zr_ptr, dz_ptr, y_ptr, inv_t_ptr, tau_ptr, cw_ptr, lse_ptr, gl_ptr, alpha_ptr,
                        beta_ptr, gamma_ptr, eta_ptr, lse_r_ptr, delta_ptr, V, n_splits, stride_z, stride_zr,
                        stride_dz, cap, log_1mb, log_b,
                        HAS_BETA: tl.constexpr, HAS_REF: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TAU: tl.constexpr,
                        HAS_ETA: tl.constexpr, HAS_CW: tl.constexpr, DIV: tl.constexpr, SPLIT_V: tl.constexpr,
                        FAST: tl.constexpr, BLOCK_V: tl.constexpr):
    _, row, v0 = program_split(n_splits, SPLIT_V, BLOCK_V)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    dz_row = dz_ptr + row * stride_dz
    inv_t = tl.load(inv_t_ptr + row)
    lse = tl.load(lse_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    gl = tl.load(gl_ptr + row)
    target = tl.load(y_ptr + row).to(tl.int32)   # V < 2^31: a 32-bit compare per logit, not 64
    beta = 0.0
    gamma = 0.0
    eta = 0.0
    tau = float("-inf")
    if HAS_BETA:
        beta = tl.load(beta_ptr + row)
    if HAS_REF:
        gamma = tl.load(gamma_ptr + row)
    if HAS_ETA:
        eta = tl.load(eta_ptr + row)
    if HAS_TAU:
        tau = tl.load(tau_ptr + row)
    lse_r = 0.0
    delta = 0.0
    if DIV > 0:   # a teacher's forward KL / JSD: its lse and the row's delta
        lse_r = tl.load(lse_r_ptr + row)
        delta = tl.load(delta_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for i in range(0, SPLIT_V, BLOCK_V):
        idx = v0 + i + offs
        inside = idx < V
        z = tl.load(z_row + idx, mask=inside, other=0.0).to(tl.float32)
        keep = inside
        if HAS_CAP:
            th = tanh(z / cap)
            u = cap * th * inv_t
            keep = keep & (z > float("-inf"))   # a masked (-inf) logit stays out under the cap
        else:
            u = softmax_input(z, inv_t, cap, HAS_CAP)
        if HAS_TAU:
            keep = keep & ((z >= tau) | (idx == target))
        p = tl.where(keep, exp2((u - lse) * LOG2E, FAST), 0.0)   # one exp per logit
        # The logits gradient, assembled: the softmax times the row's coefficients, the one-hot, the
        # mean log-prob's eta w, and the soft cap's chain rule.
        t = alpha
        if HAS_BETA:
            t = t + beta * u
        if HAS_REF or DIV > 0:
            ur = softmax_input(tl.load(zr_row + idx, mask=inside, other=0.0).to(tl.float32), inv_t, cap, HAS_CAP)
        if HAS_REF:
            t = t + gamma * ur
        if DIV == 2:   # the JSD's delta (log p - log m), times p below
            lp = u - lse
            t = t + delta * (lp - log_mixture(lp, ur - lse_r, log_1mb, log_b, FAST))
        # p = 0 (a -inf bias row, outside the kept set): dz is exactly 0 there, whatever t (inf, or NaN
        # from 0 * -inf) is.
        d = tl.where(p == 0.0, 0.0, p * t) + tl.where(idx == target, gl, 0.0)
        if DIV == 1:   # the forward KL's -delta q (0 at rows both heads mask)
            d = d - delta * exp2((ur - lse_r) * LOG2E, FAST)
        if HAS_ETA:
            if HAS_CW:
                d = d + eta * tl.load(cw_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            else:
                d = d + eta
        if HAS_CAP:
            d = d * (1.0 - th * th)
        tl.store(dz_row + idx, d.to(dz_ptr.dtype.element_ty), mask=inside)


_logits_grad_tuned = triton.autotune(
    CONFIGS, key=["V", "HAS_BETA", "HAS_REF", "HAS_CAP", "HAS_TAU", "HAS_ETA", "HAS_CW", "DIV"],
    prune_configs_by=PRUNE)(_logits_grad_kernel)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def logits_grad(z, zr, y, inv_t, *, lse, gl, alpha, beta=None, gamma=None, eta=None, cap=None, tau=None,
                class_weight=None, out, divergence: str = "reverse_kl", delta=None, lse_r=None,
                jsd_beta: float = 0.5) -> torch.Tensor:
    """Write dz of every row of z [n, V] into `out` [n, V] (fp32 or 16-bit, rows contiguous) and
    return it. inv_t: 1 / T, a float or per row; `zr` matters only with `gamma` or a teacher's term;
    eta [n]: the mean log-prob's coefficient (times class_weight [V] when given); cap, tau: as
    `row_stats`. A teacher's forward_kl / jsd term (`divergence`, with delta [n], the teacher's lse_r [n]
    and jsd_beta) takes no cap and no truncation. `out` may not share storage with z or zr."""
    teacher = DIVERGENCES[divergence] if delta is not None else 0
    if teacher and (lse_r is None or zr is None or cap is not None or tau is not None):
        raise ValueError(f"a teacher's {divergence} term needs zr and lse_r, and takes no soft cap or truncation")
    zr = None if gamma is None and not teacher else rowmajor(zr)
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
    inv = per_row(inv_t, n, z.device)
    args = (z, z if zr is None else zr, out, y, inv, vec(tau, lse), vec(class_weight, lse), lse, gl, alpha,
            lse if beta is None else beta, lse if gamma is None else gamma, lse if eta is None else eta,
            lse if not teacher else vec(lse_r, lse), lse if not teacher else vec(delta, lse),
            vocab, n_splits, z.stride(0), 0 if zr is None else zr.stride(0), out.stride(0), float(cap or 1.0),
            *(mixture_logs(jsd_beta) if teacher == JSD else (0.0, 0.0)))
    launch(_logits_grad_tuned, _logits_grad_kernel, (n * n_splits,), args,
           dict(HAS_BETA=beta is not None, HAS_REF=gamma is not None, HAS_CAP=cap is not None, HAS_TAU=tau is not None,
                HAS_ETA=eta is not None, HAS_CW=class_weight is not None and eta is not None, DIV=teacher, SPLIT_V=sv))
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
