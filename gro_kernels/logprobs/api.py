"""`token_logprobs`: per-token log-prob, entropy and exact KL from hidden states.

This file checks the arguments, flattens them to `[N, d]` / `[N]`, picks a backend and
reshapes the results. The math lives in the backends (`naive.py`, `chunked.py`,
`chunked.py` for both `torch` and `triton`); each exposes `token_stats(...)` with identical semantics:

    token_stats(hidden[N,d], weight[V,d], targets[N] int64, bias[V]|None,
                ref_hidden[N,dr]|None, ref_weight[V,dr]|None, ref_bias[V]|None, *,
                transform (transform.Transform of the N tokens), head_precision, ignore_index,
                return_entropy, return_kl, return_sum_p2, return_mean_logp, class_weight[V]|None,
                teacher=(hidden[N,dt], weight[V,dt], bias[V]|None)|None, divergence=engine.Divergence|None,
                **backend_options)
        -> dict logp, entropy, kl, lse, sum_p2, mean_logp, distill (each [N] or None), is_top1 ([N] bool)

all float32 (float64 when the inputs are float64), exactly 0 at ignored positions, and
differentiable in hidden, weight and bias. The reference and teacher heads are frozen: no
gradient flows into them. `transform.py` defines the soft cap, temperature
and truncation every backend applies.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .engine import DIVERGENCES, Divergence
from ..argdocs import document
from . import chunked, naive
from .rows import STAT_NAMES
from .transform import check_head_options
from .vocab_parallel import VocabShard

BACKENDS = ("naive", "torch", "triton")


@dataclass
class TokenStats:
    """Per-token statistics, each shaped like `targets`, of q = the row's distribution: softmax(u),
    u = softcap(W h + b) / temperature, restricted to the kept set when truncated (`transform.py`).

    logp: log q[target].
    entropy: entropy of q, or None when not asked for.
    kl: exact KL(q || q_ref) over the whole vocabulary (q_ref: the reference head's soft-capped,
        tempered, never truncated softmax), or None without a reference head.
    lse: log sum exp(u) over the kept set, q's normalizer.
    sum_p2: sum_v q_v^2 (verl's optimal token baseline), detached, or None when not asked for.
    mean_logp: (1/V) sum_v w_v log q_v over the whole vocabulary (w: class_weight, else 1; label
        smoothing's term), differentiable, or None when not asked for.
    is_top1: bool, the target's logit is the row's largest (ties count; token accuracy), no gradient.
    distill: the exact divergence to the teacher head over the whole vocabulary (`divergence`), or None
        without a teacher head.
    """

    logp: torch.Tensor
    entropy: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    lse: torch.Tensor
    sum_p2: Optional[torch.Tensor] = None
    mean_logp: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    distill: Optional[torch.Tensor] = None


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


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor shards nothing that way
        return False
    return isinstance(t, DTensor)


def _check_not_sharded(name, t):
    """A parameter a sharding engine still holds in pieces: an error saying what to do, not a wrong result."""
    if _is_dtensor(t):
        raise TypeError(f"{name} is a sharded DTensor (FSDP2 / tensor parallel): gather it first "
                        "(gro_kernels.integrations.sharded.gathered averages its gradient back onto the shards), "
                        "or pass this rank's vocabulary shard as a plain tensor with tp_group")
    if getattr(t, "ds_id", None) is not None and t.numel() == 0:
        raise ValueError(f"{name} is a DeepSpeed ZeRO-3 parameter that is not gathered here: compute the loss inside "
                         "the engine's forward (which gathers what it reads) or inside deepspeed.zero.GatheredParameters")


def _check_head(prefix: str, hidden, weight, bias, lead_shape, device):
    """Validate one (hidden, weight, bias) head; returns (hidden2d, weight, bias)."""
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight)
    _check_not_sharded(f"{prefix}weight", weight)
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


@document(("hidden", "weight", "targets", "bias", "temperature", "softcap", "top_k", "top_p", "min_p", "head_precision",
           "ignore_index", "return_entropy", "return_sum_p2", "return_mean_logp", "class_weight",
           "ref_hidden", "ref_weight", "ref_bias", "teacher_hidden", "teacher_weight", "teacher_bias",
           "divergence", "jsd_beta", "tp_group", "vocab_start", "sequence_parallel", "backend",
           "**backend_options"), {
    "temperature": "float > 0, or a tensor shaped like targets (per token) or like its first dim (per "
                   "sequence), default 1.0. Applied to log-probs, entropy and both heads of the KL alike; a "
                   "constant (no gradient flows to it).",
    "class_weight": "[V] float >= 0, optional. Weights the mean log-prob over the vocabulary (label "
                    "smoothing's term, torch's cross-entropy class weights); needs return_mean_logp.",
    "ref_hidden": "[..., d_ref] float, optional. The frozen reference model's final hidden states: with "
                  "ref_weight, the exact KL(policy || reference) per token in the same pass, the temperature "
                  "applied to both heads. No gradient flows into the reference head.",
    "return_entropy": "bool, default False. Also compute each token's entropy (differentiable).",
    "**backend_options": "Options of the chunked backends: chunk_elements=n, the logits per chunk (default 4M "
                         "on a CPU, 192M on a GPU). An option the backend does not know is an error."})
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature=1.0,
    softcap: Optional[float] = None,
    top_k=None,
    top_p=None,
    min_p=None,
    head_precision: str = "native",
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_p2: bool = False,
    return_mean_logp: bool = False,
    class_weight: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    tp_group=None,
    vocab_start: Optional[int] = None,
    sequence_parallel: bool = False,
    backend: str = "auto",
    **backend_options,
) -> TokenStats:
    """Log-prob of each target token under the head's distribution, without building the logits.

    The fused primitive under `gro_loss`: never builds the `[tokens, vocab]` logits (except
    `backend="naive"`, the test reference), and is differentiable in hidden, weight and bias.
    `hidden` may have any leading shape matching `targets` (`[B, T, d]` with `[B, T]`, or `[N, d]`).
    The distribution of a token is q = softmax(u), u = softcap(hidden @ weight.T + bias) / temperature,
    restricted to the sampler's kept set and renormalized when top_k / top_p / min_p are given: the
    distribution the sampler drew from, as vLLM's processed log-probs (docs/head.md).

    {args}

    Returns:
        TokenStats: logp, entropy (or None), kl (the exact KL, or None without a reference head),
        lse (log normalizer), sum_p2 (or None), mean_logp (or None), is_top1, distill (the divergence
        to the teacher, or None without a teacher head); each shaped like `targets`, float32 (float64
        for float64 input; is_top1 bool), exactly 0 at ignored positions.

    Raises:
        TypeError, ValueError: naming the argument; ImportError naming triton for backend="triton"
        where triton is not installed.
    """
    refuse_teacher_with_tp_group(teacher_hidden, teacher_weight, tp_group)
    shard = vocab_shard(weight, tp_group, vocab_start, sequence_parallel, bias)
    h2, w, y, b, rh2, rw, rb, tf = check_inputs(
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature=temperature,
        ignore_index=ignore_index, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p,
        head_precision=head_precision, shard=shard)
    cw = check_class_weight(class_weight, w.shape[0] if shard is None else shard.vocab, targets.device)
    if return_mean_logp:
        check_mean_logp(tf, b, shard)
    if cw is not None and not return_mean_logp:
        raise ValueError("class_weight weights the mean log-prob over the vocabulary: pass return_mean_logp=True")
    teacher = check_teacher(teacher_hidden, teacher_weight, teacher_bias, targets, w.shape[0], b, tf)
    div = teacher_divergence(divergence, jsd_beta, teacher is not None)
    device, lead = targets.device, targets.shape
    name = resolve_backend(backend, device)
    fn = _backend_fn(name)
    if shard is not None:
        backend_options = {**backend_options, "shard": shard}
    # The promised fp32 math holds inside autocast too: no GEMM here is recast to 16 bits.
    with torch.autocast(device.type, enabled=False):
        out = fn(
            h2, w, y, b, rh2, rw, rb,
            transform=tf, head_precision=head_precision, ignore_index=ignore_index,
            return_entropy=bool(return_entropy), return_kl=rh2 is not None, return_sum_p2=bool(return_sum_p2),
            return_mean_logp=bool(return_mean_logp), class_weight=cw, teacher=teacher, divergence=div,
            **backend_options,
        )
    shape = tuple(lead)
    return TokenStats(**{k: None if out.get(k) is None else out[k].reshape(shape) for k in STAT_NAMES})


def teacher_divergence(divergence, jsd_beta, has_teacher: bool) -> Optional[Divergence]:
    """The engine's Divergence for (divergence, jsd_beta); None without a teacher (then both must be left at
    their defaults)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(jsd_beta, bool) or not isinstance(jsd_beta, (int, float)) or not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be a number in [0, 1], got {jsd_beta!r}")
    if not has_teacher:
        if divergence != "reverse_kl" or jsd_beta != 0.5:
            raise ValueError("divergence / jsd_beta apply to the teacher head: pass teacher_hidden and teacher_weight")
        return None
    return Divergence.named(divergence, float(jsd_beta))


def _check_teacher_masked_rows(bias, teacher_bias) -> None:
    """-inf rows of the teacher's bias must be the policy's: a row one head masks and the other keeps makes
    the reverse or the forward KL infinite (the JSD stays finite, but one rule for every divergence)."""
    if teacher_bias is None:
        if bias is not None and bool(torch.isneginf(bias).any()):
            raise ValueError("bias masks vocabulary rows (-inf) the teacher keeps (no teacher_bias): mask the same "
                             "rows with teacher_bias")
        return
    if bool((torch.isnan(teacher_bias) | torch.isposinf(teacher_bias)).any()) or bool(torch.isneginf(teacher_bias).all()):
        raise ValueError("teacher_bias must be finite, or -inf on the vocabulary rows it masks (not on all of them)")
    mine = torch.isneginf(bias) if bias is not None else torch.zeros_like(teacher_bias, dtype=torch.bool)
    rows = torch.nonzero(mine != torch.isneginf(teacher_bias))[:5, 0].tolist()
    if rows:
        raise ValueError(f"teacher_bias and bias mask (-inf) different vocabulary rows, e.g. {rows}: a row one head "
                         "masks and the other keeps makes the KL to the teacher infinite; mask the same rows in both")


def check_teacher(teacher_hidden, teacher_weight, teacher_bias, targets, vocab, bias=None, tf=None):
    """The teacher head flattened (hidden [N, dt], weight [V, dt], bias), or None; errors name the argument.
    A teacher takes no soft cap and no truncation (the policy's would not be the teacher's)."""
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight must be given together (the teacher head)")
    if teacher_hidden is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias was given without teacher_hidden/teacher_weight")
        return None
    th, tw, tb = _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, targets.shape, targets.device)
    if tf is not None and tf.cap is not None:
        raise ValueError("softcap applies to the policy's head; the teacher head takes none (a teacher of another model "
                         "has its own): the divergence to a teacher is not offered with softcap")
    if tf is not None and tf.truncates:
        raise ValueError("top_k / top_p / min_p truncate the policy's distribution; the divergence to a teacher is over "
                         "the whole vocabulary: not offered with truncation")
    _check_teacher_masked_rows(bias, tb)
    if tw.shape[0] != vocab:
        raise ValueError(f"teacher_weight has vocabulary {tw.shape[0]} but weight has {vocab} (a teacher must share "
                         "the policy's tokenizer; pad the smaller head's rows with a -inf bias)")
    return th, tw, tb



def refuse_teacher_with_tp_group(teacher_hidden, teacher_weight, tp_group) -> None:
    """A teacher head with tp_group is refused before any collective (every rank raises alike): its
    divergence is not combined across vocabulary shards."""
    if tp_group is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError("teacher_hidden / teacher_weight (a teacher head) do not take tp_group: the divergence to "
                         "the teacher is computed over both heads' whole vocabulary on one device; gather the heads "
                         "and drop tp_group (cp_group and sequence_ids do take a teacher)")


def vocab_shard(weight, tp_group, vocab_start, sequence_parallel, bias=None):
    """The `VocabShard` of `weight` over `tp_group` (a collective over the group), or None without one."""
    if tp_group is None:
        if vocab_start is not None or sequence_parallel:
            raise ValueError("vocab_start and sequence_parallel describe a vocabulary shard: they need tp_group")
        return None
    rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    masked = isinstance(bias, torch.Tensor) and bool(torch.isneginf(bias).any())
    return VocabShard.build(tp_group, rows, vocab_start, device, sequence_parallel, masked)


def check_mean_logp(tf, bias, shard=None) -> None:
    """The mean log-prob over the whole vocabulary (label smoothing's term) is -inf where a row has
    probability 0: refused with truncation and with a bias that masks rows (on any rank of a `shard`'s
    group, so that every rank refuses alike)."""
    if tf.truncates:
        raise ValueError("the mean log-prob over the vocabulary (label smoothing's term, return_mean_logp) is -inf "
                         "for a truncated distribution (top_k / top_p / min_p): use one or the other")
    if (shard.masked if shard is not None else bias is not None and bool(torch.isneginf(bias).any())):
        raise ValueError("the mean log-prob over the vocabulary (label smoothing's term, return_mean_logp) is -inf "
                         "when bias masks vocabulary rows with -inf: label smoothing puts mass on every row")


def check_class_weight(class_weight, vocab, device):
    """class_weight: None or a finite non-negative float tensor [V] without gradient."""
    if class_weight is None:
        return None
    _check_float("class_weight", class_weight)
    if tuple(class_weight.shape) != (vocab,):
        raise ValueError(f"class_weight must have shape ({vocab},) (one weight per vocabulary entry), "
                         f"got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight is on {class_weight.device} but targets are on {device}")
    if class_weight.requires_grad:
        raise ValueError("class_weight is a constant: pass a tensor without requires_grad (detach it)")
    if not bool((torch.isfinite(class_weight) & (class_weight >= 0)).all()):
        raise ValueError("class_weight must be finite and >= 0")
    return class_weight


def check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index,
                 softcap=None, top_k=None, top_p=None, min_p=None, head_precision="native", shard=None):
    """Validate the arguments of `token_logprobs` (each error names its argument) and flatten them:
    (hidden [N,d], weight, targets [N] int64, bias, ref_hidden [N,dr], ref_weight, ref_bias,
    the head's Transform of the N tokens). With a vocabulary `shard`, weight holds its rows and
    targets are ids of the whole vocabulary."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    device = targets.device
    lead = targets.shape
    h2, w, b = _check_head("", hidden, weight, bias, lead, device)
    vocab = w.shape[0] if shard is None else shard.vocab

    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together (the reference head for the exact KL)")
    if ref_bias is not None and ref_weight is None:
        raise ValueError("ref_bias was given without ref_hidden/ref_weight")
    rh2 = rw = rb = None
    if ref_hidden is not None:
        rh2, rw, rb = _check_head("ref_", ref_hidden, ref_weight, ref_bias, lead, device)
        if rw.shape[0] != w.shape[0]:
            raise ValueError(f"ref_weight has {rw.shape[0]} vocabulary rows but weight has {w.shape[0]} "
                             "(with tp_group: the same shard of the reference head)")
    _check_masked_rows(b, rb, whole=shard is None)

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

    tf = check_head_options(temperature=temperature, softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p,
                            head_precision=head_precision, lead=tuple(lead), device=device, dtype=h2.dtype,
                            vocab=vocab)
    if shard is not None and tf.top_p is not None:
        # top_k and min_p combine across the group (vocab_parallel.py); top_p's boundary is a running sum
        # over the whole vocabulary's sorted probabilities, which no per-rank candidate list bounds.
        raise ValueError("top_p with tp_group is not supported: the nucleus is found over the whole vocabulary's "
                         "sorted probabilities; pass top_k / min_p, or gather the head and drop tp_group")
    return h2, w, y, b, rh2, rw, rb, tf


def _check_masked_rows(bias, ref_bias, whole: bool = True) -> None:
    """A -inf bias masks a vocabulary row (padding): probability 0, and the statistics are those of
    the head without that row. NaN or +inf in a bias is an error; so is a reference that masks a
    row the policy keeps, since KL(policy || reference) is then +inf for every token. `whole=False`:
    the bias is one tensor-parallel slice, which may be all padding."""
    masks = []
    for name, t in (("bias", bias), ("ref_bias", ref_bias)):
        if t is None:
            continue
        bad = torch.isnan(t) | torch.isposinf(t)
        if bool(bad.any()) or (whole and bool(torch.isneginf(t).all())):
            rows = torch.nonzero(bad)[:5, 0].tolist()
            raise ValueError(f"{name} must be finite, or -inf on the vocabulary rows it masks (not on all of "
                             f"them); got NaN/+inf at rows {rows}" if rows else f"{name} is -inf on every row")
        masks.append(torch.isneginf(t))
    if ref_bias is not None and bool(masks[-1].any()):
        kept = ~masks[0] if bias is not None else torch.ones_like(masks[-1])
        rows = torch.nonzero(masks[-1] & kept)[:5, 0].tolist()
        if rows:
            raise ValueError(
                f"ref_bias is -inf at vocabulary rows {rows} where bias is not: the reference gives those tokens "
                "probability 0 while the policy does not, so the exact KL(policy || reference) is infinite. "
                "Mask the same rows in both heads (-inf in bias too).")
