"""`gro_loss`: hidden states -> the GRO loss and its gradients, without materializing the logits.

The only glue between layer 2 (`token_logprobs`, the fused pass) and layer 3 (`gro_objective`).
Token-local objectives (docs/objective.md, "One pass or two") take the single fused pass: three GEMMs, the gradients
computed inside the forward call and handed back by backward. The others (weights that depend on
the policy's own log-probs: DPO, IPO, CPL, SimPO, KTO, GSPO's sequence ratio) take the composable
path: `token_logprobs` forward (one GEMM), the objective, `token_logprobs` backward (three).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .argdocs import document, options_entry
from .logprobs import resolve_backend, token_logprobs
from .logprobs.api import (check_class_weight, check_inputs, check_mean_logp, check_teacher,
                            refuse_teacher_with_tp_group, teacher_divergence, vocab_shard)
from .logprobs.rows import stat_dtype
from .logprobs.chunked import PrecomputedGrad, fused_token_loss
from .logprobs.transform import HEAD_PRECISIONS, check_head_options
from .objective import GROOutput, gro_objective
from .objective.chunk import ChunkCoefficients
from .objective.core import objective_in_layout, token_layout
from .objective.inputs import check_mask, refuse_unread_inputs, uses_ref_logp
from .objective.options import COMPUTED_WITH_LOGP, OPTIONS, ce_smoothing_reader, resolve_options
from .objective.split import needs_policy_logp


_INPUTS = ("hidden", "weight", "targets", "method", "mask", "rewards", "advantages", "group_ids", "labels",
           "baselines", "offline", "old_logp", "ref_logp", "ref_hidden", "ref_weight", "bias", "ref_bias",
           "teacher_hidden", "teacher_weight", "teacher_bias", "num_items_in_batch", "rollout_logp", "truncated",
           "log_sum_sq_probs", "head_precision", "softcap", "top_k", "top_p", "min_p", "class_weight", "sequence_ids",
           "positions", "cp_group", "tp_group", "vocab_start", "sequence_parallel", "ignore_index", "backend",
           "backend_options", "return_entropy")
# the head's arguments (docs/head.md): GROLoss takes them with the options at construction
HEAD_ARGS = ("head_precision", "softcap", "top_k", "top_p", "min_p")
_OPTIONS_DOC = {"**options": options_entry(OPTIONS)}


@document(_INPUTS + ("**options",), _OPTIONS_DOC)
def gro_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "gro",
    mask: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    baselines: Optional[torch.Tensor] = None,
    offline: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    rollout_logp: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    log_sum_sq_probs: Optional[torch.Tensor] = None,
    head_precision: str = "native",
    softcap: Optional[float] = None,
    top_k=None,
    top_p=None,
    min_p=None,
    class_weight: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cp_group=None,
    tp_group=None,
    vocab_start: Optional[int] = None,
    sequence_parallel: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    backend_options: Optional[dict] = None,
    return_entropy: Optional[bool] = None,
    **options,
) -> GROOutput:
    """The loss of `method` straight from the LM head, without materializing the logits.

    The GRO objective (docs/objective.md) configured as `method`, with `options` overriding the
    preset. The policy's per-token log-probs (and entropy, exact KL to the frozen reference head)
    come from `hidden @ weight.T` one chunk of tokens at a time. Token-local configurations take
    one fused pass: three GEMMs, the gradients computed in the forward call and handed back by
    `backward`. The others (weights that read the policy's own log-probs: DPO, KTO, GSPO, ...)
    take a forward-only pass first: four GEMMs. Masked and ignored tokens reach no GEMM. The
    policy's distribution is `token_logprobs`'s: softmax(softcap(W h + b) / temperature) over the
    sampler's kept set (top_k / top_p / min_p; docs/head.md). A teacher head (teacher_hidden,
    teacher_weight) is the fused pass's second head in place of the reference, for `distill_coef`;
    with both a teacher and the exact KL to a reference head (kl_estimator="full", kl_coef != 0) each
    takes its own statistics sweep on the composable path, while a sampled-token KL (k1, k3, ...)
    reads ref_logp, which the reference head gives without gradient, and keeps the one pass.

    {args}

    Returns:
        GROOutput: loss (0-d; [B, T] with the SFT preset's reduction="none"), logp ([B, T] float32,
        detached), metrics (name -> 0-d tensor, token_accuracy among them), per_sequence
        (name -> [B]), per_token (name -> [B, T]); docs/options.md lists every name.

    Raises:
        TypeError, ValueError: naming the argument or option (an unknown option also names the
        closest valid ones).

    Example:
        >>> out = gro_loss(hidden, model.lm_head.weight, targets, method="grpo",
        ...                rewards=rewards, group_ids=group_ids, kl_coef=0.0)
        >>> out.loss.backward()
    """
    backend_options = dict(backend_options or {})
    opts = resolve_options(method, options)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T], got shape {tuple(targets.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together (the frozen reference head)")
    has_ref_head = ref_hidden is not None
    full_kl = opts.kl_estimator == "full"
    if full_kl and opts.kl_coef != 0 and not has_ref_head:
        raise ValueError("kl_estimator='full' needs the reference head: pass ref_hidden and ref_weight")
    # packed rows: a per-sequence head tensor is indexed by sequence id, as the other per-sequence inputs
    head = dict(temperature=_by_sequence("temperature", opts.temperature, sequence_ids), softcap=softcap,
                head_precision=head_precision)
    sampler = {k: _by_sequence(k, v, sequence_ids) for k, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p))}
    # tensor parallelism: token_logprobs / the fused pass combine the vocabulary shards (a collective)
    vocab = dict(tp_group=tp_group, vocab_start=vocab_start, sequence_parallel=sequence_parallel)
    refuse_teacher_with_tp_group(teacher_hidden, teacher_weight, tp_group)   # before the shard's collective
    shard = vocab_shard(weight, **vocab, bias=bias)
    teacher = None
    if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
        if opts.distill_coef == 0:
            raise ValueError("teacher_hidden / teacher_weight were given but distill_coef is 0: use method='distill' "
                             "or set distill_coef")
        teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                       divergence=opts.divergence, jsd_beta=opts.jsd_beta)
    elif opts.distill_coef != 0:
        raise ValueError(f"distill_coef={opts.distill_coef} needs the teacher head: pass teacher_hidden and "
                         "teacher_weight (its final hidden states and lm_head weight)")

    # Masked positions are ignored tokens: dropped before any matrix work, so nothing there
    # (padding, a NaN hidden state) reaches a GEMM.
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & check_mask(mask, tuple(targets.shape), targets.device, against="targets")
    if isinstance(sequence_ids, torch.Tensor) and tuple(sequence_ids.shape) == tuple(targets.shape):
        valid = valid & (sequence_ids >= 0)  # padding between packed sequences
    if mask is not None or sequence_ids is not None:
        targets = targets.masked_fill(~valid, ignore_index)

    if has_ref_head:  # the reference head is read for ref_logp or the exact KL, or refused (inputs.py)
        refuse_unread_inputs(method, opts, {"ref_head"} | ({"ref_logp"} if ref_logp is not None else set()),
                             advantages is not None)
    ref_head = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias) if (full_kl and has_ref_head) else {}
    # The entropy: for the bonus, for top-entropy token selection, or asked for (metrics).
    want_entropy = bool(return_entropy) or opts.entropy_coef != 0 or opts.top_entropy_quantile < 1
    if ref_logp is None and has_ref_head and uses_ref_logp(method, opts):
        with torch.no_grad():  # the reference's full (never truncated) distribution
            ref_logp = token_logprobs(
                ref_hidden, ref_weight, targets, bias=ref_bias, ignore_index=ignore_index, backend=backend,
                **head, **vocab, **backend_options,
            ).logp
    # WPO's weights read log sum_v p_v^2 of the policy: the statistics pass gives it (no gradient).
    # (use_weighting is never token-local, so that pass is the composable path's own, below.)
    want_sum_p2 = log_sum_sq_probs is None and opts.use_weighting
    # SFT's label smoothing reads the mean log-prob over the vocabulary; its class weights the targets'.
    want_mean_logp = opts.label_smoothing != 0 and ce_smoothing_reader(opts)
    # class weights are indexed by ids of the whole vocabulary (with tp_group too: every rank passes all V)
    vocab_size = shard.vocab if shard is not None else weight.shape[0] if isinstance(weight, torch.Tensor) else 0
    cw = check_class_weight(class_weight, vocab_size, targets.device)
    target_weight = None if cw is None else cw[targets.clamp(min=0)] * valid
    # The temperature and the teacher's divergence are applied here, to the log-probs and divergence the
    # objective gets (gro_objective refuses them).
    objective = dict(method=method, mask=valid, rewards=rewards, advantages=advantages, group_ids=group_ids,
                     labels=labels, baselines=baselines, offline=offline, old_logp=old_logp, ref_logp=ref_logp,
                     num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
                     log_sum_sq_probs=log_sum_sq_probs, target_weight=target_weight, sequence_ids=sequence_ids,
                     positions=positions, cp_group=cp_group,
                     **{k: v for k, v in options.items() if k not in COMPUTED_WITH_LOGP})
    stat_options = dict(want_entropy=want_entropy, want_mean_logp=want_mean_logp, class_weight=cw,
                        ignore_index=ignore_index, backend=backend, backend_options=backend_options)

    two_heads = bool(ref_head) and opts.kl_coef != 0 and teacher is not None
    if not two_heads and _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline):
        return _fused_loss(hidden, weight, targets, bias, ref_head, teacher, opts, objective, head={**head, **sampler},
                           shard=shard, **stat_options)

    stats = token_logprobs(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, return_entropy=want_entropy,
        return_sum_p2=want_sum_p2, return_mean_logp=want_mean_logp, class_weight=cw if want_mean_logp else None,
        backend=backend, **head, **sampler, **ref_head, **(teacher or {}), **vocab, **backend_options,
    )
    if stats.distill is not None:
        objective["distill"] = stats.distill
    if want_sum_p2:
        objective["log_sum_sq_probs"] = stats.sum_p2.clamp_min(torch.finfo(torch.float32).tiny).log()
    entropy = stats.entropy
    if entropy is not None and opts.entropy_coef == 0:
        entropy = entropy.detach()  # metrics only
    out = gro_objective(stats.logp, entropy=entropy, kl=stats.kl, lse=stats.lse if opts.z_loss_coef != 0 else None,
                        mean_logp=stats.mean_logp, **objective)
    _token_accuracy(out, stats.is_top1, valid, cp_group)
    return out


def _by_sequence(name, value, sequence_ids):
    """A 1-D head tensor (temperature, top_k, top_p, min_p) of packed rows: one entry per sequence id,
    spread to the tokens [B, T] (padding tokens take sequence 0's: they are not scored)."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 1 and isinstance(sequence_ids, torch.Tensor)):
        return value
    seq = sequence_ids.long()
    top = int(seq.max()) + 1 if seq.numel() else 0
    if value.shape[0] < top or value.device != seq.device:
        raise ValueError(f"{name} per sequence with sequence_ids is indexed by sequence id: it needs at least {top} "
                         f"entries on {seq.device}, got shape {tuple(value.shape)} on {value.device}")
    return value[seq.clamp(min=0)]


def _token_accuracy(out: GROOutput, is_top1, valid, cp_group=None) -> None:
    """metrics["token_accuracy"]: the fraction of scored targets that are their row's top-1 (Liger's);
    over every rank's tokens with cp_group, like the other metrics."""
    if is_top1 is None:
        return
    counts = torch.stack([(is_top1 & valid).sum(), valid.sum()]).to(out.logp.dtype)
    if cp_group is not None:
        import torch.distributed as dist
        dist.all_reduce(counts, group=cp_group)
    out.metrics["token_accuracy"] = counts[0] / counts[1].clamp(min=1)


def _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline) -> bool:
    """The single fused pass (three GEMMs) applies when gradients are wanted, the backend is a
    chunked one, the loss is a scalar, and the objective is token-local (docs/objective.md)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False  # token_logprobs names the bad argument
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not wants_grad or resolve_backend(backend, hidden.device) == "naive" or opts.reduction == "none":
        return False
    has_offline = isinstance(offline, torch.Tensor) and bool(offline.any())
    return not needs_policy_logp(opts, has_old_logp=old_logp is not None, has_advantages=advantages is not None,
                                 has_offline=has_offline)


def _fused_loss(hidden, weight, targets, bias, ref_head, teacher, opts, objective, *, head, shard, want_entropy,
                want_mean_logp, class_weight, ignore_index, backend, backend_options) -> GROOutput:
    """Loss and gradients in one sweep: the sequence plan first (`ChunkCoefficients`), then per chunk
    of tokens the token-local loss's derivatives, then dz and the gradient GEMMs (the engine). The
    engine's second head is the teacher (its divergence) when there is one, else the reference (the exact KL)."""
    B, T = targets.shape
    zeros = torch.zeros(B, T, dtype=stat_dtype(hidden.dtype), device=targets.device)
    want_lse = opts.z_loss_coef != 0
    # Packed rows, a context-parallel group: the plan is formed on the whole batch, read at our tokens.
    objective = dict(objective)
    cp_group = objective["cp_group"]
    layout = token_layout(zeros, opts=opts, inputs=objective,
                          **{k: objective.pop(k) for k in ("sequence_ids", "positions", "cp_group")})
    coefficients = ChunkCoefficients(opts, objective, zeros=zeros, layout=layout, want_entropy=want_entropy,
                                     want_kl=bool(ref_head) and teacher is None, want_lse=want_lse,
                                     want_mean_logp=want_mean_logp, teacher=teacher is not None)

    second = {} if teacher is not None else ref_head
    *args, tf = check_inputs(hidden, weight, targets, bias, second.get("ref_hidden"), second.get("ref_weight"),
                             second.get("ref_bias"), ignore_index=ignore_index, shard=shard, **head)
    div = {}
    if teacher is not None:  # the teacher head in the second head's place
        args = args[:4] + list(check_teacher(teacher["teacher_hidden"], teacher["teacher_weight"],
                                             teacher["teacher_bias"], targets, weight.shape[0], bias, tf))
        div = dict(divergence=teacher_divergence(opts.divergence, opts.jsd_beta, True))
    if want_mean_logp:
        check_mean_logp(tf, bias, shard)
    if shard is not None:
        backend_options = {**backend_options, "shard": shard}
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    stats, grads = fused_token_loss(
        *args, transform=tf, head_precision=head["head_precision"], ignore_index=ignore_index,
        return_entropy=want_entropy, coefficients=coefficients, need_grads=need, want_mean_logp=want_mean_logp,
        class_weight=class_weight, backend=resolve_backend(backend, targets.device), **div, **backend_options)
    # The value and the metrics: the same objective on the detached [B,T] statistics.
    bt = lambda t: None if t is None else t.reshape(B, T)  # noqa: E731
    with torch.no_grad():
        second_stat = dict(distill=bt(stats["kl"]), kl=None) if teacher is not None else dict(kl=bt(stats["kl"]))
        out = objective_in_layout(layout, bt(stats["logp"]), entropy=bt(stats["entropy"]),
                                  lse=bt(stats["lse"]) if want_lse else None, mean_logp=bt(stats["mean_logp"]),
                                  **second_stat, **objective)
    _token_accuracy(out, bt(stats["is_top1"]), objective["mask"], cp_group)
    loss = PrecomputedGrad.apply(out.loss, hidden, weight, bias, grads)
    return GROOutput(loss=loss, logp=out.logp, metrics=out.metrics, per_sequence=out.per_sequence,
                     per_token=out.per_token)


@document(("method", "**options"), {"**options": options_entry(OPTIONS) + " And the head's arguments of "
                                     "gro_loss: " + ", ".join(HEAD_ARGS) + " (docs/head.md)."})
class GROLoss(nn.Module):
    """`gro_loss` as an `nn.Module`: the method and its options are fixed, and checked, at construction.

        loss_fn = GROLoss(method="grpo", kl_coef=0.0)
        out = loss_fn(hidden, model.lm_head.weight, targets, rewards=rewards, group_ids=group_ids)
        out.loss.backward()

    {args}

    Raises:
        TypeError, ValueError: an unknown option (naming the closest valid ones), a bad method or value.
    """

    def __init__(self, method: str = "gro", **options):
        super().__init__()
        self.head = {k: options.pop(k) for k in HEAD_ARGS if k in options}
        resolve_options(method, options)  # fail at construction, not at the first step
        precision = self.head.get("head_precision", "native")
        if precision not in HEAD_PRECISIONS:
            raise ValueError(f"head_precision must be one of {HEAD_PRECISIONS}, got {precision!r}")
        check_head_options(temperature=1.0, softcap=self.head.get("softcap"), top_k=None, top_p=None, min_p=None,
                           head_precision="native", lead=(1,), device=torch.device("cpu"), dtype=torch.float32, vocab=1)
        self.method = method
        self.options = dict(options)

    def forward(self, hidden, weight, targets, *, mask=None, rewards=None, advantages=None, group_ids=None,
                labels=None, baselines=None, offline=None, old_logp=None, ref_logp=None, ref_hidden=None,
                ref_weight=None, bias=None, ref_bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                num_items_in_batch=None, rollout_logp=None, truncated=None, log_sum_sq_probs=None, class_weight=None,
                temperature=None, top_k=None, top_p=None, min_p=None, sequence_ids=None, positions=None, cp_group=None,
                tp_group=None, vocab_start=None, sequence_parallel=False, ignore_index=-100, backend="auto",
                backend_options=None, return_entropy=None) -> GROOutput:
        """The loss of the module's method and options on one batch (`gro_loss` with them).

        {args}

        Returns:
            GROOutput: loss, logp, metrics (0-d tensors), per_sequence ([B]), per_token ([B, T]).
        """
        head, options = dict(self.head), dict(self.options)
        for name, value in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
            if value is not None:
                head[name] = value
        if temperature is not None:
            options["temperature"] = temperature
        return gro_loss(
            hidden, weight, targets, method=self.method, mask=mask, rewards=rewards, advantages=advantages,
            group_ids=group_ids, labels=labels, baselines=baselines, offline=offline, old_logp=old_logp,
            ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias, ref_bias=ref_bias,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
            log_sum_sq_probs=log_sum_sq_probs, class_weight=class_weight, sequence_ids=sequence_ids,
            positions=positions, cp_group=cp_group, tp_group=tp_group, vocab_start=vocab_start,
            sequence_parallel=sequence_parallel, ignore_index=ignore_index, backend=backend,
            backend_options=backend_options, return_entropy=return_entropy, **head, **options,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in {**self.head, **self.options}.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "")


_PER_CALL = {
    "temperature": "float > 0 or a [B] / [B, T] tensor, optional. Replaces the module's temperature for this call "
                   "(the sampler's, per sequence or per token).",
    "top_k": "int or a [B] / [B, T] tensor, optional. Replaces the module's top_k for this call.",
    "top_p": "float or a [B] / [B, T] tensor, optional. Replaces the module's top_p for this call.",
    "min_p": "float or a [B] / [B, T] tensor, optional. Replaces the module's min_p for this call.",
}
_LAYOUT = ("sequence_ids", "positions", "cp_group", "tp_group", "vocab_start", "sequence_parallel")
GROLoss.forward = document(_INPUTS[:3] + _INPUTS[4:_INPUTS.index("log_sum_sq_probs") + 1]
                           + ("class_weight", "temperature", "top_k", "top_p", "min_p") + _LAYOUT + _INPUTS[-4:],
                           _PER_CALL)(GROLoss.forward)
