"""The `naive` backend: materializes the `[N, V]` logits and lets autograd differentiate.

Readable on purpose: it is the reference the tests compare the fused backends against. Only the
rows that count (targets != ignore_index) are computed, so nothing at an ignored position (a NaN
hidden state, padding) reaches a gradient. The logits are computed in the statistics dtype (fp32
for 16-bit inputs: what head_precision="fp32" promises); the soft cap, temperature and kept set
are `transform.py`'s.
"""
from __future__ import annotations

import torch

from .api import STAT_NAMES, reject_options, scatter_rows, stat_dtype, take_rows, valid_rows
from . import transform as head


def _logits(hidden, weight, bias, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, transform: head.Transform,
                head_precision, ignore_index, return_entropy, return_kl, return_sum_p2=False,
                return_mean_logp=False, class_weight=None, **options):
    reject_options("naive", options)
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
    # outside the kept set log q = -inf and q = 0: their products count 0
    kept_logprobs = logprobs if keep is None else torch.where(keep, logprobs, torch.zeros_like(logprobs))

    def out(v):
        return scatter_rows(v, rows, n)

    stats = dict.fromkeys(STAT_NAMES)
    stats.update(logp=out(logprobs.gather(1, y[:, None])[:, 0]), lse=out(torch.logsumexp(u, dim=-1)))
    stats["is_top1"] = out((z.gather(1, y[:, None])[:, 0] >= z.amax(1)).detach())
    if return_entropy:
        stats["entropy"] = out(-(p * kept_logprobs).sum(-1))
    if return_kl:
        ref_logprobs = torch.log_softmax(head.transform(zr, tf.without_truncation()), dim=-1)
        stats["kl"] = out((p * (kept_logprobs - ref_logprobs)).sum(-1))
    if return_sum_p2:
        stats["sum_p2"] = out((p * p).sum(-1)).detach()
    if return_mean_logp:
        w = 1.0 if class_weight is None else class_weight.to(dtype)
        stats["mean_logp"] = out((w * logprobs).sum(-1) / logprobs.shape[-1])
    return stats

