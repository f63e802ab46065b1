"""The `torch` backend: chunked over tokens and vocabulary, any device.

Forward sweeps the vocabulary in chunks with an online log-sum-exp, so no `[tokens, vocab]`
tensor ever exists; backward recomputes each logits chunk. The workspace is bounded by
`chunk_elements` (default 2**21 = 2M entries, 8 MiB in float32): a chunk holds at most
`chunk_elements` logits, and at most four such buffers are alive at once (logits, softmax,
reference logits, one transient; the gradient reuses the logits buffer), so the workspace is at most 32 MiB
whatever the number of tokens or the vocabulary. Gradients of hidden, weight and bias accumulate
in float32 (for bf16/fp16 weights that is one extra gradient-sized float32 buffer).

Math, with z = (h W^T + b) / T, p = softmax(z), zr the reference head's logits:
    logp = z_y - lse,   H = lse - E_p[z],   KL = E_p[z - zr] - lse + lse_ref
    dlogp/dz = onehot - p,   dH/dz = -p (z - E_p[z]),   dKL/dz = p ((z - zr) - E_p[z - zr])
so the logits gradient of `g_logp*logp + g_H*H + g_KL*KL` is `g_logp*onehot + p*(alpha + beta*z + gamma*zr)`
with per-token alpha, beta, gamma: one affine expression per chunk.
"""
from __future__ import annotations

import torch

from .api import scatter_rows, stat_dtype, take_rows, valid_rows

# 2M logits = 8 MiB in float32 (512 tokens x 4096 vocab): big enough for efficient matmuls, small
# enough that the elementwise passes over a chunk mostly stay in cache; on 2 CPU cores (N=2048,
# d=512, V=32768) it measured faster than 1M- and 4M-element chunks side by side.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
DEFAULT_CHUNK_VOCAB = 4096


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _logits(h, weight, bias, a, b, inv_t, dtype):
    z = h @ weight[a:b].to(dtype).T
    if bias is not None:
        z += bias[a:b].to(dtype)
    return z if inv_t == 1.0 else z.mul_(inv_t)


def _rowdot(a, b):
    """Per-row dot product without a chunk-sized temporary."""
    return torch.einsum("nv,nv->n", a, b)


def _chunk_sizes(n_tokens: int, vocab: int, chunk_elements: int):
    cv = min(vocab, DEFAULT_CHUNK_VOCAB, chunk_elements)
    ct = max(1, min(n_tokens, chunk_elements // cv))
    return ct, cv


class _ChunkedTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                temperature, return_entropy, return_kl, chunk_elements):
        # `rows`: indices of the non-ignored tokens (None when all are valid); only they are computed.
        dtype = stat_dtype(hidden.dtype)
        inv_t = 1.0 / temperature
        n_all = targets.shape[0]
        h, y = take_rows(hidden, rows), take_rows(targets, rows)
        hr = take_rows(ref_hidden, rows) if return_kl else None
        n, vocab = h.shape[0], weight.shape[0]
        ct, cv = _chunk_sizes(n, vocab, chunk_elements)

        lse = torch.zeros(n, dtype=dtype, device=h.device)
        ez = torch.zeros_like(lse) if return_entropy else None
        ekl = torch.zeros_like(lse) if return_kl else None
        lse_ref = torch.zeros_like(lse) if return_kl else None
        z_target = torch.zeros_like(lse)
        with torch.no_grad():
            for s, e in _chunks(n, ct):
                hc = h[s:e].to(dtype)
                hrc = hr[s:e].to(dtype) if return_kl else None
                yc = y[s:e]
                m = torch.full((e - s,), float("-inf"), dtype=dtype, device=h.device)
                se = torch.zeros_like(m)  # running sum exp(z - m)
                sz = torch.zeros_like(m)  # running sum exp(z - m) * z
                skl = torch.zeros_like(m)  # running sum exp(z - m) * (z - zr)
                mr = torch.full_like(m, float("-inf"))
                ser = torch.zeros_like(m)
                for a, b in _chunks(vocab, cv):
                    z = _logits(hc, weight, bias, a, b, inv_t, dtype)
                    inside = (yc >= a) & (yc < b)
                    picked = z.gather(1, (yc - a).clamp(0, b - a - 1)[:, None])[:, 0]
                    z_target[s:e] = torch.where(inside, picked, z_target[s:e])
                    m_new = torch.maximum(m, z.amax(1))
                    scale = torch.exp(m - m_new)
                    p = torch.sub(z, m_new[:, None]).exp_()
                    se = se * scale + p.sum(1)
                    if return_entropy:
                        sz = sz * scale + _rowdot(p, z)
                    if return_kl:
                        zr = _logits(hrc, ref_weight, ref_bias, a, b, inv_t, dtype)
                        mr_new = torch.maximum(mr, zr.amax(1))
                        skl = skl * scale + _rowdot(p, z.sub_(zr))
                        ser = ser * torch.exp(mr - mr_new) + zr.sub_(mr_new[:, None]).exp_().sum(1)
                        mr = mr_new
                    m = m_new
                lse[s:e] = m + torch.log(se)
                if return_entropy:
                    ez[s:e] = sz / se
                if return_kl:
                    lse_ref[s:e] = mr + torch.log(ser)
                    ekl[s:e] = skl / se

        logp = scatter_rows(z_target - lse, rows, n_all)
        entropy = scatter_rows(lse - ez, rows, n_all) if return_entropy else None
        # Clamp tiny negative round-off: KL is non-negative by definition.
        kl = scatter_rows((ekl - lse + lse_ref).clamp_min(0), rows, n_all) if return_kl else None

        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                              lse, ez, ekl)
        ctx.config = (temperature, return_entropy, return_kl, chunk_elements)
        outs = (logp, entropy, kl, scatter_rows(lse, rows, n_all))
        ctx.set_materialize_grads(False)  # outputs nobody differentiates arrive as None: skip their terms
        return tuple(o if o is not None else torch.zeros(0, dtype=dtype, device=h.device) for o in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent, g_kl, g_lse):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, lse, ez, ekl = ctx.saved_tensors
        temperature, return_entropy, return_kl, chunk_elements = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = lse.dtype
        inv_t = 1.0 / temperature
        n_all, vocab = targets.shape[0], weight.shape[0]

        def gather(g):
            return None if g is None or g.numel() == 0 else take_rows(g.to(dtype), rows)

        gl, gs = gather(g_logp), gather(g_lse)
        gh = gather(g_ent) if return_entropy else None
        gk = gather(g_kl) if return_kl else None
        h, y = take_rows(hidden, rows), take_rows(targets, rows)
        hr = take_rows(ref_hidden, rows) if gk is not None else None
        n = h.shape[0]
        zeros = torch.zeros(n, dtype=dtype, device=h.device)
        # dz = (gl*onehot + p*(alpha + beta*z - gk*zr)) / T, see the module docstring; dlse/dz = p.
        # 1/T is folded into the per-token coefficients so no pass over the chunk applies it.
        gl = zeros if gl is None else gl
        alpha = -gl if gs is None else gs - gl
        beta = None
        if gh is not None:
            alpha = alpha + gh * ez
            beta = -gh
        if gk is not None:
            alpha = alpha - gk * ekl
            beta = gk if beta is None else beta + gk
            gk = gk * inv_t
        gl, alpha = gl * inv_t, alpha * inv_t
        beta = None if beta is None else beta * inv_t

        dh = torch.zeros(n, h.shape[1], dtype=dtype, device=h.device) if need_h else None
        dw = torch.zeros(vocab, weight.shape[1], dtype=dtype, device=h.device) if need_w else None
        db = torch.zeros(vocab, dtype=dtype, device=h.device) if (need_b and bias is not None) else None
        ct, cv = _chunk_sizes(n, vocab, chunk_elements)
        for s, e in _chunks(n, ct):
            hc = h[s:e].to(dtype)
            yc = y[s:e]
            hrc = hr[s:e].to(dtype) if gk is not None else None
            for a, b in _chunks(vocab, cv):
                z = _logits(hc, weight, bias, a, b, inv_t, dtype)
                if beta is None:  # log-prob (and lse) only: dz = p * alpha, computed in place
                    dz = z.sub_(lse[s:e, None]).exp_().mul_(alpha[s:e, None])
                else:
                    p = torch.sub(z, lse[s:e, None]).exp_()
                    t = z.mul_(beta[s:e, None]).add_(alpha[s:e, None])
                    if gk is not None:
                        zr = _logits(hrc, ref_weight, ref_bias, a, b, inv_t, dtype)
                        t.sub_(zr.mul_(gk[s:e, None]))
                    dz = t.mul_(p)
                inside = ((yc >= a) & (yc < b)).nonzero()[:, 0]
                if inside.numel():
                    dz.index_put_((inside, yc[inside] - a), gl[s:e][inside], accumulate=True)
                # addmm_ accumulates inside the GEMM: no temporary, no extra pass.
                if dh is not None:
                    dh[s:e].addmm_(dz, weight[a:b].to(dtype))
                if dw is not None:
                    dw[a:b].addmm_(dz.T, hc)
                if db is not None:
                    db[a:b] += dz.sum(0)

        grad_h = None if dh is None else scatter_rows(dh.to(hidden.dtype), rows, n_all)
        return (grad_h, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None, None, None, None)


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *,
                temperature, ignore_index, return_entropy, return_kl, chunk_elements=DEFAULT_CHUNK_ELEMENTS,
                **options):
    if options:
        raise TypeError(f"backend='torch' takes only the option chunk_elements, got {sorted(options)}")
    if not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    rows = valid_rows(targets, ignore_index)
    if return_kl:  # the reference head is frozen
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    logp, ent, kl, lse = _ChunkedTokenStats.apply(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
        temperature, return_entropy, return_kl, chunk_elements,
    )
    return logp, ent if return_entropy else None, kl if return_kl else None, lse
