"""The divergence to a teacher head beyond the reverse KL: forward KL and the generalized JSD.

For a logits chunk z [n, V] of the policy and zr [n, V] of the teacher (u = z / T, ur = zr / T,
p = softmax(u), q = softmax(ur), both heads' -inf bias rows the same):

    forward_kl   D = KL(q || p) = sum_v q (log q - log p)             dD/du = p - q
    jsd          D = b KL(q || m) + (1 - b) KL(p || m),  m = (1 - b) p + b q
                 dD/du = (1 - b) p (log p - log m - E_p[log p - log m])

(the reverse KL is the reference head's exact KL of `row_stats`). Both need the normalized p and q
per element, so the statistics take the policy's lse (from the row statistics) and a first sweep
over zr for the teacher's own lse; a second sweep forms the sums. `teacher_stats` writes, per row,
the teacher's lse, D, and E_p[log p - log m] (jsd: the gradient's shift). `teacher_term` is the
per-element part of the gradient the logits-gradient kernel adds:

    forward_kl   -delta q                     (its + delta p is in the row's alpha)
    jsd          delta p (log p - log m)      (its - delta E_p[log(p/m)] p is in alpha)

with delta = dL/dD (times 1 - b for jsd) / T, from `engine.coefficients_from_upstream`.
Rows masked by a -inf bias in both heads have p = q = 0: every term there is 0, never NaN.

`python -m gro_kernels.kernels.teacher` checks both against float64 torch (CUDA, or the CPU with
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

FORWARD_KL, JSD = 1, 2
KINDS = {"forward_kl": FORWARD_KL, "jsd": JSD}
_CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in ((1024, 4), (2048, 4), (2048, 8))]
_INTERPRETER_BLOCK_V = 256


@triton.jit
def _log_mixture(lp, lq, log_1mb, log_b):
    """log((1 - b) p + b q) from log p, log q; -inf where both are -inf (not NaN)."""
    a = lp + log_1mb
    c = lq + log_b
    mx = tl.maximum(a, c)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return tl.where(mx == float("-inf"), float("-inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(c - safe)))


@triton.jit
def teacher_term(u, ur, lse, lse_r, delta, log_1mb, log_b, KIND: tl.constexpr):
    """The teacher's per-element addition to dz (fp32): -delta q (forward_kl) or delta p log(p/m) (jsd)."""
    lq = ur - lse_r
    q = tl.exp(lq)
    if KIND == 1:
        return -delta * q
    else:
        lp = u - lse
        p = tl.exp(lp)
        lm = _log_mixture(lp, lq, log_1mb, log_b)
        return tl.where(p > 0, delta * p * (lp - lm), 0.0)


@triton.jit
def _teacher_stats_kernel(z_ptr, zr_ptr, lse_ptr, lse_r_ptr, d_ptr, epm_ptr, V, stride_z, stride_zr, inv_t,
                          b, log_1mb, log_b, KIND: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    # Sweep 1: the teacher's log-sum-exp (a per-lane online max and sum, merged at the end).
    mr = tl.full([BLOCK_V], neg_inf, tl.float32)
    sr = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        ur = tl.load(zr_row + idx, mask=idx < V, other=neg_inf).to(tl.float32) * inv_t
        m_new = tl.maximum(mr, ur)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        sr = sr * tl.exp(mr - m_safe) + tl.exp(ur - m_safe)
        mr = m_new
    big = tl.max(mr, 0)
    lse_r = big + tl.log(tl.sum(sr * tl.exp(mr - big), 0))
    lse = tl.load(lse_ptr + row)
    # Sweep 2: the divergence's sums from the normalized log-probabilities.
    acc = tl.zeros([BLOCK_V], tl.float32)   # forward: sum q (lq - lp); jsd: sum q (lq - lm)
    acc_p = tl.zeros([BLOCK_V], tl.float32)  # jsd: sum p (lp - lm)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        inside = idx < V
        lp = tl.load(z_row + idx, mask=inside, other=neg_inf).to(tl.float32) * inv_t - lse
        lq = tl.load(zr_row + idx, mask=inside, other=neg_inf).to(tl.float32) * inv_t - lse_r
        q = tl.exp(lq)
        if KIND == 1:
            acc += tl.where(q > 0, q * (lq - lp), 0.0)
        else:
            p = tl.exp(lp)
            lm = _log_mixture(lp, lq, log_1mb, log_b)
            acc += tl.where(q > 0, q * (lq - lm), 0.0)
            acc_p += tl.where(p > 0, p * (lp - lm), 0.0)
    tl.store(lse_r_ptr + row, lse_r)
    if KIND == 1:
        tl.store(d_ptr + row, tl.maximum(tl.sum(acc, 0), 0.0))
    else:
        s_p = tl.sum(acc_p, 0)
        tl.store(epm_ptr + row, s_p)
        tl.store(d_ptr + row, tl.maximum(b * tl.sum(acc, 0) + (1 - b) * s_p, 0.0))


_teacher_stats_tuned = triton.autotune(_CONFIGS, key=["V", "KIND"])(_teacher_stats_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mixture_logs(beta: float):
    """(log(1 - b), log b) of the JSD's mixture weights (unused for the forward KL)."""
    return (math.log1p(-beta), math.log(beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)


def teacher_stats(z, zr, inv_t, *, kind: str, beta: float, lse, lse_r, div, e_pm=None) -> None:
    """Write the teacher's lse, the divergence and (jsd) E_p[log p - log m] of every row of z / zr.
    `lse` is the policy's (from the row statistics)."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    zr = zr if zr.stride(-1) == 1 else zr.contiguous()
    n, vocab = z.shape
    if n == 0:
        return
    log_1mb, log_b = mixture_logs(beta)
    args = (z, zr, lse, lse_r, div, lse_r if e_pm is None else e_pm, vocab, z.stride(0), zr.stride(0), float(inv_t),
            float(beta), log_1mb, log_b)
    if _interpreting():
        _teacher_stats_kernel[(n,)](*args, KIND=KINDS[kind], BLOCK_V=_INTERPRETER_BLOCK_V)
    else:
        _teacher_stats_tuned[(n,)](*args, KIND=KINDS[kind])


def check(n=5, vocab=700, device=None, seed=0) -> float:
    """The largest error of the teacher statistics against float64 torch (both divergences, masked rows).
    Returns it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = 3 * torch.randn(n, vocab, generator=g)
    zr = z + 2 * torch.randn(n, vocab, generator=g)
    z[:, 5] = zr[:, 5] = float("-inf")   # a vocabulary row both heads mask
    z, zr = z.to(device), zr.to(device)
    inv_t = 1 / 0.8
    u, ur = z.double() * inv_t, zr.double() * inv_t
    lp, lq = u.log_softmax(1), ur.log_softmax(1)
    p, q = lp.exp(), lq.exp()
    worst = 0.0
    for kind, beta in (("forward_kl", 0.5), ("jsd", 0.3)):
        out = {k: torch.empty(n, device=device) for k in ("lse_r", "div", "e_pm")}
        teacher_stats(z, zr, inv_t, kind=kind, beta=beta, lse=u.logsumexp(1).float(), **out)
        live = p > 0
        if kind == "forward_kl":
            want = dict(div=(q * torch.where(live, lq - lp, 0.0)).sum(1))
        else:
            lm = torch.where(live, ((1 - beta) * p + beta * q).log(), 0.0)
            e_pm = (p * torch.where(live, lp - lm, 0.0)).sum(1)
            want = dict(div=beta * (q * torch.where(live, lq - lm, 0.0)).sum(1) + (1 - beta) * e_pm, e_pm=e_pm)
        want["lse_r"] = ur.logsumexp(1)
        worst = max(worst, max(float((out[k].double() - v).abs().max()) for k, v in want.items()))
    return worst


if __name__ == "__main__":
    e = check()
    print(f"teacher_stats: max abs error vs float64 torch {e:.2e}")
    raise SystemExit(0 if e < 1e-4 else 1)
