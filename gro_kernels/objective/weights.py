"""Forming the weights (docs/objective.md, steps 1-4): score -> anchor -> separation -> weighting.

Everything here is detached: the weights are `sg[w_i]`. Each `w_i` is `-dL/dS_i` of the method's
loss, so `sum_i w_i grad S_i` is the method's gradient. The RL-free weightings also return the
method's own loss value per unit (pair or sequence) so that `loss` can report it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .inputs import Batch, uses_reference_score
from .offline import scale_offline
from .options import PAIR_WEIGHTINGS, Options
from .pair_losses import odds_ratio_weights, pair_loss_weights


@dataclass
class Weights:
    advantages: torch.Tensor           # A [B,T], 0 where masked
    weights: torch.Tensor              # w [B] (or [B,T] for token-level scores)
    units: int                         # n: sequences, or pairs for pairwise weightings
    unit_losses: Optional[torch.Tensor] = None   # the method's own loss per unit (RL-free), or None
    scores: Optional[torch.Tensor] = None
    anchors: Optional[torch.Tensor] = None
    signs: Optional[torch.Tensor] = None


# ---- group statistics ------------------------------------------------------------------------

def _group_sums(values, group, num_groups):
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def group_mean(values, group, num_groups):
    """Per-row mean of the row's group, and whether the group's values are all equal.

    Sums in float64: float32 scores near 1e30 would overflow a float32 sum or sum of squares."""
    wide = values.double()
    counts = _group_sums(torch.ones_like(wide), group, num_groups)
    mean = (_group_sums(wide, group, num_groups) / counts)[group].to(values.dtype)
    vmax = torch.full((num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    vmin = torch.full((num_groups,), torch.inf, dtype=values.dtype, device=values.device)
    vmax = vmax.scatter_reduce(0, group, values, "amax")
    vmin = vmin.scatter_reduce(0, group, values, "amin")
    return mean, (vmax == vmin)[group]


def group_std(values, group, num_groups):
    """Per-row std of the row's group, Bessel-corrected; 0 for a group of one."""
    wide = values.double()
    counts = _group_sums(torch.ones_like(wide), group, num_groups)
    mean = (_group_sums(wide, group, num_groups) / counts)[group]
    ss = _group_sums((wide - mean) ** 2, group, num_groups)
    return (ss / (counts - 1).clamp(min=1)).sqrt()[group].to(values.dtype)


def _divide(num, scale):
    """num / scale, exactly 0 where num is 0 (equal scores: no direction, even when scale is 0)."""
    zero = num == 0
    if ((scale == 0) & ~zero).any():
        raise ValueError("the scale (std + std_eps) is 0 for scores that differ from their anchor, so the "
                         "weight would be infinite: use std_eps > 0")
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(scale), scale))


def _check_finite(w):
    if not torch.isfinite(w).all():
        raise ValueError("the sequence weights overflow (non-finite): rewards, baselines or scores are too large "
                         "for the statistics dtype; rescale them")


def pair_partner(group, num_groups):
    """Index of the other member of each row's pair; every group must have exactly two rows."""
    sizes = torch.bincount(group, minlength=num_groups)
    if (sizes != 2).any():
        raise ValueError(
            "pairwise methods need group_ids that form pairs: every group id exactly twice "
            f"(found group sizes {sorted(set(sizes.tolist()))})"
        )
    order = torch.argsort(group, stable=True)
    first, second = order[0::2], order[1::2]
    partner = torch.empty_like(group)
    partner[first], partner[second] = second, first
    return partner


# ---- steps 1-2: score and anchor -----------------------------------------------------------

def sequence_scores(method, opts: Options, b: Batch, reward_kl):
    """The raw score x_i and its gain g (s_i = g x_i): reward (g=1) or implicit X_i (g=beta)."""
    if opts.score == "reward":
        x = b.rewards if reward_kl is None else b.rewards - opts.kl_coef * reward_kl
        return x, 1.0
    if opts.score == "implicit":
        use_ref = uses_reference_score(method, opts, b.ref_logp is not None)
        x = (b.logp.detach() - b.ref_logp) if use_ref else b.logp.detach()
        x = (b.mask * x).sum(1)
        if opts.length_normalize:
            x = x / b.lengths.clamp(min=1)
        return x, opts.beta
    return torch.zeros_like(b.lengths), 1.0  # "none": no score (SFT)


def anchors(opts: Options, x, b: Batch, partner):
    """The level a_i each score is compared with, in the units of x."""
    kind = opts.anchor
    if kind == "none":
        return torch.zeros_like(x)
    if kind == "constant":
        return torch.full_like(x, opts.anchor_value)
    if kind == "baseline":
        return b.baselines
    if kind == "pair":
        return x[partner]
    if kind == "batch_mean":
        group, num_groups = torch.zeros_like(x, dtype=torch.long), 1
    else:
        group, num_groups = b.group, b.num_groups
    mean, constant = group_mean(x, group, num_groups)
    if kind == "leave_one_out":
        sums = _group_sums(x, b.group, b.num_groups)[b.group]
        counts = _group_sums(torch.ones_like(x), b.group, b.num_groups)[b.group]
        mean = (sums - x) / (counts - 1)
    # A group of equal scores has no direction: give it exactly zero, not rounding noise.
    return torch.where(constant, x, mean)


def _scale(opts: Options, s, b: Batch):
    if opts.scale == "none":
        return torch.ones_like(s)
    if opts.scale == "nonzero_fraction":
        # GPG (verl compute_gpg_outcome_advantage): A = alpha (r - mean_group r), alpha = B / #(r != 0)
        if (torch.bincount(b.group, minlength=b.num_groups) < 2).any():
            raise ValueError("scale='nonzero_fraction' (GPG) needs at least 2 sequences in every group of group_ids "
                             "(verl gives a lone sequence the anchor 0, this package its own reward)")
        nonzero = torch.count_nonzero(b.rewards).clamp(min=1).to(s.dtype)
        return torch.ones_like(s) * nonzero / s.numel()
    if opts.scale == "group_std":
        std = group_std(s, b.group, b.num_groups)
    else:
        std = group_std(s, torch.zeros_like(s, dtype=torch.long), 1)
    return std + opts.std_eps


# ---- steps 3-4: separation and weighting ----------------------------------------------------

def _signs(opts: Options, x, a, b: Batch):
    if opts.separation == "label":
        return b.labels
    if opts.separation == "positive":
        return torch.ones_like(x)
    return torch.sign(x - a)


def _coefficients(opts: Options, y):
    """coef(y): pos_coef for y >= 0, neg_coef for y < 0, in y's dtype (not rounded through float32)."""
    return torch.where(y < 0, y.new_tensor(opts.neg_coef), y.new_tensor(opts.pos_coef))


def _check_pairs(labels, partner):
    if ((labels + labels[partner]) != 0).any():
        raise ValueError("labels: every pair (group id) needs exactly one +1 (chosen) and one -1 (rejected)")


def _sigmoid_pair(opts, x, g, y, partner):
    """Pairwise logistic (DPO, CPL, SimPO): h = s_w - neg_coef s_l - margin."""
    x_w = torch.where(y > 0, x, x[partner])
    x_l = torch.where(y > 0, x[partner], x)
    h = g * (x_w - opts.neg_coef * x_l) - opts.margin
    eps = opts.label_smoothing
    phi = opts.beta * ((1 - eps) * torch.sigmoid(-h) - eps * torch.sigmoid(h))
    pair_loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return phi, pair_loss[y > 0]


def _squared_pair(opts, x, y, partner):
    """IPO: w_w = -w_l = -2 (X_w - X_l - 1/(2 beta))."""
    gap = y * (x - x[partner]) - 1 / (2 * opts.beta)   # X_w - X_l - 1/(2 beta), the same on both rows
    return -2 * gap, (gap ** 2)[y > 0]


def _add_chosen_nll(opts, b: Batch, y, A, unit_losses, units):
    """ORPO / CPO's NLL term: nll_coef x the mean negative log-likelihood of every chosen token. With the
    pair aggregation c = m / pairs, it is the weight nll_coef pairs / (chosen tokens) on each chosen token."""
    chosen = (y > 0)[:, None] * b.mask
    tokens = chosen.sum().clamp(min=1)
    A = A + opts.nll_coef * max(units, 1) / tokens * chosen
    nll = -(chosen * b.logp.detach()).sum() / tokens
    return A, unit_losses + opts.nll_coef * nll


def sequence_weights(method, opts: Options, b: Batch, reward_kl) -> Weights:
    """w_i per sequence, broadcast over its tokens as A[i,t] = w_i."""
    x, g = sequence_scores(method, opts, b, reward_kl)
    pairwise = opts.weighting in PAIR_WEIGHTINGS
    partner = pair_partner(b.group, b.num_groups) if opts.anchor == "pair" else None
    a = anchors(opts, x, b, partner)
    y = _signs(opts, x, a, b)
    coef = _coefficients(opts, y)
    unit_losses = None
    if pairwise:
        _check_pairs(y, partner)

    kind = "pair_loss" if opts.pair_loss is not None else opts.weighting
    token_A = None
    scores, anchor_scores = g * x, g * a
    if kind == "pair_loss":
        token_A, unit_losses, scores = pair_loss_weights(opts, b, y, partner)
        anchor_scores = scores[partner]
        w = token_A.sum(1) / b.lengths.clamp(min=1)   # reported: the mean weight of the row's tokens
    elif kind == "linear":
        w = coef * _divide(g * (x - a), _scale(opts, g * x, b))
    elif kind == "constant":
        w = y * coef
    elif kind == "sigmoid":
        phi, unit_losses = _sigmoid_pair(opts, x, g, y, partner)
        w = y * coef * phi
    elif kind == "squared":
        phi, unit_losses = _squared_pair(opts, x, y, partner)
        w = y * coef * phi
    elif kind == "odds_ratio":  # ORPO: w_i = -dL/dx_i by autograd on the pair loss
        w, unit_losses = odds_ratio_weights(opts, x, y, partner)
    else:  # sigmoid_bell (KTO): u = beta y (X - a); loss coef (1 - sigma(u))
        u = opts.beta * y * (x - a)
        w = y * coef * opts.beta * torch.sigmoid(u) * torch.sigmoid(-u)
        unit_losses = torch.where(b.lengths > 0, coef * (1 - torch.sigmoid(u)), 0.0)

    if partner is not None and unit_losses is not None:
        # A pair of two empty completions has nothing to compare: it reports loss 0 (not the
        # method's constant, log 2 for DPO), as an empty KTO sequence does.
        empty_pair = ((b.lengths + b.lengths[partner]) == 0)[y > 0]
        unit_losses = torch.where(empty_pair, 0.0, unit_losses)
    if opts.length_normalize:
        w = w / b.lengths.clamp(min=1)
    w = torch.where(b.lengths > 0, w, 0.0)  # an empty sequence has nothing to push
    w = scale_offline(opts, w, b.offline)
    _check_finite(w)
    units = b.num_groups if pairwise else x.numel()
    if token_A is None:
        A = w[:, None] * b.mask
    else:
        A = scale_offline(opts, token_A, b.offline[:, None])
    if opts.nll_coef != 0:
        A, unit_losses = _add_chosen_nll(opts, b, y, A, unit_losses, units)
    return Weights(advantages=A, weights=w, units=units, unit_losses=unit_losses,
                   scores=scores, anchors=anchor_scores, signs=y)


def token_weights(opts: Options, b: Batch, token_kl) -> Weights:
    """REINFORCE++: token rewards (terminal reward, minus kl_coef * k per token), returns G[i,t],
    normalized over all valid tokens of the batch."""
    m = b.mask
    token_r = torch.zeros_like(m)
    if m.shape[1] > 0:  # no token at all (targets [B, 0]): no reward to place
        last = (m * torch.arange(1, m.shape[1] + 1, device=m.device, dtype=m.dtype)).argmax(1)
        token_r[torch.arange(m.shape[0], device=m.device), last] = b.rewards
    token_r = token_r * m
    if token_kl is not None:
        token_r = token_r - opts.kl_coef * token_kl * m
    returns = (m * token_r).flip(1).cumsum(1).flip(1)

    G = returns[m > 0]  # the returns of every valid token of the batch
    if opts.anchor == "batch_mean" and G.numel() > 0:
        a = G[0] if bool((G == G[0]).all()) else G.mean()  # equal returns: exactly zero advantages
    else:
        a = G.new_tensor(opts.anchor_value if opts.anchor == "constant" else 0.0)
    scale = G.new_tensor(1.0)
    if opts.scale == "batch_std":
        std = G.double().var(correction=1).sqrt().to(G.dtype) if G.numel() > 1 else G.new_tensor(0.0)
        scale = std + opts.std_eps
    diff = returns - a
    y = b.labels[:, None].expand_as(diff) if opts.separation == "label" else torch.sign(diff)
    coef = _coefficients(opts, y)
    A = coef * _divide(diff * m, scale)
    if opts.length_normalize:
        A = A / b.lengths.clamp(min=1)[:, None]
    A = scale_offline(opts, A, b.offline[:, None]) * m
    _check_finite(A)
    return Weights(advantages=A, weights=A, units=m.shape[0], scores=returns * m, anchors=a * m, signs=y * m)
