"""Models whose logits are not `lm_head(hidden)`: fold what is exact, refuse what is not.

`gro_loss` computes log-probs from `hidden @ weight.T + bias`. Some models post-process that:

- a scalar scale (muP-style): Granite divides by `logits_scaling`, HyperCLOVAX multiplies by it,
  Cohere multiplies by `logit_scale`. A scalar `s` is folded exactly into the hidden states and
  the bias: `s * (h W^T + b) = (s h) W^T + (s b)`;
- a soft cap (Gemma 2/3: `final_logit_softcapping`, `c * tanh(z / c)` after any scale) is passed to
  `gro_loss` / `token_logprobs` as `softcap=c` (`logit_softcap`), which apply it in their pass.

Every model is then checked once, numerically, on a short probe (`check_head`): the model's own
`model(...).logits` against the folded, soft-capped projection of its final hidden states. A model
with a head transform not listed here fails loudly there instead of training on wrong log-probs.
"""
from __future__ import annotations

import torch

from ..logprobs.transform import softcap

# model types that *multiply* by `logits_scaling` (Granite and its relatives divide)
MULTIPLY_LOGITS_SCALING = ("hyperclovax",)


def _configs(model):
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) if cfg is not None else None
    return [c for c in (cfg, text) if c is not None]


def _set(value) -> bool:
    return value is not None and value != 0


def logit_softcap(model):
    """Gemma 2/3's `final_logit_softcapping` c (logits = c * tanh(z / c)), or None."""
    for cfg in _configs(model):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if _set(cap):
            return float(cap)
    return None


def logit_scale(model) -> float:
    """The scalar `s` with `model(...).logits == softcap(s * lm_head(final hidden))`."""
    for cfg in _configs(model):
        scaling = getattr(cfg, "logits_scaling", None)
        if _set(scaling) and scaling != 1:
            multiply = str(getattr(cfg, "model_type", "")).startswith(MULTIPLY_LOGITS_SCALING)
            return float(scaling) if multiply else 1.0 / float(scaling)
        scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
            return float(scale)
    return 1.0


def fold_scale(hidden, bias, scale: float):
    """(scale * hidden, scale * bias): the projection of the result is the model's scaled logits."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


@torch.no_grad()
def check_head(model, final_hidden, head) -> None:
    """Compare `model(ids).logits` with the folded, soft-capped `hidden @ W.T + b` on a 16-token probe."""
    scale, cap = logit_scale(model), logit_softcap(model)
    weight, bias = head(model)
    device = weight.device
    vocab = weight.shape[0]
    ids = (torch.arange(16, device=device) * 7919 % vocab)[None, :]
    am = torch.ones_like(ids)
    pos = torch.arange(16, device=device)[None, :]
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits.float()
        h, b = fold_scale(final_hidden(model, ids, am, pos), bias, scale)
        ours = softcap((h @ weight.T.to(h.dtype)).float() + (0 if b is None else b.float()), cap)
    finally:
        model.train(was_training)
    low_precision = weight.dtype in (torch.float16, torch.bfloat16)
    tol = (2e-2 if low_precision else 1e-4) * max(1.0, float(logits.abs().max()))
    err = float((ours - logits).abs().max())
    if not err <= tol:
        raise ValueError(
            f"{type(model).__name__}'s logits are not lm_head(final hidden state) (max difference {err:.3g} on a "
            f"probe; scale folded: {scale}, soft cap: {cap}): it transforms its logits in a way gro_kernels does not "
            "know, so training would use wrong log-probs")
