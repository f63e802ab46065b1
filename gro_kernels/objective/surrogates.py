"""How the weight meets the policy (the surrogate), and the KL estimators (docs/objective.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .options import Options


def _kl_value(kind: str, log_ratio):
    """The value of a sampled-token KL(pi || pi_ref) estimator; log_ratio = l - lr."""
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # k3 = exp(lr - l) - (lr - l) - 1, >= 0
    # low_var_kl (verl's k3): the same with the log-ratio clamped to [-20, 20] and the value to [-10, 10]
    r = (-log_ratio).clamp(-20.0, 20.0)
    return (torch.expm1(r) - r).clamp(-10.0, 10.0)


def kl_estimate(kind: str, logp, ref_logp, kl=None):
    """Per-token KL(pi || pi_ref): k1, k2, k3, low_var_kl, abs, the exact `full` KL, or a straight-through
    `name+` (verl): the value of `name`, the gradient of k2 (the unbiased KL gradient)."""
    if kind == "full":
        return kl
    log_ratio = logp - ref_logp
    if not kind.endswith("+"):
        return _kl_value(kind, log_ratio)
    k2 = 0.5 * log_ratio ** 2
    return k2 - k2.detach() + _kl_value(kind[:-1], log_ratio).detach()


@dataclass
class Surrogate:
    value: torch.Tensor                      # [B,T], the term the loss maximizes
    ratio: Optional[torch.Tensor] = None     # [B,T] detached importance ratio (online rows)
    clipped_low: Optional[torch.Tensor] = None
    clipped_high: Optional[torch.Tensor] = None
    live_ratio: Optional[torch.Tensor] = None  # [B,T] the ratio with its gradient (KL bias correction)


def _sapo_gate(ratio, A, opts: Options):
    """SAPO's soft gate f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos where A > 0, else tau_neg."""
    tau = torch.where(A > 0, A.new_tensor(opts.sapo_temperature_pos), A.new_tensor(opts.sapo_temperature_neg))
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def _geo_mean(opts: Options, log_ratio, A, mask):
    """GMPO (verl geo_mean): rho_i = exp(mean_t sgn(A) min(sgn(A) lr, sgn(A) clip(lr, -eps_low, eps_high))),
    value A_bar_i rho_i on each token of row i (A_bar_i: the row's mean advantage). Reads whole rows."""
    sgn = torch.sign(A)
    clipped = log_ratio.clamp(-opts.eps_low, opts.eps_high)
    kept = sgn * torch.minimum(sgn * log_ratio, sgn * clipped)
    n = mask.sum(1, keepdim=True).clamp(min=1)
    rho = torch.exp((mask * kept).sum(1, keepdim=True) / n)
    a_bar = (mask * A).sum(1, keepdim=True) / n
    clip = (log_ratio != clipped) & (mask > 0)
    return (a_bar * rho).expand_as(A), clip & (A < 0), clip & (A > 0)


def offline_term(opts: Options, A, logp):
    """The term an offline token maximizes (`offline_surrogate`): A l; LUFFY's policy shaping
    A f(p), f(p) = p / (p + shaping_gamma), p = exp(l) with its gradient; CHORD-phi's sg[p (1 - p)] A l."""
    kind = opts.offline_surrogate
    if kind == "logp":
        return A * logp
    p = torch.exp(logp)
    if kind == "shaping":
        return A * p / (p + opts.shaping_gamma)
    q = p.detach()
    return q * (1 - q) * A * logp


def policy_surrogate(opts: Options, logp, old_logp, advantages, mask, online) -> Surrogate:
    """The term the loss maximizes per token, by `opts.surrogate`:

    logp        A l
    ratio_clip  min(r A, clip(r, 1-eps_low, 1+eps_high) A) (PPO; r capped at `delta`; for A < 0 floored at
                clip_ratio_c A with dual clip; r is GSPO's sequence ratio with importance_sampling='sequence')
    cispo       sg[min(r, eps_high)] A l
    sapo        f_tau(r) A, f_tau(r) = sigmoid(tau (r - 1)) 4 / tau
    vespo       A l (its detached sequence weight phi comes with the plan's policy_weight)
    clip_cov    max-form PPO clip without dual clip (the plan's policy_weight drops the selected tokens)
    kl_cov      r A (the plan's abs_kl_coef adds the |l - lo| penalty on the selected tokens)
    geo_mean    A_bar_i rho_i (GMPO; whole rows)
    dft         A sg[exp(l)] l (Dynamic Fine-Tuning), on every row

    Offline rows (`online` False, broadcastable to logp) were not sampled from the old policy: they use
    `offline_term` (A l by default; `dft` keeps its own term on every row unless offline_surrogate is set).
    Elementwise except for the sequence ratio and geo_mean, which read whole rows.
    """
    A = advantages
    plain = A * logp
    kind = opts.surrogate
    if kind in ("logp", "vespo", "dft"):
        value = plain * torch.exp(logp.detach()) if kind == "dft" else plain
        if opts.offline_surrogate != "logp":
            value = torch.where(online, value, offline_term(opts, A, logp))
        return Surrogate(value=value)

    log_ratio = logp - old_logp
    if kind == "geo_mean":
        value, low, high = _geo_mean(opts, log_ratio, A, mask)
        ratio = torch.exp(log_ratio)
    else:
        if opts.importance_sampling == "sequence":  # GSPO: rho_i = exp(mean_t m (l - lo))
            seq = (mask * log_ratio).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
            log_ratio = seq.expand_as(logp)
        ratio = torch.exp(log_ratio)

    if kind in ("ratio_clip", "clip_cov"):
        first = ratio if opts.delta is None else ratio.clamp(max=opts.delta)
        clipped = ratio.clamp(1 - opts.eps_low, 1 + opts.eps_high)
        value = torch.minimum(first * A, clipped * A)
        if opts.clip_ratio_c is not None:  # dual clip: a floor on the loss of A < 0 tokens
            value = torch.where(A < 0, torch.maximum(value, opts.clip_ratio_c * A), value)
        low = (ratio < 1 - opts.eps_low) & (A < 0)
        high = (ratio > 1 + opts.eps_high) & (A > 0)
    elif kind == "cispo":  # a clipped, detached importance weight on the REINFORCE term
        value = ratio.clamp(max=opts.eps_high).detach() * plain
        low = torch.zeros_like(ratio, dtype=torch.bool)
        high = ratio > opts.eps_high
    elif kind == "sapo":
        value = _sapo_gate(ratio, A, opts) * A
        low = high = torch.zeros_like(ratio, dtype=torch.bool)
    elif kind == "kl_cov":
        value = ratio * A
        low = high = torch.zeros_like(ratio, dtype=torch.bool)

    return Surrogate(value=torch.where(online, value, offline_term(opts, A, logp)), ratio=ratio.detach(),
                     clipped_low=low & online, clipped_high=high & online,
                     live_ratio=torch.where(online, ratio, torch.ones_like(ratio)))
