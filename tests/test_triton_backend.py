"""The triton backend: the chunked engine with the Triton epilogue (`gro_kernels.kernels.row_stats`, `gro_kernels.kernels.logits_grad`).

On a CUDA machine the kernels run compiled; elsewhere tests/conftest.py sets TRITON_INTERPRET=1
and they run on CPU tensors through Triton's interpreter (slow: tiny shapes; the interpreter's
vocabulary block is 256 wide, so V > 256 exercises multi-block loops and ragged edges, and small
`chunk_elements` force several token chunks).

References: `naive.token_stats` on float64 copies of the (rounded) inputs, an independent float64
textbook computation written here, and the chunked torch backend.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is off", allow_module_level=True)
pytest.importorskip("triton")

import functools  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from gro_kernels.logprobs import chunked, naive, token_logprobs  # noqa: E402
from gro_kernels.logprobs.transform import Transform  # noqa: E402
from gro_kernels.objective.inputs import read_inputs  # noqa: E402

# The backends as modules with token_stats, as `run` expects.
triton_op = SimpleNamespace(token_stats=functools.partial(chunked.token_stats, backend="triton"))
torch_op = SimpleNamespace(token_stats=functools.partial(chunked.token_stats, backend="torch"))
SMALL = dict(chunk_elements=2000)   # several token chunks at these vocabularies
IGNORE = -100


def make_inputs(n, d, v, *, dr=None, bias=False, ref=False, ref_bias=False, scale=1.0, shift=0.0,
                n_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden=torch.randn(n, d, generator=g, dtype=torch.float64),
        weight=torch.randn(v, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d)),
        targets=torch.randint(0, v, (n,), generator=g),
        bias=(torch.randn(v, generator=g, dtype=torch.float64) + shift) if (bias or shift) else None,
        ref_hidden=None, ref_weight=None, ref_bias=None,
    )
    if n_ignored:
        x["targets"][torch.randperm(n, generator=g)[:n_ignored]] = IGNORE
    if ref:
        dr = dr or d
        x["ref_hidden"] = torch.randn(n, dr, generator=g, dtype=torch.float64)
        x["ref_weight"] = torch.randn(v, dr, generator=g, dtype=torch.float64) * (scale / math.sqrt(dr))
        if ref_bias:
            x["ref_bias"] = torch.randn(v, generator=g, dtype=torch.float64)
    coefs = torch.randn(4, n, generator=g, dtype=torch.float64)
    return x, coefs


def run(module, x, coefs, dtype, *, temperature=1.0, entropy=True, use_lse=False, **options):
    """Outputs and gradients (float64 copies) of sum(a*logp + b*H + c*KL [+ e*lse])."""
    def cast(t, grad=False):
        if t is None:
            return None
        t = t.to(device=DEVICE, dtype=dtype).clone()
        return t.requires_grad_() if grad else t

    h, w, b = cast(x["hidden"], True), cast(x["weight"], True), cast(x["bias"], True)
    rh, rw, rb = cast(x["ref_hidden"]), cast(x["ref_weight"]), cast(x["ref_bias"])
    has_ref = rh is not None
    out = module.token_stats(
        h, w, x["targets"].to(DEVICE), b, rh, rw, rb, transform=Transform(inv_t=1.0 / temperature),
        head_precision="native", ignore_index=IGNORE, return_entropy=entropy, return_kl=has_ref, **options)
    logp, ent, kl, lse = (out[k] for k in ("logp", "entropy", "kl", "lse"))
    a, bb, c, e = coefs.to(DEVICE)
    loss = (a * logp.double()).sum()
    if entropy:
        loss = loss + (bb * ent.double()).sum()
    if has_ref:
        loss = loss + (c * kl.double()).sum()
    if use_lse:
        loss = loss + (e * lse.double()).sum()
    loss.backward()
    out = dict(logp=logp, entropy=ent, kl=kl, lse=lse, d_hidden=h.grad, d_weight=w.grad,
               d_bias=None if b is None else b.grad)
    return {k: None if t is None else t.detach().double().cpu() for k, t in out.items()}


def rounded(x, dtype):
    """The inputs as the low-precision run sees them, back in float64 (reference from the same bits)."""
    return {k: (t.to(dtype).double() if (t is not None and t.is_floating_point()) else t) for k, t in x.items()}


def textbook(x, temperature=1.0):
    """Independent float64 computation straight from the definitions, gradients by autograd."""
    h = x["hidden"].clone().requires_grad_()
    w = x["weight"].clone().requires_grad_()
    b = None if x["bias"] is None else x["bias"].clone().requires_grad_()
    y = x["targets"]
    valid = y != IGNORE
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z / temperature
    zmax = z.max(-1, keepdim=True).values.detach()
    lse = zmax[:, 0] + torch.log(torch.exp(z - zmax).sum(-1))
    p = torch.exp(z - lse[:, None])
    logp = torch.stack([z[i, y[i]] - lse[i] if valid[i] else z.new_zeros(()) for i in range(len(y))])
    ent = torch.where(valid, -(p * (z - lse[:, None])).sum(-1), 0.0)
    kl = None
    if x["ref_hidden"] is not None:
        zr = x["ref_hidden"] @ x["ref_weight"].T
        if x["ref_bias"] is not None:
            zr = zr + x["ref_bias"]
        zr = zr / temperature
        lse_r = torch.logsumexp(zr, -1)
        kl = torch.where(valid, (p * ((z - lse[:, None]) - (zr - lse_r[:, None]))).sum(-1), 0.0)
    return h, w, b, logp, ent, kl, torch.where(valid, lse, 0.0)


def assert_close(got, ref, tol, what="", floor=1.0):
    for k, r in ref.items():
        g = got[k]
        if r is None:
            assert g is None, f"{what}{k}: expected None"
            continue
        assert torch.isfinite(g).all(), f"{what}{k}: non-finite values"
        err = (g - r).abs().max().item() if r.numel() else 0.0
        scale = max(floor, r.abs().max().item() if r.numel() else 0.0)
        assert err <= tol * scale, f"{what}{k}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"


CASES = {
    # name: (n, d, v, make_inputs kwargs, temperature)
    "single_token": (1, 16, 17, dict(), 1.0),
    "odd_sizes_bias_temp": (7, 24, 300, dict(bias=True), 0.7),
    "ref_head_dr_ne_d": (37, 24, 513, dict(ref=True, dr=16, bias=True, ref_bias=True, n_ignored=5), 1.3),
    "ref_head_no_bias": (20, 16, 100, dict(ref=True, n_ignored=3), 1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_matches_float64_reference(case):
    n, d, v, kw, temp = CASES[case]
    x, coefs = make_inputs(n, d, v, **kw)
    ref = run(naive, x, coefs, torch.float64, temperature=temp, use_lse=True)
    got = run(triton_op, x, coefs, torch.float32, temperature=temp, use_lse=True, **SMALL)
    assert_close(got, ref, 1e-5)


def test_fp32_matches_textbook():
    x, coefs = make_inputs(13, 24, 100, ref=True, dr=16, bias=True, ref_bias=True, n_ignored=2, seed=3)
    h, w, b, logp, ent, kl, lse = textbook(x, temperature=0.8)
    a, bb, c, _ = coefs
    ((a * logp).sum() + (bb * ent).sum() + (c * kl).sum()).backward()
    got = run(triton_op, x, coefs, torch.float32, temperature=0.8, **SMALL)
    ref = dict(logp=logp.detach(), entropy=ent.detach(), kl=kl.detach(), lse=lse.detach(),
               d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad)
    assert_close(got, ref, 1e-5)


@pytest.mark.parametrize("dtype,gtol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_epilogue_matches_torch_epilogue(dtype, gtol):
    # Same engine, same GEMMs: only the epilogue differs. Statistics agree to fp32 rounding; 16-bit
    # gradients differ by the rounding of dz to the input dtype (one ulp of bf16 / fp16).
    x, coefs = make_inputs(37, 24, 300, ref=True, dr=16, bias=True, ref_bias=True, n_ignored=4, seed=5)
    ref = run(torch_op, x, coefs, dtype, temperature=0.9, **SMALL)
    got = run(triton_op, x, coefs, dtype, temperature=0.9, **SMALL)
    stats = ("logp", "entropy", "kl", "lse")
    assert_close({k: got[k] for k in stats}, {k: ref[k] for k in stats}, 1e-5)
    grads = ("d_hidden", "d_weight", "d_bias")
    assert_close({k: got[k] for k in grads}, {k: ref[k] for k in grads}, gtol)


@pytest.mark.parametrize("dtype,tol,gtol", [(torch.float16, 2e-5, 3e-3), (torch.bfloat16, 2e-5, 2e-2)])
def test_half_precision_matches_reference_from_rounded_inputs(dtype, tol, gtol):
    # Logits come from exact products of the rounded inputs with fp32 accumulation, so the
    # statistics are fp32-accurate; gradients pass the logits gradient through the 16-bit dtype
    # (as autograd does for a 16-bit matmul) and get a dtype-sized tolerance.
    x, coefs = make_inputs(21, 24, 300, ref=True, dr=16, bias=True, n_ignored=2, seed=7)
    ref = run(naive, rounded(x, dtype), coefs, torch.float64, temperature=0.9)
    got = run(triton_op, x, coefs, dtype, temperature=0.9, **SMALL)
    stats = ("logp", "entropy", "kl", "lse")
    assert_close({k: got[k] for k in stats}, {k: ref[k] for k in stats}, tol, f"{dtype} ")
    grads = ("d_hidden", "d_weight", "d_bias")
    assert_close({k: got[k] for k in grads}, {k: ref[k] for k in grads}, gtol, f"{dtype} ")


@pytest.mark.parametrize("kind", ["huge", "all_negative"])
def test_extreme_logits_are_finite_and_exact(kind):
    # huge: weights scaled by 100 (logits in the hundreds, softmax one-hot-like);
    # all_negative: every logit around -1000 (with a 0 max identity every exp underflows: log 0).
    kw = dict(scale=100.0, ref=True) if kind == "huge" else dict(shift=-1e3, ref=True)
    x, coefs = make_inputs(19, 16, 300, n_ignored=2, seed=11, **kw)
    ref = run(naive, rounded(x, torch.float32), coefs, torch.float64)
    got = run(triton_op, x, coefs, torch.float32, **SMALL)
    plain = run(naive, x, coefs, torch.float32)
    # fp32 logits of magnitude ~300..1000 are only good to ~3e-5..6e-5 absolute, so the bar is
    # plain fp32 torch on the materialized logits: the kernels may not be much worse than it.
    for k, r in ref.items():
        if r is None:
            continue
        assert torch.isfinite(got[k]).all(), k
        err, err_plain = (got[k] - r).abs().max().item(), (plain[k] - r).abs().max().item()
        assert err <= 4 * err_plain + 1e-6 * max(1.0, r.abs().max().item()), (k, err, err_plain)


def test_ignored_tokens_and_fully_ignored_batch():
    x, coefs = make_inputs(9, 16, 40, ref=True, bias=True, n_ignored=4, seed=2)
    got = run(triton_op, x, coefs, torch.float32, **SMALL)
    ign = x["targets"] == IGNORE
    for k in ("logp", "entropy", "kl", "lse"):
        assert (got[k][ign] == 0).all(), k
    assert (got["d_hidden"][ign] == 0).all()
    x["targets"][:] = IGNORE
    got = run(triton_op, x, coefs, torch.float32, **SMALL)
    for k, t in got.items():
        assert torch.isfinite(t).all() and (t == 0).all(), k


def test_properties_logp_entropy_kl():
    x, coefs = make_inputs(37, 16, 100, ref=True, bias=True, scale=3.0, seed=13)
    got = run(triton_op, x, coefs, torch.float32, temperature=0.5, **SMALL)
    assert (got["logp"] <= 0).all()
    assert (got["entropy"] >= 0).all() and (got["entropy"] <= math.log(100) + 1e-5).all()
    assert (got["kl"] >= -1e-5).all()


def test_frozen_weight_or_hidden():
    x, _ = make_inputs(11, 16, 50, bias=True, seed=19)
    for frozen in ("weight", "hidden"):
        h = x["hidden"].float().requires_grad_(frozen != "hidden")
        w = x["weight"].float().requires_grad_(frozen != "weight")
        logp = triton_op.token_stats(h, w, x["targets"], None, None, None, None, transform=Transform(),
                                     head_precision="native", ignore_index=IGNORE, return_entropy=False,
                                     return_kl=False, **SMALL)["logp"]
        logp.sum().backward()
        hh = x["hidden"].clone().requires_grad_()
        ww = x["weight"].clone().requires_grad_()
        torch.log_softmax(hh @ ww.T, -1).gather(1, x["targets"][:, None]).sum().backward()
        live, ref = (h.grad, hh.grad) if frozen == "weight" else (w.grad, ww.grad)
        assert (w.grad if frozen == "weight" else h.grad) is None
        assert (live.double() - ref).abs().max() < 1e-5


def test_api_dispatch_shapes_and_options():
    x, _ = make_inputs(12, 16, 40, bias=True, seed=29)
    h = x["hidden"].float().reshape(3, 4, 16)
    y = x["targets"].reshape(3, 4)
    st = token_logprobs(h, x["weight"].float(), y, bias=x["bias"].float(), return_entropy=True, backend="triton",
                        **SMALL)
    ref = token_logprobs(h.double(), x["weight"], y, bias=x["bias"], return_entropy=True, backend="naive")
    assert st.logp.shape == (3, 4) and st.logp.dtype == torch.float32 and st.kl is None
    assert (st.logp.double() - ref.logp).abs().max() < 1e-5
    assert (st.entropy.double() - ref.entropy).abs().max() < 1e-5
    with pytest.raises(TypeError, match="chunk_elements"):
        token_logprobs(h, x["weight"].float(), y, backend="triton", filter_eps=1e-3)
    with pytest.raises(ValueError, match="chunk_elements"):
        token_logprobs(h, x["weight"].float(), y, backend="triton", chunk_elements=0)


def test_float64_inputs_are_computed_in_float64():
    x, coefs = make_inputs(7, 16, 30, ref=True, bias=True, seed=31)
    got = run(triton_op, x, coefs, torch.float64)
    ref = run(naive, x, coefs, torch.float64)
    assert_close(got, ref, 1e-12)


# ---- every gro_loss preset: the triton backend gives the torch backend's loss and gradients ----

PRESET_METHODS = ["reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
                  "dpo", "ipo", "cpl", "simpo", "kto", "sft", "gro"]
_REWARD_METHODS = {"reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp", "gro"}
_GROUP_METHODS = {"rloo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "gro"}
_RATIO_METHODS = {"grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp", "gro"}
_EXTRA_OPTIONS = {
    "grpo": dict(kl_estimator="full"),            # the exact KL from the fused pass
    "reinforce_pp": dict(kl_coef=0.05),
    "gro": dict(kl_coef=0.05, offline_coef=0.5, entropy_coef=0.01),   # k3 KL from a ref head + entropy bonus
}


def _preset_inputs(method, B=8, T=6, d=16, V=40, seed=0):
    """An fp32 batch (B sequences of T tokens, right padding, two reward groups or four labelled
    pairs) with every input `method` needs, per docs/options.md (Inputs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g)
    weight = 0.5 * torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 5, 4, 6, 3, 6, 2, 5])
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE
    kw = dict(ref_hidden=hidden + 0.1 * torch.randn(B, T, d, generator=g),
              ref_weight=weight + 0.1 * torch.randn(V, d, generator=g))
    if method in _REWARD_METHODS:
        kw["rewards"] = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.3])
    if method in _GROUP_METHODS:
        kw["group_ids"] = torch.tensor([3, 7, 3, 7, 7, 3, 3, 7])
    if method == "remax":
        kw["baselines"] = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.0, 0.4, 0.7, 0.3])
    if method in ("dpo", "ipo", "cpl", "simpo"):
        kw["group_ids"] = torch.tensor([5, 9, 5, 2, 9, 2, 0, 0])
        kw["labels"] = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1])
    if method == "kto":
        kw.update(labels=torch.tensor([1, -1, 1, 1, -1, -1, 1, -1]), anchor_value=0.2)
    if method == "gro":
        kw["offline"] = torch.tensor([False, False, True, False, False, False, False, True])
    if method in _RATIO_METHODS:
        with torch.no_grad():   # behaviour log-probs: the policy's, perturbed per row so clipping happens
            logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            noise = torch.tensor([0.0, 1e-4, 0.3, 2.0, 5e-4, 0.1, 0.5, 1e-3])[:, None]
            kw["old_logp"] = torch.where(targets != IGNORE, logp + noise * torch.randn(B, T, generator=g), 0.0)
    read = read_inputs(method, {**kw, **_EXTRA_OPTIONS.get(method, {})})  # the rest are refused
    return hidden, weight, targets, {k: v for k, v in kw.items() if k in read}


@pytest.mark.parametrize("method", PRESET_METHODS)
def test_every_preset_same_loss_and_gradients_as_torch_backend(method):
    loss_mod = pytest.importorskip("gro_kernels.loss")
    hidden, weight, targets, kw = _preset_inputs(method)
    results = {}
    for backend in ("torch", "triton"):
        h = hidden.to(DEVICE).clone().requires_grad_()
        w = weight.to(DEVICE).clone().requires_grad_()
        args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        out = loss_mod.gro_loss(h, w, targets.to(DEVICE), method=method, backend=backend, **args,
                                **_EXTRA_OPTIONS.get(method, {}))
        dh, dw = torch.autograd.grad(out.loss, (h, w))
        results[backend] = (out.loss.detach().double().cpu(), dh.double().cpu(), dw.double().cpu())
    (lt, dht, dwt), (lx, dhx, dwx) = results["torch"], results["triton"]
    assert dht.abs().max() > 1e-6, "degenerate case: zero gradient"
    torch.testing.assert_close(lx, lt, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dhx, dht, atol=2e-5 * dht.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(dwx, dwt, atol=2e-5 * dwt.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("dtype,vocab", [(torch.int16, 300), (torch.uint8, 200), (torch.int32, 300)])
def test_narrow_target_dtypes(dtype, vocab):
    # Targets arrive as any integer dtype; the kernels index with int64 (no wrap-around in the
    # target comparison or the row offsets).
    x, coefs = make_inputs(13, 16, vocab, bias=True, seed=41)
    ref = run(torch_op, x, coefs, torch.float32)
    x["targets"] = x["targets"].to(dtype)
    st = token_logprobs(x["hidden"].float().to(DEVICE), x["weight"].float().to(DEVICE), x["targets"].to(DEVICE),
                        bias=x["bias"].float().to(DEVICE), return_entropy=True, backend="triton")
    assert (st.logp.double().cpu() - ref["logp"]).abs().max() < 1e-5
    assert (st.entropy.double().cpu() - ref["entropy"]).abs().max() < 1e-5


def test_sum_p2_matches_torch_epilogue():
    x, _ = make_inputs(17, 16, 300, bias=True, seed=43)
    args = [x["hidden"].float().to(DEVICE), x["weight"].float().to(DEVICE), x["targets"].to(DEVICE)]
    kw = dict(bias=x["bias"].float().to(DEVICE), return_sum_p2=True, temperature=0.8)
    got = token_logprobs(*args, backend="triton", **kw).sum_p2
    want = token_logprobs(*args, backend="torch", **kw).sum_p2
    assert (got - want).abs().max() < 1e-6 and want.max() > 1e-3


@pytest.mark.parametrize("kernel", ["row_partials", "logits_grad"])
@pytest.mark.parametrize("cap", [False, True])
def test_the_autotuner_tries_exactly_the_configs_compile_check_compiles(kernel, cap):
    # compile_check.py's verdict (no spills, 128-bit loads) holds only for the configs it compiles:
    # those must be the ones each kernel's autotuner may pick, which leaves out 4096 lanes with the
    # soft cap (they spilled on sm_90).
    from gro_kernels.kernels import compile_check, launch, logits_grad, row_stats

    tasks = [t for t in compile_check._tasks(151936, quick=False) if t[0] == kernel and t[2]["HAS_CAP"] == cap]
    tuned = {"row_partials": row_stats._row_partials_tuned, "logits_grad": logits_grad._logits_grad_tuned}[kernel]
    for dz, flags in {(t[1], tuple(t[2].items())) for t in tasks}:
        flags = dict(flags)
        tried = tuned.early_config_prune(launch.CONFIGS, {}, **flags, SPLIT_V=launch.SPLIT_V)
        compiled = [(t[4], t[5]) for t in tasks if t[1] == dz and t[2] == flags]
        assert sorted((c.num_warps, c.kwargs["BLOCK_V"]) for c in tried) == sorted(compiled)
        assert (max(b for _, b in compiled) < 4096) == cap


# ---- issue 19: a teacher head -------------------------------------------------------------------

def _teacher_batch(dtype=torch.float32):
    """A policy and a teacher head of another width, both masking vocabulary row 5 (-inf bias), V > 2
    interpreter splits, one ignored token."""
    g = torch.Generator().manual_seed(19)
    B, T, d, dt, V = 3, 4, 8, 6, 700
    bias, tb = 0.1 * torch.randn(V, generator=g), 0.1 * torch.randn(V, generator=g)
    bias[5] = tb[5] = float("-inf")
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[targets == 5] = 6
    targets[0, 3] = IGNORE
    x = dict(hidden=torch.randn(B, T, d, generator=g), weight=0.5 * torch.randn(V, d, generator=g), bias=bias,
             teacher_hidden=torch.randn(B, T, dt, generator=g), teacher_weight=0.5 * torch.randn(V, dt, generator=g),
             teacher_bias=tb)
    return {k: v.to(DEVICE, dtype) for k, v in x.items()}, targets.to(DEVICE)


TEACHER_DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"jsd_beta": 0.3})]


@pytest.mark.parametrize("div,extra", TEACHER_DIVERGENCES, ids=[d for d, _ in TEACHER_DIVERGENCES])
def test_teacher_divergences_on_triton_equal_float64(div, extra):
    """The teacher as the second head, every divergence on the triton kernels: the fused pass (gro_loss, with
    the GRPO term and a per-sequence temperature) and the composable op (token_logprobs's distill and its
    backward) equal the naive backend on float64 copies of the inputs; no NaN from the masked row."""
    from gro_kernels import gro_loss

    x, targets = _teacher_batch()
    x64 = {k: v.double() for k, v in x.items()}
    temp = torch.tensor([0.8, 1.0, 1.3], device=DEVICE)
    common = dict(method="distill", rewards=torch.tensor([1.0, 0.0, 0.5], device=DEVICE), divergence=div,
                  group_ids=torch.zeros(3, dtype=torch.long, device=DEVICE), **extra)
    upstream = torch.linspace(0.5, 1.5, targets.numel(), device=DEVICE).reshape(targets.shape)
    got, want = [], []
    for inputs, out, backend in ((x, got, "triton"), (x64, want, "naive")):
        h, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        teacher = {k: inputs[k] for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
        res = gro_loss(h, w, targets, bias=b, backend=backend, temperature=temp.to(h.dtype),
                       backend_options=SMALL if backend == "triton" else None, **common, **teacher)
        out += [res.loss.detach(), *torch.autograd.grad(res.loss, (h, w, b))]
        h, w = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight"))
        st = token_logprobs(h, w, targets, bias=inputs["bias"], backend=backend, divergence=div, temperature=0.8,
                            **extra, **teacher, **(SMALL if backend == "triton" else {}))
        out += [st.distill.detach(), *torch.autograd.grad((st.distill * upstream.to(h.dtype)).sum(), (h, w))]
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5)
    assert want[4].abs().max() > 1e-2   # the divergence is not ~0 (the teacher differs)


@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9)])
def test_teacher_kernels_equal_the_formula(div, beta):
    """The kernels alone against the divergences written out in float64: row_stats's divergence, teacher lse
    and E_p[log p - log m], and logits_grad's per-element term, with rows both heads mask and a ragged split."""
    from gro_kernels.kernels.logits_grad import logits_grad
    from gro_kernels.kernels.row_stats import row_stats

    g = torch.Generator().manual_seed(3)
    n, V = 5, 1300
    z = 3 * torch.randn(n, V, generator=g)
    zr = z + 2 * torch.randn(n, V, generator=g)
    z[:, [7, 700]] = zr[:, [7, 700]] = float("-inf")
    y = torch.randint(8, 600, (n,), generator=g)
    inv_t = torch.tensor([1.25, 1.0, 0.7, 2.0, 1.1])
    u, ur = z.double() * inv_t.double()[:, None], zr.double() * inv_t.double()[:, None]
    lp, lq = u.log_softmax(1), ur.log_softmax(1)
    p, q = lp.exp(), lq.exp()
    live = p > 0
    lm = torch.where(live, ((1 - beta) * p + beta * q).log(), 0.0)
    if div == "forward_kl":
        want = dict(kl=(q * torch.where(live, lq - lp, 0.0)).sum(1))
    else:
        e_pm = (p * torch.where(live, lp - lm, 0.0)).sum(1)
        want = dict(kl=beta * (q * torch.where(live, lq - lm, 0.0)).sum(1) + (1 - beta) * e_pm, e_pm=e_pm)
    want.update(lse_r=ur.logsumexp(1), lse=u.logsumexp(1))
    z, zr, y, inv_t = (t.to(DEVICE) for t in (z, zr, y, inv_t))
    out = {k: torch.full((n,), float("nan"), device=DEVICE) for k in ("lse", "logp", "top1", "kl", "lse_r", "e_pm")}
    row_stats(z, zr, y, inv_t, divergence=div, jsd_beta=beta, **{k: v for k, v in out.items()
                                                                 if k != "e_pm" or div == "jsd"})
    for k, v in want.items():
        torch.testing.assert_close(out[k].double().cpu(), v, rtol=1e-5, atol=2e-6)
    delta = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2])
    dz = logits_grad(z, zr, y, inv_t, lse=out["lse"], gl=torch.zeros(n, device=DEVICE),
                     alpha=torch.zeros(n, device=DEVICE), divergence=div, delta=delta.to(DEVICE),
                     lse_r=out["lse_r"], jsd_beta=beta, out=torch.empty(n, V, device=DEVICE))
    term = -delta[:, None].double() * q if div == "forward_kl" else \
        delta[:, None].double() * p * torch.where(live, lp - lm, 0.0)
    assert torch.isfinite(dz).all()
    torch.testing.assert_close(dz.double().cpu(), term, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,gtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("div,extra", TEACHER_DIVERGENCES[1:], ids=[d for d, _ in TEACHER_DIVERGENCES[1:]])
def test_teacher_divergences_on_16_bit_heads(div, extra, dtype, gtol):
    """16-bit heads on the triton kernels: a 16-bit dz (fp16's per-row scale multiplies the teacher's delta
    too: a small distill_coef keeps that scale far from 1, and leaving delta unscaled fails here); the loss
    fp32-accurate, the gradients within the dtype's rounding, against the naive backend on float64 copies
    of the rounded inputs."""
    from gro_kernels import gro_loss

    x, targets = _teacher_batch()
    x = {k: v.to(dtype) for k, v in x.items() if k != "bias" and k != "teacher_bias"}
    got, want = [], []
    for cast, out, backend in ((lambda t: t, got, "triton"), (lambda t: t.double(), want, "naive")):
        h, w = cast(x["hidden"]).clone().requires_grad_(), cast(x["weight"]).clone().requires_grad_()
        res = gro_loss(h, w, targets, method="distill", divergence=div, distill_coef=0.01, backend=backend,
                       teacher_hidden=cast(x["teacher_hidden"]), teacher_weight=cast(x["teacher_weight"]),
                       backend_options=SMALL if backend == "triton" else None, **extra)
        out += [res.loss.detach().double(), *(g.double() for g in torch.autograd.grad(res.loss, (h, w)))]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1:], want[1:]):
        assert float((a - b).abs().max() / b.abs().max()) < gtol
