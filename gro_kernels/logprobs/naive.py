"""The `naive` backend: materializes the `[N, V]` logits and lets autograd differentiate.

Readable on purpose: it is the reference the tests compare the fused backends against. Only the
rows that count (targets != ignore_index) are computed, so nothing at an ignored position (a NaN
hidden state, padding) reaches a gradient.
"""
from __future__ import annotations

import torch

from .rows import scatter_rows, stat_dtype, take_rows, valid_rows


def _logits(hidden, weight, bias, temperature, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def _reject_options(options: dict) -> None:
    if options:
        raise TypeError(f"backend='naive' takes no backend options, got {sorted(options)}")


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *,
                temperature, ignore_index, return_entropy, return_kl, return_sum_p2=False, **options):
    _reject_options(options)
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
    entropy = out(-(p * logprobs).sum(-1)) if return_entropy else None
    kl = None
    if return_kl:
        with torch.no_grad():  # the reference head is frozen
            ref_logprobs = torch.log_softmax(
                _logits(take_rows(ref_hidden, rows), ref_weight, ref_bias, temperature, dtype), dim=-1)
        kl = out((p * (logprobs - ref_logprobs)).sum(-1))
    sum_p2 = out((p * p).sum(-1)).detach() if return_sum_p2 else None
    return logp, entropy, kl, lse, sum_p2
