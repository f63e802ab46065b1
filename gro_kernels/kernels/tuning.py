"""Block sizes and launch settings per shape and dtype (one table; no autotuning).

No autotuner on purpose: the backward kernels accumulate into buffers, and a table keeps launches
free of benchmarking passes and of any input mutation. The table is a first guess for Hopper
(H100/H200, sm_90) written without GPU measurements; `bench/` is where it gets tuned. Every
entry can be overridden per call through the backend options (`block_n`, `block_v`, `block_d`,
`num_warps`, `num_stages`, `vocab_splits`).

Constraints: every block is a power of two >= 16 (`tl.dot`), and BLOCK_D <= 128 keeps the
double-buffered operand tiles in shared memory.
"""
from __future__ import annotations

import functools

import torch
import triton

OVERRIDE_KEYS = ("block_n", "block_v", "block_d", "num_warps", "num_stages", "vocab_splits",
                 "dw_slice_elements", "dh_slice_elements")

# (dtype class) -> settings for the tile shared by the forward sweep and the backward kernels.
_FWD_TABLE = {
    # 16-bit inputs: tensor-core dots, a [64, 128] fp32 logits tile, 32-wide K steps. Chosen so that
    # every forward variant (with the reference head too) compiles for sm_90 without register
    # spills (`python -m gro_kernels.kernels.compile_check`); [128, 128] tiles spilled.
    "half": {"small_n": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
             "large_n": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)},
    # fp32 inputs run IEEE fp32 dots (no TF32, to match torch): smaller tiles.
    "fp32": {"small_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
             "large_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2)},
}
# The backward holds more [BLOCK_N, BLOCK_V] tiles at once (z, zr, p, dz and its dot operand):
# [64, 64] tiles are the largest that compiled without spills for every variant.
_BWD_TABLE = {
    "half": {"small_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3),
             "large_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)},
    "fp32": {"small_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
             "large_n": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2)},
}
# Under TRITON_INTERPRET=1 (numpy) bigger tiles mean fewer Python-level steps; warps are ignored.
_INTERPRETER = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)

_MAX_SPLIT = 32
_DH_SPLIT_BUDGET_BYTES = 1 << 30   # the backward's per-slice fp32 dh buffers


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _base(n: int, d: int, dtype: torch.dtype, interpreting: bool, table: dict) -> dict:
    if interpreting:
        cfg = dict(_INTERPRETER)
    else:
        kind = "fp32" if dtype == torch.float32 else "half"
        cfg = dict(table[kind]["large_n" if n >= 4096 else "small_n"])
    # Tiny problems: do not pad a 7-token batch to a 128-row tile.
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2_clamp(n, 16, cfg["BLOCK_N"]))
    cfg["BLOCK_D"] = min(cfg["BLOCK_D"], _pow2_clamp(d, 16, cfg["BLOCK_D"]))
    return cfg


def _split(n_programs: int, n_vblocks: int, device: torch.device, interpreting: bool) -> int:
    """Vocabulary slices per token block so that the grid covers the GPU about twice."""
    if interpreting or device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if n_programs >= target:
        return 1
    return max(1, min(_MAX_SPLIT, triton.cdiv(target, n_programs), n_vblocks // 4))


def _apply_overrides(cfg: dict, overrides: dict) -> dict:
    names = dict(block_n="BLOCK_N", block_v="BLOCK_V", block_d="BLOCK_D", num_warps="num_warps",
                 num_stages="num_stages", vocab_splits="SPLIT", dw_slice_elements="DW_SLICE_ELEMENTS",
                 dh_slice_elements="DH_SLICE_ELEMENTS")
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("block_"):
            value = int(value)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{key} must be a power of two >= 16, got {value}")
        cfg[names[key]] = int(value)
    return cfg


def vocab_split(cfg: dict, vocab: int):
    """(split, v_per_split): cfg's SPLIT clamped to the vocabulary blocks, each slice a run of whole
    BLOCK_V blocks, and the count recomputed so that no slice is empty."""
    n_vblocks = triton.cdiv(vocab, cfg["BLOCK_V"])
    split = max(1, min(int(cfg.get("SPLIT", 1)), n_vblocks))
    v_per_split = triton.cdiv(n_vblocks, split) * cfg["BLOCK_V"]
    return triton.cdiv(vocab, v_per_split), v_per_split


def forward_config(n, vocab, d, dtype, device, interpreting, overrides) -> dict:
    cfg = _base(n, d, dtype, interpreting, _FWD_TABLE)
    cfg["SPLIT"] = _split(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]), device, interpreting)
    return _apply_overrides(cfg, overrides)


def backward_config(n, vocab, d, dtype, device, interpreting, overrides) -> dict:
    cfg = _base(n, d, dtype, interpreting, _BWD_TABLE)
    split = _split(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]), device, interpreting)
    cfg["SPLIT"] = max(1, min(split, _DH_SPLIT_BUDGET_BYTES // max(1, n * d * 4)))
    return _apply_overrides(cfg, overrides)
