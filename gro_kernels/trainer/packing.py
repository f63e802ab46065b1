"""Sequence packing: a micro-batch's rows run through the backbone as one sequence without padding.

The real tokens of every row (left-padded prompt + right-padded completion, `rollout.py`) are
concatenated into one `[1, L]` sequence whose position ids restart at 0 for each row, with no
attention mask. Transformers then keeps attention inside each row (flash-attention's variable
length path; since the 4.5x/5.x masking utilities, a block-diagonal causal mask for SDPA and
eager attention too), so no FLOP is spent on padding. The final hidden states are scattered back
to the padded `[N, P + C, d]` layout the loss reads (pads get zeros and are never scored).

Whether a model honours restarted position ids is checked once, numerically (`check_packing`):
packed and separate forwards of two short sequences must give the same hidden states.
"""
from __future__ import annotations

import torch


def packed_final_hidden(final_hidden, model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """`final_hidden` of the padded batch computed as one packed sequence; `[N, P + C, d]`, 0 at pads."""
    real = attention_mask.bool()
    h = final_hidden(model, input_ids[real][None], None, position_ids[real][None])[0]
    out = h.new_zeros(*input_ids.shape, h.shape[-1])
    return out.index_put((real.nonzero(as_tuple=True)), h)


@torch.no_grad()
def check_packing(model, final_hidden) -> None:
    """Packed and separate forwards of two probe sequences agree, or a ValueError says packing is unsupported."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    a = (torch.arange(7, device=device) * 31 % vocab)[None]
    b = (torch.arange(5, device=device) * 17 % vocab + 1)[None] % vocab
    pos = lambda t: torch.arange(t.shape[1], device=device)[None]  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        sep = torch.cat([final_hidden(model, t, torch.ones_like(t), pos(t))[0] for t in (a, b)])
        packed = final_hidden(model, torch.cat([a, b], 1), None, torch.cat([pos(a), pos(b)], 1))[0]
    finally:
        model.train(was_training)
    err = float((packed.float() - sep.float()).abs().max())
    tol = 1e-2 if sep.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not err <= tol * max(1.0, float(sep.abs().max())):
        raise ValueError(f"{type(model).__name__} does not keep packed sequences apart (attention "
                         f"{getattr(model.config, '_attn_implementation', '?')}, max difference {err:.3g}): "
                         "use pack_sequences=False, or flash_attention_2 / a newer transformers")
