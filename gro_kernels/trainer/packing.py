"""Sequence packing: a micro-batch's rows run through the backbone as one sequence without padding,
and the loss reads the packed hidden states directly.

The real tokens of every row (left-padded prompt + right-padded completion, `rollout.py`) are
concatenated into one `[1, L]` sequence whose position ids restart at 0 for each row, with no
attention mask. Transformers then keeps attention inside each row (flash-attention's variable
length path; since the 4.5x/5.x masking utilities, a block-diagonal causal mask for SDPA and
eager attention too), so no FLOP is spent on padding. Of the `[L, d]` final hidden states the loss
takes the K that predict a scored completion token, as one packed row `[1, K, d]` with the row of
each (`sequence_ids`): nothing is scattered back to the padded `[N, P + C, d]` layout, and the
per-token inputs follow the same `[1, K]` selection (`PackedTokens`).

Whether a model honours restarted position ids is checked once, numerically (`check_packing`):
packed and separate forwards of two short sequences must give the same hidden states.
"""
from __future__ import annotations

import torch


class PackedTokens:
    """The scored tokens of a padded `[N, C]` batch as one packed row `[1, K]` (row-major order)."""

    def __init__(self, scored: torch.Tensor):
        self.shape = tuple(scored.shape)
        self.rows, self.cols = scored.nonzero(as_tuple=True)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """`t [N, C, ...]` at the scored tokens: `[1, K, ...]`."""
        return t[self.rows, self.cols][None]

    def put(self, v: torch.Tensor) -> torch.Tensor:
        """`v [1, K]` back at its tokens of the padded `[N, C]` layout (0 elsewhere)."""
        return v.new_zeros(self.shape).index_put((self.rows, self.cols), v[0])

    def loss_inputs(self, kwargs: dict) -> dict:
        """gro_loss's keyword arguments for the packed row: per-token tensors taken, per-row ones kept
        (indexed by sequence id = row), and `sequence_ids`."""
        out = {k: (self.take(v) if isinstance(v, torch.Tensor) and tuple(v.shape) == self.shape else v)
               for k, v in kwargs.items()}
        out["sequence_ids"] = self.rows[None]
        return out


def packed_hidden(final_hidden, model, input_ids, attention_mask, position_ids, prompt_len: int,
                  packed: PackedTokens) -> torch.Tensor:
    """The final hidden states that predict the `packed` completion tokens, the rows run as one packed
    sequence: `[1, K, d]` in `packed`'s order."""
    real = attention_mask.bool()
    h = final_hidden(model, input_ids[real][None], None, position_ids[real][None])[0]
    place = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
    place[real] = torch.arange(h.shape[0], device=real.device)  # each real token's index in the packed sequence
    # completion token j of a row is predicted by the state at column P - 1 + j: the token before it,
    # real since prompts are left-padded and completions right-padded
    return h[place[packed.rows, prompt_len - 1 + packed.cols]][None]


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
