"""The SFT preset as a fused linear cross-entropy (issue 17): what torch 2.13's
`F.linear_cross_entropy` offers (reduction "none" / "mean" / "sum", label smoothing, class weights,
linear bias) and what Liger's / Cut Cross-Entropy's add (z-loss, soft cap, token accuracy), computed
in the pass. References: torch's own `F.linear_cross_entropy` (values and gradients), and the z-loss
and token accuracy written here from their formulas.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gro_kernels import gro_loss, gro_objective, token_logprobs

from test_one_pass import MatmulFlops

IGNORE = -100
B, T, D, V = 3, 6, 8, 50


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = IGNORE
    y[2, 5] = IGNORE
    cw = 0.2 + torch.rand(V, generator=g, dtype=dtype)
    return h, w, b, y, cw


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_sft_equals_torch_linear_cross_entropy(reduction, smoothing, weighted, backend):
    h, w, b, y, cw = inputs()
    cw = cw if weighted else None
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(B * T, generator=g, dtype=torch.float64)  # reduction="none": any per-token gradient

    def reduce(loss):
        return (loss.reshape(-1) * upstream).sum() if reduction == "none" else loss

    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    want = F.linear_cross_entropy(leaves[0].reshape(-1, D), leaves[1], y.reshape(-1), linear_bias=leaves[2],
                                  weight=cw, reduction=reduction, label_smoothing=smoothing)
    want_grads = grads_of(reduce(want), leaves)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = gro_loss(leaves[0], leaves[1], y, bias=leaves[2], method="sft", reduction=reduction,
                   label_smoothing=smoothing, class_weight=cw, backend=backend,
                   backend_options={"chunk_elements": 4 * V} if backend == "torch" else None)
    got = out.loss.reshape(-1) if reduction == "none" else out.loss
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g_ours, g_ref in zip(grads_of(reduce(out.loss), leaves), want_grads):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-10)


def test_z_loss_soft_cap_and_token_accuracy_from_their_formulas():
    h, w, b, y, _ = inputs(seed=2)
    c, zc = 4.0, 1e-3
    y[1] = (h[1] @ w.T + b).argmax(-1)   # a row of top-1 targets: the accuracy is not trivially 0
    valid = y != IGNORE
    res = {}
    for backend in ("torch", "naive"):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        out = gro_loss(*leaves[:2], y, bias=leaves[2], method="sft", softcap=c, z_loss_coef=zc, backend=backend,
                       label_smoothing=0.1, backend_options={"chunk_elements": 3 * V} if backend == "torch" else None)
        res[backend] = (out, grads_of(out.loss, leaves))
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    z = leaves[0] @ leaves[1].T + leaves[2]
    s = c * torch.tanh(z / c)
    logq = torch.log_softmax(s, -1)
    lse = torch.logsumexp(s, -1)
    nll = -logq.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    smooth = -logq.mean(-1)
    per_token = 0.9 * nll + 0.1 * smooth + zc * lse ** 2   # Liger / PaLM z-loss on the capped logits
    want = (per_token * valid).sum() / valid.sum()
    want_grads = grads_of(want, leaves)
    accuracy = ((s.argmax(-1) == y) & valid).sum() / valid.sum()
    for backend, (out, grads) in res.items():
        torch.testing.assert_close(out.loss, want, atol=1e-10, rtol=1e-10)
        for g_ours, g_ref in zip(grads, want_grads):
            torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.metrics["token_accuracy"], accuracy.double())
    assert 0 < accuracy < 1


def test_sft_extras_stay_in_the_three_gemm_pass():
    h, w, _, y, cw = inputs(dtype=torch.float32)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with MatmulFlops() as counter:
        out = gro_loss(hh, ww, y, method="sft", label_smoothing=0.1, class_weight=cw.float(), z_loss_coef=1e-4,
                       softcap=30.0, backend="torch", backend_options={"chunk_elements": 5 * V})
        out.loss.backward()
    # three GEMMs, plus label smoothing's class-weighted row sums (one [tokens, V] x [V] product)
    assert counter.flops == 3 * 2 * y.numel() * D * V + 2 * y.numel() * V
    # reduction="none" leaves the upstream gradient to the caller: the composable op (four GEMMs)
    with MatmulFlops() as counter:
        gro_loss(hh, ww, y, method="sft", reduction="none", backend="torch").loss.sum().backward()
    assert counter.flops == 4 * 2 * y.numel() * D * V


def test_objective_takes_lse_and_mean_logp_from_token_logprobs():
    h, w, b, y, cw = inputs(seed=4)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    st = token_logprobs(leaves[0], leaves[1], y, bias=leaves[2], return_mean_logp=True, class_weight=cw,
                        backend="torch")
    tw = cw[y.clamp(min=0)]
    out = gro_objective(st.logp, mask=y != IGNORE, method="sft", lse=st.lse, mean_logp=st.mean_logp,
                        target_weight=tw, label_smoothing=0.2, z_loss_coef=0.01)
    want = F.linear_cross_entropy(h.reshape(-1, D), w, y.reshape(-1), linear_bias=b, weight=cw,
                                  label_smoothing=0.2)
    valid = y != IGNORE
    z = h @ w.T + b
    want = want + 0.01 * (torch.logsumexp(z, -1) ** 2 * valid).sum() / valid.sum()
    torch.testing.assert_close(out.loss, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw,match", [
    (dict(method="dapo", reduction="none"), "reduction"),
    (dict(method="sft", reduction="sum", loss_agg="token_mean"), "reduction and loss_agg"),
    (dict(method="sft", label_smoothing=1.5), "label_smoothing must be <= 1"),
    (dict(method="sft", label_smoothing=0.1, top_k=5), "truncated"),
    (dict(method="dapo", class_weight=True), "target_weight"),
    (dict(method="sft", label_smoothing=0.1, bias="masked"), "masks vocabulary rows"),
])
def test_sft_options_are_refused_where_they_mean_nothing(kw, match):
    h, w, b, y, cw = inputs()
    if kw.get("class_weight") is True:
        kw["class_weight"] = cw
    if kw.get("bias") == "masked":
        kw["bias"] = b.masked_fill(torch.arange(V) >= V - 3, float("-inf"))
    if kw["method"] == "dapo":
        kw.update(rewards=torch.ones(B, dtype=torch.float64), group_ids=torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        gro_loss(h, w, y, backend="torch", **kw)


def test_sft_label_smoothing_is_the_cross_entropy_smoothing():
    # main accepted label_smoothing for the SFT preset and ignored it (the plain NLL came back)
    h, w, b, y, _ = inputs(seed=7)
    for backend in ("torch", "naive"):
        out = gro_loss(h, w, y, bias=b, method="sft", label_smoothing=0.3, backend=backend)
        want = F.cross_entropy((h @ w.T + b).reshape(-1, V), y.reshape(-1), label_smoothing=0.3)
        torch.testing.assert_close(out.loss, want, atol=1e-10, rtol=1e-10)
