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
from .logprobs.api import check_inputs, stat_dtype, vocab_shard
from .logprobs.chunked import PrecomputedGrad, fused_token_loss
from .objective import GROOutput, gro_objective
from .objective.core import objective_in_layout, prepare_objective, token_layout
from .objective.inputs import check_mask, uses_ref_logp
from .objective.options import OPTIONS, resolve_options
from .objective.split import needs_policy_logp, token_loss


_INPUTS = ("hidden", "weight", "targets", "method", "mask", "rewards", "advantages", "group_ids", "labels",
           "baselines", "offline", "old_logp", "ref_logp", "ref_hidden", "ref_weight", "bias", "ref_bias",
           "num_items_in_batch", "rollout_logp", "truncated", "log_sum_sq_probs", "sequence_ids", "positions",
           "cp_group", "tp_group", "vocab_start", "sequence_parallel", "ignore_index", "backend", "backend_options",
           "return_entropy")
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
    num_items_in_batch=None,
    rollout_logp: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    log_sum_sq_probs: Optional[torch.Tensor] = None,
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
    take a forward-only pass first: four GEMMs. Masked and ignored tokens reach no GEMM.

    {args}

    Returns:
        GROOutput: loss (0-d), logp ([B, T] float32, detached), metrics (name -> 0-d tensor),
        per_sequence (name -> [B]), per_token (name -> [B, T]); docs/options.md lists every name.

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
    # tensor parallelism: token_logprobs / the fused pass combine the vocabulary shards
    vocab = dict(tp_group=tp_group, vocab_start=vocab_start, sequence_parallel=sequence_parallel)
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

    # Masked positions are ignored tokens: dropped before any matrix work, so nothing there
    # (padding, a NaN hidden state) reaches a GEMM.
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & check_mask(mask, tuple(targets.shape), targets.device, against="targets")
    if isinstance(sequence_ids, torch.Tensor) and tuple(sequence_ids.shape) == tuple(targets.shape):
        valid = valid & (sequence_ids >= 0)  # padding between packed sequences
    if mask is not None or sequence_ids is not None:
        targets = targets.masked_fill(~valid, ignore_index)

    ref_head = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias) if (full_kl and has_ref_head) else {}
    # The entropy: for the bonus, for top-entropy token selection, or asked for (metrics).
    want_entropy = bool(return_entropy) or opts.entropy_coef != 0 or opts.top_entropy_quantile < 1
    if ref_logp is None and has_ref_head and uses_ref_logp(method, opts):
        with torch.no_grad():
            ref_logp = token_logprobs(
                ref_hidden, ref_weight, targets, bias=ref_bias, temperature=opts.temperature,
                ignore_index=ignore_index, backend=backend, **vocab, **backend_options,
            ).logp
    # WPO's weights read log sum_v p_v^2 of the policy: the statistics pass gives it (no gradient).
    # (use_weighting is never token-local, so that pass is the composable path's own, below.)
    want_sum_p2 = log_sum_sq_probs is None and opts.use_weighting
    # The temperature is applied here, to the log-probs the objective gets (gro_objective refuses it).
    objective = dict(method=method, mask=valid, rewards=rewards, advantages=advantages, group_ids=group_ids,
                     labels=labels, baselines=baselines, offline=offline, old_logp=old_logp, ref_logp=ref_logp,
                     num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
                     log_sum_sq_probs=log_sum_sq_probs, sequence_ids=sequence_ids, positions=positions,
                     cp_group=cp_group, **{k: v for k, v in options.items() if k != "temperature"})

    if _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline):
        return _fused_loss(hidden, weight, targets, bias, ref_head, opts, objective, want_entropy=want_entropy,
                           ignore_index=ignore_index, backend=backend, backend_options=backend_options, vocab=vocab)

    stats = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=opts.temperature, ignore_index=ignore_index,
        return_entropy=want_entropy, return_sum_p2=want_sum_p2, backend=backend, **ref_head, **vocab,
        **backend_options,
    )
    if want_sum_p2:
        objective["log_sum_sq_probs"] = stats.sum_p2.clamp_min(torch.finfo(torch.float32).tiny).log()
    entropy = stats.entropy
    if entropy is not None and opts.entropy_coef == 0:
        entropy = entropy.detach()  # metrics only
    return gro_objective(stats.logp, entropy=entropy, kl=stats.kl, **objective)


def _one_pass(opts, hidden, weight, bias, backend, old_logp, advantages, offline) -> bool:
    """The single fused pass (three GEMMs) applies when gradients are wanted, the backend is a
    chunked one, and the objective is token-local (docs/objective.md)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False  # token_logprobs names the bad argument
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not wants_grad or resolve_backend(backend, hidden.device) == "naive":
        return False
    has_offline = isinstance(offline, torch.Tensor) and bool(offline.any())
    return not needs_policy_logp(opts, has_old_logp=old_logp is not None, has_advantages=advantages is not None,
                                 has_offline=has_offline)


def _fused_loss(hidden, weight, targets, bias, ref_head, opts, objective, *, want_entropy, ignore_index,
                backend, backend_options, vocab) -> GROOutput:
    """Loss and gradients in one sweep: the sequence plan first, then per chunk the token-local loss's
    derivatives by autograd on the chunk's [n] vectors, then dz and the gradient GEMMs."""
    B, T = targets.shape
    zeros = torch.zeros(B, T, dtype=stat_dtype(hidden.dtype), device=targets.device)
    want_kl = bool(ref_head)
    kl_grad = want_kl and opts.kl_coef != 0
    # Packed rows, a context-parallel group: the plan is formed on the whole batch, read at our tokens.
    objective = dict(objective)
    layout = token_layout(zeros, opts=opts, inputs=objective,
                          **{k: objective.pop(k) for k in ("sequence_ids", "positions", "cp_group")})
    # The plan is formed before the pass (token-local): zeros give the shapes, and the plan itself
    # gets no logp, H or KL at all (reading them raises: see split.NotYetComputed).
    _, b, plan = prepare_objective(zeros, entropy=zeros if want_entropy else None,
                                   kl=zeros if want_kl else None, layout=layout, before_pass=True, **objective)
    local = (lambda t: t) if layout is None else layout.local  # noqa: E731
    flat = lambda t: None if t is None else local(t).reshape(-1)  # noqa: E731
    A, c, lr = flat(plan.weights.advantages), flat(plan.coef), flat(b.ref_logp)
    # Per-token inputs of token_loss formed before the pass (rollout correction, entropy weights, ...).
    g_pol, g_ent, a_kl = flat(plan.policy_weight), flat(plan.entropy_weight), flat(plan.abs_kl_coef)
    pick = lambda t, pos: None if t is None else t[pos][None]  # noqa: E731
    online = flat((~b.offline)[:, None].expand(b.mask.shape))
    # On-policy rows (no old_logp) and offline rows use sg[l] as the behaviour log-prob.
    given_lo = flat(b.old_logp) if objective["old_logp"] is not None else None

    def coefficients(pos, cs):
        with torch.enable_grad():
            leaves = [cs.logp.detach().requires_grad_()]
            H = cs.entropy.detach().requires_grad_() if opts.entropy_coef != 0 else None
            K = cs.kl.detach().requires_grad_() if kl_grad else None
            leaves += [t for t in (H, K) if t is not None]
            l = leaves[0]
            lo = l.detach() if given_lo is None else torch.where(online[pos], given_lo[pos], l.detach())
            terms = token_loss(opts, logp=l[None], old_logp=lo[None], ref_logp=pick(lr, pos),
                               entropy=None if H is None else H[None], kl=None if K is None else K[None],
                               advantages=A[pos][None], coef=c[pos][None], online=online[pos][None], mask=None,
                               kl_in_loss=plan.kl_in_loss, policy_weight=pick(g_pol, pos),
                               entropy_weight=pick(g_ent, pos), abs_kl_coef=pick(a_kl, pos))
            g = torch.autograd.grad(terms.loss, leaves, allow_unused=True)
        g = [torch.zeros_like(l) if x is None else x for x in g]
        return g[0], (g[1] if H is not None else None), (g[-1] if K is not None else None)

    shard = vocab_shard(weight, **vocab)
    flat_args = check_inputs(hidden, weight, targets, bias, ref_head.get("ref_hidden"), ref_head.get("ref_weight"),
                             ref_head.get("ref_bias"), temperature=opts.temperature, ignore_index=ignore_index,
                             shard=shard)
    if shard is not None:
        backend_options = {**backend_options, "shard": shard}
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    (logp, entropy, kl, _), (dh, dw, db) = fused_token_loss(
        *flat_args, temperature=opts.temperature, ignore_index=ignore_index, return_entropy=want_entropy,
        coefficients=coefficients, need_grads=need, backend=resolve_backend(backend, targets.device),
        **backend_options)
    # The value and the metrics: the same objective on the detached [B,T] statistics.
    with torch.no_grad():
        out = objective_in_layout(layout, logp.reshape(B, T), entropy=None if entropy is None else entropy.reshape(B, T),
                                  kl=None if kl is None else kl.reshape(B, T), **objective)
    loss = PrecomputedGrad.apply(out.loss, hidden, weight, bias, None if dh is None else dh.reshape(hidden.shape), dw, db)
    return GROOutput(loss=loss, logp=out.logp, metrics=out.metrics, per_sequence=out.per_sequence,
                     per_token=out.per_token)


@document(("method", "**options"), _OPTIONS_DOC)
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
        resolve_options(method, options)  # fail at construction, not at the first step
        self.method = method
        self.options = dict(options)

    def forward(self, hidden, weight, targets, *, mask=None, rewards=None, advantages=None, group_ids=None,
                labels=None, baselines=None, offline=None, old_logp=None, ref_logp=None, ref_hidden=None,
                ref_weight=None, bias=None, ref_bias=None, num_items_in_batch=None, rollout_logp=None, truncated=None,
                log_sum_sq_probs=None, sequence_ids=None, positions=None, cp_group=None, tp_group=None,
                vocab_start=None, sequence_parallel=False, ignore_index=-100, backend="auto", backend_options=None,
                return_entropy=None) -> GROOutput:
        """The loss of the module's method and options on one batch (`gro_loss` with them).

        {args}

        Returns:
            GROOutput: loss, logp, metrics (0-d tensors), per_sequence ([B]), per_token ([B, T]).
        """
        return gro_loss(
            hidden, weight, targets, method=self.method, mask=mask, rewards=rewards, advantages=advantages,
            group_ids=group_ids, labels=labels, baselines=baselines, offline=offline, old_logp=old_logp,
            ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias, ref_bias=ref_bias,
            num_items_in_batch=num_items_in_batch, rollout_logp=rollout_logp, truncated=truncated,
            log_sum_sq_probs=log_sum_sq_probs, sequence_ids=sequence_ids, positions=positions, cp_group=cp_group,
            tp_group=tp_group, vocab_start=vocab_start, sequence_parallel=sequence_parallel,
            ignore_index=ignore_index, backend=backend,
            backend_options=backend_options, return_entropy=return_entropy, **self.options,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "")


GROLoss.forward = document(_INPUTS[:3] + _INPUTS[4:])(GROLoss.forward)
