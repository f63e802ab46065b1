"""Forward kernel: per-token log-prob, entropy, exact KL and LSE in one sweep over the vocabulary.

What one program computes
    Program `pid` owns token block `pid // SPLIT` (BLOCK_N rows) and vocabulary slice `pid % SPLIT`
    (a run of BLOCK_V-wide blocks). It loops over the blocks of its slice; for each it computes the
    logits tile z = (h @ W_blk^T + b) / T in fp32 (`tiles.logits_tile`, itself a loop over the hidden
    dim) and folds it into per-row running statistics, all relative to the running max m:
        s = sum exp(z - m)                  (the softmax normalizer; m starts at -inf)
        a = sum exp(z - m) * (z - m)        (gives E_p[z] = m + a/s and H = log s - a/s without the
                                             cancellation of lse - E_p[z] when logits are huge)
        zy = z[target]                      (the target logit, found in exactly one block)
    and with a reference head (KL), the same for zr = (hr @ Wr_blk^T + br) / T:
        mr, sr = running max / sum exp(zr - mr)
        c = sum exp(z - m) * (zr - mr)      (so E_p[zr] = mr + c/s)
    When the max moves from m to m' every sum is rescaled by exp(m - m') and shifted by
    (m - m') * s; the shift is guarded so that the -inf identity never meets a 0 (no NaN).
    KL = E_p[z - zr] - lse + lse_ref = (a - c)/s - log s + log sr.

Why the grid is shaped so
    A 1-D grid (no 65535 limit on any axis) of token blocks: each program streams the whole of W
    once, the W blocks are shared through L2 by the programs running at the same time, and only
    [N]-sized vectors are written. With few token blocks (short batches on a 132-SM GPU) the
    vocabulary is split over SPLIT programs per token block; each writes its partial statistics
    ([SPLIT, N] vectors) and `merge_partials` combines them (a log-sum-exp merge, O(SPLIT * N)).
    With SPLIT == 1 the program finalizes in place. Ignored tokens never reach the kernel: the
    autograd op compacts the valid rows first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import logits_tile
from .tuning import vocab_split


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, hr_ptr, wr_ptr, br_ptr,
    # [SPLIT, N] partials (SPLIT > 1) or [N] final outputs (SPLIT == 1)
    m_ptr, s_ptr, a_ptr, zy_ptr, mr_ptr, sr_ptr, c_ptr,
    logp_ptr, ent_ptr, kl_ptr, lse_ptr, ez_ptr, ed_ptr,
    N, V, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t, v_per_split,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tb = pid // SPLIT
    sp = pid % SPLIT
    rows = tb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)

    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_N,), neg_inf, tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    a_i = tl.zeros((BLOCK_N,), tl.float32)
    zy_i = tl.zeros((BLOCK_N,), tl.float32)
    mr_i = tl.full((BLOCK_N,), neg_inf, tl.float32)
    sr_i = tl.zeros((BLOCK_N,), tl.float32)
    c_i = tl.zeros((BLOCK_N,), tl.float32)

    v_start = sp.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_t,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        z = tl.where(col_mask[None, :], z, neg_inf)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)                              # 0 while m_i is -inf
        shift = tl.where(m_i > neg_inf, m_i - m_new, 0.0)
        e = tl.exp(z - m_new[:, None])                           # 0 at masked columns
        zc = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        a_i = alpha * (a_i + shift * s_i) + tl.sum(e * zc, axis=1)
        zy_i += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if HAS_REF:
            zr = logits_tile(hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask, DR, stride_hr, stride_wr,
                             inv_t, HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, REF_PRECISION)
            zr = tl.where(col_mask[None, :], zr, neg_inf)
            mr_new = tl.maximum(mr_i, tl.max(zr, axis=1))
            shift_r = tl.where(mr_i > neg_inf, mr_i - mr_new, 0.0)
            zrc = tl.where(col_mask[None, :], zr - mr_new[:, None], 0.0)
            c_i = alpha * (c_i + shift_r * s_i) + tl.sum(e * zrc, axis=1)
            sr_i = tl.exp(mr_i - mr_new) * sr_i + tl.sum(tl.exp(zr - mr_new[:, None]), axis=1)
            mr_i = mr_new
        s_i = alpha * s_i + tl.sum(e, axis=1)
        m_i = m_new

    if SPLIT == 1:
        log_s = tl.log(s_i)
        mean_zc = a_i / s_i                                      # E_p[z] - m
        tl.store(lse_ptr + rows, m_i + log_s, mask=row_mask)
        tl.store(logp_ptr + rows, (zy_i - m_i) - log_s, mask=row_mask)
        tl.store(ent_ptr + rows, log_s - mean_zc, mask=row_mask)
        tl.store(ez_ptr + rows, m_i + mean_zc, mask=row_mask)
        if HAS_REF:
            mean_zrc = c_i / s_i                                 # E_p[zr] - mr
            tl.store(kl_ptr + rows, (mean_zc - mean_zrc) - log_s + tl.log(sr_i), mask=row_mask)
            tl.store(ed_ptr + rows, (m_i - mr_i) + (mean_zc - mean_zrc), mask=row_mask)
    else:
        off = sp.to(tl.int64) * N + rows
        tl.store(m_ptr + off, m_i, mask=row_mask)
        tl.store(s_ptr + off, s_i, mask=row_mask)
        tl.store(a_ptr + off, a_i, mask=row_mask)
        tl.store(zy_ptr + off, zy_i, mask=row_mask)
        if HAS_REF:
            tl.store(mr_ptr + off, mr_i, mask=row_mask)
            tl.store(sr_ptr + off, sr_i, mask=row_mask)
            tl.store(c_ptr + off, c_i, mask=row_mask)


def merge_partials(m, s, a, zy, mr=None, sr=None, c=None):
    """Combine [SPLIT, N] partial statistics into (logp, entropy, kl, lse, E_p[z], E_p[z - zr])."""
    neg_inf = float("-inf")
    M = m.max(0).values
    w = torch.exp(m - M)                                           # 0 for an empty slice (m = -inf)
    shift = torch.where(m > neg_inf, m - M, torch.zeros_like(m))
    S = (w * s).sum(0)
    A = (w * (a + shift * s)).sum(0)
    log_s = torch.log(S)
    mean_zc = A / S
    lse = M + log_s
    logp = (zy.sum(0) - M) - log_s
    ent = log_s - mean_zc
    ez = M + mean_zc
    kl = ed = None
    if mr is not None:
        MR = mr.max(0).values
        shift_r = torch.where(mr > neg_inf, mr - MR, torch.zeros_like(mr))
        SR = (torch.exp(mr - MR) * sr).sum(0)
        C = (w * (c + shift_r * s)).sum(0)
        mean_zrc = C / S
        kl = (mean_zc - mean_zrc) - log_s + torch.log(SR)
        ed = (M - MR) + (mean_zc - mean_zrc)
    return logp, ent, kl, lse, ez, ed


def launch_forward(h, w, b, y, hr, wr, br, *, temperature, cfg, upcast, precision, ref_precision):
    """Run the forward sweep over compacted valid rows. Returns fp32 [N] tensors
    (logp, entropy, kl|None, lse, E_p[z], E_p[z - zr]|None)."""
    n, d = h.shape
    vocab = w.shape[0]
    has_ref = hr is not None
    dev = h.device
    bn, bv, bd = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    split, v_per_split = vocab_split(cfg, vocab)
    grid = (triton.cdiv(n, bn) * split,)

    f32 = dict(dtype=torch.float32, device=dev)
    dummy = torch.empty(1, **f32)
    logp, ent, lse, ez = (torch.empty(n, **f32) for _ in range(4))
    kl, ed = (torch.empty(n, **f32), torch.empty(n, **f32)) if has_ref else (dummy, dummy)
    if split > 1:
        parts = [torch.empty(split, n, **f32) for _ in range(4)]
        parts += [torch.empty(split, n, **f32) for _ in range(3)] if has_ref else [dummy] * 3
    else:
        parts = [dummy] * 7
    _forward_kernel[grid](
        h, w, b if b is not None else dummy, y,
        hr if has_ref else h, wr if has_ref else w, br if br is not None else dummy,
        *parts, logp, ent, kl, lse, ez, ed,
        n, vocab, d, hr.shape[1] if has_ref else d,
        h.stride(0), w.stride(0), hr.stride(0) if has_ref else 0, wr.stride(0) if has_ref else 0,
        1.0 / temperature, v_per_split,
        HAS_BIAS=b is not None, HAS_REF=has_ref, HAS_REF_BIAS=br is not None, SPLIT=split,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, UPCAST=upcast, PRECISION=precision, REF_PRECISION=ref_precision,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    if split > 1:
        if has_ref:
            return merge_partials(*parts)
        logp, ent, _, lse, ez, _ = merge_partials(*parts[:4])
        return logp, ent, None, lse, ez, None
    return logp, ent, (kl if has_ref else None), lse, ez, (ed if has_ref else None)

