"""`gro_objective`: the GRO loss on per-token log-probs (docs/objective.md).

    loss = sum_{i,t} c[i,t] * ( -surrogate(A, l, lo) + kl_coef * k(l, lr) - entropy_coef * H )

The objective never knows which backend produced `logp`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch

from . import corrections
from .aggregation import token_coefficients
from .offline import scale_offline, sft_plan
from ..argdocs import document, options_entry
from ..logprobs.rows import stat_dtype
from .inputs import Batch, check_mask, check_requirements, kl_is_used, prepare_batch, truncation_mask
from .layout import TokenLayout
from .options import COMPUTED_WITH_LOGP, OPTIONS, Options, resolve_options
from .split import NotYetComputed, token_loss
from .surrogates import kl_estimate
from .weights import Weights, sequence_weights, token_weights


@dataclass
class GROOutput:
    """What `gro_loss`, `GROLoss` and `gro_objective` return. Everything but `loss` is detached.

    loss: 0-d tensor to backpropagate.
    logp: [B,T] float32 (float64 for float64 input), the policy's per-token log-probs, 0 where not scored.
    metrics: name -> 0-d tensor, the batch's diagnostics (`float(v)` works on every value): policy_loss,
        kl, entropy, ratio_mean, clip_frac(_low/_high), policy_weight_mean, and for the preference
        methods rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins as TRL logs them.
        Which names are present depends on the method, options and inputs, never on the values.
    per_sequence: name -> [B] tensor: weights w_i, scores s_i, anchors a_i, signs y_i (when the weights
        are formed per sequence).
    per_token: name -> [B,T] tensor: advantages A[i,t] (always: the weights, or the given advantages),
        and scores / anchors / signs when the scores are per token (score='token_return').
    docs/options.md ("What comes back") lists every name.
    """

    loss: torch.Tensor
    logp: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    per_sequence: Dict[str, torch.Tensor] = field(default_factory=dict)
    per_token: Dict[str, torch.Tensor] = field(default_factory=dict)


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class SequencePlan:
    """Step (a) of the split (docs/objective.md, "One pass or two"): everything formed before the pass over the vocabulary (detached)."""

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
    m, lo = b.mask, b.old_logp
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
        g = times(g, online_only(corrections.off_policy_mask(opts, A, b.logp.detach(), behaviour, on_mask)))
    keep = m
    if opts.top_entropy_quantile < 1:
        keep = corrections.top_entropy_mask(opts, b.entropy, m)
        g, e = times(g, keep), keep * c
    if opts.entropy_agg == "token_mean":  # TRL: the mean entropy of the (selected) tokens, whatever c is
        e = keep / keep.sum().clamp(min=1)
    if opts.surrogate == "vespo":
        g = times(g, online_only(corrections.vespo_weight(opts, A, b.logp.detach(), lo, on_mask, is_weight)))
    elif opts.surrogate == "clip_cov":
        g = times(g, corrections.clip_cov_keep(opts, A, b.logp.detach(), lo, on_mask))
    elif opts.surrogate == "kl_cov":
        a = corrections.kl_cov_coef(opts, A, b.logp.detach(), on_mask)
    return g, e, a


def _weights(method: str, opts: Options, b: Batch, kl_used: bool) -> Weights:
    """The weights of every row of b: given advantages, rewards (sequence or token returns), or none at all
    (method='distill' without rewards: pure distillation)."""
    m = b.mask
    if b.advantages is not None:  # offline rows' given advantages scaled as formed weights would be
        A = scale_offline(opts, b.advantages, b.offline[:, None])
        return Weights(advantages=A, weights=A, units=m.shape[0])
    if b.rewards is None and method == "distill":
        return Weights(advantages=torch.zeros_like(m), weights=torch.zeros_like(b.lengths), units=m.shape[0])
    reward_kl = None
    if kl_used and opts.kl_placement == "reward":
        # The KL of the sampled tokens, under the behaviour policy, enters the reward.
        reward_kl = kl_estimate(opts.kl_estimator, b.old_logp, b.ref_logp, b.kl).detach() * m
    if opts.score == "token_return":
        return token_weights(opts, b, reward_kl)
    return sequence_weights(method, opts, b, None if reward_kl is None else reward_kl.sum(1))


def sequence_plan(method: str, opts: Options, b: Batch) -> SequencePlan:
    """Weights and aggregation coefficients for a validated batch. Reads b.logp only (detached)
    for the methods `split.needs_policy_logp` names; the rest never look at it."""
    m = b.mask
    kl_used = kl_is_used(opts, b.advantages is not None)
    if opts.offline_role == "sft":  # CHORD, HPT: the online rows' weights alone, offline rows SFT (offline.py)
        A, c, _ = sft_plan(method, opts, b, lambda sub: _weights(method, opts, sub, kl_used))
        w = Weights(advantages=A, weights=(A * m).sum(1) / b.lengths.clamp(min=1), units=m.shape[0])
    else:
        w = _weights(method, opts, b, kl_used)
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


# ---- layouts other than one padded batch (layout.py) --------------------------------------------------
# The objective's per-token arguments (shaped like logp; advantages also [B]) and per-sequence ones.
_PER_TOKEN = ("mask", "entropy", "kl", "advantages", "old_logp", "ref_logp", "rollout_logp", "log_sum_sq_probs", "lse",
              "mean_logp", "target_weight", "distill")
_PER_SEQUENCE = ("rewards", "advantages", "group_ids", "labels", "baselines", "offline", "truncated")


def token_layout(logp, *, opts: Options, sequence_ids, positions, cp_group, inputs: dict):
    """The `TokenLayout` of a call with packed rows or a context-parallel group (None for one padded batch)."""
    if sequence_ids is None and positions is None and cp_group is None:
        return None
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point() or logp.dim() != 2:
        raise ValueError("logp must be a floating-point tensor [B, T] (with sequence_ids, positions or cp_group)")
    if sequence_ids is not None and opts.loss_agg == "seq_mean_token_sum_norm" and opts.max_completion_length is None:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' with sequence_ids needs max_completion_length: "
                         "packed rows have no padded width to divide by")
    if cp_group is not None and opts.surrogate == "clip_cov":
        raise ValueError("surrogate='clip_cov' draws the tokens it drops at random, so the ranks of cp_group would "
                         "draw different ones: it does not take cp_group")
    count = None
    if sequence_ids is not None:  # packed rows: the per-sequence inputs say how many sequences there are
        for name in _PER_SEQUENCE:
            t = inputs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                count = t.shape[0]
                break
    return TokenLayout.build(tuple(logp.shape), logp.device, sequence_ids=sequence_ids, positions=positions,
                             cp_group=cp_group, num_sequences=count)


def _to_full(layout, logp, inputs: dict):
    """logp and the per-token inputs of this rank's tokens as the whole [S, W] batch (one gather)."""
    dtype = stat_dtype(logp.dtype)
    names, tensors = ["logp"], [logp.to(dtype)]
    for name in _PER_TOKEN:
        t = inputs.get(name)
        if t is None or (name == "advantages" and isinstance(t, torch.Tensor) and t.dim() == 1):
            continue
        if name == "mask":
            t = check_mask(t, layout.shape, logp.device)
        elif not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if tuple(t.shape) != layout.shape:
            raise ValueError(f"{name} must have shape {layout.shape} (like logp), got {tuple(t.shape)}")
        names.append(name)
        tensors.append(t.to(dtype))
    if inputs.get("mask") is None:  # every token of a sequence counts: the places that hold none do not
        names.append("mask")
        tensors.append(torch.ones(layout.shape, dtype=dtype, device=logp.device))
    full = dict(zip(names, layout.full(*tensors)))
    full["mask"] = full["mask"] > 0.5
    return full.pop("logp"), {**inputs, **full}


def _to_local(layout, out: GROOutput) -> GROOutput:
    """The output for this rank's tokens: log-probs and per-token values back in its [B, T] layout
    (per-sequence values stay indexed by sequence, metrics are the whole batch's)."""
    loss = out.loss if out.loss.dim() == 0 else layout.local(out.loss)   # reduction="none": per token
    return GROOutput(loss=loss, logp=layout.local(out.logp), metrics=out.metrics,
                     per_sequence=out.per_sequence, per_token={k: layout.local(v) for k, v in out.per_token.items()})


def prepare_objective(logp, *, method, mask, entropy, kl, rewards, advantages, group_ids, labels, baselines,
                      offline, old_logp, ref_logp, num_items_in_batch, rollout_logp=None, truncated=None,
                      log_sum_sq_probs=None, lse=None, mean_logp=None, target_weight=None, distill=None,
                      layout=None, before_pass=False, **options):
    """Resolve the options, validate the inputs, form the sequence plan: (opts, batch, plan). With a
    `layout` (`token_layout`), the batch and the plan are those of the whole [S, W] batch.

    before_pass=True (the one pass of gro_loss): logp, entropy, kl and distill are placeholders for shapes only;
    the plan gets `NotYetComputed` in their place (and in place of sg[l] as the behaviour log-prob),
    so reading them raises, and any non-finite plan output is an error too."""
    if layout is not None:
        values = (mask, entropy, kl, advantages, old_logp, ref_logp, rollout_logp, log_sum_sq_probs, lse, mean_logp,
                  target_weight, distill)
        logp, full = _to_full(layout, logp, dict(zip(_PER_TOKEN, values)))
        (mask, entropy, kl, advantages, old_logp, ref_logp, rollout_logp, log_sum_sq_probs, lse, mean_logp,
         target_weight, distill) = (full[k] for k in _PER_TOKEN)
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
        log_sum_sq_probs=log_sum_sq_probs, lse=lse, mean_logp=mean_logp, target_weight=target_weight, distill=distill,
    )
    present = {name for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rewards", rewards),
                                    ("labels", labels), ("group_ids", group_ids), ("offline", offline),
                                    ("baselines", baselines), ("rollout_logp", rollout_logp)) if t is not None}
    check_requirements(method, opts, b, given=options, present=present)
    if not before_pass:
        return opts, b, sequence_plan(method, opts, b)
    b = _before_pass(b, given_old_logp=old_logp is not None)
    plan = sequence_plan(method, opts, b)
    _check_plan(plan)
    return opts, b, plan


def _before_pass(b: Batch, *, given_old_logp: bool) -> Batch:
    """The batch as the one pass's plan may see it: no statistic of the policy. Given old_logp stays;
    its offline rows (sg[l] there) become NaN, which `_check_plan` catches if the plan reads them."""
    if given_old_logp:
        old = torch.where(b.offline[:, None], torch.full_like(b.old_logp, float("nan")), b.old_logp)
    else:
        old = NotYetComputed("on-policy behaviour log-probs sg[logp]")
    return replace(b, logp=NotYetComputed("log-probs"), old_logp=old,
                   entropy=None if b.entropy is None else NotYetComputed("entropies"),
                   kl=None if b.kl is None else NotYetComputed("exact KL"),
                   lse=None if b.lse is None else NotYetComputed("log normalizers"),
                   mean_logp=None if b.mean_logp is None else NotYetComputed("mean log-probs over the vocabulary"),
                   distill=None if b.distill is None else NotYetComputed("divergence to the teacher"))


def _check_plan(plan: SequencePlan) -> None:
    parts = dict(advantages=plan.weights.advantages, coef=plan.coef, policy_weight=plan.policy_weight,
                 entropy_weight=plan.entropy_weight, abs_kl_coef=plan.abs_kl_coef)
    bad = [name for name, t in parts.items() if t is not None and not torch.isfinite(t).all()]
    if bad:
        NotYetComputed(f"behaviour log-probs of offline rows (non-finite plan outputs {bad})")._refuse()


@document(("logp", "method", "mask", "entropy", "kl", "rewards", "advantages", "group_ids", "labels", "baselines",
           "offline", "old_logp", "ref_logp", "num_items_in_batch", "rollout_logp", "truncated", "log_sum_sq_probs",
           "lse", "mean_logp", "target_weight", "distill", "sequence_ids", "positions", "cp_group", "**options"),
          {"**options": options_entry(o for o in OPTIONS if o not in COMPUTED_WITH_LOGP)})
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
    distill: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cp_group=None,
    **options,
) -> GROOutput:
    """The GRO objective on per-token log-probs you computed (docs/objective.md), configured as
    `method` with `options` overriding the preset. Use it when the log-probs come from elsewhere
    (your own forward, `token_logprobs`, another trainer); `gro_loss` computes them from hidden
    states without the logits. `entropy` and `kl` may carry gradients (as from `token_logprobs`).
    Statistics are float32 (float64 when logp is float64). For the preference presets (DPO, IPO,
    CPL, SimPO, KTO) `loss` reports the method's own loss value; its gradient is the GRO gradient,
    which equals the method's.

    {args}

    Returns:
        GROOutput: loss (0-d), logp (detached), metrics (name -> 0-d tensor), per_sequence
        (name -> [B]), per_token (name -> [B, T]); docs/options.md lists every name.

    Raises:
        TypeError, ValueError: naming the argument or option; an option the configuration does not
        read is one (docs/options.md), and so are `temperature`, `divergence` and `jsd_beta`: they apply
        where the log-probs and the divergence to a teacher are computed (gro_loss, token_logprobs), and
        gro_objective gets them computed (`logp`, `distill`).
    """
    for name in COMPUTED_WITH_LOGP:
        if name in options:
            raise ValueError(f"option {name} is not read by gro_objective: it applies where the log-probs and the "
                             "divergence to a teacher are computed (gro_loss, token_logprobs(temperature=..., "
                             "divergence=..., jsd_beta=...)); gro_objective gets them computed (logp, distill)")
    inputs = dict(mask=mask, entropy=entropy, kl=kl, rewards=rewards, advantages=advantages, group_ids=group_ids,
                  labels=labels, baselines=baselines, offline=offline, old_logp=old_logp, ref_logp=ref_logp,
                  num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
                  log_sum_sq_probs=log_sum_sq_probs, lse=lse, mean_logp=mean_logp, target_weight=target_weight,
                  distill=distill)
    layout = token_layout(logp, opts=resolve_options(method, options), sequence_ids=sequence_ids,
                          positions=positions, cp_group=cp_group, inputs=inputs)
    return objective_in_layout(layout, logp, method=method, **inputs, **options)


def objective_in_layout(layout, logp, **kwargs) -> GROOutput:
    """`gro_objective` of this rank's tokens of a `layout` (`token_layout`; None: one padded batch)."""
    out = _objective(logp, layout=layout, **kwargs)
    return out if layout is None else _to_local(layout, out)


def _objective(logp, *, method, layout=None, **kwargs) -> GROOutput:
    """The objective on one padded batch (on the whole batch of a `layout`)."""
    opts, b, plan = prepare_objective(logp, method=method, layout=layout, **kwargs)
    l, m = b.logp, b.mask
    online = ~b.offline[:, None]
    terms = token_loss(opts, logp=l, old_logp=b.old_logp, ref_logp=b.ref_logp, entropy=b.entropy, kl=b.kl,
                       advantages=plan.weights.advantages, coef=plan.coef, online=online, mask=m,
                       kl_in_loss=plan.kl_in_loss, policy_weight=plan.policy_weight,
                       entropy_weight=plan.entropy_weight, abs_kl_coef=plan.abs_kl_coef,
                       lse=b.lse, mean_logp=b.mean_logp, lse_coef=plan.lse_coef, distill=b.distill)
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
    if b.distill is not None:
        metrics["distill"] = _masked_mean(b.distill.detach(), m)
    if surrogate.ratio is not None:
        on = m * online.to(m.dtype)
        metrics["ratio_mean"] = _masked_mean(surrogate.ratio, on)
        metrics["clip_frac_low"] = _masked_mean(surrogate.clipped_low.to(m.dtype), on)
        metrics["clip_frac_high"] = _masked_mean(surrogate.clipped_high.to(m.dtype), on)
        metrics["clip_frac"] = _masked_mean((surrogate.clipped_low | surrogate.clipped_high).to(m.dtype), on)
    if plan.policy_weight is not None:
        metrics["policy_weight_mean"] = _masked_mean(plan.policy_weight, m)
    if opts.score == "implicit" and opts.separation == "label" and w.scores is not None:
        metrics.update(_preference_metrics(w, pairwise=opts.anchor == "pair"))
    # [B] values in per_sequence, [B,T] values in per_token: the shape says which.
    per_sequence, per_token = {}, {"advantages": w.advantages.detach()}
    for name in ("weights", "scores", "anchors", "signs"):
        value = getattr(w, name)
        if value is not None and not (name == "weights" and value is w.advantages):
            (per_sequence if value.dim() == 1 else per_token)[name] = value.detach()
    return GROOutput(loss=loss, logp=l.detach(), metrics=metrics, per_sequence=per_sequence, per_token=per_token)


def _preference_metrics(w: Weights, *, pairwise: bool) -> Dict[str, torch.Tensor]:
    """TRL's DPO / KTO reward metrics from the implicit scores s_i (beta times the sequence log-ratio
    to the reference, or the method's reference-free score): the mean over chosen (desirable) rows,
    over rejected (undesirable) rows, their difference, and for pairs the fraction of pairs whose
    chosen row scores higher. A label with no row in the batch (KTO) contributes 0."""
    s, chosen = w.scores.detach(), w.signs > 0
    rejected = ~chosen

    def mean(rows):
        return s[rows].sum() / rows.sum().clamp(min=1)

    out = {"rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected)}
    if pairwise:  # anchors: the partner's score
        margin = (s - w.anchors.detach())[chosen]
        out["rewards/accuracies"] = (margin > 0).to(s.dtype).mean()
        out["rewards/margins"] = margin.mean()
    else:
        both = bool(chosen.any()) and bool(rejected.any())
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"] if both else s.new_zeros(())
    return out
