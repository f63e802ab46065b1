"""Where each token of a call sits in the batch the objective runs on: packed rows and context parallelism.

The objective is written for a padded batch `[S, W]`: one row per sequence, its tokens in order along
the row. Two layouts of the caller's `[B, T]` per-token tensors differ from that, and `TokenLayout`
maps them onto it:

- packed rows (`sequence_ids [B, T]`, the sequence each token belongs to, -1 for padding): a row holds
  several sequences (TRL's padding-free `[1, L]`, verl's remove-padding `[total_nnz]`); per-sequence
  inputs (rewards, group ids, labels, ...) are indexed by sequence id;
- context parallelism (`cp_group`): each rank of the group holds a slice of the tokens of the same
  sequences (contiguous as Ulysses, or zigzag as ring attention), the per-sequence inputs the same on
  every rank.

A token's column is its `positions` entry (its place in its sequence) when given, else its order of
appearance in its sequence, counting the ranks of `cp_group` in rank order. Every rank gathers every
rank's tokens (`full`: one all-gather of the per-token inputs, a few floats per token and call, never
anything per vocabulary entry), runs the same objective on the whole batch, and keeps its own tokens'
values (`local`). So every rank returns the loss of the whole sequences, and the backward of `full`
keeps this rank's tokens' part of the gradient: each rank's backward is the part of the gradient that
flows through its own tokens, and the parameter gradients are to be summed over `cp_group` (an engine
that averages them over a data x context group of dp * cp ranks needs the loss multiplied by cp).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _int_tokens(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of the per-token inputs {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the per-token inputs are on {device}")
    return t.reshape(-1).long()


def _gather_rows(x: torch.Tensor, sizes, group) -> torch.Tensor:
    """Every rank's `x [k, n_r]` (n_r = sizes[r]), concatenated along the tokens in rank order."""
    width = max(sizes)
    padded = x.new_zeros(x.shape[0], width)
    padded[:, :x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], 1)


class TokenLayout:
    """The map from this rank's `[B, T]` tokens to the `[S, W]` batch of every rank's tokens."""

    def __init__(self, shape, sizes, rank, group, seq_all, col_all, num_sequences, width):
        self.shape, self.sizes, self.rank, self.group = tuple(shape), sizes, rank, group
        self.S, self.W = num_sequences, width
        placed = seq_all >= 0
        flat = torch.where(placed, seq_all * width + col_all, torch.zeros_like(seq_all))
        self.placed_all = placed.nonzero()[:, 0]       # tokens of every rank that belong to a sequence
        self.flat_all = flat[self.placed_all]           # ... and their index in the flattened [S, W]
        start = sum(sizes[:rank])
        local_placed = placed[start:start + sizes[rank]]
        self.keep = local_placed.nonzero()[:, 0]        # this rank's tokens that belong to a sequence
        self.flat_local = flat[start:start + sizes[rank]][self.keep]

    @classmethod
    def build(cls, shape, device, *, sequence_ids=None, positions=None, cp_group=None,
              num_sequences: Optional[int] = None) -> Optional["TokenLayout"]:
        """The layout of per-token tensors shaped `shape`, or None when nothing differs from one padded batch."""
        if sequence_ids is None and positions is None and cp_group is None:
            return None
        B, T = shape
        n = B * T
        seq = (_int_tokens("sequence_ids", sequence_ids, shape, device) if sequence_ids is not None
               else torch.arange(B, device=device).repeat_interleave(T))
        if sequence_ids is not None and bool((seq < -1).any()):
            raise ValueError("sequence_ids must hold a sequence index >= 0, or -1 for padding")
        pos = _int_tokens("positions", positions, shape, device) if positions is not None else None
        if pos is not None and bool(((pos < 0) & (seq >= 0)).any()):
            raise ValueError("positions must be >= 0 (each token's place in its sequence)")
        rank, sizes = 0, [n]
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            rank = dist.get_rank(cp_group)
            counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(cp_group))]
            dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device), group=cp_group)
            sizes = [int(c) for c in counts]
            ids = torch.stack([seq, pos if pos is not None else torch.zeros_like(seq)])
            ids = _gather_rows(ids, sizes, cp_group)
            seq, pos = ids[0], (ids[1] if pos is not None else None)
        else:
            cp_group = None
        placed = seq >= 0
        if pos is None:  # order of appearance in its sequence (rank order, then the order along the row)
            order = torch.sort(seq, stable=True).indices
            ranked = seq[order]
            within = torch.arange(seq.numel(), device=device) - torch.searchsorted(ranked, ranked)
            col = torch.empty_like(seq).index_copy_(0, order, within)
        else:
            col = pos
        top = int(seq.max()) + 1 if seq.numel() else 0
        S = top if num_sequences is None else int(num_sequences)
        if top > S:
            raise ValueError(f"sequence_ids holds sequence {top - 1} but the per-sequence inputs have {S} entries")
        W = int(col[placed].max()) + 1 if bool(placed.any()) else 1
        if pos is not None:
            slots = torch.zeros(S * W, dtype=torch.long, device=device)
            slots.index_add_(0, (seq * W + col)[placed], torch.ones_like(seq[placed]))
            if bool((slots > 1).any()):
                raise ValueError("positions give two tokens of one sequence the same place (across cp_group's ranks)")
        return cls(shape, sizes, rank, cp_group, seq, col, S, W)

    # ---- moving tensors between the two layouts -----------------------------------------------
    def full(self, *xs: torch.Tensor):
        """Each `x [B, T]` of this rank as `[S, W]` holding every rank's tokens (0 where there is no
        token); one all-gather for all of them. Differentiable: the backward keeps this rank's tokens."""
        stacked = torch.stack([x.reshape(-1) for x in xs])
        out = _ToFull.apply(stacked, self)
        return tuple(out[i].reshape(self.S, self.W) for i in range(len(xs)))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """`x [S, W]` at this rank's tokens, `[B, T]` (0 at padding tokens). Differentiable."""
        out = x.new_zeros(self.shape[0] * self.shape[1])
        return out.index_put((self.keep,), x.reshape(-1)[self.flat_local]).reshape(self.shape)


class _ToFull(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        values = x if layout.group is None else _gather_rows(x, layout.sizes, layout.group)
        out = x.new_zeros(x.shape[0], layout.S * layout.W)
        out[:, layout.flat_all] = values[:, layout.placed_all]
        return out

    @staticmethod
    def backward(ctx, g):
        layout = ctx.layout
        grad = g.new_zeros(g.shape[0], layout.sizes[layout.rank])
        grad[:, layout.keep] = g[:, layout.flat_local]
        return grad, None
