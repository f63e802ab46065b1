"""Backward kernels: gradients of hidden, weight and bias, recomputing the logits blockwise.

The logits gradient of `g_logp*logp + g_lse*lse + g_H*H + g_KL*KL` for one token is
    dz = g_logp*onehot(y) + p * ( (g_lse - g_logp) - g_H*(z - E_p[z]) + g_KL*((z - zr) - E_p[z - zr]) )
with p = exp(z - lse); d(logits) = dz / T. `grad_tile` recomputes z (and zr only when the KL has
an upstream gradient) for one [BLOCK_N, BLOCK_V] tile from the saved per-token vectors
(lse, E_p[z], E_p[z - zr]) and returns dz / T in fp32, 0 outside the valid rows/columns.

Default mode "split" (deterministic, no atomics), two kernels:
  * `_dh_kernel`: program = (token block, vocabulary slice). Loops over the vocab blocks of its
    slice; per block: dz tile, then for each BLOCK_D chunk of the hidden dim
    dh[rows, chunk] += dz @ W[blk, chunk] (fp32 read-modify-write of rows only this program owns).
    With SPLIT > 1 slices each slice has its own fp32 buffer, summed on the host (deterministic).
  * `_dw_kernel`: program = one vocab block. Loops over all token blocks; per block: dz tile, then
    dW[blk, chunk] += dz^T @ h[rows, chunk] (rows of dW only this program owns), db[blk] += sum(dz).
  Cost: the logits are recomputed twice (8*N*V*d flops with the two gradient matmuls, vs 6 for a
  single pass) in exchange for no atomics and bitwise-reproducible gradients.
Mode "atomic" (CCE-style), one kernel: program = (token block, vocab block) tile; dz tile once,
  then dh and dW (and db) are accumulated with fp32 `tl.atomic_add` (6*N*V*d flops, non-deterministic
  summation order, (BLOCK_N + BLOCK_V) * d atomics per tile). Offered for measurement on the GPU.

Filtered backward (`filter_eps`): a tile whose every |dz| is <= `thr` (per row: filter_eps times the
sum of the token's |upstream gradients| / T) skips its gradient matmuls (the Cut Cross-Entropy idea:
far-from-target vocab blocks carry a negligible softmax gradient). The z recompute is still done.

All accumulators are fp32; dz is rounded to the input dtype for the tensor-core dot (as autograd
does for a bf16 matmul). 1-D grids, int64 offsets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import logits_tile
from .tuning import vocab_split


@triton.jit
def grad_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask,
              y, lse, gl, c0, gh, ez, gk, ed,
              D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t,
              HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    mask = row_mask[:, None] & col_mask[None, :]
    z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_t,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    p = tl.where(mask, tl.exp(z - lse[:, None]), 0.0)
    coef = tl.zeros((BLOCK_N, BLOCK_V), tl.float32) + c0[:, None]
    if HAS_ENT:
        coef -= gh[:, None] * (z - ez[:, None])
    if HAS_KL:
        zr = logits_tile(hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask, DR, stride_hr, stride_wr,
                         inv_t, HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, REF_PRECISION)
        coef += gk[:, None] * ((z - zr) - ed[:, None])
    dz = p * coef + tl.where(cols[None, :] == y[:, None], gl[:, None], 0.0)
    return tl.where(mask, dz * inv_t, 0.0)


@triton.jit
def _load_rows(y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr, thr_ptr, rows, row_mask,
               HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr, FILTER: tl.constexpr):
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_mask, other=0.0)
    c0 = tl.load(c0_ptr + rows, mask=row_mask, other=0.0)
    gh = gl * 0.0
    ez = gl * 0.0
    gk = gl * 0.0
    ed = gl * 0.0
    thr = gl * 0.0
    if HAS_ENT:
        gh = tl.load(gh_ptr + rows, mask=row_mask, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=row_mask, other=0.0)
    if HAS_KL:
        gk = tl.load(gk_ptr + rows, mask=row_mask, other=0.0)
        ed = tl.load(ed_ptr + rows, mask=row_mask, other=0.0)
    if FILTER:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
    return y, lse, gl, c0, gh, ez, gk, ed, thr


@triton.jit
def _any_above(dz, thr):
    big = tl.where(tl.abs(dz) > thr[:, None], 1, 0)
    return tl.max(tl.max(big, axis=1), axis=0) > 0


@triton.jit
def _acc_dot(a, src_ptr, dst_ptr, src_idx, dst_idx, src_mask, dst_mask, D, stride_src, stride_dst,
             BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dst[dst_idx, :] += a @ src[src_idx, :] in fp32, one BLOCK_D chunk of the hidden dim at a time.
    dH: a = dz, src = W at the tile's columns, dst = dH at its rows; dW: a = dz^T, src = h, dst = dW.
    `a` is rounded to the source dtype for the tensor-core dot (as autograd does for a bf16 matmul)."""
    a = a.to(src_ptr.dtype.element_ty)
    if UPCAST:
        a = a.to(tl.float32)
    for k in range(0, D, BLOCK_D):
        dk = k + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        src = tl.load(src_ptr + src_idx[:, None] * stride_src + dk[None, :],
                      mask=src_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            src = src.to(tl.float32)
        ptrs = dst_ptr + dst_idx[:, None] * stride_dst + dk[None, :]
        m2 = dst_mask[:, None] & d_mask[None, :]
        acc = tl.load(ptrs, mask=m2, other=0.0)
        acc = tl.dot(a, src, acc, input_precision=PRECISION)
        tl.store(ptrs, acc, mask=m2)


@triton.jit
def _dh_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr,
               y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr, thr_ptr, dh_ptr,
               N, V, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t, v_per_split,
               HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr,
               FILTER: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tb = pid // SPLIT
    sp = pid % SPLIT
    rows = tb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y, lse, gl, c0, gh, ez, gk, ed, thr = _load_rows(y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr,
                                                     thr_ptr, rows, row_mask, HAS_ENT, HAS_KL, FILTER)
    dh_base = dh_ptr + sp.to(tl.int64) * N * D                   # this slice's own buffer, [N, D]
    v_start = sp.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        dz = grad_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask,
                       y, lse, gl, c0, gh, ez, gk, ed, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t,
                       HAS_BIAS, HAS_REF_BIAS, HAS_ENT, HAS_KL, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
                       REF_PRECISION)
        keep = True
        if FILTER:
            keep = _any_above(dz, thr)
        if keep:
            _acc_dot(dz, w_ptr, dh_base, cols, rows, col_mask, row_mask, D, stride_w, D,
                     BLOCK_D, UPCAST, PRECISION)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr,
               y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr, thr_ptr, dw_ptr, db_ptr,
               N, V, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t,
               HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr,
               FILTER: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    vb = tl.program_id(0)
    cols = vb.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        y, lse, gl, c0, gh, ez, gk, ed, thr = _load_rows(y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr,
                                                         ed_ptr, thr_ptr, rows, row_mask, HAS_ENT, HAS_KL, FILTER)
        dz = grad_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask,
                       y, lse, gl, c0, gh, ez, gk, ed, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t,
                       HAS_BIAS, HAS_REF_BIAS, HAS_ENT, HAS_KL, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
                       REF_PRECISION)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            keep = True
            if FILTER:
                keep = _any_above(dz, thr)
            if keep:
                _acc_dot(tl.trans(dz), h_ptr, dw_ptr, rows, cols, row_mask, col_mask, D, stride_h, D,
                         BLOCK_D, UPCAST, PRECISION)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


@triton.jit
def _atomic_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr,
                   y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr, thr_ptr, dh_ptr, dw_ptr, db_ptr,
                   N, V, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t, n_vblocks,
                   HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, HAS_KL: tl.constexpr,
                   FILTER: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tb = pid // n_vblocks
    vb = pid % n_vblocks
    rows = tb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = vb.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    y, lse, gl, c0, gh, ez, gk, ed, thr = _load_rows(y_ptr, lse_ptr, gl_ptr, c0_ptr, gh_ptr, ez_ptr, gk_ptr, ed_ptr,
                                                     thr_ptr, rows, row_mask, HAS_ENT, HAS_KL, FILTER)
    dz = grad_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, row_mask, col_mask,
                   y, lse, gl, c0, gh, ez, gk, ed, D, DR, stride_h, stride_w, stride_hr, stride_wr, inv_t,
                   HAS_BIAS, HAS_REF_BIAS, HAS_ENT, HAS_KL, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
                       REF_PRECISION)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
    keep = True
    if FILTER:
        keep = _any_above(dz, thr)
    if keep:
        dzc = dz.to(w_ptr.dtype.element_ty)
        if UPCAST:
            dzc = dzc.to(tl.float32)
        dzt = tl.trans(dzc)
        for k in range(0, D, BLOCK_D):
            dk = k + tl.arange(0, BLOCK_D)
            d_mask = dk < D
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None] * stride_w + dk[None, :], mask=col_mask[:, None] & d_mask[None, :],
                            other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                part = tl.dot(dzc, w, input_precision=PRECISION)
                tl.atomic_add(dh_ptr + rows[:, None] * D + dk[None, :], part,
                              mask=row_mask[:, None] & d_mask[None, :])
            if NEED_DW:
                h = tl.load(h_ptr + rows[:, None] * stride_h + dk[None, :], mask=row_mask[:, None] & d_mask[None, :],
                            other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                part = tl.dot(dzt, h, input_precision=PRECISION)
                tl.atomic_add(dw_ptr + cols[:, None] * D + dk[None, :], part,
                              mask=col_mask[:, None] & d_mask[None, :])


def launch_backward(h, w, b, y, hr, wr, br, lse, ez, ed, g_logp, g_ent, g_kl, g_lse, *, temperature,
                    need_dh, need_dw, need_db, filter_eps, mode, cfg, upcast, precision, ref_precision):
    """Gradients for the compacted valid rows. g_* are fp32 [N] or None (no upstream gradient).
    Returns fp32 (dh [N, d] | None, dW [V, d] | None, db [V] | None)."""
    n, d = h.shape
    vocab = w.shape[0]
    dev = h.device
    f32 = dict(dtype=torch.float32, device=dev)
    zeros = torch.zeros(n, **f32)
    has_ent = g_ent is not None
    has_kl = g_kl is not None
    gl = g_logp if g_logp is not None else zeros
    c0 = (g_lse if g_lse is not None else zeros) - gl
    gh = g_ent if has_ent else zeros
    gk = g_kl if has_kl else zeros
    ez_ = ez if has_ent else zeros
    ed_ = ed if has_kl else zeros
    filt = filter_eps is not None
    if filt:
        scale = gl.abs() + gh.abs() + gk.abs() + (g_lse.abs() if g_lse is not None else 0.0)
        thr = (scale * (float(filter_eps) / temperature)).contiguous()
    else:
        thr = zeros
    dummy = torch.empty(1, **f32)
    inv_t = 1.0 / temperature
    bn, bv, bd = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    dr = hr.shape[1] if has_kl else d
    common = (h, w, b if b is not None else dummy,
              hr if has_kl else h, wr if has_kl else w, br if (has_kl and br is not None) else dummy,
              y, lse, gl.contiguous(), c0.contiguous(), gh.contiguous(), ez_, gk.contiguous(), ed_, thr)
    sizes = (n, vocab, d, dr, h.stride(0), w.stride(0),
             hr.stride(0) if has_kl else 0, wr.stride(0) if has_kl else 0, inv_t)
    flags = dict(HAS_BIAS=b is not None, HAS_REF_BIAS=has_kl and br is not None, HAS_ENT=has_ent, HAS_KL=has_kl,
                 FILTER=filt, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, UPCAST=upcast, PRECISION=precision,
                 REF_PRECISION=ref_precision,
                 num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    dh = dw = db = None
    n_vblocks = triton.cdiv(vocab, bv)

    if mode == "atomic":
        dh = torch.zeros(n, d, **f32) if need_dh else dummy
        dw = torch.zeros(vocab, d, **f32) if need_dw else dummy
        db = torch.zeros(vocab, **f32) if need_db else dummy
        grid = (triton.cdiv(n, bn) * n_vblocks,)
        _atomic_kernel[grid](*common, dh, dw, db, *sizes, n_vblocks,
                             NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, **flags)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None)
    if mode != "split":
        raise ValueError(f"backward mode must be 'split' or 'atomic', got {mode!r}")

    if need_dh:
        split, v_per_split = vocab_split(cfg, vocab)
        if h.dtype == torch.float32:  # the fp32 accumulator is the gradient itself
            buf = torch.zeros(split, n, d, **f32)
            _dh_kernel[(triton.cdiv(n, bn) * split,)](*common, buf, *sizes, v_per_split, SPLIT=split, **flags)
            dh = buf[0] if split == 1 else buf.sum(0)
        else:
            dh = _dh_in_token_slices(common, sizes, flags, split, v_per_split, h.dtype,
                                     int(cfg.get("DH_SLICE_ELEMENTS", DH_SLICE_ELEMENTS)))
    if need_dw or need_db:
        db = torch.empty(vocab, **f32) if need_db else dummy
        if not need_dw or w.dtype == torch.float32:
            # fp32 weights: the fp32 accumulator is the gradient itself, one launch.
            dw = torch.zeros(vocab, d, **f32) if need_dw else dummy
            _dw_kernel[(n_vblocks,)](*common, dw, db, *sizes, NEED_DW=need_dw, NEED_DB=need_db, **flags)
            dw = dw if need_dw else None
        else:
            dw = _dw_in_vocab_slices(common, sizes, flags, db if need_db else None, need_db, w.dtype,
                                     int(cfg.get("DW_SLICE_ELEMENTS", DW_SLICE_ELEMENTS)))
        db = db if need_db else None
    return dh, dw, db


# bf16/fp16 hidden states: each dH program accumulates its token block in fp32 in global memory;
# a whole [N, d] fp32 buffer would be 8 GiB at N=131072, d=4096 (long context), so the kernel runs
# over token slices with an fp32 buffer of at most this many elements per vocabulary split.
DH_SLICE_ELEMENTS = 1 << 25


def _dh_in_token_slices(common, sizes, flags, split, v_per_split, out_dtype, slice_elements):
    h, w, b, hr, wr, br = common[:6]
    per_row = common[6:]  # y, lse, gl, c0, gh, ez, gk, ed, thr: [N] vectors
    n, d = h.shape
    bn = flags["BLOCK_N"]
    rows = max(bn, (slice_elements // d) // bn * bn)
    out = torch.empty(n, d, dtype=out_dtype, device=h.device)
    same_ref = hr is h  # no KL: the kernel gets h as a placeholder for the reference hidden states
    for s in range(0, n, rows):
        e = min(s + rows, n)
        buf = torch.zeros(split, e - s, d, dtype=torch.float32, device=h.device)
        sliced = (h[s:e], w, b, h[s:e] if same_ref else hr[s:e], wr, br, *(v[s:e] for v in per_row))
        _dh_kernel[(triton.cdiv(e - s, bn) * split,)](*sliced, buf, e - s, *sizes[1:], v_per_split,
                                                       SPLIT=split, **flags)
        out[s:e] = buf[0] if split == 1 else buf.sum(0)
    return out


# bf16/fp16 weights: each dW program accumulates its vocabulary block in fp32 in global memory.
# A whole [V, d] fp32 buffer would be 2.4 GiB at V=151936, d=4096, so the kernel is launched over
# vocabulary slices with one reusable fp32 buffer of at most this many elements (256 MiB), each
# slice cast to the weight's dtype as it finishes. Sliced views keep the kernel unchanged: the
# targets are shifted by the slice's start (they are only compared with column ids).
DW_SLICE_ELEMENTS = 1 << 26


def _dw_in_vocab_slices(common, sizes, flags, db, need_db, out_dtype, slice_elements):
    h, w, b, hr, wr, br, y = common[:7]
    rest = common[7:]
    vocab, d = w.shape
    bv = flags["BLOCK_V"]
    rows = max(bv, (slice_elements // d) // bv * bv)
    out = torch.empty(vocab, d, dtype=out_dtype, device=w.device)
    buf = torch.empty(min(rows, vocab), d, dtype=torch.float32, device=w.device)
    has_bias, has_ref_bias, has_kl = flags["HAS_BIAS"], flags["HAS_REF_BIAS"], flags["HAS_KL"]
    for a in range(0, vocab, rows):
        e = min(a + rows, vocab)
        acc = buf[: e - a].zero_()
        sliced = (h, w[a:e], b[a:e] if has_bias else b, hr, wr[a:e] if has_kl else w[a:e],
                  br[a:e] if has_ref_bias else br, y - a, *rest)
        part_sizes = (sizes[0], e - a, *sizes[2:])
        db_part = db[a:e] if need_db else acc  # a placeholder when no bias gradient is needed
        _dw_kernel[(triton.cdiv(e - a, bv),)](*sliced, acc, db_part, *part_sizes, NEED_DW=True,
                                               NEED_DB=need_db, **flags)
        out[a:e] = acc
    return out
