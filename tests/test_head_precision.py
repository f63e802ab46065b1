"""head_precision (issue 17): "fp32" runs the head's GEMMs on fp32 copies of 16-bit hidden states
and weight, so logp is log_softmax(F.linear(h.float(), W.float()))[y] to fp32 rounding (vLLM's
fp32 head), the gradient GEMMs too; the fp32 weight copy is made in vocabulary slices when a whole
copy would pass the budget; the pass keeps its three GEMMs. "tf32" needs CUDA (refused here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gro_kernels import gro_loss, token_logprobs
from gro_kernels.logprobs import engine
from test_one_pass import MatmulFlops

N, D, V = 24, 32, 200


def inputs(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (0.3 * torch.randn(V, D, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return h, w, y


def fp32_reference(h, w, y, coef):
    """fp32 autograd of sum coef * log_softmax(F.linear(h.float(), W.float()))[y] (and the entropy)."""
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    logq = torch.log_softmax(F.linear(hh, ww), -1)
    valid = y != -100
    logp = torch.where(valid, logq.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logq.exp() * logq).sum(-1), 0.0)
    (coef * (logp + 0.1 * ent)).sum().backward()
    return logp.detach(), ent.detach(), hh.grad, ww.grad


class Fp32Sizes(TorchDispatchMode):
    """The element counts of every fp32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("whole_copy", [True, False])
def test_fp32_head_is_the_fp32_linear_to_rounding(dtype, whole_copy, monkeypatch):
    if not whole_copy:  # the weight upcast 7 vocabulary rows at a time, per GEMM
        monkeypatch.setattr(engine, "FP32_COPY_ELEMENTS", 0)
        monkeypatch.setattr(engine, "DW_SLICE_ELEMENTS", 7 * D)
    h, w, y = inputs(dtype)
    coef = torch.randn(N, generator=torch.Generator().manual_seed(1))
    logp, ent, dh, dw = fp32_reference(h, w, y, coef)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    st = token_logprobs(hh, ww, y, head_precision="fp32", return_entropy=True, backend="torch", chunk_elements=5 * V)
    (coef * (st.logp + 0.1 * st.entropy)).sum().backward()
    torch.testing.assert_close(st.logp, logp, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(st.entropy, ent, atol=2e-6, rtol=2e-6)
    # the gradients: the fp32 ones, rounded once to the inputs' dtype
    assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
    for got, want in ((hh.grad, dh), (ww.grad, dw)):
        assert ((got.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()


def test_fp32_head_gradients_beat_the_native_16bit_dz():
    # native rounds dz to 16 bits before the gradient GEMMs; fp32 keeps it: closer to the fp32 reference.
    h, w, y = inputs(torch.bfloat16, seed=2)
    coef = torch.randn(N, generator=torch.Generator().manual_seed(3))
    _, _, dh, dw = fp32_reference(h, w, y, coef)
    err = {}
    for precision in ("native", "fp32"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        st = token_logprobs(hh, ww, y, head_precision=precision, return_entropy=True, backend="torch")
        (coef * (st.logp + 0.1 * st.entropy)).sum().backward()
        err[precision] = float((ww.grad.float() - dw).abs().max() / dw.abs().max())
        rounded_once = bool(((ww.grad.float() - dw).abs() <= dw.abs() * 2 ** -7 + 1e-6).all())
        assert rounded_once == (precision == "fp32"), precision
    assert err["fp32"] < err["native"], err


def test_no_whole_fp32_copy_of_a_large_head(monkeypatch):
    # A head over the budget: no fp32 tensor as large as the weight is ever made (one slice at a time).
    monkeypatch.setattr(engine, "FP32_COPY_ELEMENTS", V * D - 1)
    monkeypatch.setattr(engine, "DW_SLICE_ELEMENTS", 16 * D)
    h, w, y = inputs(torch.bfloat16)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with Fp32Sizes() as sizes:
        out = gro_loss(hh[None], ww, y[None], method="sft", head_precision="fp32", backend="torch",
                       backend_options={"chunk_elements": 4 * V})
        out.loss.backward()
    assert sizes.largest < V * D, sizes.largest
    monkeypatch.setattr(engine, "FP32_COPY_ELEMENTS", V * D)   # within the budget: one whole copy
    with Fp32Sizes() as sizes:
        gro_loss(hh[None], ww, y[None], method="sft", head_precision="fp32", backend="torch").loss.backward()
    assert sizes.largest == V * D


def test_fp32_head_keeps_three_gemms():
    h, w, y = inputs(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with MatmulFlops() as counter:
        gro_loss(hh[None], ww, y[None], method="sft", head_precision="fp32", backend="torch",
                 backend_options={"chunk_elements": 5 * V}).loss.backward()
    assert counter.flops == 3 * 2 * N * D * V


def test_fp32_and_float64_inputs_take_every_precision_but_tf32():
    for dtype in (torch.float32, torch.float64):
        h, w, y = inputs(dtype)
        a = token_logprobs(h, w, y, head_precision="fp32", backend="torch").logp
        b = token_logprobs(h, w, y, backend="torch").logp
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tf32"):
        gro_loss(h[None], w, y[None], method="sft", head_precision="tf32", backend="torch")
