"""`gro_objective`: the GRO loss on per-token log-probs (GRO.md section 2).

    loss = sum_{i,t} c[i,t] * ( -surrogate(A, l, lo) + kl_coef * k(l, lr) - entropy_coef * H )

The objective never knows which backend produced `logp`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch

from . import corrections
from .aggregation import token_coefficients
from .inputs import Batch, check_requirements, kl_is_used, prepare_batch, truncation_mask
from .options import Options, resolve_options
from .split import token_loss
from .surrogates import kl_estimate
from .weights import Weights, sequence_weights, token_weights


@dataclass
class GROOutput:
    """loss: 0-d tensor to backpropagate; logp: the policy's per-token log-probs [B,T] (detached,
    0 where masked); metrics: detached diagnostics (kl, entropy, clip fractions, weights, ...)."""

    loss: torch.Tensor
    logp: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class SequencePlan:
    """Step (a) of GRO.md section 6: everything formed before the pass over the vocabulary (detached)."""

    weights: Weights         # A[i,t] = weights.advantages
    coef: torch.Tensor       # c[i,t], the aggregation coefficients
    kl_in_loss: bool
    # Per-token inputs of `token_loss` (see its docstring); None where not used.
    policy_weight: Optional[torch.Tensor] = None
    entropy_weight: Optional[torch.Tensor] = None
    abs_kl_coef: Optional[torch.Tensor] = None
    lse_coef: Optional[torch.Tensor] = None     # the z-loss's c_z where it differs from c (SFT class weights)


def _token_weights(opts: Options, b: Batch, A: torch.Tensor, c: torch.Tensor):
    """The per-token policy weight g, entropy coefficient e and KL-Cov coefficient a (corrections.py).
    Offline rows were not sampled: no mismatch correction, off-policy mask, VESPO weight or covariance
    selection applies to them (the top-entropy selection does)."""
    m, l, lo = b.mask, b.logp.detach(), b.old_logp
    online = (~b.offline[:, None]).to(m.dtype)
    on_mask = m * online
    g, e, a = None, None, None

    def times(x, y):
        return y if x is None else x * y

    def online_only(w):
        return torch.where(b.offline[:, None], torch.ones_like(w), w)

    is_weight = None
    if opts.rollout_correction is not None:
        is_weight = online_only(corrections.rollout_weight(opts, lo, b.rollout_logp, on_mask))
        if opts.surrogate != "vespo":  # VESPO folds it into phi instead
            g = times(g, is_weight)
    if opts.off_policy_mask_threshold is not None:
        behaviour = b.rollout_logp if b.rollout_logp is not None else lo
        g = times(g, online_only(corrections.off_policy_mask(opts, A, l, behaviour, on_mask)))
    keep = m
    if opts.top_entropy_quantile < 1:
        keep = corrections.top_entropy_mask(opts, b.entropy, m)
        g, e = times(g, keep), keep * c
    if opts.entropy_agg == "token_mean":  # TRL: the mean entropy of the (selected) tokens, whatever c is
        e = keep / keep.sum().clamp(min=1)
    if opts.surrogate == "vespo":
        g = times(g, online_only(corrections.vespo_weight(opts, A, l, lo, on_mask, is_weight)))
    elif opts.surrogate == "clip_cov":
        g = times(g, corrections.clip_cov_keep(opts, A, l, lo, on_mask))
    elif opts.surrogate == "kl_cov":
        a = corrections.kl_cov_coef(opts, A, l, on_mask)
    return g, e, a


def sequence_plan(method: str, opts: Options, b: Batch) -> SequencePlan:
    """Weights and aggregation coefficients for a validated batch. Reads b.logp only (detached)
    for the methods `split.needs_policy_logp` names; the rest never look at it."""
    m = b.mask
    kl_used = kl_is_used(opts, b.advantages is not None)
    if b.advantages is not None:
        A = torch.where(b.offline[:, None], b.advantages * opts.offline_coef, b.advantages)
        w = Weights(advantages=A, weights=A, units=m.shape[0])
    else:
        reward_kl = None
        if kl_used and opts.kl_placement == "reward":
            # The KL of the sampled tokens, under the behaviour policy, enters the reward.
            reward_kl = kl_estimate(opts.kl_estimator, b.old_logp, b.ref_logp, b.kl).detach() * m
        if opts.score == "token_return":
            w = token_weights(opts, b, reward_kl)
        else:
            w = sequence_weights(method, opts, b, None if reward_kl is None else reward_kl.sum(1))
    c = token_coefficients(opts.loss_agg, m, units=w.units, max_completion_length=opts.max_completion_length,
                           num_items=b.num_items)
    lse_coef = None
    if b.target_weight is not None:
        # SFT's class weights, as torch's cross-entropy: each target's log-likelihood times its class weight,
        # the mean over the targets' weights (not their count); label smoothing's term and the z-loss unweighted
        # (the z-loss keeps the mean over tokens, Liger's convention).
        w = replace(w, advantages=w.advantages * b.target_weight)
        if opts.loss_agg == "token_mean" and b.num_items is None:
            lse_coef = c
            c = m / (m * b.target_weight).sum().clamp(min=torch.finfo(m.dtype).tiny)
    g, e, a = _token_weights(opts, b, w.advantages, c)
    return SequencePlan(weights=w, coef=c, kl_in_loss=kl_used and opts.kl_placement == "loss",
                        policy_weight=g, entropy_weight=e, abs_kl_coef=a, lse_coef=lse_coef)


def prepare_objective(logp, *, method, mask, entropy, kl, rewards, advantages, group_ids, labels, baselines,
                      offline, old_logp, ref_logp, num_items_in_batch, rollout_logp=None, truncated=None,
                      log_sum_sq_probs=None, lse=None, mean_logp=None, target_weight=None, **options):
    """Resolve the options, validate the inputs, form the sequence plan: (opts, batch, plan)."""
    opts = resolve_options(method, options)
    if (truncated is not None) != opts.mask_truncated_completions:
        raise ValueError("mask_truncated_completions=True and truncated [B] (bool) go together: "
                         f"got mask_truncated_completions={opts.mask_truncated_completions}, truncated "
                         f"{'given' if truncated is not None else 'not given'}")
    if truncated is not None:
        mask = truncation_mask(truncated, mask, tuple(logp.shape), logp.device)
    b = prepare_batch(
        logp, mask=mask, entropy=entropy, kl=kl, rewards=rewards, advantages=advantages,
        group_ids=group_ids, labels=labels, baselines=baselines, offline=offline,
        old_logp=old_logp, ref_logp=ref_logp, num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp,
        log_sum_sq_probs=log_sum_sq_probs, lse=lse, mean_logp=mean_logp, target_weight=target_weight,
    )
    check_requirements(method, opts, b)
    return opts, b, sequence_plan(method, opts, b)


def gro_objective(
    logp: torch.Tensor,
    *,
    method: str = "gro",
    mask: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    baselines: Optional[torch.Tensor] = None,
    offline: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    rollout_logp: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    log_sum_sq_probs: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    mean_logp: Optional[torch.Tensor] = None,
    target_weight: Optional[torch.Tensor] = None,
    **options,
) -> GROOutput:
    """The GRO objective, configured as `method` (a row of the preset table) with `options` overriding it.

    logp, mask, entropy, kl, old_logp, ref_logp: [B,T] (entropy and kl differentiable, as from
    `token_logprobs`). rewards, baselines, group_ids, labels (+1/-1), offline (bool): [B].
    advantages: [B] or [B,T], replacing the weights formed from rewards. rollout_logp [B,T]: the
    sampler's log-probs (vLLM), for `rollout_correction` and `off_policy_mask_threshold`. truncated
    [B] bool: completions cut at the length limit, dropped with `mask_truncated_completions`.
    log_sum_sq_probs [B,T]: log sum_v p_v^2 of the policy's next-token distribution, for WPO's
    `use_weighting`. lse [B,T] (the head's log normalizer, differentiable) for `z_loss_coef`;
    mean_logp [B,T] ((1/V) sum_v w_v log p_v, differentiable) for the SFT preset's `label_smoothing`;
    target_weight [B,T] (each target's class weight) for the SFT preset's class weights (torch's
    weighted cross-entropy); `token_logprobs` returns the first two (`lse`, `return_mean_logp`).
    With the SFT preset's `reduction="none"` `loss` is the per-token loss [B,T] (0 where masked).
    Statistics are float32
    (float64 when logp is float64). For RL-free methods (DPO, IPO, CPL, SimPO, KTO) `loss` reports
    the method's own loss value; its gradient is the GRO gradient, which equals the method's.
    The head's options (temperature, soft cap, truncation, precision) are applied where logp is
    computed (`token_logprobs`, `gro_loss`); `temperature` is accepted here so presets can carry it.
    """
    opts, b, plan = prepare_objective(
        logp, method=method, mask=mask, entropy=entropy, kl=kl, rewards=rewards, advantages=advantages,
        group_ids=group_ids, labels=labels, baselines=baselines, offline=offline, old_logp=old_logp,
        ref_logp=ref_logp, num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
        log_sum_sq_probs=log_sum_sq_probs, lse=lse, mean_logp=mean_logp, target_weight=target_weight, **options)
    l, m = b.logp, b.mask
    online = ~b.offline[:, None]
    terms = token_loss(opts, logp=l, old_logp=b.old_logp, ref_logp=b.ref_logp, entropy=b.entropy, kl=b.kl,
                       advantages=plan.weights.advantages, coef=plan.coef, online=online, mask=m,
                       kl_in_loss=plan.kl_in_loss, policy_weight=plan.policy_weight,
                       entropy_weight=plan.entropy_weight, abs_kl_coef=plan.abs_kl_coef,
                       lse=b.lse, mean_logp=b.mean_logp, lse_coef=plan.lse_coef)
    loss = terms.loss if opts.reduction != "none" else terms.per_token
    w, surrogate = plan.weights, terms.surrogate
    policy = terms.policy
    if w.unit_losses is not None and opts.loss_agg == "seq_mean_token_sum":
        # Report the method's own loss; keep the GRO gradient (equal to the method's, see tests).
        # Token-local terms other than the surrogate (KL, entropy) keep their values.
        own = w.unit_losses.sum() / max(w.units, 1)
        loss = loss + (own - policy).detach()
        policy = own

    metrics = {"policy_loss": policy.detach()}
    if terms.kl is not None:
        metrics["kl"] = _masked_mean(terms.kl.detach(), m)
    if b.entropy is not None:
        metrics["entropy"] = _masked_mean(b.entropy.detach(), m)
    if surrogate.ratio is not None:
        on = m * online.to(m.dtype)
        metrics["ratio_mean"] = _masked_mean(surrogate.ratio, on)
        metrics["clip_frac_low"] = _masked_mean(surrogate.clipped_low.to(m.dtype), on)
        metrics["clip_frac_high"] = _masked_mean(surrogate.clipped_high.to(m.dtype), on)
        metrics["clip_frac"] = _masked_mean((surrogate.clipped_low | surrogate.clipped_high).to(m.dtype), on)
    if plan.policy_weight is not None:
        metrics["policy_weight_mean"] = _masked_mean(plan.policy_weight, m)
    metrics["weights"] = w.weights.detach()
    metrics["advantages"] = w.advantages.detach()
    for name in ("scores", "anchors", "signs"):
        if getattr(w, name) is not None:
            metrics[name] = getattr(w, name).detach()
    return GROOutput(loss=loss, logp=l.detach(), metrics=metrics)
