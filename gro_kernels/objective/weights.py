"""Forming the weights (GRO.md section 2, steps 1-4): score -> anchor -> separation -> weighting.

Everything here is detached: the weights are `sg[w_i]`. Each `w_i` is `-dL/dS_i` of the method's
loss, so `sum_i w_i grad S_i` is the method's gradient. The RL-free weightings also return the
method's own loss value per unit (pair or sequence) so that `loss` can report it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import math

import torch
import torch.nn.functional as F

from .inputs import Batch, uses_reference_score
from .options import Options


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
    """Per-row mean of the row's group, and whether the group's values are all equal."""
    counts = _group_sums(torch.ones_like(values), group, num_groups)
    mean = (_group_sums(values, group, num_groups) / counts)[group]
    vmax = torch.full((num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    vmin = torch.full((num_groups,), torch.inf, dtype=values.dtype, device=values.device)
    vmax = vmax.scatter_reduce(0, group, values, "amax")
    vmin = vmin.scatter_reduce(0, group, values, "amin")
    return mean, (vmax == vmin)[group]


def group_std(values, group, num_groups):
    """Per-row std of the row's group, Bessel-corrected; 0 for a group of one."""
    counts = _group_sums(torch.ones_like(values), group, num_groups)
    mean, _ = group_mean(values, group, num_groups)
    ss = _group_sums((values - mean) ** 2, group, num_groups)
    return (ss / (counts - 1).clamp(min=1)).sqrt()[group]


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


def _f_scores(opts, log_ratio):
    """f'(pi / pi_ref) of the chosen f-divergence, as a function of the log-ratio u (TRL f-DPO)."""
    kind = opts.f_divergence_type
    if kind == "reverse_kl":
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    alpha = opts.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:   # the limit alpha -> 1 is reverse KL
        return log_ratio
    return (torch.exp(((alpha - 1) * log_ratio).clamp(max=80.0)) - 1) / (alpha - 1)


def _trl_pair_loss(kind, opts, S_w, S_l, R_w, R_l, n_w, n_l, sft_S_w, chosen_tokens):
    """TRL DPOTrainer's per-pair loss of `kind` (dpo_trainer.py, TRL 1.16), from the chosen / rejected
    sequence log-probs S and reference log-probs R [pairs], the completion lengths n, and the
    chosen completions' plain log-likelihoods sft_S_w (the `sft` term). The losses
    TRL writes with `delta_score` / `chosen_scores` use the f-divergence scores; the others the log-ratios."""
    beta, eps = opts.beta, opts.label_smoothing
    cw, cl = S_w - R_w, S_l - R_l          # chosen / rejected log-ratios
    fw, fl = _f_scores(opts, cw), _f_scores(opts, cl)
    delta = fw - fl
    ls = F.logsigmoid
    if kind == "sigmoid":
        return -ls(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":   # TRL's IPO averages the score per token
        return (fw / n_w.clamp(min=1) - fl / n_l.clamp(min=1) - 1 / (2 * beta)) ** 2
    if kind == "sigmoid_norm":
        return -ls(beta * (fw / n_w.clamp(min=1) - fl / n_l.clamp(min=1)))
    if kind == "exo_pair":
        h = beta * delta
        return torch.sigmoid(h) * (ls(h) - math.log1p(-eps)) + torch.sigmoid(-h) * (ls(-h) - math.log(eps))
    if kind == "nca_pair":
        return -ls(beta * cw) - 0.5 * ls(-beta * cw) - 0.5 * ls(-beta * cl)
    if kind == "robust":
        return (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -ls(beta * cw) - ls(-beta * cl)
    if kind == "sppo_hard":
        return (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":   # sort the policy's and the reference's chosen-rejected gaps separately
            d = torch.sort(S_w - S_l).values - torch.sort(R_w - R_l).values
        else:               # sort the chosen and the rejected log-ratios separately
            d = torch.sort(cw).values - torch.sort(cl).values
        return -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * cw) + torch.sigmoid(beta * cl)
    if kind == "apo_down":
        return torch.sigmoid(beta * cw) + 1 - torch.sigmoid(beta * (cw - cl))
    if kind == "discopop":
        h = beta * delta
        mix = torch.sigmoid(h / opts.discopop_tau)
        return -ls(h) * (1 - mix) + torch.exp(-h) * mix
    # sft: the mean negative log-likelihood of the chosen tokens, the same value on every pair
    return (-sft_S_w.sum() / chosen_tokens.clamp(min=1)).expand_as(S_w)


def _length_desensitized(m, n, chosen, rejected, alpha):
    """LD-DPO's per-token factor: 1 on each completion's first min(|y_w|, |y_l|) tokens (the length
    the pair shares), ld_alpha on the rest (TRL ld_alpha)."""
    shared = torch.zeros_like(n)
    shared[chosen] = shared[rejected] = torch.minimum(n[chosen], n[rejected])
    position = m.cumsum(1)
    return torch.where(position <= shared[:, None], m.new_tensor(1.0), m.new_tensor(alpha)) * m


def pair_loss_weights(opts: Options, b: Batch, y, partner):
    """Per-token weights A[i,t] for TRL's DPO loss types (`pair_loss`, combined by `loss_weights`, each
    scaled by WPO's detached pair weight with `use_weighting`), and the per-pair losses.

    The per-pair loss is written once (`_trl_pair_loss`) as a function of the sequence sums
    S_i = sum_t u l (u = 1, or LD-DPO's factor with `ld_alpha`) and of the plain sums the `sft` term
    reads; autograd on those detached sums gives dL/dS, and A[i,t] = -(dL/dS_i u[i,t] + dL/dS_sft_i),
    so sum A grad l is the loss's gradient."""
    m, l = b.mask, b.logp.detach()
    chosen = torch.nonzero(y > 0).flatten()
    rejected = partner[chosen]
    n = b.lengths
    u = m if opts.ld_alpha is None else _length_desensitized(m, n, chosen, rejected, opts.ld_alpha)
    ref = b.ref_logp if b.ref_logp is not None else torch.zeros_like(l)
    with torch.enable_grad():
        S = (u * l).sum(1).requires_grad_()
        S_sft = (m * l).sum(1).requires_grad_()
        R = (u * ref).sum(1)
        scale = 1.0
        if opts.use_weighting:  # WPO: exp of the mean of (l - log sum_v p_v^2) per sequence, detached
            wpo = torch.exp((m * (l - b.log_sum_sq_probs)).sum(1) / n.clamp(min=1))
            scale = wpo[chosen] * wpo[rejected]
        total = torch.zeros_like(S[chosen])
        for kind, weight in zip(opts.pair_loss, opts.loss_weights):
            total = total + weight * scale * _trl_pair_loss(kind, opts, S[chosen], S[rejected], R[chosen], R[rejected],
                                                            n[chosen], n[rejected], S_sft[chosen], n[chosen].sum())
        grad, grad_sft = torch.autograd.grad(total.sum(), (S, S_sft), allow_unused=True)
    grad = torch.zeros_like(S) if grad is None else grad              # only `sft` given
    grad_sft = torch.zeros_like(S) if grad_sft is None else grad_sft  # no `sft` given
    return -(grad[:, None] * u + grad_sft[:, None] * m), total.detach()


def sequence_weights(method, opts: Options, b: Batch, reward_kl) -> Weights:
    """w_i per sequence, broadcast over its tokens as A[i,t] = w_i."""
    x, g = sequence_scores(method, opts, b, reward_kl)
    pairwise = opts.weighting in ("sigmoid", "squared")
    partner = pair_partner(b.group, b.num_groups) if opts.anchor == "pair" else None
    a = anchors(opts, x, b, partner)
    y = _signs(opts, x, a, b)
    coef = _coefficients(opts, y)
    unit_losses = None
    if pairwise:
        _check_pairs(y, partner)

    kind = "pair_loss" if opts.pair_loss is not None else opts.weighting
    token_A = None
    if kind == "pair_loss":
        token_A, unit_losses = pair_loss_weights(opts, b, y, partner)
        w = token_A.sum(1) / b.lengths.clamp(min=1)   # reported: the mean weight of the row's tokens
    elif kind == "linear":
        w = coef * g * (x - a) / _scale(opts, g * x, b)
    elif kind == "constant":
        w = y * coef
    elif kind == "sigmoid":
        phi, unit_losses = _sigmoid_pair(opts, x, g, y, partner)
        w = y * coef * phi
    elif kind == "squared":
        phi, unit_losses = _squared_pair(opts, x, y, partner)
        w = y * coef * phi
    else:  # sigmoid_bell (KTO): u = beta y (X - a); loss coef (1 - sigma(u))
        u = opts.beta * y * (x - a)
        w = y * coef * opts.beta * torch.sigmoid(u) * torch.sigmoid(-u)
        unit_losses = torch.where(b.lengths > 0, coef * (1 - torch.sigmoid(u)), 0.0)

    if opts.length_normalize:
        w = w / b.lengths.clamp(min=1)
    w = torch.where(b.lengths > 0, w, 0.0)  # an empty sequence has nothing to push
    w = torch.where(b.offline, w * opts.offline_coef, w)
    units = b.num_groups if pairwise else x.numel()
    if token_A is None:
        A = w[:, None] * b.mask
    else:
        A = torch.where(b.offline[:, None], token_A * opts.offline_coef, token_A)
    return Weights(advantages=A, weights=w, units=units, unit_losses=unit_losses,
                   scores=g * x, anchors=g * a, signs=y)


def token_weights(opts: Options, b: Batch, token_kl) -> Weights:
    """REINFORCE++: token rewards (terminal reward, minus kl_coef * k per token), returns G[i,t],
    normalized over all valid tokens of the batch."""
    m = b.mask
    last = (m * torch.arange(1, m.shape[1] + 1, device=m.device, dtype=m.dtype)).argmax(1)
    token_r = torch.zeros_like(m)
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
        scale = (G.var(correction=1).sqrt() if G.numel() > 1 else G.new_tensor(0.0)) + opts.std_eps
    diff = returns - a
    y = b.labels[:, None].expand_as(diff) if opts.separation == "label" else torch.sign(diff)
    coef = _coefficients(opts, y)
    A = coef * diff / scale
    if opts.length_normalize:
        A = A / b.lengths.clamp(min=1)[:, None]
    A = torch.where(b.offline[:, None], A * opts.offline_coef, A) * m
    return Weights(advantages=A, weights=A, units=m.shape[0], scores=returns * m, anchors=a, signs=y * m)
