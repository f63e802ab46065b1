"""Checks the objective's tensor inputs and brings them to one form (`Batch`).

Every error names the argument. Per-token inputs are zeroed at masked positions so that
nothing a caller put there (padding, -inf) can reach the loss or make NaN.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ..logprobs.rows import stat_dtype  # float32 statistics, float64 when given float64
from .options import IMPLICIT_REFERENCE, OPTIONS, WEIGHT_OPTIONS, Options, ce_smoothing_reader, resolve_options


@dataclass
class Batch:
    logp: torch.Tensor                 # [B,T] differentiable, 0 where masked
    mask: torch.Tensor                 # [B,T] 0/1 in the statistics dtype
    lengths: torch.Tensor              # [B] |y_i|
    old_logp: torch.Tensor             # [B,T] detached; sg[logp] when absent and on offline rows
    offline: torch.Tensor              # [B] bool
    ref_logp: Optional[torch.Tensor] = None     # [B,T] detached
    entropy: Optional[torch.Tensor] = None      # [B,T] differentiable
    kl: Optional[torch.Tensor] = None           # [B,T] differentiable (exact KL)
    rewards: Optional[torch.Tensor] = None      # [B]
    advantages: Optional[torch.Tensor] = None   # [B,T]
    baselines: Optional[torch.Tensor] = None    # [B]
    labels: Optional[torch.Tensor] = None       # [B] +-1
    group: Optional[torch.Tensor] = None        # [B] int64 in [0, num_groups)
    num_groups: int = 0
    num_items: Optional[float] = None
    rollout_logp: Optional[torch.Tensor] = None  # [B,T] detached: the sampler's log-probs (NaN = unscored)
    log_sum_sq_probs: Optional[torch.Tensor] = None  # [B,T] detached: log sum_v p_v^2 of the policy (WPO)
    lse: Optional[torch.Tensor] = None          # [B,T] differentiable: the head's log normalizer (z-loss)
    mean_logp: Optional[torch.Tensor] = None    # [B,T] differentiable: (1/V) sum_v w_v log p_v (SFT label smoothing)
    target_weight: Optional[torch.Tensor] = None  # [B,T] detached: the class weight of each target (SFT)
    distill: Optional[torch.Tensor] = None      # [B,T] differentiable: the divergence to the teacher head


def _tensor(name, t, device, against="logp"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {against} is on {device}")
    return t


def _shape(name, t, shapes):
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _per_token(name, t, shape, valid, dtype, device, *, detach, finite=False):
    if t is None:
        return None
    _tensor(name, t, device)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    _shape(name, t, [shape])
    t = t.detach() if detach else t
    if finite and not (torch.isfinite(t) | ~valid).all():  # a NaN/-inf log-prob would poison the loss
        bad = torch.nonzero(~torch.isfinite(t) & valid)[:5].tolist()
        raise ValueError(f"{name} must be finite at unmasked positions, got non-finite values at [row, token] {bad}")
    return torch.where(valid, t.to(dtype), torch.zeros((), dtype=dtype, device=device))


def _per_sequence(name, t, B, dtype, device):
    """A finite real score per sequence, [B]."""
    if t is None:
        return None
    _tensor(name, t, device)
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    _shape(name, t, [(B,)])
    t = t.detach().to(dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got non-finite values at rows {torch.nonzero(~torch.isfinite(t)).flatten().tolist()}")
    return t


def check_mask(mask, shape, device, against="logp"):
    """`mask` as bool [shape]: bool or 0/1 values, anything else an error naming mask (all True when None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    _tensor("mask", mask, device, against)
    _shape("mask", mask, [shape])
    if mask.dtype != torch.bool:
        if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be bool or hold only 0 and 1")
        mask = mask != 0
    return mask


def _labels(labels, B, device, dtype):
    if labels is None:
        return None
    _tensor("labels", labels, device)
    _shape("labels", labels, [(B,)])
    if labels.dtype == torch.bool:
        return torch.where(labels, 1.0, -1.0).to(dtype)
    if labels.is_complex() or not ((labels == 1) | (labels == -1)).all():
        raise ValueError("labels must hold +1 (chosen / desirable) or -1 (rejected / undesirable) for every row")
    return labels.detach().to(dtype)


def _groups(group_ids, B, device):
    if group_ids is None:
        return None, 0
    _tensor("group_ids", group_ids, device)
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    _shape("group_ids", group_ids, [(B,)])
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _bool_rows(name, t, B, device, meaning):
    """A per-sequence flag [B]: bool, or an integer tensor of 0/1; anything else a TypeError naming it."""
    _tensor(name, t, device)
    _shape(name, t, [(B,)])
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not ((t == 0) | (t == 1)).all():
            raise TypeError(f"{name} must be a bool tensor (True for {meaning}), got dtype {t.dtype}")
        t = t != 0
    return t


def _offline(offline, B, device):
    if offline is None:
        return torch.zeros(B, dtype=torch.bool, device=device)
    return _bool_rows("offline", offline, B, device, "offline rows")


def _num_items(n):
    if n is None:
        return None
    if isinstance(n, (tuple, list)):  # offline_role='sft': (online tokens, offline tokens), each may be 0
        if len(n) != 2:
            raise ValueError(f"num_items_in_batch as a pair holds (online tokens, offline tokens), got {n!r}")
        return tuple(_count(x) for x in n)
    return _count(n, positive=True)


def _count(n, positive=False):
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(n.shape)}")
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or not (n > 0 or (n == 0 and not positive)):
        raise ValueError(f"num_items_in_batch must be a {'positive' if positive else 'non-negative'} finite number, got {n!r}")
    return float(n)


def prepare_batch(logp, *, mask, entropy, kl, rewards, advantages, group_ids, labels, baselines,
                  offline, old_logp, ref_logp, num_items_in_batch, rollout_logp=None, log_sum_sq_probs=None,
                  lse=None, mean_logp=None, target_weight=None, distill=None) -> Batch:
    """Validate every input against logp [B,T] and return them cast to the statistics dtype."""
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point tensor, got dtype {logp.dtype}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T] (sequences x tokens), got shape {tuple(logp.shape)}")
    B, T = logp.shape
    device, dtype = logp.device, stat_dtype(logp.dtype)
    valid = check_mask(mask, (B, T), device)
    zero = torch.zeros((), dtype=dtype, device=device)
    m = valid.to(dtype)

    if not bool((torch.isfinite(logp.detach()) | ~valid).all()):
        bad = torch.nonzero(~torch.isfinite(logp.detach()) & valid)[:5].tolist()
        raise ValueError(f"logp must be finite at unmasked positions, got non-finite values at [row, token] {bad}: "
                         "targets there have probability 0 (e.g. a token of a vocabulary row masked with a -inf bias)")
    l = torch.where(valid, logp.to(dtype), zero)
    off = _offline(offline, B, device)
    lo = _per_token("old_logp", old_logp, (B, T), valid, dtype, device, detach=True, finite=True)
    # Absent behaviour log-probs mean on-policy: sg[l]. Offline rows never use a ratio.
    lo = l.detach() if lo is None else torch.where(off[:, None], l.detach(), lo)

    adv = None
    if advantages is not None:
        _tensor("advantages", advantages, device)
        if advantages.is_complex() or not advantages.is_floating_point():
            raise TypeError(f"advantages must be a floating-point tensor, got dtype {advantages.dtype}")
        _shape("advantages", advantages, [(B,), (B, T)])
        adv = advantages.detach().to(dtype)
        adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
        adv = torch.where(valid, adv, zero)
        if not torch.isfinite(adv).all():
            raise ValueError("advantages must be finite at unmasked positions")

    group, num_groups = _groups(group_ids, B, device)
    return Batch(
        logp=l, mask=m, lengths=m.sum(1), old_logp=lo, offline=off,
        ref_logp=_per_token("ref_logp", ref_logp, (B, T), valid, dtype, device, detach=True, finite=True),
        entropy=_per_token("entropy", entropy, (B, T), valid, dtype, device, detach=False),
        kl=_per_token("kl", kl, (B, T), valid, dtype, device, detach=False),
        rewards=_per_sequence("rewards", rewards, B, dtype, device),
        advantages=adv,
        baselines=_per_sequence("baselines", baselines, B, dtype, device),
        labels=_labels(labels, B, device, dtype),
        group=group, num_groups=num_groups,
        num_items=_num_items(num_items_in_batch),
        rollout_logp=_per_token("rollout_logp", rollout_logp, (B, T), valid, dtype, device, detach=True),
        log_sum_sq_probs=_per_token("log_sum_sq_probs", log_sum_sq_probs, (B, T), valid, dtype, device, detach=True),
        lse=_per_token("lse", lse, (B, T), valid, dtype, device, detach=False, finite=True),
        mean_logp=_per_token("mean_logp", mean_logp, (B, T), valid, dtype, device, detach=False, finite=True),
        target_weight=_per_token("target_weight", target_weight, (B, T), valid, dtype, device, detach=True,
                                 finite=True),
        distill=_per_token("distill", distill, (B, T), valid, dtype, device, detach=False),
    )


def truncation_mask(truncated, mask, shape, device):
    """The mask with the rows of truncated completions [B] (bool) dropped (mask_truncated_completions)."""
    truncated = _bool_rows("truncated", truncated, shape[0], device, "completions cut at the length limit")
    return check_mask(mask, shape, device) & ~truncated[:, None]


def uses_reference_score(method: str, opts: Options, has_ref: bool) -> bool:
    """Whether the implicit score is D_i (against the reference) rather than S_i."""
    return opts.score == "implicit" and IMPLICIT_REFERENCE.get(method, has_ref)


def uses_ref_logp(method: str, opts: Options) -> bool:
    """Whether the configured objective would use reference log-probs (gro_loss then computes them)."""
    kl_tokens = opts.kl_coef != 0 and opts.kl_estimator != "full"
    return kl_tokens or (opts.score == "implicit" and IMPLICIT_REFERENCE.get(method, True))


def kl_is_used(opts: Options, given_advantages: bool) -> bool:
    """A KL term is used in the loss, or in the reward when the weights are formed from rewards."""
    if opts.kl_coef == 0:
        return False
    return opts.kl_placement == "loss" or (not given_advantages and opts.score in ("reward", "token_return"))


def reads_old_logp(opts: Options, given_advantages: bool = False) -> bool:
    """Whether the configuration reads the behaviour log-probs `old_logp` of its online rows: an importance
    ratio (every surrogate but logp and dft), the rollout correction's train-side log-prob, the off-policy
    mask's behaviour, a sampled KL in the reward (at the behaviour policy), or the ratio on the KL term."""
    reward_kl = (kl_is_used(opts, given_advantages) and opts.kl_placement == "reward"
                 and opts.kl_estimator != "full")
    bias_corrected_kl = opts.use_bias_correction_kl and opts.kl_coef != 0 and opts.kl_placement == "loss"
    return (opts.surrogate not in ("logp", "dft") or opts.rollout_correction is not None
            or opts.off_policy_mask_threshold is not None or reward_kl or bias_corrected_kl)


def reads_group_ids(opts: Options, given_advantages: bool = False) -> bool:
    """Whether the weights read the groups: a group anchor, a group scale, HPT's per-group switch
    (given advantages replace the weights)."""
    return not given_advantages and (opts.anchor in ("group_mean", "leave_one_out", "pair")
                                     or opts.scale in ("group_std", "nonzero_fraction")
                                     or opts.switch_threshold is not None)


def reads_offline(opts: Options, given_advantages: bool = False) -> bool:
    """Whether marking rows offline changes anything: their own role or coefficients, their own surrogate
    (the ratio surrogates' rows without a ratio, offline_surrogate), no rollout correction / off-policy mask
    on them, or their sampled reward KL at sg[l]."""
    return (opts.offline_role == "sft" or opts.offline_coef != 1 or opts.offline_neg_coef != 1
            or opts.surrogate not in ("logp", "dft") or opts.offline_surrogate != "logp"
            or opts.rollout_correction is not None or opts.off_policy_mask_threshold is not None
            or (kl_is_used(opts, given_advantages) and opts.kl_placement == "reward"))


def unread_inputs(method: str, opts: Options, present, given_advantages: bool) -> dict:
    """The inputs among `present` (names of the tensor inputs passed) that the configuration does not read,
    each with what would read it. gro_objective and gro_loss refuse them (docs/options.md, "Inputs")."""
    out = {}
    if "old_logp" in present and not reads_old_logp(opts, given_advantages):
        out["old_logp"] = (f"surrogate={opts.surrogate!r} has no importance ratio (old_logp is read by the ratio "
                           "surrogates, rollout_correction, off_policy_mask_threshold, a sampled KL in the reward, "
                           "use_bias_correction_kl)")
    if "labels" in present and (given_advantages or opts.separation != "label"):
        out["labels"] = ("given advantages replace the weights labels form" if given_advantages else
                         f"separation={opts.separation!r} (labels are read by separation='label': dpo, kto, ...)")
    if "rewards" in present and opts.score not in ("reward", "token_return"):
        out["rewards"] = f"score={opts.score!r} (rewards are read by score='reward' or 'token_return': grpo, rloo, ...)"
    if "baselines" in present and (given_advantages or opts.anchor != "baseline"):
        out["baselines"] = ("given advantages replace the weights baselines anchor" if given_advantages else
                            f"anchor={opts.anchor!r} (baselines are read by anchor='baseline': remax)")
    if "group_ids" in present and not reads_group_ids(opts, given_advantages):
        out["group_ids"] = ("given advantages replace the weights groups form" if given_advantages else
                            f"anchor={opts.anchor!r} and scale={opts.scale!r} read no groups (group_ids are read by "
                            "anchor='group_mean' / 'leave_one_out' / 'pair', scale='group_std' / 'nonzero_fraction', "
                            "switch_threshold)")
    if "offline" in present and not reads_offline(opts, given_advantages):
        out["offline"] = (f"its offline rows would be trained exactly as online ones (surrogate={opts.surrogate!r}, "
                          "offline_role='group', offline_coef=1; offline is read by the ratio surrogates, "
                          "offline_surrogate, offline_coef, offline_role='sft': gro, luffy, chord, hpt, ...)")
    if "ref_head" in present:
        reads_ref = opts.kl_estimator == "full" or ("ref_logp" not in present and uses_ref_logp(method, opts))
        if not reads_ref:
            out["ref_hidden"] = ("the reference head gives ref_logp for kl_coef != 0 or a reference-scored method "
                                 "(dpo, kto, ...), or the exact KL with kl_estimator='full'"
                                 + ("; ref_logp was given too" if "ref_logp" in present else ""))
    return out


def read_inputs(method: str, kwargs: dict) -> dict:
    """`kwargs` of a gro_loss / gro_objective call without the per-row inputs its configuration does not read
    (the objective refuses them). For callers whose batch carries group ids, offline flags, behaviour log-probs
    for every method (GROTrainer, the verl integration): they pass each only where it is read."""
    opts = resolve_options(method, {k: v for k, v in kwargs.items() if k in OPTIONS})
    present = {k for k in ("old_logp", "ref_logp", "rewards", "labels", "group_ids", "offline", "baselines")
               if kwargs.get(k) is not None}
    if kwargs.get("ref_hidden") is not None:
        present.add("ref_head")
    unread = set(unread_inputs(method, opts, present, kwargs.get("advantages") is not None))
    if "ref_hidden" in unread:  # the reference head
        unread |= {"ref_weight", "ref_bias"}
    return {k: v for k, v in kwargs.items() if k not in unread}


def refuse_unread_inputs(method: str, opts: Options, present, given_advantages: bool) -> None:
    unread = unread_inputs(method, opts, present, given_advantages)
    if unread:
        name, why = next(iter(unread.items()))
        raise ValueError(f"{name} was given but method={method!r} does not read it: {why}. Leave it out "
                         f"(unread inputs are refused, not ignored; docs/options.md). A batch that carries every "
                         f"field for every method can pass gro_kernels.objective.inputs.read_inputs(method, kwargs), "
                         f"which keeps the inputs the method reads")


def check_requirements(method: str, opts: Options, b: Batch, *, given: dict, present: set) -> None:
    """Errors for inputs the configured method needs but did not get, or cannot use. `given`: the
    options the caller passed (a preset's value is not a choice the caller made); `present`: the names of
    the tensor inputs passed (the batch fills some in, e.g. old_logp)."""
    who = f"method={method!r}"
    if b.advantages is not None and b.rewards is not None:
        raise ValueError("pass either rewards or advantages: given advantages replace the weights formed from rewards")
    if kl_is_used(opts, b.advantages is not None):
        if opts.kl_estimator == "full" and b.kl is None:
            raise ValueError(f"{who} with kl_estimator='full' needs the exact KL: pass kl (or ref_hidden and ref_weight to gro_loss)")
        if opts.kl_estimator != "full" and b.ref_logp is None:
            raise ValueError(f"{who} with kl_coef={opts.kl_coef} needs ref_logp (or ref_hidden and ref_weight to gro_loss)")
    if opts.entropy_coef != 0 and b.entropy is None:
        raise ValueError(f"entropy_coef={opts.entropy_coef} needs entropy (per-token entropies [B, T])")
    if opts.entropy_agg == "token_mean" and b.num_items is not None:
        raise ValueError("entropy_agg='token_mean' is TRL's mean entropy of this call's tokens; it does not take "
                         "num_items_in_batch (leave entropy_agg='loss' to aggregate the bonus like the loss)")
    if opts.top_entropy_quantile < 1 and b.entropy is None:
        raise ValueError(f"top_entropy_quantile={opts.top_entropy_quantile} selects tokens by entropy: pass entropy "
                         "[B, T] (gro_loss: return_entropy=True)")
    if opts.rollout_correction is not None and b.rollout_logp is None:
        raise ValueError(f"rollout_correction={opts.rollout_correction!r} needs rollout_logp [B, T] (the sampler's log-probs)")
    if opts.use_weighting != (b.log_sum_sq_probs is not None):
        raise ValueError("use_weighting=True (WPO) and log_sum_sq_probs [B, T] (log sum_v p_v^2 of the policy) go "
                         f"together: got use_weighting={opts.use_weighting}, log_sum_sq_probs "
                         f"{'given' if b.log_sum_sq_probs is not None else 'not given'}")
    if opts.z_loss_coef != 0 and b.lse is None:
        raise ValueError(f"z_loss_coef={opts.z_loss_coef} needs lse [B, T] (the head's log normalizer; gro_loss "
                         "computes it in its pass)")
    ce_smoothing = opts.label_smoothing != 0 and ce_smoothing_reader(opts)
    if ce_smoothing and b.mean_logp is None:
        raise ValueError(f"{who} with label_smoothing={opts.label_smoothing} needs mean_logp [B, T] ((1/V) sum_v w_v "
                         "log p_v, label smoothing's term; gro_loss computes it in its pass)")
    if b.mean_logp is not None and not ce_smoothing:
        raise ValueError("mean_logp was given but nothing uses it: it is SFT's label_smoothing term")
    if b.target_weight is not None:
        if not ce_smoothing_reader(opts):
            raise ValueError(f"target_weight (class weights) applies to the SFT preset (method='sft'), got {who}")
        if (b.target_weight < 0).any():
            raise ValueError("target_weight must be >= 0 (class weights)")
    refuse_unread_inputs(method, opts, present, b.advantages is not None)
    if opts.off_policy_mask_threshold is not None and "rollout_logp" not in present and "old_logp" not in present:
        raise ValueError(f"off_policy_mask_threshold={opts.off_policy_mask_threshold} masks sequences whose behaviour "
                         "policy is far from the current one: pass rollout_logp [B, T] (the sampler's log-probs) or "
                         "old_logp; without either the behaviour is the current policy and nothing is masked")
    if b.rollout_logp is not None and opts.rollout_correction is None and opts.off_policy_mask_threshold is None:
        raise ValueError("rollout_logp was given but nothing uses it: set rollout_correction and/or off_policy_mask_threshold")
    if "kl_estimator" in given and opts.kl_coef == 0 and b.ref_logp is None and b.kl is None:
        raise ValueError("option kl_estimator is not read: kl_coef is 0 and there is no reference (ref_logp, kl, or "
                         "the reference head) to report a KL for")
    if opts.distill_coef != 0 and b.distill is None:
        raise ValueError(f"{who} with distill_coef={opts.distill_coef} needs the divergence to the teacher: pass distill "
                         "[B, T] (or teacher_hidden and teacher_weight to gro_loss)")
    if b.distill is not None and opts.distill_coef == 0:
        raise ValueError("distill (the divergence to a teacher) was given but distill_coef is 0: use method='distill' "
                         "or set distill_coef")
    if isinstance(b.num_items, tuple) and opts.offline_role != "sft":
        raise ValueError("num_items_in_batch is one number (a pair only with offline_role='sft', whose online and "
                         f"offline rows have their own token means); got {b.num_items!r}")
    if opts.offline_role == "sft" and b.num_items is not None and not isinstance(b.num_items, tuple):
        raise ValueError("offline_role='sft' has two token means (online rows, offline rows): pass num_items_in_batch "
                         "as a pair (online tokens, offline tokens), e.g. from objective.offline.sft_token_counts")
    if opts.switch_threshold is not None and (b.rewards is None or b.group is None):
        raise ValueError(f"switch_threshold={opts.switch_threshold} (HPT) switches each group by its mean online "
                         "reward: pass rewards [B] and group_ids [B] (not advantages)")
    if b.advantages is not None:
        unread = [name for name in WEIGHT_OPTIONS if name in given]
        if opts.kl_coef != 0 and opts.kl_placement == "reward" and ("kl_coef" in given or "kl_placement" in given):
            unread.append("kl_coef")  # a reward KL enters the weights formed from rewards
        if unread:
            raise ValueError(f"option(s) {', '.join(unread)} shape the weights formed from rewards, labels or scores; "
                             "given advantages replace those weights, so they would be ignored: leave them out, or "
                             "fold them into the advantages (a KL: kl_placement='loss')")
        return  # steps 1-4 (scores, anchors, separation, weighting) are replaced
    if method == "distill" and b.rewards is None:
        return  # pure distillation: no policy-gradient term
    if opts.score in ("reward", "token_return") and b.rewards is None:
        raise ValueError(f"{who} scores sequences by reward: pass rewards [B] (or advantages)")
    if opts.score == "implicit" and IMPLICIT_REFERENCE.get(method) and b.ref_logp is None:
        raise ValueError(f"{who} scores by the log-ratio to the reference: pass ref_logp (or ref_hidden and ref_weight to gro_loss)")
    if opts.separation == "label" and b.labels is None:
        raise ValueError(f"{who} separates by label: pass labels [B] (+1 chosen / desirable, -1 rejected / undesirable)")
    if method == "kto" and "anchor_value" not in given:
        raise ValueError(
            "method='kto' needs its reference point z0 as anchor_value: KTO weighs each completion by "
            "beta (D_i - z0), D_i its log-ratio to the reference, z0 = KL(policy || reference) estimated per "
            "batch and detached (TRL: the mean log-ratio of mismatched prompt/completion pairs, clamped at 0). "
            "Pass anchor_value=z0; method='apo_zero_unpaired' is the method with z0 = 0")
    if opts.anchor == "baseline" and b.baselines is None:
        raise ValueError(f"{who} with anchor='baseline' needs baselines [B] (e.g. the greedy decode's reward)")
    needs_groups = opts.anchor in ("group_mean", "leave_one_out", "pair") or opts.scale == "group_std"
    if needs_groups and b.group is None:
        raise ValueError(f"{who} (anchor={opts.anchor!r}, scale={opts.scale!r}) needs group_ids [B]")
    if opts.anchor == "group_mean" and b.num_groups == b.mask.shape[0]:
        raise ValueError(
            f"{who} compares each sequence with its group's mean (anchor='group_mean'), but every group of "
            "group_ids has one sequence, so every weight would be 0 and nothing would train. Give the samples "
            "of one prompt one id (e.g. torch.arange(prompts).repeat_interleave(samples_per_prompt)). (Groups "
            "whose rewards are all equal are fine: their weights are 0 by design.)")
    if opts.anchor == "leave_one_out":
        sizes = torch.bincount(b.group, minlength=b.num_groups)
        if (sizes < 2).any():
            raise ValueError("anchor='leave_one_out' needs at least 2 sequences in every group of group_ids; "
                             f"smallest group has {int(sizes.min())}")
