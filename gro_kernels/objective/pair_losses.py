"""TRL DPOTrainer's preference loss types as GRO weights (`pair_loss`, `loss_weights`, f-divergence
scores, WPO's `use_weighting`, LD-DPO's `ld_alpha`). docs/methods.md gives each definition.

Each per-pair loss is written once, as a function of the pair's sequence sums; the weights are its
negative gradient w.r.t. those sums (autograd on detached [B] vectors), so the GRO gradient is the
loss's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .inputs import Batch
from .options import Options


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
    scaled by WPO's detached pair weight with `use_weighting`), the per-pair losses, and each row's
    implicit reward beta (S_i - R_i) as TRL's DPOTrainer logs it (LD-DPO-weighted with `ld_alpha`).

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
    return -(grad[:, None] * u + grad_sft[:, None] * m), total.detach(), opts.beta * (S.detach() - R)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (each branch sees only its own side, so
    the unused one never puts an infinite gradient through torch.where)."""
    cut = -math.log(2)
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def odds_ratio_weights(opts: Options, x, y, partner):
    """ORPO's odds-ratio term per pair, beta log sigma(log odds(y_w) - log odds(y_l)) with
    log odds(y) = x - log(1 - exp(x)), x the (mean) log-likelihood: (w_i = -dL/dx_i [B], per-pair losses).
    The loss is written once and differentiated by autograd on the detached scores. x = 0 (probability 1,
    e.g. an empty row) has infinite odds: x is capped at -eps (the dtype's machine epsilon), so nothing
    is NaN or infinite."""
    chosen = torch.nonzero(y > 0).flatten()
    rejected = partner[chosen]
    with torch.enable_grad():
        xs = x.detach().clamp(max=-torch.finfo(x.dtype).eps).requires_grad_()
        xw, xl = xs[chosen], xs[rejected]
        log_odds = (xw - xl) - (_log1mexp(xw) - _log1mexp(xl))
        losses = -opts.beta * F.logsigmoid(log_odds)
        (grad,) = torch.autograd.grad(losses.sum(), xs)
    return -grad, losses.detach()
