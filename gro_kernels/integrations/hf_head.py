"""A fused LM head on gro_kernels for a Hugging Face causal LM, called the way TRL's trainers call theirs.

TRL (>= 1.x) patches `model.forward` so that `model(..., labels=labels, fused_lm_head=True)` returns
per-token log-probs (and entropy) instead of logits. `add_gro_head` patches the same call to run
`token_logprobs` from the backbone's final hidden states and the `lm_head` weight, and adds one
more: `model(..., labels=labels, gro=GROCall(...))` runs the whole `gro_loss` inside the model's
forward, so DDP / FSDP see the head's weight used inside `forward` exactly as with TRL's own head.
Without either keyword the model's forward is unchanged (generation is untouched).
"""
from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers.utils import ModelOutput

from ..logprobs import token_logprobs
from ..logprobs.transform import softcap as soft_cap
from ..loss import gro_loss
from .sharded import gathered


@dataclass
class GROCall:
    """One `gro_loss` call: `keep` = the number of trailing positions scored (TRL's `logits_to_keep`);
    `kwargs` = everything `gro_loss` takes besides hidden, weight, targets and the head's options (temperature,
    softcap, head_precision, the sampler's truncation: `add_gro_head`'s)."""

    keep: int
    kwargs: dict = field(default_factory=dict)
    extras: bool = False   # also return mean_logits and is_top1 (TRL's DPO / KTO metrics), without gradient
    entropy: bool = False  # also return the per-token entropy (one more forward sweep, without gradient)
    # with entropy=True: called with that entropy [B, keep] before the loss; returns kwargs to override
    update: Optional[Callable] = None


@dataclass
class GROHeadOutput(ModelOutput):
    """`fused_lm_head=True`: loss (mean NLL), log_probs / entropy [B, T-1] (0 where label is -100), label_mask.
    `gro=...`: loss (the GRO loss), log_probs [B, keep], metrics / per_sequence (gro_loss's detached 0-d
    metrics and [B] values), and with `GROCall(entropy=True)` the detached per-token entropy [B, keep]."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None
    per_sequence: Optional[dict] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


def head_softcap(model):
    """The model's final_logit_softcapping (Gemma 2/3: logits = c * tanh(z / c)), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None


def check_plain_head(model) -> None:
    """gro_kernels computes softmax(softcap(W h + b) / T): refuse heads that transform the logits further
    (a scale before the soft cap)."""
    config = model.config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"gro_kernels' fused head does not support the config's {name}={value!r} "
                             f"(model_type={config.model_type!r}); use the trainer's own head")


@torch.no_grad()
def logit_extras(hidden, weight, bias, targets, *, temperature: float, softcap=None, chunk_elements: int = 2 ** 21):
    """Per token: the mean of the (soft-capped, tempered) logits over the vocabulary and whether the target
    is the (first) argmax. Metrics only: one forward sweep over vocabulary chunks, nothing of size
    [tokens x vocab]."""
    mask = targets != -100
    h, y = hidden[mask].float(), targets[mask]
    V = weight.shape[0]
    step = max(1, chunk_elements // max(h.shape[0], 1))
    total = h.new_zeros(h.shape[0])
    best = h.new_full((h.shape[0],), -torch.inf)
    best_id = torch.zeros_like(y)
    for start in range(0, V, step):
        z = h @ weight[start:start + step].float().T
        if bias is not None:
            z = z + bias[start:start + step].float()
        z = soft_cap(z, softcap) / temperature
        total += z.sum(-1)
        value, index = z.max(-1)
        better = value > best          # strict: the first maximum wins, as argmax
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + start, best_id)
    mean_logits = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=hidden.device)
    mean_logits[mask] = total / V
    is_top1[mask] = best_id == y
    return mean_logits, is_top1


def _head_weights(model):
    """(weight, bias) of the output projection, whole (`sharded.gathered`: FSDP2 / ZeRO-3)."""
    head = model.get_output_embeddings()
    return gathered(head.weight), gathered(getattr(head, "bias", None), "lm_head.bias")


def add_gro_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                 entropy: bool = True, backend: str = "auto", sampler: Optional[dict] = None) -> None:
    """Patch `model.forward` (in place) so `fused_lm_head=True` and `gro=GROCall(...)` run on gro_kernels.

    Args:
        temperature: the logits' temperature (TRL's).
        cast_lm_head_to_fp32: TRL's fp32 head: the head runs on fp32 hidden states and weight
            (head_precision="fp32").
        entropy: `fused_lm_head=True` also returns the per-token entropy.
        backend: the gro_kernels backend.
        sampler: top_k / top_p / min_p of the distribution the sampler drew from: the log-probs are then
            those of the truncated distribution (None: the full one, as TRL computes them).
    The model's final_logit_softcapping (Gemma 2/3) is applied as `softcap`."""
    check_plain_head(model)
    head = dict(temperature=temperature, softcap=head_softcap(model),
                head_precision="fp32" if cast_lm_head_to_fp32 else "native", **(sampler or {}))
    original_forward = model.forward
    # Vision-language models expose their language backbone as `base_model` (transformers >= 5).
    backbone_attr = "base_model"

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates kwargs against it
    def forward(self, *args, fused_lm_head=False, gro=None, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head and gro is None:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("gro_kernels' fused head does not compute the MoE router auxiliary loss "
                             "(output_router_logits=True)")

        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t+1
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        weight, bias = _head_weights(self)
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        if gro is not None:
            hidden, targets = hidden[:, -gro.keep:], targets[:, -gro.keep:]
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        elif hidden.dtype != weight.dtype:  # autocast: the head's matmul runs in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        # gro_kernels keeps float32 statistics itself; autocast must not recast inside its chunks.
        device = hidden.device.type
        no_autocast = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()
        mask = targets != -100
        with no_autocast:
            if gro is not None:
                kwargs, token_entropy = gro.kwargs, None
                if gro.entropy:
                    with torch.no_grad():
                        token_entropy = token_logprobs(
                            hidden.detach(), weight.detach(), targets, bias=None if bias is None else bias.detach(),
                            return_entropy=True, backend=backend, **head).entropy
                    if gro.update is not None:
                        kwargs = {**kwargs, **gro.update(token_entropy)}
                out = gro_loss(hidden, weight, targets, bias=bias, backend=backend, **head, **kwargs)
                extras = (logit_extras(hidden, weight, bias, targets, temperature=temperature,
                                       softcap=head["softcap"]) if gro.extras else (None, None))
                return GROHeadOutput(loss=out.loss, log_probs=out.logp, label_mask=mask, metrics=out.metrics,
                                     per_sequence=out.per_sequence, mean_logits=extras[0], is_top1=extras[1],
                                     entropy=token_entropy)
            stats = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=entropy, backend=backend, **head)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return GROHeadOutput(loss=-stats.logp.sum() / count, log_probs=stats.logp, entropy=stats.entropy,
                             label_mask=mask)

    model.forward = types.MethodType(forward, model)
