"""What the two kernel files share: block sizes, the autotuning configs, how a kernel is launched.

Each program of either kernel handles one row of the logits chunk and SPLIT_V of its vocabulary
entries (a 1-D grid of rows x splits, int64 row offsets), in BLOCK_V-wide vectors. Splitting the
vocabulary gives a grid of many short, equal programs (at V = 151936: 19 per row, ~14k for a chunk
of 768 rows, ~27 waves on an H200), so the last, partly filled wave costs at most one short
program instead of the 0.2-0.6 of a wave that one program per row left idle.

Under TRITON_INTERPRET=1 (the CPU tests) the blocks are small, so that small vocabularies still
exercise several blocks, several splits and ragged edges.
"""
from __future__ import annotations

import math
import os
import warnings

import triton
import triton.language as tl

# Small and few: the kernels stream memory; wider vectors only add registers. Every BLOCK_V divides
# SPLIT_V. `compile_check.py` compiles each for sm_90 (registers, spills, 128-bit loads).
CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w)
           for bv, w in ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8))]
SPLIT_V = 8192
INTERPRETER_BLOCK_V = 256
INTERPRETER_SPLIT_V = 512


def launchable(config, flags) -> bool:
    """Whether the autotuner may run `config` for a kernel variant with these constexpr flags. With
    the soft cap, 4096 lanes on 8 warps spilled 8 bytes to the stack in both kernels (sm_90, Triton
    3.6 and 3.9, `compile_check.py`): left out there."""
    return not (flags.get("HAS_CAP") and config.kwargs["BLOCK_V"] >= 4096)


# for triton.autotune(prune_configs_by=...): the configs `launchable` allows, with the launch's flags
PRUNE = {"early_config_prune": lambda configs, named_args, **flags: [c for c in configs if launchable(c, flags)]}


LOG2E = tl.constexpr(1.4426950408889634)   # the kernels work in base 2: exp(x) = 2^(x log2 e)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exp2(x, FAST: tl.constexpr):
    """2^x. On the GPU (FAST) one MUFU.EX2: `ex2.approx.ftz` flushes results below 2^-126 to 0,
    which no softmax sum can see, and skips the 3 extra instructions per element that keep
    them subnormal. Under the interpreter (no inline PTX) `tl.exp2`."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def program_split(n_splits, SPLIT_V: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's (id, row, first vocabulary entry) on the grid of rows x vocabulary splits. Its
    kernel walks [v0, v0 + SPLIT_V) in BLOCK_V steps masking only at V: a BLOCK_V that did not divide
    SPLIT_V would run into the next split (entries counted or written twice), so it does not compile."""
    tl.static_assert(SPLIT_V % BLOCK_V == 0, "BLOCK_V must divide SPLIT_V")
    pid = tl.program_id(0)
    return pid, (pid // n_splits).to(tl.int64), (pid % n_splits) * SPLIT_V


@triton.jit
def tanh(x):
    """tanh in fp32 from exp (libdevice is not there under the interpreter): a Taylor polynomial below
    |x| = 0.25, where 1 - exp(-2|x|) would cancel (its first left-out term is < 1e-8 relative there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def softmax_input(z, inv_t, cap, HAS_CAP: tl.constexpr):
    """u = c tanh(z / c) / T with a soft cap (a -inf logit stays -inf), else z / T: what the softmax
    sees of a loaded fp32 logit, in both kernels (`logprobs/transform.py`). The one place a logit is
    transformed on load; the statistics kernel's block max relies on the map being increasing."""
    if HAS_CAP:
        u = tl.where(z == float("-inf"), z, cap * tanh(z / cap)) * inv_t
    else:
        u = z * inv_t
    return u


# The divergence to a teacher head (the second head's statistic), a constexpr of both kernels: the exact
# KL(p || q) of a reference (or a teacher's reverse KL), KL(q || p), or the generalized JSD.
REVERSE_KL, FORWARD_KL, JSD = 0, 1, 2
DIVERGENCES = {"reverse_kl": REVERSE_KL, "forward_kl": FORWARD_KL, "jsd": JSD}


@triton.jit
def log_mixture(lp, lq, log_1mb, log_b, FAST: tl.constexpr):
    """log m = log((1 - b) p + b q) from log p, log q (generalized JSD): the larger of the two logs plus
    log(1 + exp(-|difference|)), one exp and one log; -inf where both are -inf (never NaN)."""
    a = lp + log_1mb
    c = lq + log_b
    mx = tl.maximum(a, c)
    finite = mx > float("-inf")
    d = tl.where(finite, -tl.abs(a - c), 0.0)
    return tl.where(finite, mx + tl.log(1.0 + exp2(d * LOG2E, FAST)), float("-inf"))


def mixture_logs(jsd_beta: float):
    """(log(1 - b), log b) of the generalized JSD's mixture weights, b in (0, 1)."""
    return math.log1p(-jsd_beta), math.log(jsd_beta)


def per_row(inv_t, n, device):
    """1 / T of each row as an fp32 vector (a scalar temperature broadcast)."""
    import torch

    if isinstance(inv_t, torch.Tensor):
        return inv_t.to(device=device, dtype=torch.float32).contiguous()
    return torch.full((n,), float(inv_t), dtype=torch.float32, device=device)


def vec(t, fallback):
    """An fp32 vector argument, or `fallback` (never read: its flag is off) when absent."""
    import torch

    return fallback if t is None else t.to(torch.float32).contiguous()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_v() -> int:
    """Vocabulary entries per program."""
    return INTERPRETER_SPLIT_V if interpreting() else SPLIT_V


_warned_unaligned = False


def launch(tuned, raw, grid, args, flags) -> None:
    """Run `tuned` (the autotuned kernel) on the GPU, `raw` with the interpreter's block size on the CPU."""
    if interpreting():  # numpy underneath: no timing to tune on
        raw[grid](*args, **flags, FAST=False, BLOCK_V=INTERPRETER_BLOCK_V)
    else:
        tuned[grid](*args, **flags, FAST=True)


def warn_if_unaligned(vocab: int) -> None:
    global _warned_unaligned
    if vocab % 4 and not _warned_unaligned and not interpreting():
        # fp32 rows of V % 4 != 0 logits are not 16-byte aligned: the loads fall back to 32 bits.
        warnings.warn(f"vocabulary size {vocab} is not a multiple of 4: the epilogue kernels lose their "
                      "128-bit loads (pad the LM head to a multiple of 64 rows for full speed)")
        _warned_unaligned = True


def rowmajor(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()
