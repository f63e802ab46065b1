"""Aggregation: the coefficient c[i,t] each token's term is summed with (docs/objective.md)."""
from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_sum")


def token_coefficients(kind: str, mask: torch.Tensor, *, units: int,
                       max_completion_length: Optional[int] = None,
                       num_items: Optional[float] = None) -> torch.Tensor:
    """c[i,t] for `loss = sum c * term`; `units` is n (sequences, or pairs for pairwise methods).

    token_mean:              m / sum m   (m / num_items when given: exact gradient accumulation)
    token_sum:               m           (torch's reduction="sum")
    seq_mean_token_mean:     m / (n |y_i|)
    seq_mean_token_sum:      m / n
    seq_mean_token_sum_norm: m / (n max_completion_length)   (Dr. GRPO; defaults to T)
    """
    if num_items is not None and kind != "token_mean":
        raise ValueError(f"num_items_in_batch applies to loss_agg='token_mean' only, got loss_agg={kind!r}")
    n = max(units, 1)
    if kind == "token_sum":
        return mask.clone()
    if kind == "token_mean":
        total = mask.sum().clamp(min=1) if num_items is None else num_items
        return mask / total
    if kind == "seq_mean_token_mean":
        return mask / (n * mask.sum(1, keepdim=True).clamp(min=1))
    if kind == "seq_mean_token_sum":
        return mask / n
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    return mask / (n * length)
