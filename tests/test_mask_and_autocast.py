"""Two silent errors of issue 11 that live in gro_loss and the backends (items 3 and 4).

- `mask` means the same in gro_loss as in gro_objective: bool or 0/1, anything else is an error
  naming `mask`; masked positions are dropped before any matrix work, like ignored tokens, so a NaN
  hidden state there reaches no gradient.
- Inside `torch.autocast(..., bfloat16)` the logits stay fp32 (the GEMMs keep their input dtypes).
"""
import pytest
import torch

from gro_kernels import gro_loss, token_logprobs

BACKENDS = ["naive", "torch"]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 5, 8, generator=g)
    w = torch.randn(30, 8, generator=g) * 0.5
    y = torch.randint(0, 30, (4, 5), generator=g)
    return h, w, y, dict(rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]), group_ids=torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_mask_values_other_than_0_and_1_are_errors(backend, bad):
    h, w, y, kw = _batch()
    mask = torch.ones(4, 5)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match="mask"):
        gro_loss(h, w, y, method="dapo", mask=mask, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dapo", "dpo"])
def test_nan_hidden_at_masked_position_reaches_no_gradient(backend, method):
    h, w, y, kw = _batch()
    if method == "dpo":
        kw = dict(group_ids=torch.tensor([0, 0, 1, 1]), labels=torch.tensor([1, -1, 1, -1]),
                  ref_logp=torch.full((4, 5), -3.0))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 3:] = False
    clean = h.clone()
    h[2, 3:] = float("nan")
    results = []
    for hidden, m in ((h, mask), (clean, mask)):
        hh, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        out = gro_loss(hh, ww, y, method=method, mask=m, backend=backend, **kw)
        out.loss.backward()
        results.append((out.loss, hh.grad, ww.grad))
    (loss, dh, dw), (loss_c, dh_c, dw_c) = results
    assert torch.isfinite(loss) and torch.isfinite(dw).all()
    assert (dh[2, 3:] == 0).all() and torch.isfinite(dh).all()
    torch.testing.assert_close(loss, loss_c)
    torch.testing.assert_close(dw, dw_c)
    torch.testing.assert_close(dh, dh_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_fp32_logits(backend):
    h, w, y, _ = _batch(1)
    want = token_logprobs(h.double(), w.double(), y, return_entropy=True, backend="naive")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert got.logp.dtype == torch.float32
    assert (got.logp.double() - want.logp).abs().max() < 1e-5
    assert (got.entropy.double() - want.entropy).abs().max() < 1e-5
    hh = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gro_loss(hh, w, y, method="sft", backend=backend)
    out.loss.backward()
    ref = h.double().requires_grad_()
    gro_loss(ref, w.double(), y, method="sft", backend="naive").loss.backward()
    assert (hh.grad.double() - ref.grad).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dpo", "dapo"])   # the two-pass (composable) path and the one pass
def test_backward_inside_autocast_keeps_fp32_gemms(backend, method):
    # The composable op's backward recomputes the logits and runs the gradient GEMMs: inside
    # autocast (backward() called in the `with` block) they ran in bf16 (DPO grad_h off by 7e-3).
    h, w, y, kw = _batch(2)
    if method == "dpo":
        kw = dict(group_ids=torch.tensor([0, 0, 1, 1]), labels=torch.tensor([1, -1, 1, -1]),
                  ref_logp=torch.full((4, 5), -3.0))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gro_loss(hh, ww, y, method=method, backend=backend, **kw).loss.backward()
    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    gro_loss(ref_h, ref_w, y, method=method, backend="naive", **kw64).loss.backward()
    assert (hh.grad.double() - ref_h.grad).abs().max() < 1e-5
    assert (ww.grad.double() - ref_w.grad).abs().max() < 1e-5
