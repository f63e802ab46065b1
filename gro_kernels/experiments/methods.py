"""The methods compared, as one `gro_loss` call (or two) each on a step's rows (online samples + offline rows).

Every method gets the same rows each step: K sampled completions per prompt (scored) and the
prompts' offline answers (scored by the same reward). What each one trains on:

* `grpo`          online rows only: `gro_loss(method="grpo", kl_coef=0)`.
* `sft`           offline rows only: `gro_loss(method="sft")` (token-mean negative log-likelihood).
* `sft_then_grpo` `sft` for the first `knob` fraction of the steps, then `grpo`.
* `grpo_sft`      `grpo` on the online rows + `knob` x `sft` on the offline rows.
* `luffy`         `gro_loss(method="luffy")`: offline rows in the group, online tokens the clipped ratio,
                  offline tokens A p / (p + 0.1), token mean (LUFFY, arXiv 2504.14945).
* `chord`         `gro_loss(method="chord", mu=knob)`: (1 - mu) GRPO on the online rows + mu SFT on the
                  offline rows with CHORD-phi's token weight p (1 - p) (CHORD, arXiv 2508.11408).
* `hpt`           `gro_loss(method="hpt", switch_threshold=knob)`: per prompt, SFT on its offline answer
                  when the group's mean online reward is at or below the threshold, else GRPO alone
                  (HPT, arXiv 2509.04419).
* `distill`       on-policy distillation: `gro_loss(method="distill", distill_coef=knob)` on the online
                  rows, the exact reverse KL to a teacher head at every sampled token plus the GRPO term
                  of the rewards. The teacher is the `sft` arm's model: the same initialization trained
                  by SFT on the same offline answers for the same number of steps (`runner.train_teacher`),
                  so it has seen exactly the data every other method sees.
* `gro`           offline rows in the group: `gro_loss(method="gro", offline=..., offline_coef=knob)`.
* `gro_nodown`    (the ablation, not in the default list) `gro` with `offline_neg_coef=0`: an offline
                  answer below its group's anchor is not pushed down (weight 0).

`KNOBS` is each method's one free setting and the grid it is tuned on (the same grid size, 3, for
every method that has one); `grpo`, `sft` and `luffy` have none (luffy's gamma is fixed at 0.1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gro_loss

METHODS = ("grpo", "sft", "sft_then_grpo", "grpo_sft", "luffy", "chord", "hpt", "distill", "gro")
ABLATIONS = ("gro_nodown",)
ALL_METHODS = METHODS + ABLATIONS  # what --methods and RunConfig.method accept
KNOBS = {
    "sft_then_grpo": ("sft_fraction", (0.25, 0.5, 0.75)),
    "grpo_sft": ("sft_weight", (0.1, 0.3, 1.0)),
    "chord": ("mu", (0.1, 0.5, 0.9)),         # Trinity-RFT's default 0.1 up to CHORD-mu's peak 0.9
    "hpt": ("switch_threshold", (0.0, 0.25, 0.5)),
    "distill": ("distill_coef", (0.1, 0.5, 2.0)),
    "gro": ("offline_coef", (0.5, 1.0, 2.0)),
    "gro_nodown": ("offline_coef", (0.5, 1.0, 2.0)),
}


def default_knob(method: str) -> Optional[float]:
    """The middle of the grid (what an untuned run uses), or None for a method without a knob."""
    return KNOBS[method][1][1] if method in KNOBS else None


def uses_rows(method: str, step: int, steps: int, knob: Optional[float]) -> str:
    """Which rows this step's loss reads: 'online', 'offline' or 'both'."""
    if method in ("grpo", "distill"):
        return "online"
    if method == "sft":
        return "offline"
    if method == "sft_then_grpo":
        return "offline" if step < round(knob * steps) else "online"
    return "both"


def method_loss(method: str, knob: Optional[float], *, hidden, weight, targets, rewards, group_ids, offline,
                step: int, steps: int, backend: str = "torch", teacher=None) -> Optional[torch.Tensor]:
    """The loss of `method` on rows already restricted to `uses_rows(...)`; None when there is nothing to train on.
    `teacher`: (hidden, weight) of the teacher head on the same rows (method='distill')."""
    if targets.shape[0] == 0:
        return None
    rows = uses_rows(method, step, steps, knob)
    rl = dict(rewards=rewards, group_ids=group_ids, backend=backend)
    if method == "distill":
        return gro_loss(hidden, weight, targets, method="distill", distill_coef=knob, teacher_hidden=teacher[0],
                        teacher_weight=teacher[1], **rl).loss
    if rows == "online":
        return gro_loss(hidden, weight, targets, method="grpo", kl_coef=0.0, **rl).loss
    if rows == "offline":
        return gro_loss(hidden, weight, targets, method="sft", backend=backend).loss
    if method in ("gro", "gro_nodown"):
        extra = {"offline_neg_coef": 0.0} if method == "gro_nodown" else {}
        return gro_loss(hidden, weight, targets, method="gro", offline=offline, offline_coef=knob, **extra, **rl).loss
    if method == "luffy":
        return gro_loss(hidden, weight, targets, method="luffy", offline=offline, **rl).loss
    if method == "chord":
        return gro_loss(hidden, weight, targets, method="chord", offline=offline, mu=knob, **rl).loss
    if method == "hpt":
        return gro_loss(hidden, weight, targets, method="hpt", offline=offline, switch_threshold=knob, **rl).loss
    if method == "grpo_sft":
        on, off = ~offline, offline
        loss = gro_loss(hidden[on], weight, targets[on], method="grpo", kl_coef=0.0, rewards=rewards[on],
                        group_ids=group_ids[on], backend=backend).loss
        if off.any():
            loss = loss + knob * gro_loss(hidden[off], weight, targets[off], method="sft", backend=backend).loss
        return loss
    raise ValueError(f"method must be one of {', '.join(ALL_METHODS)}; got {method!r}")
