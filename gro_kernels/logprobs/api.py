"""`token_logprobs`: per-token log-prob, entropy and exact KL from hidden states.

This file checks the arguments, flattens them to `[N, d]` / `[N]`, picks a backend and
reshapes the results. The math lives in the backends (`naive.py`; `chunked.py` for both `torch`
and `triton`); each exposes `token_stats(...)` with identical semantics:

    token_stats(hidden[N,d], weight[V,d], targets[N] int64, bias[V]|None,
                ref_hidden[N,dr]|None, ref_weight[V,dr]|None, ref_bias[V]|None, *,
                temperature, ignore_index, return_entropy, return_kl, return_sum_p2, **backend_options)
        -> (logp[N], entropy[N]|None, kl[N]|None, lse[N], sum_p2[N]|None)

all float32 (float64 when the inputs are float64), exactly 0 at ignored positions, and
differentiable in hidden, weight and bias. The reference head is frozen: no gradient
flows into ref_hidden / ref_weight / ref_bias.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import chunked, naive

BACKENDS = ("naive", "torch", "triton")


@dataclass
class TokenStats:
    """Per-token statistics, each shaped like `targets`.

    logp: log softmax(z)[target], z = (W h + b) / temperature.
    entropy: entropy of softmax(z), or None when not asked for.
    kl: exact KL(softmax(z) || softmax(z_ref)) over the whole vocabulary, or None without a reference head.
    lse: logsumexp(z), the softmax normalizer.
    sum_p2: sum_v softmax(z)_v^2 (verl's optimal token baseline), detached, or None when not asked for.
    """

    logp: torch.Tensor
    entropy: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    lse: torch.Tensor
    sum_p2: Optional[torch.Tensor] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` means triton for CUDA tensors, torch otherwise (the interpreter is opt-in: `backend="triton"`)."""
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "triton" and not _triton_available():
        raise ImportError("backend='triton' needs the `triton` package, which is not installed "
                          "(pip install triton; Linux only). backend='torch' runs everywhere.")
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the "
            f"CPU through Triton's interpreter); got tensors on {device}"
        )
    return backend


def _triton_available() -> bool:
    # Whether triton is installed: a broken kernel module must raise its own error, not read as "no triton".
    return importlib.util.find_spec("triton") is not None


def _backend_fn(name: str):
    if name == "naive":
        return naive.token_stats
    return functools.partial(chunked.token_stats, backend=name)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_head(prefix: str, hidden, weight, bias, lead_shape, device):
    """Validate one (hidden, weight, bias) head; returns (hidden2d, weight, bias)."""
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D [vocab, hidden_dim], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or tuple(hidden.shape[:-1]) != tuple(lead_shape):
        raise ValueError(
            f"{prefix}hidden must have shape {tuple(lead_shape)} + (hidden_dim,) to match targets, "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden's last dim ({hidden.shape[-1]}) must equal {prefix}weight's second dim "
            f"({weight.shape[1]})"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
    for name, t in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but targets are on {device}")
    if bias is not None:
        _check_float(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"{prefix}bias is on {bias.device} but targets are on {device}")
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_p2: bool = False,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    **backend_options,
) -> TokenStats:
    """Log-prob of each target token under `softmax((hidden @ weight.T + bias) / temperature)`.

    Never builds the `[tokens, vocab]` logits (except `backend="naive"`, the test reference).
    `hidden[..., d]` predicts `targets[...]` (already shifted). With `ref_hidden` and `ref_weight`
    the exact full-vocabulary KL(policy || reference) is computed in the same pass, with the
    temperature applied to both heads. `backend_options` go to the backend (the chunked backends
    take `chunk_elements`, the fp32 logits per chunk, and `group_elements`, the logits-gradient
    entries held per group of chunks before its gradient GEMMs); an option a backend does not know
    is an error.
    """
    h2, w, y, b, rh2, rw, rb = check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                                            temperature=temperature, ignore_index=ignore_index)
    device, lead = targets.device, targets.shape
    name = resolve_backend(backend, device)
    fn = _backend_fn(name)
    # The promised fp32 math holds inside autocast too: no GEMM here is recast to 16 bits.
    with torch.autocast(device.type, enabled=False):
        logp, ent, kl, lse, p2 = fn(
            h2, w, y, b, rh2, rw, rb,
            temperature=float(temperature), ignore_index=ignore_index,
            return_entropy=bool(return_entropy), return_kl=rh2 is not None, return_sum_p2=bool(return_sum_p2),
            **backend_options,
        )
    shape = tuple(lead)
    return TokenStats(
        logp=logp.reshape(shape),
        entropy=None if ent is None else ent.reshape(shape),
        kl=None if kl is None else kl.reshape(shape),
        lse=lse.reshape(shape),
        sum_p2=None if p2 is None else p2.reshape(shape),
    )


def check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index):
    """Validate the arguments of `token_logprobs` (each error names its argument) and flatten them:
    (hidden [N,d], weight, targets [N] int64, bias, ref_hidden [N,dr], ref_weight, ref_bias)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    device = targets.device
    lead = targets.shape
    h2, w, b = _check_head("", hidden, weight, bias, lead, device)
    vocab = w.shape[0]

    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together (the reference head for the exact KL)")
    if ref_bias is not None and ref_weight is None:
        raise ValueError("ref_bias was given without ref_hidden/ref_weight")
    rh2 = rw = rb = None
    if ref_hidden is not None:
        rh2, rw, rb = _check_head("ref_", ref_hidden, ref_weight, ref_bias, lead, device)
        if rw.shape[0] != vocab:
            raise ValueError(f"ref_weight has vocabulary {rw.shape[0]} but weight has {vocab}")

    y = targets.reshape(-1).long()
    valid = y != ignore_index
    if valid.any():
        yv = y[valid]
        lo, hi = int(yv.min()), int(yv.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"targets holds token id {bad} outside [0, {vocab}) that is not ignore_index ({ignore_index})"
            )

    return h2, w, y, b, rh2, rw, rb
