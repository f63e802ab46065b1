"""How offline rows (dataset answers: `offline=True`) enter the objective (docs/methods.md, "Offline data").

`offline_role="group"` (GRO, LUFFY): an offline row is a member of its prompt's group: scored by the
same reward, it shares the group's anchor and scale, so it is pushed up or down relative to the
group (`offline_neg_coef` scales the pushes down; 0 never pushes an offline answer down). This is
`weights.sequence_weights` on the whole batch.

`offline_role="sft"` (CHORD, HPT): offline rows are demonstrations beside the group. The group's
weights are formed from its online rows alone; each offline row gets weight +1 (SFT, times
`offline_coef`; given advantages replace it). The two parts have their own aggregation: the online rows with `loss_agg` over
the online rows, the offline rows with a token mean over the offline tokens, mixed as
`(1 - mu) online + mu offline` when `mu` is given (CHORD), else summed (HPT). With
`switch_threshold` (HPT) each group trains one way only: a group whose mean online reward is at or
below the threshold (the pass rate for 0/1 rewards) and that has an offline row learns that row by
SFT and drops its online rows; every other group is pure RL and its offline rows are dropped.

In both roles `offline_surrogate` says how an offline token's weight meets the policy (surrogates.py):
`logp` A l, `shaping` A p / (p + shaping_gamma) (LUFFY), `phi` sg[p (1 - p)] A l (CHORD-phi).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Optional, Tuple

import torch

from .aggregation import token_coefficients
from .inputs import Batch
from .options import Options


def scale_offline(opts: Options, w: torch.Tensor, offline: torch.Tensor) -> torch.Tensor:
    """w times offline_coef on offline rows, and times offline_neg_coef where an offline weight is negative.
    `offline` is broadcastable to w."""
    w = torch.where(offline, w * opts.offline_coef, w)
    if opts.offline_neg_coef != 1.0:
        w = torch.where(offline & (w < 0), w * opts.offline_neg_coef, w)
    return w


def sft_rows(opts: Options, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(online rows that train by RL, offline rows that train by SFT), each [B] bool, for offline_role='sft'."""
    online, offline = ~b.offline, b.offline
    if opts.switch_threshold is None:
        return online, offline
    g, n = b.group, b.num_groups
    r = torch.where(online, b.rewards, torch.zeros_like(b.rewards)).double()
    counts = torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, g, online.double())
    sums = torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, g, r)
    has_offline = torch.zeros(n, dtype=torch.bool, device=r.device).index_fill_(0, g[offline], True)
    # A group without online rows has nothing to learn by RL: it takes its offline rows.
    low = torch.where(counts > 0, sums / counts.clamp(min=1) <= opts.switch_threshold, torch.ones_like(has_offline))
    sft_group = (low & has_offline)[g]
    return online & ~sft_group, offline & sft_group


def sft_token_counts(opts: Options, b: Batch) -> Tuple[float, float]:
    """The tokens of the two token means of offline_role='sft' (RL rows, SFT rows): what a trainer passes as
    `num_items_in_batch=(online, offline)` to make gradient accumulation over micro-batches exact."""
    rl, sft = sft_rows(opts, b)
    return float((b.mask * rl[:, None]).sum()), float((b.mask * sft[:, None]).sum())


def _select(b: Batch, rows: torch.Tensor) -> Batch:
    """The batch restricted to `rows` (a [B] bool), its groups renumbered 0..n-1."""
    idx = torch.nonzero(rows).flatten()

    def pick(t):  # per-row tensors; a NotYetComputed placeholder of the one pass (or a count) stays as it is
        return t.index_select(0, idx) if isinstance(t, torch.Tensor) and t.dim() >= 1 else t

    group, num_groups = None, 0
    if b.group is not None:
        uniq, group = torch.unique(b.group.index_select(0, idx), return_inverse=True)
        num_groups = int(uniq.numel())
    rest = {f.name: pick(getattr(b, f.name)) for f in fields(b) if f.name not in ("group", "num_groups")}
    return Batch(**rest, group=group, num_groups=num_groups)


def sft_plan(method: str, opts: Options, b: Batch, online_weights) -> Tuple[torch.Tensor, torch.Tensor, object]:
    """(A [B,T], c [B,T], the online rows' Weights) for offline_role='sft'.

    `online_weights(sub_batch)` forms the Weights of the online RL rows (sequence_weights on them alone, or
    their given advantages)."""
    rl, sft = sft_rows(opts, b)
    m = b.mask
    if opts.anchor == "leave_one_out" and b.advantages is None and bool(rl.any()):
        sizes = torch.bincount(b.group[rl], minlength=b.num_groups)
        if ((sizes > 0) & (sizes < 2)).any():
            raise ValueError("offline_role='sft' forms the weights from the online rows alone, and anchor="
                             "'leave_one_out' needs at least 2 of them in every group")
    A = torch.zeros_like(m)
    w_sub = None
    if bool(rl.any()):
        w_sub = online_weights(_select(b, rl))
        A[rl] = w_sub.advantages
    # An offline row's SFT weight is +1, or its given advantage.
    off = m if b.advantages is None else b.advantages * m
    A = torch.where(sft[:, None], off * opts.offline_coef, A)
    n_on, n_off = _part_counts(b.num_items)
    units = int(rl.sum()) if w_sub is None else w_sub.units
    c_on = token_coefficients(opts.loss_agg, m * rl[:, None], units=units,
                              max_completion_length=opts.max_completion_length, num_items=n_on)
    c_off = token_coefficients("token_mean", m * sft[:, None], units=1, num_items=n_off)
    if opts.mu is not None:
        c_on, c_off = (1 - opts.mu) * c_on, opts.mu * c_off
    return A, c_on + c_off, w_sub


def _part_counts(num_items) -> Tuple[Optional[float], Optional[float]]:
    """The pair's two counts; a part with no tokens anywhere has none here either, so any positive count does."""
    if num_items is None:
        return None, None
    return tuple(max(n, 1.0) for n in num_items)

