"""The `naive` backend: materializes the `[N, V]` logits and lets autograd differentiate.

Readable on purpose: it is the reference the tests compare the fused backends against.
"""
from __future__ import annotations

import torch

from .api import reject_options, stat_dtype


def _logits(hidden, weight, bias, temperature, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *,
                temperature, ignore_index, return_entropy, return_kl, return_sum_p2=False, **options):
    reject_options("naive", options)
    dtype = stat_dtype(hidden.dtype)
    valid = targets != ignore_index
    z = _logits(hidden, weight, bias, temperature, dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    safe_y = torch.where(valid, targets, torch.zeros_like(targets))
    zero = torch.zeros((), dtype=dtype, device=z.device)

    logp = torch.where(valid, logprobs.gather(1, safe_y[:, None])[:, 0], zero)
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), zero)
    p = logprobs.exp()
    entropy = torch.where(valid, -(p * logprobs).sum(-1), zero) if return_entropy else None
    kl = None
    if return_kl:
        with torch.no_grad():  # the reference head is frozen
            ref_logprobs = torch.log_softmax(_logits(ref_hidden, ref_weight, ref_bias, temperature, dtype), dim=-1)
        kl = torch.where(valid, (p * (logprobs - ref_logprobs)).sum(-1), zero)
    sum_p2 = torch.where(valid, (p * p).sum(-1), zero).detach() if return_sum_p2 else None
    return logp, entropy, kl, lse, sum_p2
