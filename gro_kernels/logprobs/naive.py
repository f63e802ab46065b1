"""The `naive` backend: materializes the `[N, V]` logits and lets autograd differentiate.

Readable on purpose: it is the reference the tests compare the fused backends against. Only the
rows that count (targets != ignore_index) are computed, so nothing at an ignored position (a NaN
hidden state, padding) reaches a gradient. The logits are computed in the statistics dtype (fp32
for 16-bit inputs: what head_precision="fp32" promises); the soft cap, temperature and kept set
are `transform.py`'s.
"""
from __future__ import annotations

import math

import torch

from . import transform as head
from .engine import REVERSE_KL
from .rows import STAT_NAMES, scatter_rows, stat_dtype, take_rows, valid_rows


class _Linear(torch.autograd.Function):
    """h @ W^T, whose backward GEMMs run with autocast off: `backward()` called inside
    `torch.autocast` would otherwise run them in 16 bits (the forward is already outside autocast,
    in api.token_logprobs)."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return h @ w.T

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad
        with torch.autocast(g.device.type, enabled=False):
            return (g @ w if need_h else None), (g.T @ h if need_w else None)


def _logits(hidden, weight, bias, dtype):
    z = _Linear.apply(hidden.to(dtype), weight.to(dtype))
    return z if bias is None else z + bias.to(dtype)


def divergence_to(logprobs, teacher_logprobs, div):
    """The per-row divergence to the teacher, from both log-softmaxes (engine.Divergence). 0 log 0 = 0 at
    vocabulary rows a -inf bias masks: the logs are replaced before any product (as for the entropy)."""
    p = logprobs.exp()
    live_p = p > 0
    if div.kind == "reverse_kl":
        return (p * torch.where(live_p, logprobs - teacher_logprobs, 0.0)).sum(-1)
    q = teacher_logprobs.exp()
    live_q = q > 0
    if div.kind == "forward_kl":
        return (q * torch.where(live_q, teacher_logprobs - logprobs, 0.0)).sum(-1)
    b = div.beta
    dead = ~live_p & ~live_q                      # masked in both heads: m = 0 too
    lp, lq = torch.where(dead, 0.0, logprobs), torch.where(dead, 0.0, teacher_logprobs)
    log_m = torch.logaddexp(lp + math.log1p(-b), lq + math.log(b))
    return (b * (q * torch.where(live_q, lq - log_m, 0.0)).sum(-1)
            + (1 - b) * (p * torch.where(live_p, lp - log_m, 0.0)).sum(-1))


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, transform: head.Transform,
                head_precision, ignore_index, return_entropy, return_kl, return_sum_p2=False,
                return_mean_logp=False, class_weight=None, teacher=None, divergence=None, **options):
    if options.pop("shard", None) is not None:
        raise ValueError("backend='naive' does not take tp_group (it materializes one device's logits): "
                         "use backend='torch' or 'triton'")
    if options:
        raise TypeError(f"backend='naive' takes no backend options, got {sorted(options)}")
    tf = transform
    dtype = stat_dtype(hidden.dtype)
    n = targets.shape[0]
    rows = valid_rows(targets, ignore_index)
    y = take_rows(targets, rows)
    tf = tf.rows(rows) if rows is not None else tf
    with head.gemm_precision(head_precision, hidden.device):
        z = _logits(take_rows(hidden, rows), weight, bias, dtype)
        zr = None
        if return_kl:
            with torch.no_grad():  # the reference head is frozen
                zr = _logits(take_rows(ref_hidden, rows), ref_weight, ref_bias, dtype)
    u = head.transform(z, tf)
    keep = None
    if tf.truncates:
        with torch.no_grad():  # the kept set is a constant of the gradient
            keep = head.kept_mask(z, y, head.kept_threshold(z.detach(), tf))
        u = u.masked_fill(~keep, float("-inf"))
    logprobs = torch.log_softmax(u, dim=-1)
    p = logprobs.exp()
    # 0 log 0 = 0: outside the kept set, and at a vocabulary row masked with a -inf bias, p = 0 and
    # log p = -inf. The log is replaced before the product (a `where` after it would still send NaN
    # into the gradient).
    live = p > 0
    kept_logprobs = torch.where(live, logprobs, 0.0)

    def out(v):
        return scatter_rows(v, rows, n)

    stats = dict.fromkeys(STAT_NAMES)
    stats.update(logp=out(logprobs.gather(1, y[:, None])[:, 0]), lse=out(torch.logsumexp(u, dim=-1)))
    stats["is_top1"] = out((z.gather(1, y[:, None])[:, 0] >= z.amax(1)).detach())
    if return_entropy:
        stats["entropy"] = out(-(p * kept_logprobs).sum(-1))
    if return_kl:
        ref_logprobs = torch.log_softmax(head.transform(zr, tf.without_truncation()), dim=-1)
        stats["kl"] = out(divergence_to(logprobs, ref_logprobs, REVERSE_KL))
    if return_sum_p2:
        stats["sum_p2"] = out((p * p).sum(-1)).detach()
    if return_mean_logp:
        w = 1.0 if class_weight is None else class_weight.to(dtype)
        stats["mean_logp"] = out((w * logprobs).sum(-1) / logprobs.shape[-1])
    if teacher is not None:
        t_hidden, t_weight, t_bias = teacher
        with torch.no_grad(), head.gemm_precision(head_precision, hidden.device):  # the teacher is frozen
            zt = _logits(take_rows(t_hidden, rows), t_weight, t_bias, dtype)
        t_logprobs = torch.log_softmax(head.transform(zt, tf.without_truncation()), dim=-1)
        stats["distill"] = out(divergence_to(logprobs, t_logprobs, divergence))
    return stats
