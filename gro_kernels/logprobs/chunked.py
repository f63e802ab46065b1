"""The `torch` and `triton` backends: the chunked engine (`engine.py`) behind two autograd entries.

- `token_stats`: the composable op behind `token_logprobs`. Forward: statistics (one GEMM per
  chunk); saved: the inputs and [N] vectors (lse, entropy, E_p[u - ur]), never anything [N, V].
  Backward: recompute each chunk, dz from any upstream per-token gradients, two GEMMs.
- `fused_token_loss`: the single pass of `gro_loss` for token-local objectives. Statistics,
  per-token coefficients from the caller's callback, dz and the gradients in one sweep (three
  GEMMs); `gro_loss` hands the gradients back through `PrecomputedGrad`.

`backend="torch"` uses the torch-ops epilogue (any device); `backend="triton"` the two Triton
kernels (CUDA; the CPU under TRITON_INTERPRET=1). float64 inputs (the test reference precision)
always take the torch epilogue, which keeps float64 end to end. Backend option: `chunk_elements`,
the logits per chunk (default: 768 MiB of fp32 logits on a GPU, 16 MiB on a CPU).
"""
from __future__ import annotations

import torch

from . import engine
from .rows import scatter_rows, stat_dtype, take_rows, valid_rows
from .epilogues import TorchEpilogue, TritonEpilogue

_OPTIONS = ("chunk_elements",)


def _epilogue(backend: str, dtype: torch.dtype):
    if backend == "triton" and dtype != torch.float64:
        return TritonEpilogue()
    return TorchEpilogue()


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
                temperature, return_entropy, return_sum_p2, chunk_elements, backend):
        n_all = targets.shape[0]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        ct = engine.chunk_tokens(y.shape[0], weight.shape[0], hidden.device, chunk_elements)
        epi = _epilogue(backend, hidden.dtype)
        st = engine.forward_stats(head, ref, y, inv_t=1.0 / temperature, want_entropy=return_entropy,
                                  epilogue=epi, ct=ct, want_sum_p2=return_sum_p2)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                              st.lse, st.entropy, st.ekl)
        ctx.config = (temperature, chunk_elements, backend)
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
        temperature, chunk_elements, backend = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        st = engine.Stats(logp=lse, lse=lse, entropy=ent, ekl=ekl)

        def gather(g, present=True):
            return None if (g is None or g.numel() == 0 or not present) else take_rows(g, rows).to(lse.dtype)

        inv_t = 1.0 / temperature
        coefs = engine.coefficients_from_upstream(st, gather(g_logp), gather(g_ent, ent is not None),
                                                  gather(g_kl, ekl is not None), gather(g_lse), inv_t)
        grads = engine.Grads(head, need_h, need_w, need_b)
        ct = engine.chunk_tokens(y.shape[0], weight.shape[0], hidden.device, chunk_elements)
        engine.backward_grads(head, ref, y, st, coefs, inv_t=inv_t, grads=grads,
                              epilogue=_epilogue(backend, hidden.dtype), ct=ct)
        dh, dw, db = grads.result()
        return (scatter_rows(dh, rows, hidden.shape[0]) if dh is not None else None, _cast(dw, weight),
                _cast(db, bias), None, None, None, None, None, None, None, None, None, None)


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


def _check_options(backend, options):
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"backend={backend!r} takes only the option chunk_elements, got {unknown}")
    ce = options.get("chunk_elements")
    if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
        raise ValueError(f"chunk_elements must be a positive int, got {ce!r}")
    return ce


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index,
                return_entropy, return_kl, return_sum_p2=False, backend="torch", **options):
    """See `gro_kernels.logprobs.api`. Returns (logp, entropy|None, kl|None, lse, sum_p2|None), each [N]."""
    chunk_elements = _check_options(backend, options)
    rows = valid_rows(targets, ignore_index)
    if not return_kl:
        ref_hidden = ref_weight = ref_bias = None
    logp, ent, kl, lse, p2 = _TokenStats.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
                                               rows, float(temperature), bool(return_entropy), bool(return_sum_p2),
                                               chunk_elements, backend)
    return (logp, ent if return_entropy else None, kl if return_kl else None, lse,
            p2 if return_sum_p2 else None)


def fused_token_loss(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, temperature, ignore_index,
                     return_entropy, coefficients, need_grads, backend="torch", **options):
    """One sweep: statistics, then `coefficients(positions, chunk_stats) -> (g_logp, g_entropy|None,
    g_kl|None)` per chunk, then the gradients. `positions` are the chunk's token indices in [N].
    Returns ((logp, entropy|None, kl|None, lse) each [N] detached, (dh [N,d]|None, dW|None, db|None))."""
    chunk_elements = _check_options(backend, options)
    rows = valid_rows(targets, ignore_index)
    n_all = targets.shape[0]
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        head, ref = _heads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows)
        y = take_rows(targets, rows)
        positions = torch.arange(n_all, device=targets.device) if rows is None else rows
        ct = engine.chunk_tokens(y.shape[0], weight.shape[0], hidden.device, chunk_elements)
        need_h, need_w, need_b = need_grads
        grads = engine.Grads(head, need_h, need_w, need_b)
        st = engine.fused_pass(head, ref, y, inv_t=1.0 / temperature, want_entropy=return_entropy,
                               coefficients=lambda s, e, cs: coefficients(positions[s:e], cs),
                               grads=grads, epilogue=_epilogue(backend, hidden.dtype), ct=ct)
    outs = tuple(None if o is None else scatter_rows(o, rows, n_all) for o in (st.logp, st.entropy, st.kl, st.lse))
    dh, dw, db = grads.result()
    return outs, (None if dh is None else scatter_rows(dh, rows, n_all), _cast(dw, weight), _cast(db, bias))


class PrecomputedGrad(torch.autograd.Function):
    """A scalar whose gradients wrt (hidden, weight, bias) were computed in the forward call;
    backward hands them back scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, dh, dw, db):
        ctx.grads = (dh, dw, db)
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("gro_loss's fused pass hands its gradients back once: a second backward through "
                               "the same loss (retain_graph=True) needs a new gro_loss call")
        dh, dw, db = ctx.grads
        ctx.grads = None  # no second reference: autograd can take the buffers as .grad without a copy

        def scaled(t):  # the buffers are ours and used once: scale in place
            return None if t is None else t.mul_(g.to(t.dtype))

        return None, scaled(dh), scaled(dw), scaled(db), None, None, None
