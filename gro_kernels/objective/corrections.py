"""Per-token weights formed before the pass over the vocabulary (all detached): train/inference
mismatch corrections, off-policy and top-entropy token selection, VESPO's sequence weight and the
Clip-Cov / KL-Cov covariance selection. docs/methods.md gives each one's definition and source.

Each returns a [B,T] tensor in the statistics dtype; `sequence_plan` multiplies them into the
policy weight g[i,t] that `split.token_loss` applies to the policy term.
"""
from __future__ import annotations

import math

import torch

from .options import Options

_TOKEN_MODES = ("token_truncate", "token_mask", "icepop")


def _row_mean(values, mask):
    return (mask * values).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def _mismatch_log_ratio(old_logp, rollout_logp, mask):
    """log(pi_train / pi_rollout) per token; a token the sampler could not score (NaN) counts as 0 (TRL)."""
    return torch.nan_to_num((old_logp - rollout_logp) * mask, nan=0.0)


def rollout_weight(opts: Options, old_logp, rollout_logp, mask):
    """The importance weight correcting for the sampler's log-probs (vLLM) differing from the trainer's.

    With d = lo - l_rollout per token and [lo_c, hi_c] = [rollout_clip_min, rollout_clip_max]:
      token_truncate     clamp(exp(d), lo_c, hi_c)                         (TRL; OpenRLHF TIS)
      token_mask/icepop  exp(d) if lo_c <= exp(d) <= hi_c else 0           (TRL; OpenRLHF ICEPOP)
      sequence_truncate  clamp(exp(sum_t d), lo_c, hi_c) on every token of the row            (TRL)
      sequence_mask      exp(sum_t d) if inside the bounds else 0, on every token of the row  (TRL)
      seq_mask_tis       exp(d) on the rows whose geometric mean exp(mean_t d) is inside the
                         bounds, 0 on the others                                          (OpenRLHF)
    """
    mode, lo, hi = opts.rollout_correction, opts.rollout_clip_min, opts.rollout_clip_max
    d = _mismatch_log_ratio(old_logp, rollout_logp, mask)
    if mode == "seq_mask_tis":
        stat = torch.exp(_row_mean(d, mask))
        return torch.where((stat >= lo) & (stat <= hi), torch.exp(d), torch.zeros_like(d))
    ratio = torch.exp(d) if mode in _TOKEN_MODES else torch.exp(d.sum(1, keepdim=True)).expand_as(d)
    if mode.endswith("truncate"):
        return ratio.clamp(min=lo, max=hi)
    return torch.where((ratio >= lo) & (ratio <= hi), ratio, torch.zeros_like(ratio))


def off_policy_mask(opts: Options, advantages, logp, behaviour_logp, mask):
    """DeepSeek-V3.2's off-policy sequence mask (TRL off_policy_mask_threshold = delta): drop a row's
    tokens with A < 0 when the row's mean of (l_behaviour - sg[l]) exceeds delta. l_behaviour is the
    sampler's log-prob (rollout_logp) when given, else old_logp."""
    kl = _row_mean(torch.nan_to_num(behaviour_logp - logp.detach(), nan=0.0), mask)
    keep = (advantages >= 0) | (kl <= opts.off_policy_mask_threshold)
    return keep.to(mask.dtype)


def quantile(values, q: float):
    """torch.quantile(values, q) (linear interpolation, the same lerp), without its 16M-element limit."""
    v = torch.sort(values.flatten()).values
    rank = v.new_tensor(q) * (v.numel() - 1)   # in the values' dtype, as torch does
    below = rank.long().clamp(max=v.numel() - 1)
    above = (below + 1).clamp(max=v.numel() - 1)
    return torch.lerp(v[below], v[above], rank - below)


def top_entropy_mask(opts: Options, entropy, mask):
    """Beyond the 80/20 rule (TRL top_entropy_quantile = rho): keep the tokens whose entropy is at
    least the (1 - rho) quantile (linear interpolation) of the entropies of all valid tokens."""
    valid = mask > 0
    H = entropy.detach()
    if not valid.any():
        return torch.zeros_like(mask)
    threshold = quantile(H[valid], 1 - opts.top_entropy_quantile)
    return ((H * mask >= threshold) & valid).to(mask.dtype)


def vespo_weight(opts: Options, advantages, logp, old_logp, mask, token_is_weight=None):
    """VESPO's sequence weight phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1), with the
    sequence ratio w = exp(clamp(sum_t clamp(l - lo, -20, 20) [+ sum_t clamp(log g_t, log 1e-8, 20)],
    log 1e-8, 20)), g_t the token-level rollout weight; (k, lambda) = (k_pos, lambda_pos) where A >= 0,
    else (k_neg, lambda_neg). TRL / Liger get_gamma_weights."""
    floor = math.log(1e-8)
    seq = (mask * (logp.detach() - old_logp).clamp(-20.0, 20.0)).sum(1, keepdim=True)
    if token_is_weight is not None:
        seq = seq + (mask * torch.log(token_is_weight).clamp(floor, 20.0)).sum(1, keepdim=True)
    log_w = seq.clamp(floor, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, mask.new_tensor(opts.vespo_k_pos), mask.new_tensor(opts.vespo_k_neg))
    lam = torch.where(nonneg, mask.new_tensor(opts.vespo_lambda_pos), mask.new_tensor(opts.vespo_lambda_neg))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _covariance(advantages, logp, mask):
    """(A - mean A) (l - mean l) per token, means over the valid tokens."""
    n = mask.sum().clamp(min=1)
    l = logp.detach()
    return (advantages - (mask * advantages).sum() / n) * (l - (mask * l).sum() / n)


def clip_cov_keep(opts: Options, advantages, logp, old_logp, mask):
    """Clip-Cov (verl clip_cov): among the valid tokens PPO does not already clip whose covariance
    lies in (clip_cov_lb, clip_cov_ub), drop max(1, floor(clip_cov_ratio N)) drawn at random
    (torch.randperm on torch's default generator, as verl does): returns 0 there, 1 elsewhere."""
    ratio = torch.exp(logp.detach() - old_logp)
    A = advantages
    clipped_by_ppo = (-A * ratio.clamp(1 - opts.eps_low, 1 + opts.eps_high) > -A * ratio) & (mask > 0)
    cov = _covariance(A, logp, mask)
    candidates = (cov < opts.clip_cov_ub) & (cov > opts.clip_cov_lb) & (mask > 0) & ~clipped_by_ppo
    idx = torch.nonzero(candidates)
    keep = torch.ones_like(mask)
    if len(idx) > 0:
        count = max(int(opts.clip_cov_ratio * mask.sum().item()), 1)
        idx = idx[torch.randperm(len(idx))[: min(count, len(idx))].to(idx.device)]
        keep[idx[:, 0], idx[:, 1]] = 0
    return keep


def kl_cov_coef(opts: Options, advantages, logp, mask):
    """KL-Cov (verl kl_cov): the max(1, floor(kl_cov_ratio N)) valid tokens of largest covariance
    get the penalty ppo_kl_coef |l - lo|; returns that coefficient per token (0 elsewhere)."""
    valid = mask > 0
    coef = torch.zeros_like(mask)
    n = int(valid.sum().item())
    if n == 0:
        return coef
    A, l = advantages[valid], logp.detach()[valid]
    cov = (A - A.mean()) * (l - l.mean())
    top = torch.topk(cov, max(1, int(n * opts.kl_cov_ratio)), largest=True).indices
    flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0][top]
    coef.view(-1)[flat] = opts.ppo_kl_coef
    return coef
