"""The rows that count: every backend computes only the tokens whose target is not ignored.

    rows = valid_rows(targets, ignore_index)     # indices of those tokens, or None when all count
    h = take_rows(hidden, rows)                  # [n, d]: the compacted rows the backend works on
    logp = scatter_rows(logp_n, rows, N)         # back to [N], exactly 0 at the ignored tokens

Statistics are float32, or float64 for float64 inputs (`stat_dtype`). The backends (`naive.py`,
`chunked.py`) and `api.py` import this module; it imports none of them.
"""
from __future__ import annotations

from typing import Optional

import torch

# The per-token statistics every backend's token_stats returns, in this order (None: not asked for).
STAT_NAMES = ("logp", "entropy", "kl", "lse", "sum_p2", "mean_logp", "is_top1", "distill")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32, or float64 when the inputs are float64 (the test reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_rows(targets: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the tokens that count, or None when all do (then nothing is copied)."""
    valid = targets != ignore_index
    return None if bool(valid.all()) else valid.nonzero()[:, 0]


def take_rows(t: Optional[torch.Tensor], rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rows of `t` that count (backends compute only those)."""
    return t if t is None or rows is None else t.index_select(0, rows)


def scatter_rows(v: Optional[torch.Tensor], rows: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """`v` back at `rows` of an n-row tensor, exactly 0 at the ignored rows."""
    if v is None or rows is None:
        return v
    return v.new_zeros((n,) + tuple(v.shape[1:])).index_copy_(0, rows, v)
