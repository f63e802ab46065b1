"""The six methods compared, as one loss each on a step's rows (online samples + offline rows).

Every method gets the same rows each step: K sampled completions per prompt (scored) and the
prompts' offline answers (scored by the same reward). What each one trains on:

* `grpo`          online rows only: `gro_loss(method="grpo", kl_coef=0)`.
* `sft`           offline rows only: `gro_loss(method="sft")` (token-mean negative log-likelihood).
* `sft_then_grpo` `sft` for the first `knob` fraction of the steps, then `grpo`.
* `grpo_sft`      `grpo` on the online rows + `knob` x `sft` on the offline rows.
* `luffy`         offline rows in the group (advantages over the mixed group, mean/std-normalized);
                  online tokens: the clipped-ratio surrogate; offline tokens: policy shaping
                  A * f(p), f(p) = p / (p + 0.1), no clipping, no importance ratio; token mean
                  over all rows (LUFFY, arXiv 2504.14945).
* `gro`           offline rows in the group: `gro_loss(method="gro", offline=..., offline_coef=knob)`.

`KNOBS` is each method's one free setting and the grid it is tuned on (same grid size for every
method that has one); `grpo`, `sft` and `luffy` have none (luffy's gamma is fixed at 0.1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gro_loss
from ..logprobs import token_logprobs

METHODS = ("grpo", "sft", "sft_then_grpo", "grpo_sft", "luffy", "gro")
KNOBS = {
    "sft_then_grpo": ("sft_fraction", (0.25, 0.5, 0.75)),
    "grpo_sft": ("sft_weight", (0.1, 0.3, 1.0)),
    "gro": ("offline_coef", (0.5, 1.0, 2.0)),
}
LUFFY_GAMMA = 0.1


def default_knob(method: str) -> Optional[float]:
    """The middle of the grid (what an untuned run uses), or None for a method without a knob."""
    return KNOBS[method][1][1] if method in KNOBS else None


def uses_rows(method: str, step: int, steps: int, knob: Optional[float]) -> str:
    """Which rows this step's loss reads: 'online', 'offline' or 'both'."""
    if method == "grpo":
        return "online"
    if method == "sft":
        return "offline"
    if method == "sft_then_grpo":
        return "offline" if step < round(knob * steps) else "online"
    return "both"


def luffy_loss(logp: torch.Tensor, mask: torch.Tensor, *, rewards: torch.Tensor, group_ids: torch.Tensor,
               offline: torch.Tensor, gamma: float = LUFFY_GAMMA, eps: float = 0.2,
               std_eps: float = 1e-4) -> torch.Tensor:
    """LUFFY's mixed-policy objective (negated), one update per batch (old log-probs = sg[logp]).

    A_i = (r_i - mean_g r) / (std_g r + std_eps) over the group's online *and* offline rows (std
    unbiased, as GRPO's); online tokens: min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = exp(l - sg l);
    offline tokens: A f(exp(l)), f(p) = p / (p + gamma); loss = -sum / number of tokens.
    """
    mask = mask.to(logp.dtype)
    r = rewards.to(torch.float32)
    adv = torch.zeros_like(r)
    for g in torch.unique(group_ids):
        sel = group_ids == g
        rg = r[sel]
        std = rg.std() if rg.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv[sel] = (rg - rg.mean()) / (std + std_eps)
    A = adv.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - logp.detach())
    online_term = torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    p = torch.exp(logp)
    offline_term = A * p / (p + gamma)
    per_token = torch.where(offline[:, None], offline_term, online_term) * mask
    return -per_token.sum() / mask.sum().clamp(min=1)


def method_loss(method: str, knob: Optional[float], *, hidden, weight, targets, rewards, group_ids, offline,
                step: int, steps: int, backend: str = "torch") -> Optional[torch.Tensor]:
    """The loss of `method` on rows already restricted to `uses_rows(...)`; None when there is nothing to train on."""
    if targets.shape[0] == 0:
        return None
    rows = uses_rows(method, step, steps, knob)
    if rows == "online":
        return gro_loss(hidden, weight, targets, method="grpo", kl_coef=0.0, rewards=rewards, group_ids=group_ids,
                        backend=backend).loss
    if rows == "offline":
        return gro_loss(hidden, weight, targets, method="sft", backend=backend).loss
    if method == "gro":
        return gro_loss(hidden, weight, targets, method="gro", rewards=rewards, group_ids=group_ids, offline=offline,
                        offline_coef=knob, backend=backend).loss
    if method == "luffy":
        logp = token_logprobs(hidden, weight, targets, backend=backend).logp
        return luffy_loss(logp, targets != -100, rewards=rewards, group_ids=group_ids, offline=offline)
    if method == "grpo_sft":
        on, off = ~offline, offline
        loss = gro_loss(hidden[on], weight, targets[on], method="grpo", kl_coef=0.0, rewards=rewards[on],
                        group_ids=group_ids[on], backend=backend).loss
        if off.any():
            loss = loss + knob * gro_loss(hidden[off], weight, targets[off], method="sft", backend=backend).loss
        return loss
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
