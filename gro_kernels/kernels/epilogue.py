"""Layer 1: the two memory-bound Triton kernels that sit between the vendor GEMMs.

The logits chunk z [ct, V] (fp32, from cuBLAS) is read once by `_row_stats_kernel` and read and
written once by `_logits_grad_kernel`; nothing else touches it. One program per row (a 1-D grid,
int64 row offsets), a loop over the vocabulary in BLOCK_V-wide vectors with per-lane running
max / sums (an online log-sum-exp with -inf as the identity, so all-negative or huge logits are
exact), merged across lanes at the end. Block sizes and warps autotune on the user's GPU, keyed on
V and the dtypes; the gradient kernel writes its input in place, so tuning restores it.

Math (u = softcap(z) / T per row, p = softmax(u) over the row's kept set z >= tau, plus the target):
see `gro_kernels/logprobs/engine.py` and `gro_kernels/logprobs/transform.py`.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

# Small and few: the kernels stream memory; wider vectors only add registers. (4096 lanes on 4
# warps spills 96 bytes in the statistics kernel with a reference head on sm_90: left out.)
_CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in ((1024, 4), (1024, 8), (2048, 4), (2048, 8),
                                                                       (4096, 8))]
_INTERPRETER_BLOCK_V = 256


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp (libdevice is not there under the interpreter): a Taylor polynomial below
    |x| = 0.25, where 1 - exp(-2|x|) would cancel (its first left-out term is < 1e-8 relative there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _transformed(z, cap, inv_t, HAS_CAP: tl.constexpr):
    """u = c tanh(z / c) / T with a soft cap (a -inf logit stays -inf), else z / T (logprobs/transform.py)."""
    if HAS_CAP:
        u = tl.where(z == float("-inf"), z, cap * _tanh(z / cap)) * inv_t
    else:
        u = z * inv_t
    return u


@triton.jit
def _row_stats_kernel(z_ptr, zr_ptr, y_ptr, inv_t_ptr, tau_ptr, cw_ptr, lse_ptr, logp_ptr, ent_ptr, kl_ptr, ekl_ptr,
                      p2_ptr, top1_ptr, mean_ptr, V, stride_z, stride_zr, cap,
                      WANT_ENT: tl.constexpr, HAS_REF: tl.constexpr, WANT_P2: tl.constexpr, HAS_CAP: tl.constexpr,
                      HAS_TAU: tl.constexpr, WANT_MEAN: tl.constexpr, HAS_CW: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    inv_t = tl.load(inv_t_ptr + row)
    target = tl.load(y_ptr + row)
    tau = neg_inf
    if HAS_TAU:
        tau = tl.load(tau_ptr + row)   # the kept set: z >= tau, and the target
    m = tl.full([BLOCK_V], neg_inf, tl.float32)      # per-lane running max of u
    s = tl.zeros([BLOCK_V], tl.float32)              # sum exp(u - m)
    sd = tl.zeros([BLOCK_V], tl.float32)             # sum exp(u - m) (u - m): relative, no cancellation
    mr = tl.full([BLOCK_V], neg_inf, tl.float32)     # reference: running max, sum
    sr = tl.zeros([BLOCK_V], tl.float32)
    sdr = tl.zeros([BLOCK_V], tl.float32)            # sum exp(u - m) (ur - mr): relative too
    s2 = tl.zeros([BLOCK_V], tl.float32)             # sum exp(u - m)^2
    sw = tl.zeros([BLOCK_V], tl.float32)             # sum w (u - m) over the whole vocabulary (mean log-prob)
    ws = tl.zeros([BLOCK_V], tl.float32)             # sum w
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        inside = idx < V
        z = tl.load(z_row + idx, mask=inside, other=neg_inf).to(tl.float32)
        u = _transformed(z, cap, inv_t, HAS_CAP)
        if HAS_TAU:
            u = tl.where((z >= tau) | (idx == target), u, neg_inf)
        m_new = tl.maximum(m, u)
        # A lane that has seen only -inf keeps max 0 for the exponent: exp(-inf - 0) = 0, no NaN.
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        scale = tl.exp(m - m_safe)
        e = tl.exp(u - m_safe)
        shift = tl.where(m == neg_inf, 0.0, m - m_safe)
        if WANT_ENT or HAS_REF:
            # u = -inf (past the row's end, outside the kept set, or a vocabulary row masked by a -inf
            # bias): e = 0 and 0 * (u - m) must count as 0, not NaN.
            sd = scale * (sd + shift * s) + e * tl.where(u == neg_inf, 0.0, u - m_safe)
        if WANT_MEAN:
            wv = tl.where(inside, 1.0, 0.0)
            if HAS_CW:
                wv = tl.load(cw_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            sw = sw + shift * ws + wv * tl.where(inside, u - m_safe, 0.0)
            ws = ws + wv
        if HAS_REF:
            ur = _transformed(tl.load(zr_row + idx, mask=inside, other=neg_inf).to(tl.float32), cap, inv_t, HAS_CAP)
            mr_new = tl.maximum(mr, ur)
            mr_safe = tl.where(mr_new == neg_inf, 0.0, mr_new)
            shift_r = tl.where(mr == neg_inf, 0.0, mr - mr_safe)
            # ur = -inf only where u = -inf too (api.py refuses the rest): again 0, not 0 * -inf.
            sdr = scale * (sdr + shift_r * s) + e * tl.where(ur == neg_inf, 0.0, ur - mr_safe)
            sr = sr * tl.exp(mr - mr_safe) + tl.exp(ur - mr_safe)
            mr = mr_new
        if WANT_P2:
            s2 = s2 * scale * scale + e * e
        s = s * scale + e
        m = m_new
    big = tl.max(m, 0)
    w = tl.exp(m - big)
    total = tl.sum(s * w, 0)
    log_total = tl.log(total)
    lse = big + log_total
    u_y = _transformed(tl.load(z_row + target).to(tl.float32), cap, inv_t, HAS_CAP)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, u_y - lse)
    tl.store(top1_ptr + row, tl.where(u_y >= big, 1.0, 0.0))   # the target's logit is the row's largest
    if WANT_ENT or HAS_REF:
        e_rel = tl.sum(tl.where(m == neg_inf, 0.0, sd + (m - big) * s) * w, 0) / total    # E_p[u - big]
    if WANT_P2:    # sum_v p_v^2
        tl.store(p2_ptr + row, tl.sum(s2 * w * w, 0) / (total * total))
    if WANT_ENT:   # H = log total - E_p[u - big]
        tl.store(ent_ptr + row, log_total - e_rel)
    if WANT_MEAN:  # (1/V) sum_v w_v (u_v - lse) = (sum w (u - big) - W log total) / V
        sum_rel = tl.sum(sw + tl.where(m == neg_inf, 0.0, m - big) * ws, 0)
        tl.store(mean_ptr + row, (sum_rel - tl.sum(ws, 0) * log_total) / V)
    if HAS_REF:    # KL = E_p[u - big] - E_p[ur - big_r] - log total + log total_r
        big_r = tl.max(mr, 0)
        log_total_r = tl.log(tl.sum(sr * tl.exp(mr - big_r), 0))
        e_rel_r = tl.sum(tl.where(mr == neg_inf, 0.0, sdr + (mr - big_r) * s) * w, 0) / total
        tl.store(ekl_ptr + row, e_rel - e_rel_r + (big - big_r))   # E_p[u - ur], for the gradient
        tl.store(kl_ptr + row, tl.maximum(e_rel - e_rel_r - log_total + log_total_r, 0.0))


@triton.jit
def _logits_grad_kernel(z_ptr, zr_ptr, dz_ptr, y_ptr, inv_t_ptr, tau_ptr, cw_ptr, lse_ptr, gl_ptr, alpha_ptr,
                        beta_ptr, gamma_ptr, eta_ptr, V, stride_z, stride_zr, stride_dz, cap,
                        HAS_BETA: tl.constexpr, HAS_REF: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TAU: tl.constexpr,
                        HAS_ETA: tl.constexpr, HAS_CW: tl.constexpr, BLOCK_V: tl.constexpr):
    # dz = (gl * onehot + p * (alpha + beta u + gamma ur) + eta w) * (1 - tanh^2(z / c)), p = 0 outside the
    # kept set. dz may alias z: each program owns its row and stores a block only after loading it, and a
    # 16-bit dz row lies in the first half of its own fp32 row, behind the loads, so no program reads what
    # another has written.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zr_row = zr_ptr + row * stride_zr
    dz_row = dz_ptr + row * stride_dz
    inv_t = tl.load(inv_t_ptr + row)
    lse = tl.load(lse_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    gl = tl.load(gl_ptr + row)
    target = tl.load(y_ptr + row)
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
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        inside = idx < V
        z = tl.load(z_row + idx, mask=inside, other=0.0).to(tl.float32)
        keep = inside
        if HAS_CAP:
            th = _tanh(z / cap)
            u = cap * th * inv_t
            keep = keep & (z > float("-inf"))   # a masked (-inf) logit stays out under the cap
        else:
            u = z * inv_t
        if HAS_TAU:
            keep = keep & ((z >= tau) | (idx == target))
        p = tl.where(keep, tl.exp(u - lse), 0.0)
        t = alpha
        if HAS_BETA:
            t = t + beta * u
        if HAS_REF:
            ur = _transformed(tl.load(zr_row + idx, mask=inside, other=0.0).to(tl.float32), cap, inv_t, HAS_CAP)
            t = t + gamma * ur
        # p = 0 (a -inf bias row, outside the kept set): dz is exactly 0 there, whatever t (inf, or NaN
        # from 0 * -inf) is.
        d = tl.where(p == 0.0, 0.0, p * t) + tl.where(idx == target, gl, 0.0)
        if HAS_ETA:
            if HAS_CW:
                d = d + eta * tl.load(cw_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            else:
                d = d + eta
        if HAS_CAP:
            d = d * (1.0 - th * th)   # the soft cap's chain rule
        tl.store(dz_row + idx, d.to(dz_ptr.dtype.element_ty), mask=inside)


_row_stats_tuned = triton.autotune(
    _CONFIGS, key=["V", "WANT_ENT", "HAS_REF", "WANT_P2", "HAS_CAP", "HAS_TAU", "WANT_MEAN", "HAS_CW"])(_row_stats_kernel)
_logits_grad_tuned = triton.autotune(_CONFIGS, key=["V", "HAS_BETA", "HAS_REF", "HAS_CAP", "HAS_TAU", "HAS_ETA", "HAS_CW"],
                                     restore_value=["z_ptr"])(_logits_grad_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_warned_unaligned = False


def _launch(tuned, raw, n, vocab, args, flags):
    global _warned_unaligned
    if n == 0:
        return
    if vocab % 4 and not _warned_unaligned and not _interpreting():
        # fp32 rows of V % 4 != 0 logits are not 16-byte aligned: the loads fall back to 32 bits.
        warnings.warn(f"vocabulary size {vocab} is not a multiple of 4: the epilogue kernels lose their "
                      "128-bit loads (pad the LM head to a multiple of 64 rows for full speed)")
        _warned_unaligned = True
    if _interpreting():  # numpy underneath: no timing to tune on
        raw[(n,)](*args, **flags, BLOCK_V=_INTERPRETER_BLOCK_V)
    else:
        tuned[(n,)](*args, **flags)


def _rowmajor(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _per_row(inv_t, n, device):
    """1 / T of each row as an fp32 vector (a scalar temperature broadcast)."""
    if isinstance(inv_t, torch.Tensor):
        return inv_t.to(device=device, dtype=torch.float32).contiguous()
    return torch.full((n,), float(inv_t), dtype=torch.float32, device=device)


def _vec(t, fallback):
    """An fp32 row vector argument, or `fallback` (never read) when absent."""
    return fallback if t is None else t.to(torch.float32).contiguous()


def launch_row_stats(z, zr, y, inv_t, *, lse, logp, top1, ent=None, kl=None, ekl=None, sum_p2=None, mean_logp=None,
                     cap=None, tau=None, class_weight=None):
    """Fill lse, logp and top1 (and the entropy, sum_v p_v^2, the mean log-prob; with zr, the exact KL and
    E_p[u - ur]) for each row of z. inv_t: 1 / T, a float or per row; cap: the soft cap c or None; tau [n]:
    the raw-logit threshold of each row's kept set or None; class_weight [V]: the mean log-prob's w."""
    z, zr = _rowmajor(z), _rowmajor(zr)
    n, vocab = z.shape
    args = (z, lse if zr is None else zr, y, _per_row(inv_t, n, z.device), _vec(tau, lse), _vec(class_weight, lse),
            lse, logp, lse if ent is None else ent, lse if kl is None else kl, lse if ekl is None else ekl,
            lse if sum_p2 is None else sum_p2, top1, lse if mean_logp is None else mean_logp,
            vocab, z.stride(0), 0 if zr is None else zr.stride(0), float(cap or 1.0))
    _launch(_row_stats_tuned, _row_stats_kernel, n, vocab, args,
            dict(WANT_ENT=ent is not None, HAS_REF=zr is not None, WANT_P2=sum_p2 is not None, HAS_CAP=cap is not None,
                 HAS_TAU=tau is not None, WANT_MEAN=mean_logp is not None, HAS_CW=class_weight is not None))


def launch_logits_grad(z, zr, y, inv_t, *, lse, gl, alpha, beta=None, gamma=None, out_dtype=torch.float32,
                       cap=None, tau=None, eta=None, class_weight=None):
    """The logits gradient dz [ct, V] in `out_dtype`, written over z's memory (a 16-bit dz is a
    strided view of the first half of each fp32 row). Under the interpreter dz is a new tensor:
    the interpreter copies each argument, so aliasing arguments would not write back in order."""
    zr = None if gamma is None else _rowmajor(zr)  # the reference chunk matters only through gamma
    z = _rowmajor(z)
    n, vocab = z.shape
    if _interpreting():
        dz = torch.empty(n, vocab, dtype=out_dtype, device=z.device)
    elif out_dtype == z.dtype:
        dz = z
    else:
        if z.dtype != torch.float32 or out_dtype not in (torch.float16, torch.bfloat16) or not z.is_contiguous():
            raise ValueError(f"in-place dz needs a contiguous fp32 z and a 16-bit out_dtype, got {z.dtype} -> {out_dtype}")
        dz = z.view(out_dtype)[:, :vocab]   # row stride 2V: each row's first half
    args = (z, lse if zr is None else zr, dz, y, _per_row(inv_t, n, z.device), _vec(tau, lse), _vec(class_weight, lse),
            lse, gl, alpha, lse if beta is None else beta, lse if gamma is None else gamma,
            lse if eta is None else eta, vocab, z.stride(0), 0 if zr is None else zr.stride(0), dz.stride(0),
            float(cap or 1.0))
    _launch(_logits_grad_tuned, _logits_grad_kernel, n, vocab, args,
            dict(HAS_BETA=beta is not None, HAS_REF=zr is not None, HAS_CAP=cap is not None, HAS_TAU=tau is not None,
                 HAS_ETA=eta is not None, HAS_CW=class_weight is not None and eta is not None))
    return dz
