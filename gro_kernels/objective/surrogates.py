"""How the weight meets the policy (the surrogate), and the KL estimators (GRO.md section 2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .options import Options


def kl_estimate(kind: str, logp, ref_logp, kl=None):
    """Per-token KL(pi || pi_ref) estimate from the sampled token: k1, k2, k3, or the exact `full` KL."""
    if kind == "full":
        return kl
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    return torch.expm1(-log_ratio) + log_ratio  # k3 = exp(lr - l) - (lr - l) - 1, >= 0


@dataclass
class Surrogate:
    value: torch.Tensor                      # [B,T], the term the loss maximizes
    ratio: Optional[torch.Tensor] = None     # [B,T] detached importance ratio (online rows)
    clipped_low: Optional[torch.Tensor] = None
    clipped_high: Optional[torch.Tensor] = None


def policy_surrogate(opts: Options, logp, old_logp, advantages, mask, online) -> Surrogate:
    """`logp`: A l; `ratio_clip` (PPO, token or sequence ratio, optional delta); `cispo`: sg[min(rho, eps_high)] A l.
    Offline rows (`online` False, broadcastable to logp) always use A l: they were not sampled
    from the old policy. Elementwise except for the sequence ratio, which reads whole rows."""
    A = advantages
    plain = A * logp
    if opts.surrogate == "logp":
        return Surrogate(value=plain)

    log_ratio = logp - old_logp
    if opts.importance_sampling == "sequence":  # GSPO: rho_i = exp(mean_t m (l - lo))
        seq = (mask * log_ratio).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio)

    if opts.surrogate == "ratio_clip":
        first = ratio if opts.delta is None else ratio.clamp(max=opts.delta)
        clipped = ratio.clamp(1 - opts.eps_low, 1 + opts.eps_high)
        value = torch.minimum(first * A, clipped * A)
        low = (ratio < 1 - opts.eps_low) & (A < 0)
        high = (ratio > 1 + opts.eps_high) & (A > 0)
    else:  # cispo: a clipped, detached importance weight on the REINFORCE term
        value = ratio.clamp(max=opts.eps_high).detach() * plain
        low = torch.zeros_like(ratio, dtype=torch.bool)
        high = ratio > opts.eps_high

    return Surrogate(value=torch.where(online, value, plain), ratio=ratio.detach(),
                     clipped_low=low & online, clipped_high=high & online)
