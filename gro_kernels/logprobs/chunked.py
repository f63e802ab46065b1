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

_OPTIONS = ("chunk_elements", "group_elements")


def _epilogue(backend: str, dtype: torch.dtype):
    if backend == "triton" and dtype != torch.float64:
        return TritonEpilogue()
    return TorchEpilogue()


def _layout(head, n, options):
    return engine.layout(n, head.w.shape[0], head.w.shape[1], head.h.device, head.dz_dtype, **options)


def _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows):
    stat = stat_dtype(hidden.dtype)
    head = engine.Head(take_rows(hidden, rows), weight, bias, stat)
    ref = None
    if ref_hidden is not None:
        ref = engine.Head(take_rows(ref_hidden.detach(), rows), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), stat)
    return head, ref


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                temperature, return_entropy, return_sum_p2, options, backend):
        n_all = targets.shape[0]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        epi = _epilogue(backend, hidden.dtype)
        st = engine.forward_stats(head, ref, y, inv_t=1.0 / temperature, want_entropy=return_entropy,
                                  epilogue=epi, lay=_layout(head, y.shape[0], options), want_sum_p2=return_sum_p2)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                              st.lse, st.entropy, st.ekl)
        ctx.config = (temperature, options, backend)
        ctx.set_materialize_grads(False)  # outputs nobody differentiates arrive as None: skip their terms
        outs = (st.logp, st.entropy, st.kl, st.lse, st.sum_p2)
        empty = torch.zeros(0, dtype=st.lse.dtype, device=hidden.device)
        outs = tuple(empty if o is None else scatter_rows(o, rows, n_all) for o in outs)
        ctx.mark_non_differentiable(outs[4])  # sum_v p_v^2 is a statistic, returned without gradient
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent, g_kl, g_lse, _g_sum_p2):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, lse, ent, ekl = ctx.saved_tensors
        temperature, options, backend = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        st = engine.Stats(logp=lse, lse=lse, entropy=ent, ekl=ekl)

        def gather(g, present=True):
            return None if (g is None or g.numel() == 0 or not present) else take_rows(g, rows).to(lse.dtype)

        inv_t = 1.0 / temperature
        lay = _layout(head, y.shape[0], options)
        grads = engine.Grads(head, need_h, need_w, need_b, lay)
        coefs = engine.coefficients_from_upstream(st, gather(g_logp), gather(g_ent, ent is not None),
                                                  gather(g_kl, ekl is not None), gather(g_lse), inv_t,
                                                  with_size=grads.scaled)
        engine.backward_grads(head, ref, y, st, coefs, inv_t=inv_t, grads=grads,
                              epilogue=_epilogue(backend, hidden.dtype), lay=lay)
        dh, dw, db = grads.result().finish()
        return (scatter_rows(dh, rows, hidden.shape[0]) if dh is not None else None, _cast(dw, weight),
                _cast(db, bias), None, None, None, None, None, None, None, None, None, None)


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


def _check_options(backend, options) -> dict:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"backend={backend!r} takes only the options {', '.join(_OPTIONS)}, got {unknown}")
    for name in _OPTIONS:
        v = options.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return {name: options.get(name) for name in _OPTIONS}


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index,
                return_entropy, return_kl, return_sum_p2=False, backend="torch", **options):
    """See `gro_kernels.logprobs.api`. Returns (logp, entropy|None, kl|None, lse, sum_p2|None), each [N]."""
    options = _check_options(backend, options)
    rows = valid_rows(targets, ignore_index)
    if not return_kl:
        ref_hidden = ref_weight = ref_bias = None
    logp, ent, kl, lse, p2 = _TokenStats.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
                                               rows, float(temperature), bool(return_entropy), bool(return_sum_p2),
                                               options, backend)
    return (logp, ent if return_entropy else None, kl if return_kl else None, lse,
            p2 if return_sum_p2 else None)


def fused_token_loss(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index,
                     return_entropy, coefficients, need_grads, backend="torch", **options):
    """One sweep: statistics, then `coefficients(positions, chunk_stats) -> (g_logp, g_entropy|None,
    g_kl|None)` per chunk, then the gradients. `positions` are the chunk's token indices in [N].
    Returns ((logp, entropy|None, kl|None, lse) each [N] detached, grads): `grads` is an
    `engine.GradsOut` over all N rows, which `PrecomputedGrad` finishes once the upstream gradient
    is known (fp16 gradients are rounded after it)."""
    options = _check_options(backend, options)
    rows = valid_rows(targets, ignore_index)
    n_all = targets.shape[0]
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        positions = torch.arange(n_all, device=targets.device) if rows is None else rows
        lay = _layout(head, y.shape[0], options)
        need_h, need_w, need_b = need_grads
        grads = engine.Grads(head, need_h, need_w, need_b, lay)
        st = engine.fused_pass(head, ref, y, inv_t=1.0 / temperature, want_entropy=return_entropy,
                               coefficients=lambda s, e, cs: coefficients(positions[s:e], cs),
                               grads=grads, epilogue=_epilogue(backend, hidden.dtype), lay=lay)
    outs = tuple(None if o is None else scatter_rows(o, rows, n_all) for o in (st.logp, st.entropy, st.kl, st.lse))
    res = grads.result()
    res.dh, res.inv_dh = scatter_rows(res.dh, rows, n_all), scatter_rows(res.inv_dh, rows, n_all)
    return outs, res


class PrecomputedGrad(torch.autograd.Function):
    """A scalar whose gradients wrt (hidden, weight, bias) were computed in the forward call
    (`grads`, an `engine.GradsOut`); backward hands them back scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grads):
        ctx.grads = grads
        ctx.shapes = (hidden.shape, None if bias is None else bias.dtype)
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("gro_loss's fused pass hands its gradients back once: a second backward through "
                               "the same loss (retain_graph=True) needs a new gro_loss call")
        grads, ctx.grads = ctx.grads, None  # no second reference: autograd can take the buffers as .grad
        hidden_shape, bias_dtype = ctx.shapes
        dh, dw, db = grads.finish(g)   # the buffers are ours and used once: scaled in place
        return (None, None if dh is None else dh.reshape(hidden_shape), dw,
                None if db is None else db.to(bias_dtype), None)
