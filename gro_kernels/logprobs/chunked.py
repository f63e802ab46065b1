"""The `torch` and `triton` backends: the chunked engine (`engine.py`) behind two autograd entries.

- `token_stats`: the composable op behind `token_logprobs`. Forward: statistics (one GEMM per
  chunk); saved: the inputs and [N] vectors (lse, entropy, E_p[u - ur]), never anything [N, V].
  Backward: recompute each chunk, dz from any upstream per-token gradients, two GEMMs.
- `fused_token_loss`: the single pass of `gro_loss` for token-local objectives. Statistics,
  per-token coefficients from the caller's callback, dz and the gradients in one sweep (three
  GEMMs); `gro_loss` hands the gradients back through `PrecomputedGrad`.

`backend="torch"` uses the torch-ops epilogue (any device); `backend="triton"` the two Triton
kernels (CUDA; the CPU under TRITON_INTERPRET=1). float64 inputs (the test reference precision)
always take the torch epilogue, which keeps float64 end to end. Backend options (`engine.layout`):
`chunk_elements`, the fp32 logits per chunk (default: 768 MiB on a GPU, 16 MiB on a CPU);
`group_elements`, the logits-gradient entries held per group of chunks before its gradient GEMMs
(default on a GPU: every token's while that costs at most 4 V d bytes, else d tokens; a CPU: one chunk).
"""
from __future__ import annotations

import torch

from . import engine
from .rows import scatter_rows, stat_dtype, take_rows, valid_rows
from .epilogues import TorchEpilogue, TritonEpilogue
from .transform import Transform, gemm_precision
from .vocab_parallel import VocabParallelEpilogue

_OPTIONS = ("chunk_elements", "group_elements")


def _epilogue(backend: str, dtype: torch.dtype, bias=None, ref_bias=None, shard=None):
    if backend == "triton" and dtype != torch.float64:
        epi = TritonEpilogue()  # its kernels guard -inf bias rows at no extra pass
    else:
        masked = any(b is not None and bool(torch.isneginf(b).any()) for b in (bias, ref_bias))
        epi = TorchEpilogue(masked_rows=masked)
    if shard is None:
        return epi
    # a slice of padding rows only (the last rank's of a padded vocabulary): nothing of the policy there
    return VocabParallelEpilogue(epi, shard, padding=bias is not None and bool(torch.isneginf(bias).all()))


def _layout(head, n, options, shard) -> engine.Layout:
    # Every rank of a tensor-parallel group cuts the same chunks and groups (each chunk is a
    # collective): sized by the largest shard, not this rank's.
    vocab = head.w.shape[0] if shard is None else shard.max_size
    return engine.layout(n, vocab, head.w.shape[1], head.h.device, head.dz_dtype, **options)


def _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, precision):
    stat = stat_dtype(hidden.dtype)
    head = engine.Head(take_rows(hidden, rows), weight, bias, stat, precision)
    ref = None
    if ref_hidden is not None:
        ref = engine.Head(take_rows(ref_hidden.detach(), rows), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), stat, precision)
    return head, ref


def _compact(tf: Transform, rows) -> Transform:
    """The transform of the rows that count (a copy: the forward fills its thresholds)."""
    return tf.rows(rows) if rows is not None else tf.rows(slice(None))


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, tf, precision,
                return_entropy, return_sum_p2, return_mean_logp, class_weight, options, backend, div, shard):
        n_all = targets.shape[0]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, precision)
        y = take_rows(targets, rows)
        lay = _layout(head, y.shape[0], options, shard)
        epi = _epilogue(backend, hidden.dtype, bias, ref_bias, shard)
        tf = _compact(tf, rows)
        with gemm_precision(precision, hidden.device):
            st = engine.forward_stats(head, ref, y, tf=tf, want_entropy=return_entropy, epilogue=epi, lay=lay,
                                      want_sum_p2=return_sum_p2, want_mean_logp=return_mean_logp,
                                      class_weight=class_weight, div=div)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                              st.lse, st.entropy, st.ekl, st.lse_r, st.e_pm)
        # the backward's transform: 1/T per row, the soft cap, the kept-set thresholds found here
        ctx.tf = Transform(inv_t=tf.inv_t, cap=tf.cap, tau=tf.tau)
        ctx.config = (precision, class_weight, options, backend, div, shard)
        ctx.set_materialize_grads(False)  # outputs nobody differentiates arrive as None: skip their terms
        outs = (st.logp, st.entropy, st.kl, st.lse, st.sum_p2, st.mean_logp, st.top1)
        empty = torch.zeros(0, dtype=st.lse.dtype, device=hidden.device)
        outs = tuple(empty if o is None else scatter_rows(o, rows, n_all) for o in outs)
        ctx.mark_non_differentiable(outs[4], outs[6])  # sum_v p_v^2 and top-1 are statistics without gradient
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent, g_kl, g_lse, _g_sum_p2, g_mean, _g_top1):
        # backward() called inside torch.autocast would recast the recompute and gradient GEMMs to
        # 16 bits: autocast off here as in the forward (api.token_logprobs).
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _TokenStats._backward(ctx, g_logp, g_ent, g_kl, g_lse, g_mean)

    @staticmethod
    def _backward(ctx, g_logp, g_ent, g_kl, g_lse, g_mean):
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, lse, ent, ekl, lse_r,
         e_pm) = ctx.saved_tensors
        precision, class_weight, options, backend, div, shard = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, precision)
        y = take_rows(targets, rows)
        st = engine.Stats(logp=lse, lse=lse, entropy=ent, ekl=ekl, lse_r=lse_r, e_pm=e_pm)

        def gather(g, present=True):
            return None if (g is None or g.numel() == 0 or not present) else take_rows(g, rows).to(lse.dtype)

        tf = ctx.tf
        epi = _epilogue(backend, hidden.dtype, bias, ref_bias, shard)
        lay = _layout(head, y.shape[0], options, shard)
        grads = engine.Grads(head, need_h, need_w, need_b, lay)
        coefs = engine.coefficients_from_upstream(st, gather(g_logp), gather(g_ent, ent is not None),
                                                  gather(g_kl, ref_hidden is not None), gather(g_lse), tf,
                                                  gather(g_mean), class_weight, engine.vocab_size(head, epi), div,
                                                  with_size=grads.scaled)
        with gemm_precision(precision, hidden.device):
            engine.backward_grads(head, ref, y, coefs, tf=tf, lse=lse, grads=grads, epilogue=epi, lay=lay,
                                  class_weight=class_weight)
        dh, dw, db = grads.result().finish()
        if shard is not None:
            dh = shard.reduce_dh(dh)
        return (scatter_rows(dh, rows, hidden.shape[0]) if dh is not None else None, _cast(dw, weight),
                _cast(db, bias)) + (None,) * 15


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


def _check_options(backend, options):
    """(the layout options {chunk_elements, group_elements}, the tensor-parallel shard or None)."""
    shard = options.pop("shard", None)  # from token_logprobs / gro_loss's tp_group, not a user option
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"backend={backend!r} takes only the options {', '.join(_OPTIONS)}, got {unknown}")
    for name in _OPTIONS:
        v = options.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return {name: options.get(name) for name in _OPTIONS}, shard


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, transform, head_precision,
                ignore_index, return_entropy, return_kl, return_sum_p2=False, return_mean_logp=False,
                class_weight=None, teacher=None, divergence=None, backend="torch", **options):
    """See `gro_kernels.logprobs.api`. Returns the dict of statistics, each [N] or None. The engine holds
    one second head per sweep: with both a reference and a teacher head the teacher's divergence takes a
    second sweep (its own recomputation in the backward)."""
    layout_options, shard = _check_options(backend, dict(options))
    if teacher is not None and shard is not None:
        raise ValueError("teacher_hidden (a teacher head) is single-device: it does not take tp_group")
    rows = valid_rows(targets, ignore_index)
    if not return_kl:
        ref_hidden = ref_weight = ref_bias = None
    flags = (bool(return_entropy), bool(return_sum_p2), bool(return_mean_logp), class_weight, layout_options, backend)
    distill = None
    if teacher is not None and ref_hidden is None:  # the teacher is the one second head
        logp, ent, distill, lse, p2, mean, top1 = _TokenStats.apply(
            hidden, weight, bias, *teacher, targets, rows, transform, head_precision, *flags, divergence, shard)
        kl = None
    else:
        logp, ent, kl, lse, p2, mean, top1 = _TokenStats.apply(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, transform, head_precision, *flags,
            engine.REVERSE_KL, shard)
        if teacher is not None:
            distill = _TokenStats.apply(hidden, weight, bias, *teacher, targets, rows, transform, head_precision,
                                        False, False, False, class_weight, layout_options, backend, divergence,
                                        shard)[2]
    return dict(logp=logp, entropy=ent if return_entropy else None, kl=kl if return_kl else None, lse=lse,
                sum_p2=p2 if return_sum_p2 else None, mean_logp=mean if return_mean_logp else None,
                is_top1=top1 != 0, distill=distill)


def fused_token_loss(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, transform, head_precision,
                     ignore_index, return_entropy, coefficients, need_grads, want_mean_logp=False, class_weight=None,
                     backend="torch", divergence=engine.REVERSE_KL, **options):
    """One sweep: statistics, then `coefficients(positions, chunk_stats) -> (g_logp, g_entropy|None,
    g_kl|None, g_lse|None, g_mean_logp|None)` per chunk, then the gradients. `positions` are the
    chunk's token indices in [N]. The second head (ref_*) is a reference or a teacher: `divergence`
    (engine.Divergence) is what its "kl" is. Returns (dict of statistics each [N] detached or None, grads):
    `grads` is an `engine.GradsOut` over all N rows, which `PrecomputedGrad` finishes once the
    upstream gradient is known (fp16 gradients are rounded after it)."""
    layout_options, shard = _check_options(backend, dict(options))
    rows = valid_rows(targets, ignore_index)
    n_all = targets.shape[0]
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False), \
            gemm_precision(head_precision, hidden.device):
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, head_precision)
        y = take_rows(targets, rows)
        positions = torch.arange(n_all, device=targets.device) if rows is None else rows
        lay = _layout(head, y.shape[0], layout_options, shard)
        need_h, need_w, need_b = need_grads
        grads = engine.Grads(head, need_h, need_w, need_b, lay)
        st = engine.fused_pass(head, ref, y, tf=_compact(transform, rows), want_entropy=return_entropy,
                               coefficients=lambda s, e, cs: coefficients(positions[s:e], cs),
                               grads=grads, epilogue=_epilogue(backend, hidden.dtype, bias, ref_bias, shard), lay=lay,
                               want_mean_logp=want_mean_logp, class_weight=class_weight, div=divergence)
    outs = {k: None if getattr(st, k) is None else scatter_rows(getattr(st, k), rows, n_all)
            for k in ("logp", "entropy", "kl", "lse", "mean_logp")}
    outs["is_top1"] = scatter_rows(st.top1, rows, n_all) != 0
    res = grads.result()
    if shard is not None and res.dh is not None:
        # the ranks' dh are partial sums over their slices: summed as values (an fp16 dh is rounded
        # once here, before the loss scale), then handed back like any other
        if res.inv_dh is not None:
            res.dh.mul_(res.inv_dh[:, None])
            res.inv_dh = None
        res.dh = shard.reduce_dh(res.dh)
    res.dh, res.inv_dh = scatter_rows(res.dh, rows, n_all), scatter_rows(res.inv_dh, rows, n_all)
    return outs, res


class PrecomputedGrad(torch.autograd.Function):
    """A scalar whose gradients wrt (hidden, weight, bias) were computed in the forward call
    (`grads`, an `engine.GradsOut`); backward hands them back scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grads):
        ctx.grads = grads
        ctx.shapes = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("gro_loss's fused pass hands its gradients back once: a second backward through "
                               "the same loss (retain_graph=True) needs a new gro_loss call")
        grads, ctx.grads = ctx.grads, None  # no second reference: autograd can take the buffers as .grad
        hidden_shape, w_dtype, b_dtype = ctx.shapes
        dh, dw, db = grads.finish(g)   # the buffers are ours and used once: scaled in place
        return (None, None if dh is None else dh.reshape(hidden_shape), None if dw is None else dw.to(w_dtype),
                None if db is None else db.to(b_dtype), None)
