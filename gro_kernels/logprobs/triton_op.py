"""The `triton` backend: the autograd op around the fused kernels in `gro_kernels.kernels`.

Forward: compact the non-ignored rows (index_select), run one sweep over the vocabulary, scatter
the [N] results back (0 at ignored positions). Saved for backward: the inputs plus [N] vectors
(lse, E_p[z] when entropy is returned, E_p[z - zr] when the KL is) - never anything [N, V].
Backward: recompute the logits blockwise and accumulate dh, dW, db in fp32 (`kernels/backward.py`).

Backend options: `filter_eps` (None = exact, the default; a float skips the gradient matmuls of
tiles whose softmax gradient is below it, relative to the token's upstream gradient),
`backward_mode` ("split": deterministic two-kernel backward, the default; "atomic": one kernel
with fp32 atomics), and the block overrides `block_n`, `block_v`, `block_d`, `num_warps`,
`num_stages`, `vocab_splits`. float64 inputs are delegated to the torch (chunked) backend, which
computes in float64 (the kernels are fp32/fp16/bf16 only).
"""
from __future__ import annotations

import torch

from ..kernels import OVERRIDE_KEYS, backward_config, forward_config, launch_backward, launch_forward
from .api import interpreting, scatter_rows, take_rows, valid_rows

_OPTIONS = ("filter_eps", "backward_mode") + OVERRIDE_KEYS
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rowmajor(t):
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    # fp32 inputs: IEEE fp32 dots (TF32 would cost ~1e-3 relative error vs torch's fp32 matmul).
    return "ieee" if dtype == torch.float32 else "tf32"


class _TritonTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows,
                temperature, return_entropy, return_kl, options):
        interp = interpreting()
        n_all = targets.shape[0]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        h, y = take_rows(hidden, rows), take_rows(targets, rows)
        hr = take_rows(ref_hidden, rows) if return_kl else None
        h, w, hr, wr = _rowmajor(h), _rowmajor(weight), _rowmajor(hr), _rowmajor(ref_weight)
        b = None if bias is None else bias.contiguous()
        br = None if (ref_bias is None or not return_kl) else ref_bias.contiguous()
        y = y.contiguous()
        n, vocab = h.shape[0], w.shape[0]
        upcast = interp and (w.dtype == torch.bfloat16 or (wr is not None and wr.dtype == torch.bfloat16))
        prec = _precision(w.dtype)
        ref_prec = _precision(wr.dtype) if wr is not None else prec
        overrides = {k: options[k] for k in OVERRIDE_KEYS if k in options}

        if n > 0:
            cfg = forward_config(n, vocab, h.shape[1], w.dtype, dev, interp, overrides)
            logp, ent, kl, lse, ez, ed = launch_forward(h, w, b, y, hr, wr, br, temperature=temperature, cfg=cfg,
                                                        upcast=upcast, precision=prec, ref_precision=ref_prec)
        else:
            logp = ent = lse = ez = torch.zeros(0, **f32)
            kl = ed = torch.zeros(0, **f32) if return_kl else None

        def scatter(v):
            return scatter_rows(v, rows, n_all)

        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, lse,
                              ez if return_entropy else None, ed if return_kl else None)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        ctx.return_kl = return_kl
        ctx.options = options
        ctx.overrides = overrides
        ctx.meta = (upcast, prec, ref_prec, interp)
        out_ent = scatter(ent) if return_entropy else None
        out_kl = scatter(kl) if return_kl else None
        return scatter(logp), out_ent, out_kl, scatter(lse)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl, g_lse):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, rows, lse, ez, ed = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_db = need_db and bias is not None
        grads = [None] * 12
        n, n_all = lse.shape[0], targets.shape[0]
        if n == 0 or not (need_dh or need_dw or need_db):
            if need_dh:
                grads[0] = torch.zeros_like(hidden)
            if need_dw:
                grads[1] = torch.zeros_like(weight)
            if need_db:
                grads[2] = torch.zeros_like(bias)
            return tuple(grads)
        upcast, prec, ref_prec, interp = ctx.meta

        def gather(g):
            if g is None:
                return None
            return take_rows(g.float(), rows).contiguous()

        g_ent = g_ent if ctx.return_entropy else None
        g_kl = g_kl if ctx.return_kl else None
        h, y = take_rows(hidden, rows), take_rows(targets, rows)
        hr = wr = br = None
        if g_kl is not None:
            hr = take_rows(ref_hidden, rows)
            hr, wr = _rowmajor(hr), _rowmajor(ref_weight)
            br = None if ref_bias is None else ref_bias.contiguous()
        h, w = _rowmajor(h), _rowmajor(weight)
        b = None if bias is None else bias.contiguous()
        cfg = backward_config(n, w.shape[0], h.shape[1], w.dtype, h.device, interp, ctx.overrides)
        dh, dw, db = launch_backward(
            h, w, b, y.contiguous(), hr, wr, br, lse, ez, ed,
            gather(g_logp), gather(g_ent), gather(g_kl), gather(g_lse),
            temperature=ctx.temperature, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
            filter_eps=ctx.options.get("filter_eps"), mode=ctx.options.get("backward_mode", "split"),
            cfg=cfg, upcast=upcast, precision=prec, ref_precision=ref_prec)
        if need_dh:
            grads[0] = scatter_rows(dh.to(hidden.dtype), rows, n_all)
        if need_dw:
            grads[1] = dw.to(weight.dtype)
        if need_db:
            grads[2] = db.to(bias.dtype)
        return tuple(grads)


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"backend='triton' got unknown options {unknown}; valid options: {list(_OPTIONS)}")
    eps = options.get("filter_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0):
        raise ValueError(f"filter_eps must be None or a non-negative float, got {eps!r}")
    mode = options.get("backward_mode", "split")
    if mode not in ("split", "atomic"):
        raise ValueError(f"backward_mode must be 'split' or 'atomic', got {mode!r}")


def token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *,
                temperature, ignore_index, return_entropy, return_kl, **options):
    """See `gro_kernels.logprobs.api`. Returns fp32 (logp, entropy|None, kl|None, lse), each [N]."""
    _check_options(options)
    dtypes = {hidden.dtype, weight.dtype} | ({ref_hidden.dtype, ref_weight.dtype} if return_kl else set())
    if not dtypes <= set(_KERNEL_DTYPES):
        # float64 (the test reference precision): the kernels compute in fp32 at most, so hand the
        # call to the chunked torch backend, which keeps float64 end to end.
        from . import chunked
        return chunked.token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                                   temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=return_entropy, return_kl=return_kl)
    rows = valid_rows(targets, ignore_index)
    logp, ent, kl, lse = _TritonTokenStats.apply(
        hidden, weight, bias, ref_hidden if return_kl else None, ref_weight if return_kl else None,
        ref_bias if return_kl else None, targets, rows, float(temperature), bool(return_entropy),
        bool(return_kl), dict(options))
    return logp, ent, kl, lse
