"""Sequence weights formed once on the whole generation batch, before it is split into micro-batches.

Reward-scored methods form their weights A[i,t] from batch statistics: the group's mean and std
(GRPO, GRO, ...), the batch's mean and std of the token returns (REINFORCE++). Forming them per
micro-batch would make the gradient depend on `micro_batch_size` and on the number of processes.
So the trainer forms A on the global batch (every process's rows, gathered) with the objective's
own code, `gro_objective`, and passes each micro-batch its rows of A as `advantages`. The weights
of these methods never depend on the current policy (only on rewards and, for a KL in the reward,
on the behaviour and reference log-probs), so forming them first is exact.

Methods whose scores are the policy's own log-probs (DPO, IPO, CPL, SimPO, KTO) keep forming their
weights in the loss: their pairs are never split across micro-batches or processes. KTO's reference
point z0 is a batch statistic too: `kto_reference_point` estimates it as TRL's KTOTrainer does.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from ..objective import gro_objective
from ..objective.inputs import kl_is_used, read_inputs
from ..objective.options import WEIGHT_OPTIONS, resolve_options
from .rollout import IGNORE_INDEX, Batch


def forms_weights_from_rewards(opts) -> bool:
    """Whether the weights come from rewards alone (so they can be formed on the whole batch)."""
    if opts.score not in ("reward", "token_return"):
        return False
    if opts.offline_role == "sft":
        return False  # CHORD / HPT: group statistics over online rows, per-group switching: formed in the loss,
        #               on whole groups (micro_batches keeps them together), with the batch's token counts
    # an exact (full-vocabulary) KL in the reward needs the policy's head: left to the loss
    return not (kl_is_used(opts, False) and opts.kl_placement == "reward" and opts.kl_estimator == "full")


def needs_behaviour_logp(opts) -> bool:
    """A k1/k2/k3 KL in the reward is evaluated at the behaviour policy's log-probs."""
    return kl_is_used(opts, False) and opts.kl_placement == "reward"


_KL_OPTIONS = ("kl_coef", "kl_estimator", "kl_placement")


def weight_options(options: dict, resolved) -> dict:
    """The loss options that form the weights: the weight options, and the KL's when it is in the reward."""
    keep = WEIGHT_OPTIONS + (_KL_OPTIONS if needs_behaviour_logp(resolved) else ())
    return {k: v for k, v in options.items() if k in keep}


def options_beside_advantages(options: dict, resolved) -> dict:
    """The loss options to pass with the advantages formed here: the ones those advantages already
    hold are left out (gro_loss refuses them beside advantages), a KL in the reward included."""
    out = {k: v for k, v in options.items() if k not in WEIGHT_OPTIONS and k not in _KL_OPTIONS}
    if needs_behaviour_logp(resolved):
        out["kl_coef"] = 0.0  # in the advantages already (a preset's KL in the loss must not come back)
    else:
        out.update({k: v for k, v in options.items() if k in _KL_OPTIONS})
    return out


def _rows(batch: Batch, opts, behaviour_logp, world_rank: int, world_size: int) -> dict:
    mask = batch.targets != IGNORE_INDEX
    group = batch.group_ids * world_size + world_rank  # a group lives on one process: make ids global
    t = dict(mask=mask, group_ids=group, offline=batch.offline, rewards=batch.rewards,
             baselines=batch.baselines if opts.anchor == "baseline" else None,
             labels=batch.labels if opts.separation == "label" else None,
             old_logp=behaviour_logp if needs_behaviour_logp(opts) else None,
             ref_logp=batch.ref_logp if needs_behaviour_logp(opts) else None)
    return {k: (None if v is None else v.detach().cpu()) for k, v in t.items()}


def _gather(local: dict, world_size: int) -> tuple:
    """All processes' rows, concatenated in rank order, padded to the widest completion.
    Returns the global rows and the index of this process's first row."""
    parts = [None] * world_size
    dist.all_gather_object(parts, local)
    width = max(p["mask"].shape[1] for p in parts)
    out = {}
    for k in local:
        vals = [p[k] for p in parts]
        if vals[0] is None:
            out[k] = None
            continue
        if vals[0].dim() == 2:
            vals = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in vals]
        out[k] = torch.cat(vals)
    start = sum(p["mask"].shape[0] for p in parts[:dist.get_rank()])
    return out, start


def batch_advantages(method: str, options: dict, batch: Batch, behaviour_logp: Optional[torch.Tensor]) -> torch.Tensor:
    """A[i,t] of this process's rows `[N, C]` (float32), formed on the global batch.

    `options` are the loss options as the trainer passes them to `gro_loss`; only those that form
    the weights are used (`offline_coef` is left to the loss: it scales given advantages of offline
    rows).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    resolved = resolve_options(method, options)
    rows = _rows(batch, resolved, behaviour_logp, rank, world)
    start = 0
    if world > 1:
        rows, start = _gather(rows, world)
    mask = rows.pop("mask")
    opts = weight_options(options, resolved)
    if resolved.distill_coef != 0:
        opts["distill_coef"] = 0.0  # the teacher's divergence is the loss's own term, not part of the weights
    if not needs_behaviour_logp(resolved):
        opts["kl_coef"] = 0.0  # a KL in the loss does not enter the weights
    # The weights of a reward-scored method do not depend on the current log-probs, except through a
    # KL in the reward, which the objective evaluates at the behaviour log-probs (on offline rows: at
    # the policy's, equal to them before the first update). Zeros stand in when there is no such KL.
    logp = rows["old_logp"] if rows["old_logp"] is not None else torch.zeros(mask.shape, dtype=torch.float32)
    out = gro_objective(logp, method=method, mask=mask, **read_inputs(method, {**rows, **opts}))
    n, width = batch.targets.shape
    return out.per_token["advantages"][start:start + n, :width].float().to(batch.targets.device)


def mismatched_pairs(batch: Batch) -> Batch:
    """KTO's mismatched (prompt, completion) pairs, built as TRL's KTOTrainer builds them: each row's
    prompt with the previous row's completion (the completions cycled by one row)."""
    P = batch.prompt_len
    ids = torch.cat([batch.input_ids[:, :P], batch.input_ids[:, P:].roll(1, 0)], 1)
    am = torch.cat([batch.attention_mask[:, :P], batch.attention_mask[:, P:].roll(1, 0)], 1)
    return replace(batch, input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0),
                   targets=batch.targets.roll(1, 0))


def kto_reference_point(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """KTO's z0 from the [N, C] log-probs of `mismatched_pairs` under the policy and the reference
    (0 off the completions): the batch mean of the sequence log-ratios, averaged over processes and
    clamped at 0, without gradient (TRL KTOTrainer, `kl` in `_compute_loss`)."""
    z0 = (policy_logp.double() - ref_logp.double()).sum(1).mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(z0)
        z0 = z0 / dist.get_world_size()
    return float(z0.clamp(min=0))
