"""Row statistics of a logits chunk: log-sum-exp, target log-prob, entropy, exact KL to a reference.

One read of the fp32 logits chunk z [n, V] (and of the reference chunk zr), with u = softcap(z) / T
per row, p the softmax of u over the row's kept set {z >= tau} plus its target (`logprobs/transform.py`):

    lse = log sum_v exp(u_v)          logp = u_y - lse          H = lse - E_p[u]
    KL(p || p_ref) = E_p[u - ur] - lse + lse_ref                sum_p2 = sum_v p_v^2
    mean_logp = (1/V) sum_v w_v (u_v - lse)                     top1 = [u_y is the row's largest]

in two steps, so that partial sums can be combined before anything is finished (across the
vocabulary splits of one chunk here; across vocabulary shards of a tensor-parallel head too):

1. `row_partials`: one program per (row, split of SPLIT_V vocabulary entries). An online
   log-sum-exp whose running max is one scalar per program: each BLOCK_V block takes
   its max first and rescales the sums only when it grew (rare after the first blocks), so every
   logit costs one exp (with a reference head one more, for its own softmax). The per-lane sums
   are relative to that max, so the entropy and KL never subtract two large numbers. Writes, per
   (row, split), the fields of `FIELDS` below.
2. `finish_row_stats`: one program per row combines its splits' partials (a max, then sums
   rescaled to it) and writes the statistics.

The second head may be a teacher (`divergence`, `launch.DIVERGENCES`; q = softmax(ur), no soft cap,
no truncation, both heads' -inf rows the same): its reverse KL is the reference's KL above; its
forward KL(q || p) = E_q[ur - u] - lse_ref + lse comes from two more sums weighted by q in the same
read; the generalized JSD, b KL(q || m) + (1 - b) KL(p || m) with m = (1 - b) p + b q, needs both
normalized distributions per element, so a second read of both chunks (`jsd_sums`) follows the
first, which gives both heads' lse. The forward KL and the JSD also write the teacher's lse, and the
JSD E_p[log p - log m]: their gradients' row terms (`logits_grad.py`).

    partials = row_partials(z, zr, y, inv_t, want_rel=..., want_p2=..., cap=..., tau=...)  # [n, splits, NF]
    finish_row_stats(partials, z, y, inv_t, lse=..., logp=..., top1=..., ent=..., kl=..., ...)

`python -m gro_kernels.kernels.row_stats` checks both against float64 torch (CUDA, or the CPU with
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (CONFIGS, DIVERGENCES, LN2, LOG2E, PRUNE, exp2, launch, log_mixture, mixture_logs, per_row,
                     program_split, rowmajor, softmax_input, split_v, vec, warn_if_unaligned)

# Fields of a partial, relative to the program's max m of u (mr of ur), with the differences in
# base 2 (x = (u - m) log2 e, xr likewise): m, sum e, sum e x, mr, sum er, sum e xr, sum e^2,
# sum w x and sum w over every logit (the mean log-prob, w the class weights or 1), sum er x and
# sum er xr (a teacher's forward KL), unused; e = 2^x = exp(u - m), er = 2^xr. The finishing step
# turns the sums of x back into natural units.
FIELDS = ("m", "s", "sd", "mr", "sr", "sdr", "s2", "sw", "ws", "sq", "sqr", "pad")
NF = len(FIELDS)
_NF = tl.constexpr(NF)
# Masked lanes load -inf; their 0 * x must count 0, not NaN: x is clamped here.
_FLOOR = tl.constexpr(-1e30)


@triton.jit
def _row_partials_kernel(z_ptr, zr_ptr, y_ptr, inv_t_ptr, tau_ptr, cw_ptr, part_ptr, V, n_splits, stride_z, stride_zr,
                         cap, WANT_REL: tl.constexpr, HAS_REF: tl.constexpr, WANT_P2: tl.constexpr,
                         HAS_CAP: tl.constexpr, HAS_TAU: tl.constexpr, WANT_MEAN: tl.constexpr, HAS_CW: tl.constexpr,
                         DIV: tl.constexpr, SPLIT_V: tl.constexpr, FAST: tl.constexpr, BLOCK_V: tl.constexpr):
    pid, row, v0 = program_split(n_splits, SPLIT_V, BLOCK_V)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    inv_t = tl.load(inv_t_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    target = 0
    tau = neg_inf
    if HAS_TAU:   # the kept set: z >= tau, and the target
        target = tl.load(y_ptr + row).to(tl.int32)
        tau = tl.load(tau_ptr + row)
    m = tl.full([], neg_inf, tl.float32)     # running max of u: one scalar for the whole program
    mr = tl.full([], neg_inf, tl.float32)    # the reference's
    s = tl.zeros([BLOCK_V], tl.float32)      # per lane: sum e
    sd = tl.zeros([BLOCK_V], tl.float32)     # sum e x
    sr = tl.zeros([BLOCK_V], tl.float32)     # sum 2^xr
    sdr = tl.zeros([BLOCK_V], tl.float32)    # sum e xr (the reverse KL)
    sq = tl.zeros([BLOCK_V], tl.float32)     # sum er x (a teacher's forward KL)
    sqr = tl.zeros([BLOCK_V], tl.float32)    # sum er xr (a teacher's forward KL)
    s2 = tl.zeros([BLOCK_V], tl.float32)     # sum e^2
    sw = tl.zeros([BLOCK_V], tl.float32)     # sum w x over every logit
    ws = tl.zeros([BLOCK_V], tl.float32)     # sum w
    for i in range(0, SPLIT_V, BLOCK_V):
        idx = v0 + i + offs
        inside = idx < V
        z = tl.load(z_row + idx, mask=inside, other=neg_inf).to(tl.float32)
        u = softmax_input(z, inv_t, cap, HAS_CAP)
        if HAS_TAU:
            u = tl.where((z >= tau) | (idx == target), u, neg_inf)
            bm = tl.max(u, 0)
        else:
            # the max of the raw block, transformed (an increasing map): u itself goes straight
            # into the FMA of x below
            bm = softmax_input(tl.max(z, 0), inv_t, cap, HAS_CAP)
        if HAS_REF:
            zr = tl.load(zr_row + idx, mask=inside, other=neg_inf).to(tl.float32)
            ur = softmax_input(zr, inv_t, cap, HAS_CAP)
            bmr = softmax_input(tl.max(zr, 0), inv_t, cap, HAS_CAP)
            if bmr > mr:   # the reference's max grew: shift its sums (rare after the first blocks)
                if mr > neg_inf:
                    if DIV == 0:
                        sdr += ((mr - bmr) * LOG2E) * s
                    if DIV == 1:
                        sqr += ((mr - bmr) * LOG2E) * sr
                scale_r = exp2((mr - bmr) * LOG2E, FAST)
                sr *= scale_r
                if DIV == 1:
                    sq *= scale_r
                    sqr *= scale_r
                mr = bmr
        if bm > m:   # the block's max first: one exp per block to rescale, not one per logit
            scale = exp2((m - bm) * LOG2E, FAST)   # 0 while m = -inf
            if m > neg_inf:
                if WANT_REL:
                    sd += ((m - bm) * LOG2E) * s
                if WANT_MEAN:
                    sw += ((m - bm) * LOG2E) * ws
                if DIV == 1:
                    sq += ((m - bm) * LOG2E) * sr
            if WANT_REL:
                sd *= scale
            if HAS_REF and DIV == 0:
                sdr *= scale
            if WANT_P2:
                s2 *= scale * scale
            s *= scale
            m = bm
        x = (u - tl.where(m > neg_inf, m, 0.0)) * LOG2E
        if WANT_MEAN:
            wv = tl.where(inside, 1.0, 0.0)
            if HAS_CW:
                wv = tl.load(cw_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            sw += wv * tl.where(inside, x, 0.0)
            ws += wv
        if WANT_REL:
            x = tl.maximum(x, _FLOOR)    # -inf (masked, outside the kept set, a -inf bias row): e x = 0
        e = exp2(x, FAST)                # the one exp per logit
        s += e
        if WANT_REL:
            sd += e * x
        if HAS_REF:
            xr = tl.maximum((ur - tl.where(mr > neg_inf, mr, 0.0)) * LOG2E, _FLOOR)
            er = exp2(xr, FAST)
            sr += er
            if DIV == 0:
                sdr += e * xr
            if DIV == 1:   # both heads mask the same rows: er = 0 wherever x is clamped
                sq += er * x
                sqr += er * xr
        if WANT_P2:
            s2 += e * e
    out = part_ptr + pid.to(tl.int64) * _NF
    tl.store(out, m)
    tl.store(out + 1, tl.sum(s, 0))
    if WANT_REL:
        tl.store(out + 2, tl.sum(sd, 0))
    if HAS_REF:
        tl.store(out + 3, mr)
        tl.store(out + 4, tl.sum(sr, 0))
        if DIV == 0:
            tl.store(out + 5, tl.sum(sdr, 0))
        if DIV == 1:
            tl.store(out + 9, tl.sum(sq, 0))
            tl.store(out + 10, tl.sum(sqr, 0))
    if WANT_P2:
        tl.store(out + 6, tl.sum(s2, 0))
    if WANT_MEAN:
        tl.store(out + 7, tl.sum(sw, 0))
        tl.store(out + 8, tl.sum(ws, 0))


@triton.jit
def _row_finish_kernel(part_ptr, z_ptr, y_ptr, inv_t_ptr, lse_ptr, logp_ptr, top1_ptr, ent_ptr, kl_ptr, ekl_ptr,
                       p2_ptr, mean_ptr, lse_r_ptr, V, n_splits, stride_z, cap,
                       WANT_ENT: tl.constexpr, HAS_REF: tl.constexpr, WANT_P2: tl.constexpr, HAS_CAP: tl.constexpr,
                       WANT_MEAN: tl.constexpr, DIV: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    ok = j < n_splits
    p = part_ptr + (row * n_splits + j) * _NF
    neg_inf = float("-inf")
    m = tl.load(p, mask=ok, other=neg_inf)
    s = tl.load(p + 1, mask=ok, other=0.0)
    big = tl.max(m, 0)
    w = tl.exp(m - tl.where(big > neg_inf, big, 0.0))   # each split's rescale to the row's max
    total = tl.sum(s * w, 0)
    log_total = tl.log(total)
    lse = big + log_total
    inv_t = tl.load(inv_t_ptr + row)
    target = tl.load(y_ptr + row)
    u_y = softmax_input(tl.load(z_ptr + row * stride_z + target).to(tl.float32), inv_t, cap, HAS_CAP)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, u_y - lse)
    tl.store(top1_ptr + row, tl.where(u_y >= big, 1.0, 0.0))   # the target's logit is the row's largest
    if WANT_ENT or HAS_REF:   # E_p[u - big]
        sd = tl.load(p + 2, mask=ok, other=0.0) * LN2
        e_rel = tl.sum(tl.where(m > neg_inf, sd + (m - big) * s, 0.0) * w, 0) / total
    if WANT_P2:    # sum_v p_v^2
        s2 = tl.load(p + 6, mask=ok, other=0.0)
        tl.store(p2_ptr + row, tl.sum(s2 * w * w, 0) / (total * total))
    if WANT_ENT:   # H = log total - E_p[u - big]
        tl.store(ent_ptr + row, log_total - e_rel)
    if WANT_MEAN:  # (1/V) sum_v w_v (u_v - lse) = (sum w (u - big) - W log total) / V
        swj = tl.load(p + 7, mask=ok, other=0.0) * LN2
        wsj = tl.load(p + 8, mask=ok, other=0.0)
        sum_rel = tl.sum(swj + tl.where(m > neg_inf, m - big, 0.0) * wsj, 0)
        tl.store(mean_ptr + row, (sum_rel - tl.sum(wsj, 0) * log_total) / V)
    if HAS_REF:
        mr = tl.load(p + 3, mask=ok, other=neg_inf)
        sr = tl.load(p + 4, mask=ok, other=0.0)
        big_r = tl.max(mr, 0)
        wr = tl.exp(mr - tl.where(big_r > neg_inf, big_r, 0.0))   # each split's rescale to the row's max of ur
        total_r = tl.sum(sr * wr, 0)
        log_total_r = tl.log(total_r)
        if DIV == 0:   # KL(p || q) = E_p[u - big] - E_p[ur - big_r] - log total + log total_r
            sdr = tl.load(p + 5, mask=ok, other=0.0) * LN2
            e_rel_r = tl.sum(tl.where(mr > neg_inf, sdr + (mr - big_r) * s, 0.0) * w, 0) / total
            tl.store(ekl_ptr + row, e_rel - e_rel_r + (big - big_r))   # E_p[u - ur], for the gradient
            tl.store(kl_ptr + row, tl.maximum(e_rel - e_rel_r - log_total + log_total_r, 0.0))
        else:          # a teacher's lse: q in the gradient (and the JSD's second sweep)
            tl.store(lse_r_ptr + row, big_r + log_total_r)
        if DIV == 1:   # KL(q || p) = E_q[ur - big_r] - E_q[u - big] - log total_r + log total
            sq = tl.load(p + 9, mask=ok, other=0.0) * LN2
            sqr = tl.load(p + 10, mask=ok, other=0.0) * LN2
            eq_r = tl.sum(tl.where(mr > neg_inf, sqr + (mr - big_r) * sr, 0.0) * wr, 0) / total_r
            eq_u = tl.sum(tl.where(m > neg_inf, sq + (m - big) * sr, 0.0) * wr, 0) / total_r
            tl.store(kl_ptr + row, tl.maximum(eq_r - eq_u - log_total_r + log_total, 0.0))


@triton.jit
def _jsd_partials_kernel(z_ptr, zr_ptr, inv_t_ptr, lse_ptr, lse_r_ptr, out_ptr, V, n_splits, stride_z, stride_zr,
                         log_1mb, log_b, SPLIT_V: tl.constexpr, FAST: tl.constexpr, BLOCK_V: tl.constexpr):
    """The generalized JSD's sums over one (row, split), once both heads' lse are known: sum q (log q - log m)
    and sum p (log p - log m), m = (1 - b) p + b q. Both heads mask the same (-inf) rows: p = q = 0 there."""
    pid, row, v0 = program_split(n_splits, SPLIT_V, BLOCK_V)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    inv_t = tl.load(inv_t_ptr + row)
    lse = tl.load(lse_ptr + row)
    lse_r = tl.load(lse_r_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    acc_q = tl.zeros([BLOCK_V], tl.float32)
    acc_p = tl.zeros([BLOCK_V], tl.float32)
    for i in range(0, SPLIT_V, BLOCK_V):
        idx = v0 + i + offs
        inside = idx < V
        lp = tl.load(z_row + idx, mask=inside, other=float("-inf")).to(tl.float32) * inv_t - lse
        lq = tl.load(zr_row + idx, mask=inside, other=float("-inf")).to(tl.float32) * inv_t - lse_r
        lm = log_mixture(lp, lq, log_1mb, log_b, FAST)
        q = exp2(lq * LOG2E, FAST)
        p = exp2(lp * LOG2E, FAST)
        acc_q += tl.where(q > 0, q * (lq - lm), 0.0)
        acc_p += tl.where(p > 0, p * (lp - lm), 0.0)
    out = out_ptr + pid.to(tl.int64) * 2
    tl.store(out, tl.sum(acc_q, 0))
    tl.store(out + 1, tl.sum(acc_p, 0))


_row_partials_tuned = triton.autotune(
    CONFIGS, key=["V", "WANT_REL", "HAS_REF", "WANT_P2", "HAS_CAP", "HAS_TAU", "WANT_MEAN", "HAS_CW", "DIV"],
    prune_configs_by=PRUNE)(_row_partials_kernel)
_jsd_partials_tuned = triton.autotune(CONFIGS, key=["V"], prune_configs_by=PRUNE)(_jsd_partials_kernel)


def row_partials(z, zr, y, inv_t, *, want_rel: bool, want_p2: bool = False, want_mean: bool = False, cap=None,
                 tau=None, class_weight=None, divergence: str = "reverse_kl") -> torch.Tensor:
    """Partial sums of each (row, vocabulary split) of z [n, V] (and zr): [n, splits, NF] fp32.
    `want_rel`: the relative sums the entropy and the KL need (always with zr). inv_t: 1 / T, a float
    or per row; cap: the soft cap c or None; tau [n]: each row's kept-set threshold on the raw
    logits or None; class_weight [V]: the mean log-prob's w; divergence: what zr's statistic is
    (`launch.DIVERGENCES`; a teacher's forward_kl / jsd: no cap, no truncation)."""
    z, zr = rowmajor(z), rowmajor(zr)
    n, vocab = z.shape
    warn_if_unaligned(vocab)
    sv = split_v()
    n_splits = triton.cdiv(vocab, sv)
    partials = torch.empty(n, n_splits, NF, dtype=torch.float32, device=z.device)
    if n:
        inv = per_row(inv_t, n, z.device)
        args = (z, z if zr is None else zr, y, inv, vec(tau, inv), vec(class_weight, inv), partials, vocab, n_splits,
                z.stride(0), 0 if zr is None else zr.stride(0), float(cap or 1.0))
        flags = dict(WANT_REL=want_rel or zr is not None, HAS_REF=zr is not None, WANT_P2=want_p2,
                     HAS_CAP=cap is not None, HAS_TAU=tau is not None, WANT_MEAN=want_mean,
                     HAS_CW=class_weight is not None and want_mean, DIV=DIVERGENCES[divergence], SPLIT_V=sv)
        launch(_row_partials_tuned, _row_partials_kernel, (n * n_splits,), args, flags)
    return partials


def finish_row_stats(partials, z, y, inv_t, *, lse, logp, top1, ent=None, kl=None, ekl=None, sum_p2=None,
                     mean_logp=None, cap=None, divergence: str = "reverse_kl", lse_r=None) -> None:
    """Combine each row's partials and write lse, logp and top1 (and the entropy, sum_v p_v^2, the
    mean log-prob, and with reference partials the exact KL and E_p[u - ur]) of every row of z. A
    teacher's partials (divergence forward_kl / jsd) give its lse (`lse_r`), and the forward KL `kl`."""
    z = rowmajor(z)
    n, n_splits, _ = partials.shape
    if n == 0:
        return
    args = (partials, z, y, per_row(inv_t, n, z.device), lse, logp, top1, lse if ent is None else ent,
            lse if kl is None else kl, lse if ekl is None else ekl, lse if sum_p2 is None else sum_p2,
            lse if mean_logp is None else mean_logp, lse if lse_r is None else lse_r, z.shape[1], n_splits,
            z.stride(0), float(cap or 1.0))
    _row_finish_kernel[(n,)](*args, WANT_ENT=ent is not None, HAS_REF=lse_r is not None or kl is not None,
                             WANT_P2=sum_p2 is not None, HAS_CAP=cap is not None, WANT_MEAN=mean_logp is not None,
                             DIV=DIVERGENCES[divergence], BLOCK_S=triton.next_power_of_2(n_splits))


def jsd_sums(z, zr, inv_t, *, lse, lse_r, jsd_beta: float) -> torch.Tensor:
    """[n, 2]: sum q (log q - log m) and sum p (log p - log m) of every row of z / zr (the generalized
    JSD, m = (1 - b) p + b q), from both heads' lse: a second read of the two chunks."""
    z, zr = rowmajor(z), rowmajor(zr)
    n, vocab = z.shape
    sv = split_v()
    n_splits = triton.cdiv(vocab, sv)
    sums = torch.empty(n, n_splits, 2, dtype=torch.float32, device=z.device)
    if n:
        args = (z, zr, per_row(inv_t, n, z.device), lse, lse_r, sums, vocab, n_splits, z.stride(0), zr.stride(0),
                *mixture_logs(jsd_beta))
        launch(_jsd_partials_tuned, _jsd_partials_kernel, (n * n_splits,), args, dict(SPLIT_V=sv))
    return sums.sum(1)


def row_stats(z, zr, y, inv_t, *, lse, logp, top1, ent=None, kl=None, ekl=None, sum_p2=None, mean_logp=None,
              cap=None, tau=None, class_weight=None, divergence: str = "reverse_kl", jsd_beta: float = 0.5,
              lse_r=None, e_pm=None) -> None:
    """Both steps: the statistics of every row of z. With zr, kl and the divergence's own outputs must be
    given: ekl (reverse_kl: a reference, or a teacher's reverse KL), lse_r (a teacher's forward_kl), lse_r
    and e_pm = E_p[log p - log m] (jsd, mixture weight jsd_beta: a second read of both chunks)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    wants = dict(reverse_kl=(ekl,), forward_kl=(lse_r,), jsd=(lse_r, e_pm))[divergence]
    if (zr is None) != (kl is None) or any((t is None) != (zr is None) for t in wants):
        raise ValueError(f"a second-head chunk zr comes with kl and {divergence}'s outputs "
                         f"({dict(reverse_kl='ekl', forward_kl='lse_r', jsd='lse_r, e_pm')[divergence]})")
    teacher = zr is not None and divergence != "reverse_kl"
    if teacher and (cap is not None or tau is not None):
        raise ValueError(f"divergence={divergence!r} takes no soft cap and no truncation")
    partials = row_partials(z, zr, y, inv_t, want_rel=ent is not None, want_p2=sum_p2 is not None,
                            want_mean=mean_logp is not None, cap=cap, tau=tau, class_weight=class_weight,
                            divergence=divergence if zr is not None else "reverse_kl")
    finish_row_stats(partials, z, y, inv_t, lse=lse, logp=logp, top1=top1, ent=ent,
                     kl=kl if divergence != "jsd" else None, ekl=ekl, sum_p2=sum_p2, mean_logp=mean_logp, cap=cap,
                     divergence=divergence if zr is not None else "reverse_kl", lse_r=lse_r if teacher else None)
    if teacher and divergence == "jsd":
        s = jsd_sums(z, zr, inv_t, lse=lse, lse_r=lse_r, jsd_beta=jsd_beta)
        e_pm.copy_(s[:, 1])
        kl.copy_((jsd_beta * s[:, 0] + (1 - jsd_beta) * s[:, 1]).clamp_min(0))


def check(n=7, vocab=1500, device=None, seed=0) -> float:
    """The largest error of every statistic against float64 torch on a random chunk with a
    reference head, a soft cap, a temperature per row, several splits and a ragged last block."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (3 * torch.randn(n, vocab, generator=g)).to(device)
    zr = (z.cpu() + torch.randn(n, vocab, generator=g)).to(device)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    inv_t = (0.5 + torch.rand(n, generator=g)).to(device)
    cap = 5.0
    out = {k: torch.empty(n, device=device) for k in ("lse", "logp", "top1", "ent", "kl", "ekl", "sum_p2",
                                                        "mean_logp")}
    row_stats(z, zr, y, inv_t, cap=cap, **out)
    t = inv_t.double()[:, None]
    u, ur = cap * torch.tanh(z.double() / cap) * t, cap * torch.tanh(zr.double() / cap) * t
    lp, lr = u.log_softmax(1), ur.log_softmax(1)
    p = lp.exp()
    ref = dict(lse=u.logsumexp(1), logp=lp.gather(1, y[:, None])[:, 0], ent=-(p * lp).sum(1),
               kl=(p * (lp - lr)).sum(1), ekl=(p * (u - ur)).sum(1), sum_p2=(p * p).sum(1),
               mean_logp=lp.mean(1), top1=(z.gather(1, y[:, None])[:, 0] >= z.amax(1)).double())
    return max(float((out[k].double() - ref[k]).abs().max()) for k in ref)


if __name__ == "__main__":
    e = check()
    print(f"row_stats: max abs error vs float64 torch {e:.2e}")
    raise SystemExit(0 if e < 1e-4 else 1)
