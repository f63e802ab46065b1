"""The Triton epilogue with issue 17's head options (soft cap, per-token temperature, the sampler's
kept set, the mean log-prob with class weights, top-1), under the interpreter on the CPU (compiled on
a GPU). Reference: the naive backend in float64 on the same (rounded) inputs, whose kept-set and
soft-cap definitions tests/test_head_options.py checks against an independent sort-based one; and
torch's F.linear_cross_entropy for the fused SFT pass. V > 256 (the interpreter's block): ragged
multi-block rows; small chunks: several token chunks.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is off", allow_module_level=True)
pytest.importorskip("triton")

from gro_kernels import gro_loss, token_logprobs  # noqa: E402

IGNORE = -100
B, T, D, V = 2, 5, 16, 300


def inputs(seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = scale * torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[1, 0] = IGNORE
    rh = h + 0.3 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    rw = w + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    temp = 0.6 + torch.rand(B, T, generator=g, dtype=torch.float64)
    coefs = torch.randn(5, B, T, generator=g, dtype=torch.float64)
    return h, w, b, y, rh, rw, temp, coefs


def run(backend, dtype, options, *, kl=True, mean=False, cw=None):
    h, w, b, y, rh, rw, temp, coefs = inputs()
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    hh, ww, bb = (cast(t).requires_grad_() for t in (h, w, b))
    opts = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    if isinstance(opts.get("temperature"), torch.Tensor):
        opts["temperature"] = opts["temperature"].to(torch.float64 if dtype == torch.float64 else torch.float32)
    extra = dict(ref_hidden=cast(rh), ref_weight=cast(rw)) if kl else {}
    if mean:
        extra.update(return_mean_logp=True, class_weight=None if cw is None else cw.to(DEVICE, dtype))
    st = token_logprobs(hh, ww, y.to(DEVICE), bias=bb, return_entropy=True, backend=backend,
                        **({} if backend == "naive" else {"chunk_elements": 3 * V}), **extra, **opts)
    a, c, e, f, g = (t.to(DEVICE, st.logp.dtype) for t in coefs)
    loss = (a * st.logp + c * st.entropy + f * st.lse).sum()
    if kl:
        loss = loss + (e * st.kl).sum()
    if mean:
        loss = loss + (g * st.mean_logp).sum()
    loss.backward()
    out = dict(logp=st.logp, entropy=st.entropy, lse=st.lse, kl=st.kl, mean_logp=st.mean_logp,
               d_hidden=hh.grad, d_weight=ww.grad, d_bias=bb.grad)
    out = {k: None if v is None else v.detach().double().cpu() for k, v in out.items()}
    out["is_top1"] = st.is_top1.cpu()
    return out


def reference(options, **kw):
    return run("naive", torch.float64, options, **kw)


def assert_close(got, want, tol, what=""):
    for k, r in want.items():
        if r is None or k == "is_top1":
            continue
        scale = max(1.0, r.abs().max().item())
        err = (got[k] - r).abs().max().item()
        assert torch.isfinite(got[k]).all() and err <= tol * scale, f"{what}{k}: {err:.3g} > {tol} * {scale:.3g}"


CONFIGS = {
    "softcap_token_temperature": dict(softcap=3.0, temperature="tokens"),
    "top_k_rows_top_p": dict(top_k=torch.tensor([5, 0]), top_p=0.8, temperature=0.9),
    "min_p_softcap_row_temperature": dict(min_p=0.05, softcap=2.5, temperature="rows"),
}


def _options(name):
    opts = dict(CONFIGS[name])
    _, _, _, _, _, _, temp, _ = inputs()
    if opts["temperature"] == "tokens":
        opts["temperature"] = temp
    elif opts["temperature"] == "rows":
        opts["temperature"] = temp[:, 0]
    return opts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_head_options_match_float64(name):
    opts = _options(name)
    want = reference(opts)
    got = run("triton", torch.float32, opts)
    assert_close(got, want, 2e-5, f"{name} ")
    assert torch.equal(got["is_top1"], want["is_top1"])
    torch_got = run("torch", torch.float32, opts)   # the torch epilogue, same fp32 GEMMs
    assert_close(got, torch_got, 2e-5, f"{name} vs torch ")


def test_triton_mean_logp_with_class_weights():
    cw = 0.2 + torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for weights in (None, cw):
        want = reference({"softcap": 4.0}, kl=False, mean=True, cw=weights)
        got = run("triton", torch.float32, {"softcap": 4.0}, kl=False, mean=True, cw=weights)
        assert_close(got, want, 2e-5, f"class weights {weights is not None} ")


def test_triton_fp32_head_of_bf16_inputs():
    opts = dict(softcap=3.0, top_p=0.9, head_precision="fp32")
    got = run("triton", torch.bfloat16, opts, kl=False)
    h, w, b, y, *_ = inputs()
    rounded = [t.to(torch.bfloat16).double() for t in (h, w, b)]
    hh, ww, bb = (t.clone().requires_grad_() for t in rounded)
    st = token_logprobs(hh, ww, y, bias=bb, return_entropy=True, backend="naive", softcap=3.0, top_p=0.9)
    for k in ("logp", "entropy", "lse"):
        assert (got[k] - getattr(st, k).detach()).abs().max() < 2e-5 * max(1.0, getattr(st, k).abs().max()), k


def test_triton_one_pass_sft_with_the_linear_cross_entropy_options():
    h, w, b, y, *_ = inputs(seed=5)
    cw = 0.2 + torch.rand(V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (h, w, b)]
    out = gro_loss(*leaves[:2], y.to(DEVICE), bias=leaves[2], method="sft", label_smoothing=0.2,
                   class_weight=cw.float().to(DEVICE), backend="triton", backend_options={"chunk_elements": 3 * V})
    out.loss.backward()
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    want = F.linear_cross_entropy(ref[0].reshape(-1, D), ref[1], y.reshape(-1), linear_bias=ref[2], weight=cw,
                                  label_smoothing=0.2)
    want.backward()
    assert abs(out.loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    for g, r in zip(leaves, ref):
        assert (g.grad.double().cpu() - r.grad).abs().max() < 2e-5 * max(1.0, r.grad.abs().max())
