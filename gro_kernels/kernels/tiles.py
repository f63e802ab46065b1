"""Tile helpers shared by the forward and backward kernels.

`logits_tile` computes one `[BLOCK_N, BLOCK_V]` tile of `(h @ W^T + b) / T` with an fp32
accumulator, looping over the hidden dimension in `BLOCK_D` chunks. Rows and columns are int64
(`N * d` and `V * d` can pass 2**31). Rows past N and columns past V load zeros; the caller masks
them. The last dimension of `h` and `W` must be contiguous (the launchers make it so).

`UPCAST` (set by the launchers only under `TRITON_INTERPRET=1` with bf16 inputs) casts the tiles to
fp32 before `tl.dot`: the interpreter's bf16 dot returns garbage, its fp32 dot of the upcast bf16
tiles gives the same products a GPU bf16 tensor-core dot accumulates in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_t,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_cols = w_ptr + cols[None, :] * stride_w
    for k in range(0, D, BLOCK_D):
        dk = k + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        h = tl.load(h_rows + dk[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_cols + dk[:, None], mask=col_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_t
