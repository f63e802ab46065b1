"""`gro_loss`: hidden states -> the GRO loss and its gradients, without materializing the logits.

The only glue between layer 2 (`token_logprobs`, the fused pass) and layer 3 (`gro_objective`).
Token-local objectives (GRO.md section 6) take the single fused pass: three GEMMs, the gradients
computed inside the forward call and handed back by backward. The others (weights that depend on
the policy's own log-probs: DPO, IPO, CPL, SimPO, KTO, GSPO's sequence ratio) take the composable
path: `token_logprobs` forward (one GEMM), the objective, `token_logprobs` backward (three).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .logprobs import resolve_backend, token_logprobs
from .logprobs.api import check_inputs
from .logprobs.rows import stat_dtype
from .logprobs.chunked import PrecomputedGrad, fused_token_loss
from .objective import GROOutput, gro_objective
from .objective.chunk import ChunkCoefficients
from .objective.inputs import check_mask, uses_ref_logp
from .objective.options import resolve_options
from .objective.split import needs_policy_logp, token_loss


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
    rollout_logp: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    log_sum_sq_probs: Optional[torch.Tensor] = None,
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
    method needs it and none was given. `backend_options` go to the backend (`{"chunk_elements": n}`:
    fp32 logits per chunk; `{"group_elements": n}`: logits-gradient entries per gradient GEMM).
    `mask` (bool or 0/1) marks the tokens that count; masked tokens are dropped like ignored ones.
    The entropy is computed when `entropy_coef != 0` or `return_entropy=True` (then
    `metrics["entropy"]` holds its mean). Token-local objectives take the single fused pass
    (three GEMMs, gradients computed in the forward call); the others the composable path (four).
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

    # Masked positions are ignored tokens: dropped before any matrix work, so nothing there
    # (padding, a NaN hidden state) reaches a GEMM.
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & check_mask(mask, tuple(targets.shape), targets.device, against="targets")
        targets = targets.masked_fill(~valid, ignore_index)

    ref_head = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias) if (full_kl and has_ref_head) else {}
    # The entropy: for the bonus, for top-entropy token selection, or asked for (metrics).
    want_entropy = bool(return_entropy) or opts.entropy_coef != 0 or opts.top_entropy_quantile < 1
    if ref_logp is None and has_ref_head and uses_ref_logp(method, opts):
        with torch.no_grad():
            ref_logp = token_logprobs(
                ref_hidden, ref_weight, targets, bias=ref_bias, temperature=opts.temperature,
                ignore_index=ignore_index, backend=backend, **backend_options,
            ).logp
    # WPO's weights read log sum_v p_v^2 of the policy: the statistics pass gives it (no gradient).
    # (use_weighting is never token-local, so that pass is the composable path's own, below.)
    want_sum_p2 = log_sum_sq_probs is None and opts.use_weighting
    objective = dict(method=method, mask=valid, rewards=rewards, advantages=advantages, group_ids=group_ids,
                     labels=labels, baselines=baselines, offline=offline, old_logp=old_logp, ref_logp=ref_logp,
                     num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
                     log_sum_sq_probs=log_sum_sq_probs, **options)

    if _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline):
        return _fused_loss(hidden, weight, targets, bias, ref_head, opts, objective, want_entropy=want_entropy,
                           ignore_index=ignore_index, backend=backend, backend_options=backend_options)

    stats = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=opts.temperature, ignore_index=ignore_index,
        return_entropy=want_entropy, return_sum_p2=want_sum_p2, backend=backend, **ref_head, **backend_options,
    )
    if want_sum_p2:
        objective["log_sum_sq_probs"] = stats.sum_p2.clamp_min(torch.finfo(torch.float32).tiny).log()
    entropy = stats.entropy
    if entropy is not None and opts.entropy_coef == 0:
        entropy = entropy.detach()  # metrics only
    return gro_objective(stats.logp, entropy=entropy, kl=stats.kl, **objective)


def _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline) -> bool:
    """The single fused pass (three GEMMs) applies when gradients are wanted, the backend is a
    chunked one, and the objective is token-local (GRO.md section 6)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False  # token_logprobs names the bad argument
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not wants_grad or resolve_backend(backend, hidden.device) == "naive":
        return False
    has_offline = isinstance(offline, torch.Tensor) and bool(offline.any())
    return not needs_policy_logp(opts, has_old_logp=old_logp is not None, has_advantages=advantages is not None,
                                 has_offline=has_offline)


def _fused_loss(hidden, weight, targets, bias, ref_head, opts, objective, *, want_entropy, ignore_index,
                backend, backend_options) -> GROOutput:
    """Loss and gradients in one sweep: the sequence plan first (`ChunkCoefficients`), then per chunk
    of tokens the token-local loss's derivatives, then dz and the gradient GEMMs (the engine)."""
    B, T = targets.shape
    coefficients = ChunkCoefficients(opts, objective, shape=(B, T), dtype=stat_dtype(hidden.dtype),
                                     device=targets.device, want_entropy=want_entropy, want_kl=bool(ref_head))
    flat_args = check_inputs(hidden, weight, targets, bias, ref_head.get("ref_hidden"), ref_head.get("ref_weight"),
                             ref_head.get("ref_bias"), temperature=opts.temperature, ignore_index=ignore_index)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    (logp, entropy, kl, _), grads = fused_token_loss(
        *flat_args, temperature=opts.temperature, ignore_index=ignore_index, return_entropy=want_entropy,
        coefficients=coefficients, need_grads=need, backend=resolve_backend(backend, targets.device),
        **backend_options)
    # The value and the metrics: the same objective on the detached [B,T] statistics.
    with torch.no_grad():
        out = gro_objective(logp.reshape(B, T), entropy=None if entropy is None else entropy.reshape(B, T),
                            kl=None if kl is None else kl.reshape(B, T), **objective)
    loss = PrecomputedGrad.apply(out.loss, hidden, weight, bias, grads)
    return GROOutput(loss=loss, logp=out.logp, metrics=out.metrics)


class GROLoss(nn.Module):
    """`gro_loss` as a module: `GROLoss(method="grpo", kl_coef=0.0)(hidden, weight, targets, rewards=..., group_ids=...)`."""

    def __init__(self, method: str = "gro", **options):
        super().__init__()
        resolve_options(method, options)  # fail at construction, not at the first step
        self.method = method
        self.options = dict(options)

    def forward(self, hidden, weight, targets, *, mask=None, rewards=None, advantages=None, group_ids=None,
                labels=None, baselines=None, offline=None, old_logp=None, ref_logp=None, ref_hidden=None,
                ref_weight=None, bias=None, ref_bias=None, num_items_in_batch=None, rollout_logp=None, truncated=None,
                log_sum_sq_probs=None, ignore_index=-100, backend="auto", backend_options=None,
                return_entropy=None) -> GROOutput:
        return gro_loss(
            hidden, weight, targets, method=self.method, mask=mask, rewards=rewards, advantages=advantages,
            group_ids=group_ids, labels=labels, baselines=baselines, offline=offline, old_logp=old_logp,
            ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias, ref_bias=ref_bias,
            num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
            log_sum_sq_probs=log_sum_sq_probs, ignore_index=ignore_index, backend=backend,
            backend_options=backend_options, return_entropy=return_entropy, **self.options,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "")
