"""The `naive` backend: materializes the `[N, V]` logits and lets autograd differentiate.

Readable on purpose: it is the reference the tests compare the fused backends against. Only the
rows that count (targets != ignore_index) are computed, so nothing at an ignored position (a NaN
hidden state, padding) reaches a gradient.
"""
from __future__ import annotations

import torch

from .api import reject_options, scatter_rows, stat_dtype, take_rows, valid_rows


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


def _logits(hidden, weight, bias, temperature, dtype):
    z = _Linear.apply(hidden.to(dtype), weight.to(dtype))
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *,
                temperature, ignore_index, return_entropy, return_kl, return_sum_p2=False, **options):
    if options.pop("shard", None) is not None:
        raise ValueError("backend='naive' does not take tp_group (it materializes one device's logits): "
                         "use backend='torch' or 'triton'")
    reject_options("naive", options)
    dtype = stat_dtype(hidden.dtype)
    n = targets.shape[0]
    rows = valid_rows(targets, ignore_index)
    y = take_rows(targets, rows)
    z = _logits(take_rows(hidden, rows), weight, bias, temperature, dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    p = logprobs.exp()

    def out(v):
        return scatter_rows(v, rows, n)

    logp = out(logprobs.gather(1, y[:, None])[:, 0])
    lse = out(torch.logsumexp(z, dim=-1))
    # 0 log 0 = 0: a vocabulary row masked with a -inf bias has p = 0 and log p = -inf. The log is
    # replaced before the product (a `where` after it would still send NaN into the gradient).
    live = p > 0
    entropy = out(-(p * torch.where(live, logprobs, 0.0)).sum(-1)) if return_entropy else None
    kl = None
    if return_kl:
        with torch.no_grad():  # the reference head is frozen
            ref_logprobs = torch.log_softmax(
                _logits(take_rows(ref_hidden, rows), ref_weight, ref_bias, temperature, dtype), dim=-1)
        kl = out((p * torch.where(live, logprobs - ref_logprobs, 0.0)).sum(-1))
    sum_p2 = out((p * p).sum(-1)).detach() if return_sum_p2 else None
    return logp, entropy, kl, lse, sum_p2
