"""`gro_loss`: hidden states -> token log-probs (one fused pass) -> the GRO objective.

The only glue between layer 2 (`token_logprobs`) and layer 3 (`gro_objective`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .logprobs import token_logprobs
from .objective import GROOutput, gro_objective
from .objective.inputs import uses_ref_logp
from .objective.options import resolve_options


def gro_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "gro",
    mask: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    baselines: Optional[torch.Tensor] = None,
    offline: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    backend: str = "auto",
    backend_options: Optional[dict] = None,
    return_entropy: Optional[bool] = None,
    **options,
) -> GROOutput:
    """The GRO loss of `method` straight from the LM head, without materializing the logits.

    hidden [B,T,d] predicts targets [B,T] (already shifted; `ignore_index` marks padding / prompt);
    weight [V,d] is the LM head. The reference head (ref_hidden, ref_weight, ref_bias) is frozen:
    it supplies the exact KL when kl_estimator="full" (in the same pass) and ref_logp when the
    method needs it and none was given. `backend_options` go to the `token_logprobs` backend
    (e.g. `{"filter_eps": 1e-3}` for the triton backend's filtered backward, `{"chunk_elements": n}`
    for the torch backend). The entropy is computed when `entropy_coef != 0` or `return_entropy=True`
    (then `metrics["entropy"]` holds its mean); it costs an extra pass, so it is off otherwise.
    Every other argument goes to `gro_objective`.
    """
    backend_options = dict(backend_options or {})
    opts = resolve_options(method, options)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T], got shape {tuple(targets.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together (the frozen reference head)")
    has_ref_head = ref_hidden is not None
    full_kl = opts.kl_estimator == "full"
    if full_kl and opts.kl_coef != 0 and not has_ref_head:
        raise ValueError("kl_estimator='full' needs the reference head: pass ref_hidden and ref_weight")

    valid = targets != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(targets.shape):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got {shape}")
        valid = valid & (mask != 0)

    ref_head = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias) if (full_kl and has_ref_head) else {}
    stats = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=opts.temperature, ignore_index=ignore_index,
        return_entropy=bool(return_entropy) or opts.entropy_coef != 0, backend=backend, **ref_head,
        **backend_options,
    )
    entropy = stats.entropy
    if entropy is not None and opts.entropy_coef == 0:
        entropy = entropy.detach()  # metrics only

    if ref_logp is None and has_ref_head and uses_ref_logp(method, opts):
        with torch.no_grad():
            ref_logp = token_logprobs(
                ref_hidden, ref_weight, targets, bias=ref_bias, temperature=opts.temperature,
                ignore_index=ignore_index, backend=backend, **backend_options,
            ).logp

    return gro_objective(
        stats.logp, method=method, mask=valid, entropy=entropy, kl=stats.kl, rewards=rewards,
        advantages=advantages, group_ids=group_ids, labels=labels, baselines=baselines, offline=offline,
        old_logp=old_logp, ref_logp=ref_logp, num_items_in_batch=num_items_in_batch, **options,
    )


class GROLoss(nn.Module):
    """`gro_loss` as a module: `GROLoss(method="grpo", kl_coef=0.0)(hidden, weight, targets, rewards=..., group_ids=...)`."""

    def __init__(self, method: str = "gro", **options):
        super().__init__()
        resolve_options(method, options)  # fail at construction, not at the first step
        self.method = method
        self.options = dict(options)

    def forward(self, hidden, weight, targets, *, mask=None, rewards=None, advantages=None, group_ids=None,
                labels=None, baselines=None, offline=None, old_logp=None, ref_logp=None, ref_hidden=None,
                ref_weight=None, bias=None, ref_bias=None, num_items_in_batch=None, ignore_index=-100,
                backend="auto", backend_options=None, return_entropy=None) -> GROOutput:
        return gro_loss(
            hidden, weight, targets, method=self.method, mask=mask, rewards=rewards, advantages=advantages,
            group_ids=group_ids, labels=labels, baselines=baselines, offline=offline, old_logp=old_logp,
            ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias, ref_bias=ref_bias,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, backend=backend,
            backend_options=backend_options, return_entropy=return_entropy, **self.options,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "")
