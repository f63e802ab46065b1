"""token_logprobs: backends agree with an independent float64 textbook computation.

The reference below is written from the definitions (log_softmax, entropy, KL), not by calling
any gro_kernels code, and runs in float64.
"""
import math

import pytest
import torch

from gro_kernels.logprobs import token_logprobs

CPU_BACKENDS = ["naive", "torch"]


def textbook(h, w, y, b=None, T=1.0, rh=None, rw=None, rb=None, ignore_index=-100):
    """float64 logp, entropy, KL(p||q), lse, each 0 at ignored positions."""
    z = (h.double() @ w.double().T + (0 if b is None else b.double())) / T
    logq = torch.log_softmax(z, -1)
    p = logq.exp()
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    logp = logq.gather(-1, ys[..., None])[..., 0]
    ent = -(p * logq).sum(-1)
    lse = torch.logsumexp(z, -1)
    kl = None
    if rh is not None:
        zr = (rh.double() @ rw.double().T + (0 if rb is None else rb.double())) / T
        kl = (p * (logq - torch.log_softmax(zr, -1))).sum(-1)
        kl = torch.where(valid, kl, 0.0)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero), kl, torch.where(valid, lse, zero)


def make_case(B=3, T=7, d=12, V=53, scale=1.0, dtype=torch.float64, seed=0, bias=True, ref=True, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) * scale / math.sqrt(d)
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        y[0, min(2, T - 1)] = -100
        y[-1, : min(3, T - 1)] = -100
    rh = torch.randn(B, T, d + 3, generator=g, dtype=dtype) if ref else None
    rw = torch.randn(V, d + 3, generator=g, dtype=dtype) / math.sqrt(d) if ref else None
    rb = torch.randn(V, generator=g, dtype=dtype) if ref and bias else None
    return h, w, b, y, rh, rw, rb


def run(backend, h, w, b, y, rh, rw, rb, T, coefs, **kw):
    """Forward, then backward of a random combination of the four outputs."""
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    st = token_logprobs(h, w, y, bias=b, temperature=T, return_entropy=True,
                        ref_hidden=rh, ref_weight=rw, ref_bias=rb, backend=backend, **kw)
    a, c, e, f = coefs
    total = (a * st.logp + c * st.entropy + f * st.lse).sum()
    if st.kl is not None:
        total = total + (e * st.kl).sum()
    total.backward()
    return st, h.grad, w.grad, None if b is None else b.grad


def reference_grads(h, w, b, y, rh, rw, rb, T, coefs):
    h = h.double().clone().requires_grad_()
    w = w.double().clone().requires_grad_()
    b = None if b is None else b.double().clone().requires_grad_()
    logp, ent, kl, lse = textbook(h, w, y, b, T, rh, rw, rb)
    a, c, e, f = (x.double() for x in coefs)
    total = (a * logp + c * ent + f * lse).sum() + (0 if kl is None else (e * kl).sum())
    total.backward()
    return (logp, ent, kl, lse), h.grad, w.grad, None if b is None else b.grad


CASES = {
    "plain": dict(),
    "odd_sizes": dict(B=1, T=5, d=7, V=101),
    "huge_logits": dict(scale=100.0),
    "single_token": dict(B=1, T=1, d=4, V=3, ignore=False),
    "no_bias_no_ref": dict(bias=False, ref=False),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_matches_float64_textbook(backend, case, T):
    h, w, b, y, rh, rw, rb = make_case(**CASES[case])
    coefs = torch.randn(4, *y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = {"chunk_elements": 24} if backend == "torch" else {}  # many small chunks: ragged edges
    st, gh, gw, gb = run(backend, h, w, b, y, rh, rw, rb, T, coefs, **kw)
    (logp, ent, kl, lse), rgh, rgw, rgb = reference_grads(h, w, b, y, rh, rw, rb, T, coefs)
    tol = dict(rtol=1e-9, atol=1e-9 * max(1.0, float(lse.detach().abs().max())))
    torch.testing.assert_close(st.logp, logp, **tol)
    torch.testing.assert_close(st.entropy, ent, **tol)
    torch.testing.assert_close(st.lse, lse, **tol)
    if kl is not None:
        torch.testing.assert_close(st.kl, kl, **tol)
    torch.testing.assert_close(gh, rgh, **tol)
    torch.testing.assert_close(gw, rgw, **tol)
    if gb is not None:
        torch.testing.assert_close(gb, rgb, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1.0, 1.7])
def test_logp_only_gradient(backend, T):
    # Only logp is differentiated: the torch backend takes its in-place fast path.
    h, w, b, y, *_ = make_case(ref=False, V=67)
    h = h.requires_grad_()
    up = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    st = token_logprobs(h, w, y, bias=b, temperature=T, backend=backend, chunk_elements=40) if backend == "torch" \
        else token_logprobs(h, w, y, bias=b, temperature=T, backend=backend)
    (gh,) = torch.autograd.grad((st.logp * up).sum(), h)
    h2 = h.detach().clone().requires_grad_()
    (rgh,) = torch.autograd.grad((textbook(h2, w, y, b, T)[0] * up).sum(), h2)
    torch.testing.assert_close(gh, rgh, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_statistics_and_grads(backend):
    h, w, b, y, rh, rw, rb = make_case(dtype=torch.float32, V=211, d=16)
    coefs = torch.randn(4, *y.shape, generator=torch.Generator().manual_seed(2))
    st, gh, gw, gb = run(backend, h, w, b, y, rh, rw, rb, 1.3, coefs)
    assert st.logp.dtype == st.entropy.dtype == st.kl.dtype == st.lse.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.float32
    (logp, ent, kl, lse), rgh, rgw, rgb = reference_grads(h, w, b, y, rh, rw, rb, 1.3, coefs)
    for got, ref in [(st.logp, logp), (st.entropy, ent), (st.kl, kl), (gh, rgh), (gw, rgw), (gb, rgb)]:
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_negative_logits_are_finite(backend):
    # Every logit far below zero: a max identity of 0 instead of -inf would underflow to log(0).
    h = torch.ones(2, 3, 4, dtype=torch.float64)
    w = torch.ones(9, 4, dtype=torch.float64)
    b = -1000.0 - torch.arange(9, dtype=torch.float64)
    y = torch.tensor([[0, 4, 8], [1, 2, 3]])
    st = token_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    ref = textbook(h, w, y, b)
    torch.testing.assert_close(st.logp, ref[0])
    torch.testing.assert_close(st.entropy, ref[1])
    assert torch.isfinite(st.lse).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_properties(backend):
    h, w, b, y, rh, rw, rb = make_case(B=4, T=9, V=77, scale=5.0, dtype=torch.float32, seed=5)
    st = token_logprobs(h, w, y, bias=b, return_entropy=True, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                        backend=backend)
    valid = y != -100
    assert (st.logp <= 0).all()
    assert (st.entropy >= -1e-6).all() and (st.entropy <= math.log(77) + 1e-5).all()
    assert (st.kl >= 0).all()
    for t in (st.logp, st.entropy, st.kl, st.lse):
        assert (t[~valid] == 0).all()  # exactly zero at ignored positions
    # KL to itself is zero.
    self_kl = token_logprobs(h, w, y, bias=b, ref_hidden=h, ref_weight=w, ref_bias=b, backend=backend).kl
    assert self_kl.abs().max() < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_ignored_batch_gives_zeros_and_zero_grads(backend):
    h = torch.randn(2, 3, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    y = torch.full((2, 3), -100)
    st = token_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert (st.logp == 0).all() and (st.entropy == 0).all()
    (st.logp.sum() + st.entropy.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_custom_ignore_index_and_int32_targets():
    h, w, b, y, *_ = make_case(ref=False)
    y32 = torch.where(y == -100, torch.tensor(7), y).to(torch.int32)
    y32[0, 0] = -1
    st = token_logprobs(h, w, y32, bias=b, ignore_index=-1, backend="torch")
    ref = textbook(h, w, y32.long(), b, ignore_index=-1)
    torch.testing.assert_close(st.logp, ref[0])


def test_reference_head_gets_no_gradient():
    h, w, b, y, rh, rw, rb = make_case()
    rh.requires_grad_()
    rw.requires_grad_()
    for backend in CPU_BACKENDS:
        st = token_logprobs(h.requires_grad_(), w, y, ref_hidden=rh, ref_weight=rw, backend=backend)
        st.kl.sum().backward()
        assert rh.grad is None and rw.grad is None


def test_non_scalar_upstream_gradient_and_grad_of_grad_free_inputs():
    # Gradients only where asked: weight frozen, hidden trained.
    h, w, b, y, *_ = make_case(ref=False, dtype=torch.float64)
    h = h.requires_grad_()
    st = token_logprobs(h, w, y, bias=b, backend="torch")
    up = torch.randn_like(st.logp)
    (gh,) = torch.autograd.grad(st.logp, h, grad_outputs=up)
    h2 = h.detach().clone().requires_grad_()
    (rgh,) = torch.autograd.grad(textbook(h2, w, y, b)[0], h2, grad_outputs=up)
    torch.testing.assert_close(gh, rgh)


# ---- bad input: a clear error that names the argument ----

def _args():
    h = torch.randn(2, 3, 4)
    w = torch.randn(10, 4)
    y = torch.randint(0, 10, (2, 3))
    return h, w, y


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda h, w, y: (h[:, :2], w, y), ValueError, "hidden"),
    (lambda h, w, y: (h, w[:, :3], y), ValueError, "weight"),
    (lambda h, w, y: (h, w[None], y), ValueError, "weight"),
    (lambda h, w, y: (h.double(), w, y), TypeError, "hidden"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "targets"),
    (lambda h, w, y: (h.long(), w, y), TypeError, "hidden"),
    (lambda h, w, y: (h, w, torch.where(y == y[0, 0], 10, y)), ValueError, "targets"),
    (lambda h, w, y: (h, w, torch.where(y == y[0, 0], -5, y)), ValueError, "targets"),
    (lambda h, w, y: (h.numpy(), w, y), TypeError, "hidden"),
])
def test_bad_input_names_the_argument(mutate, exc, name):
    h, w, y = mutate(*_args())
    with pytest.raises(exc, match=name):
        token_logprobs(h, w, y)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(bias=torch.randn(9)), ValueError, "bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(ref_hidden=torch.randn(2, 3, 4)), ValueError, "ref_weight"),
    (dict(ref_hidden=torch.randn(2, 3, 4), ref_weight=torch.randn(11, 4)), ValueError, "ref_weight"),
    (dict(ref_hidden=torch.randn(2, 2, 4), ref_weight=torch.randn(10, 4)), ValueError, "ref_hidden"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="naive", chunk_elements=8), TypeError, "naive"),
    (dict(backend="torch", chunk_elements=0), ValueError, "chunk_elements"),
])
def test_bad_keyword_names_the_argument(kwargs, exc, name):
    h, w, y = _args()
    with pytest.raises(exc, match=name):
        token_logprobs(h, w, y, **kwargs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y = _args()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        token_logprobs(h, w, y, backend="triton")


def test_auto_picks_torch_on_cpu():
    from gro_kernels.logprobs import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_sum_p2_from_the_same_pass(backend):
    # sum_v p_v^2 (verl's optimal token baseline): against a float64 softmax written here.
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(3, 7, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[0, 2] = -100
    st = token_logprobs(h, w, y, temperature=0.7, return_sum_p2=True, backend=backend, **(
        {"chunk_elements": 150} if backend == "torch" else {}))
    p = torch.softmax(h @ w.T / 0.7, -1)
    want = torch.where(y != -100, (p * p).sum(-1), 0.0)
    torch.testing.assert_close(st.sum_p2, want, atol=1e-12, rtol=1e-12)
    assert st.sum_p2.requires_grad is False
    assert token_logprobs(h, w, y, backend=backend).sum_p2 is None
