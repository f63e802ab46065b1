"""The head options of issue 17: soft cap, per-sequence / per-token temperature, the sampler's
truncated distribution (top_k, top_p, min_p), on every path.

The reference below is written here from the definitions, in float64, the way vLLM's sampler
processes logits (soft cap, temperature, min_p, then top_k and top_p by sorting each row in
ascending order, the cumulative-mass mask `cumsum <= 1 - p` with the largest token always kept),
with no gro_kernels code: log-prob, entropy, KL to an untruncated reference head and lse of the
renormalized kept set, gradients by autograd with the kept set held constant.
"""
from __future__ import annotations

import math

import pytest
import torch

from gro_kernels import GROLoss, gro_loss, gro_objective, token_logprobs
from gro_kernels.logprobs import transform

IGNORE = -100
B, T, D, V = 3, 5, 8, 300


def vllm_keep(u, top_k, top_p, min_p):
    """Bool [n, V] kept set of each row of the processed logits u (float64), vLLM's order."""
    n, vocab = u.shape
    keep = torch.ones_like(u, dtype=torch.bool)
    for i in range(n):
        row = u[i].clone()
        if min_p[i] > 0:
            probs = torch.softmax(row, 0)
            row[probs < min_p[i] * probs.max()] = -math.inf
        if 0 < top_k[i] < vocab:
            srt = torch.sort(row).values                      # ascending
            row[row < srt[vocab - top_k[i]]] = -math.inf
        if top_p[i] < 1:
            srt, idx = torch.sort(row)
            cum = torch.softmax(srt, 0).cumsum(0)
            drop = cum <= 1 - top_p[i]
            drop[-1] = False
            row[idx[drop]] = -math.inf
        keep[i] = row > -math.inf
    return keep


def reference(h, w, y, *, temp, cap=None, top_k=None, top_p=None, min_p=None, bias=None, rh=None, rw=None):
    """float64 (logp, entropy, kl, lse) [N] (0 at ignored), differentiable in h, w, bias."""
    n = y.shape[0]
    z = h @ w.T + (0 if bias is None else bias)
    s = z if cap is None else cap * torch.tanh(z / cap)
    u = s / temp[:, None]
    full = lambda x, v: torch.full((n,), v) if x is None else x  # noqa: E731
    keep = vllm_keep(u.detach(), full(top_k, 0), full(top_p, 1.0), full(min_p, 0.0))
    valid = y != IGNORE
    ys = y.clamp(min=0)
    keep[torch.arange(n), ys] = True                           # a target outside the kept set joins it
    um = u.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(um, 1)
    logq = torch.where(keep, um - lse[:, None], torch.zeros_like(um))
    q = torch.where(keep, torch.exp(logq), torch.zeros_like(um))
    logp = logq.gather(1, ys[:, None])[:, 0]
    ent = -(q * logq).sum(1)
    kl = None
    if rh is not None:
        zr = rh @ rw.T
        ur = (zr if cap is None else cap * torch.tanh(zr / cap)) / temp[:, None]
        kl = (q * (logq - torch.log_softmax(ur, 1))).sum(1)
    zero = torch.zeros((), dtype=z.dtype)
    pick = lambda t: None if t is None else torch.where(valid, t, zero)  # noqa: E731
    return pick(logp), pick(ent), pick(kl), pick(lse), keep


def inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = scale * torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    bias = 0.5 * torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = IGNORE
    y[2, 4] = IGNORE
    rh = h + 0.2 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    rw = w + 0.2 * torch.randn(V, D, generator=g, dtype=torch.float64)
    temp = 0.6 + torch.rand(B, T, generator=g, dtype=torch.float64)
    coefs = torch.randn(4, B, T, generator=g, dtype=torch.float64)
    return h, w, bias, y, rh, rw, temp, coefs


def per_token(x, like):
    """A scalar / [B] / [B,T] option as the reference's flat per-token tensor."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        return torch.full((like.numel(),), x)
    return (x[:, None].expand(B, T) if x.dim() == 1 else x).reshape(-1)


CONFIGS = {
    "softcap": dict(softcap=2.5),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.05),
    "top_k_rows": dict(top_k=torch.tensor([1, 0, 40])),                      # [B]; 0: that row untruncated
    "all_rows": dict(softcap=3.0, top_k=torch.tensor([20, 0, 60]), top_p=torch.tensor([0.9, 0.7, 1.0]),
                     min_p=torch.tensor([0.0, 0.02, 0.01])),
    "top_p_wide": dict(top_p=0.999),     # most of the vocabulary: the candidate search grows to a full sort
}


def run_ours(backend, cfg, temp_kind, chunk, *, kl=True):
    h, w, bias, y, rh, rw, temp, coefs = inputs()
    temperature = {"float": 0.8, "rows": temp[:, 0], "tokens": temp}[temp_kind]
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, bias))
    extra = dict(ref_hidden=rh, ref_weight=rw) if kl else {}
    st = token_logprobs(hh, ww, y, bias=bb, temperature=temperature, return_entropy=True, backend=backend,
                        **({"chunk_elements": chunk} if backend != "naive" else {}), **extra, **cfg)
    a, b, c, e = coefs
    loss = (a * st.logp + b * st.entropy + e * st.lse).sum() + ((c * st.kl).sum() if kl else 0)
    loss.backward()
    return st, (hh.grad, ww.grad, bb.grad)


def run_reference(cfg, temp_kind, *, kl=True):
    h, w, bias, y, rh, rw, temp, coefs = inputs()
    tflat = {"float": torch.full((B * T,), 0.8, dtype=torch.float64), "rows": temp[:, :1].expand(B, T).reshape(-1),
             "tokens": temp.reshape(-1)}[temp_kind]
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, bias))
    d = D
    logp, ent, klv, lse, keep = reference(
        hh.reshape(-1, d), ww, y.reshape(-1), temp=tflat, cap=cfg.get("softcap"), bias=bb,
        top_k=per_token(cfg.get("top_k"), y), top_p=per_token(cfg.get("top_p"), y), min_p=per_token(cfg.get("min_p"), y),
        rh=rh.reshape(-1, d) if kl else None, rw=rw if kl else None)
    a, b, c, e = (x.reshape(-1) for x in coefs)
    loss = (a * logp + b * ent + e * lse).sum() + ((c * klv).sum() if kl else 0)
    loss.backward()
    shape = (B, T)
    out = dict(logp=logp.reshape(shape), entropy=ent.reshape(shape), lse=lse.reshape(shape),
               kl=None if klv is None else klv.reshape(shape))
    return out, (hh.grad, ww.grad, bb.grad), keep


def close(a, b, tol=1e-9, what=""):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_token_logprobs_against_the_sort_based_reference(cfg, backend, monkeypatch):
    # Tiny candidate lists: the torch backend's kept-set search must grow them (x4) before it resolves.
    monkeypatch.setattr(transform, "FIRST_CANDIDATES", 2)
    temp_kind = {"softcap": "tokens", "top_k_rows": "rows", "all_rows": "tokens"}.get(cfg, "float")
    st, grads = run_ours(backend, CONFIGS[cfg], temp_kind, chunk=4 * V)
    want, want_grads, keep = run_reference(CONFIGS[cfg], temp_kind)
    for k in ("logp", "entropy", "kl", "lse"):
        close(getattr(st, k), want[k], what=k)
    for name, g, r in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        close(g, r, what=name)
    if cfg not in ("softcap",):
        kept = keep.sum(1)
        assert kept.min() >= 1 and (kept < V).any(), "the case must truncate"


def test_truncated_cases_are_not_degenerate():
    # Each truncating config keeps a strict subset on some rows and more than one token on others.
    for name, cfg in CONFIGS.items():
        if name == "softcap":
            continue
        _, _, keep = run_reference(cfg, "float", kl=False)
        sizes = keep.sum(1)
        assert (sizes < V).any() and (sizes > 1).any(), name


def test_target_outside_the_kept_set_joins_it():
    # top_k=1: only the argmax is kept; a target elsewhere gets log q over {argmax, target}, finite.
    h, w, bias, y, *_ = inputs()
    z = h @ w.T + bias
    st = token_logprobs(h, w, y, bias=bias, top_k=1, return_entropy=True, backend="torch")
    top = z.argmax(-1)
    valid = y != IGNORE
    zy = z.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    zt = z.max(-1).values
    outside = valid & (y != top)
    assert outside.sum() >= 5
    want = torch.where(y == top, torch.zeros_like(zy), zy - torch.logaddexp(zy, zt))
    close(st.logp[valid], want[valid], what="logp")
    assert torch.isfinite(st.entropy).all() and (st.logp <= 0).all()
    # entropy of the two-token distribution where the target is outside, 0 where it is the argmax
    q = torch.sigmoid(zy - zt)
    ent2 = -(q * torch.log(q) + (1 - q) * torch.log1p(-q))
    close(st.entropy[valid], torch.where(outside, ent2, torch.zeros_like(ent2))[valid], what="entropy")


def test_ties_at_the_boundary_are_kept_together():
    z = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    tf = transform.Transform(top_k=torch.tensor([2]))
    tau = transform.kept_threshold(z, tf)
    assert tau.tolist() == [2.0]  # the 2nd largest ties with two more: all three kept
    tf = transform.Transform(top_p=torch.tensor([0.5], dtype=torch.float64))
    p = torch.softmax(z[0], 0)
    assert p[0] < 0.5 < p[0] + p[1]
    assert transform.kept_threshold(z, tf).tolist() == [2.0]


def test_no_truncation_options_are_the_full_distribution():
    h, w, bias, y, *_ = inputs()
    full = token_logprobs(h, w, y, bias=bias, return_entropy=True, backend="torch")
    for kw in (dict(top_k=0), dict(top_k=-1), dict(top_k=V), dict(top_p=1.0), dict(min_p=0.0)):
        st = token_logprobs(h, w, y, bias=bias, return_entropy=True, backend="torch", **kw)
        assert torch.equal(st.logp, full.logp) and torch.equal(st.entropy, full.entropy), kw


def test_softcap_keeps_minus_inf_logits_masked():
    # A padded vocabulary masked by a -inf bias: with the soft cap the padded rows stay out (Gemma's own
    # c tanh(z / c) would give them -c), so the numbers equal a head without those rows.
    h, w, bias, y, *_ = inputs()
    y = y.clamp(max=V - 11).masked_fill(y == IGNORE, IGNORE)
    pad_bias = bias.clone()
    pad_bias[-10:] = -math.inf
    for backend in ("naive", "torch"):
        got = token_logprobs(h, w, y, bias=pad_bias, softcap=2.0, backend=backend)
        want = token_logprobs(h, w[:-10], y, bias=bias[:-10], softcap=2.0, backend=backend)
        close(got.logp, want.logp, what=backend)
        close(got.lse, want.lse, what=backend)


@pytest.mark.parametrize("method,extra", [("dapo", {}), ("grpo", dict(entropy_coef=0.02)), ("sft", {}),
                                          ("dpo", {})])
def test_gro_loss_one_pass_and_two_pass_with_every_head_option(method, extra):
    """gro_loss (torch: the one pass for token-local presets, two passes for DPO) equals the naive
    composable path, and token_logprobs + gro_objective, with soft cap, per-token temperature, truncation."""
    h, w, bias, y, rh, rw, temp, _ = inputs(seed=3)
    g = torch.Generator().manual_seed(5)
    kw = dict(softcap=2.0, top_k=torch.tensor([0, 25, 60]), top_p=0.85, min_p=0.01)
    opts = dict(temperature=temp, **extra)
    data = {}
    if method in ("dapo", "grpo"):
        data = dict(rewards=torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), group_ids=torch.tensor([0, 0, 0]),
                    old_logp=-torch.rand(B, T, generator=g, dtype=torch.float64))
        if method == "grpo":
            data["ref_logp"] = -torch.rand(B, T, generator=g, dtype=torch.float64)
    if method == "dpo":
        h, w, bias, y = h[:2], w, bias, y[:2]
        temp = temp[:2]
        opts["temperature"] = temp
        kw["top_k"] = kw["top_k"][:2]
        data = dict(labels=torch.tensor([1, -1]), group_ids=torch.tensor([0, 0]),
                    ref_logp=-torch.rand(2, T, generator=g, dtype=torch.float64))
    res = {}
    for backend in ("torch", "naive"):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, bias))
        out = gro_loss(hh, ww, y, bias=bb, method=method, backend=backend, backend_options=None, **kw, **data,
                       **opts)
        res[backend] = (out.loss, *torch.autograd.grad(out.loss, (hh, ww, bb)))
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, bias))
    st = token_logprobs(hh, ww, y, bias=bb, temperature=temp, return_entropy=True, backend="naive", **kw)
    out = gro_objective(st.logp, mask=y != IGNORE, entropy=st.entropy, method=method, **data, **extra)
    res["objective"] = (out.loss, *torch.autograd.grad(out.loss, (hh, ww, bb)))
    for other in ("naive", "objective"):
        for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), res["torch"], res[other]):
            close(a, b, tol=1e-9, what=f"{other} {name}")
    assert res["torch"][2].abs().max() > 1e-4


def test_full_kl_in_the_one_pass_with_truncation_and_temperature():
    h, w, bias, y, rh, rw, temp, _ = inputs(seed=4)
    kw = dict(softcap=3.0, top_p=0.8, temperature=temp)
    data = dict(rewards=torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), group_ids=torch.tensor([0, 0, 0]),
                kl_coef=0.1, kl_estimator="full", entropy_coef=0.01)
    res = []
    for backend in ("torch", "naive"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = gro_loss(hh, ww, y, method="dapo", ref_hidden=rh, ref_weight=rw, backend=backend, **kw, **data)
        res.append((out.loss, *torch.autograd.grad(out.loss, (hh, ww)), out.metrics["kl"]))
    for a, b in zip(*res):
        close(a, b)


def test_gro_loss_module_takes_per_batch_sampler_settings():
    h, w, bias, y, *_ = inputs(seed=6)
    temp = torch.tensor([0.7, 1.0, 1.3], dtype=torch.float64)
    mod = GROLoss("sft", softcap=2.0, top_p=0.9)
    a = mod(h, w, y, temperature=temp, top_k=torch.tensor([5, 0, 9]), backend="torch")
    b = gro_loss(h, w, y, method="sft", softcap=2.0, top_p=0.9, temperature=temp, top_k=torch.tensor([5, 0, 9]),
                 backend="naive")
    close(a.loss, b.loss)
    assert "softcap=2.0" in repr(mod) and "top_p=0.9" in repr(mod)


@pytest.mark.parametrize("kw,match", [
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"), (dict(min_p=-0.1), "min_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(softcap=0.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"), (dict(temperature=torch.ones(4)), "temperature must be"),
    (dict(temperature=torch.tensor([1.0, 0.0, 1.0])), "temperature must be positive"),
    (dict(temperature=torch.ones(3, requires_grad=True)), "temperature is a constant"),
    (dict(top_p=torch.ones(2, 2)), "top_p must be a number or a tensor of shape"),
    (dict(head_precision="fp16"), "head_precision must be one of"),
    (dict(head_precision="tf32"), "tf32"),
    (dict(return_mean_logp=True, top_k=3), "truncated"),
    (dict(class_weight=torch.ones(V)), "return_mean_logp"),
    (dict(return_mean_logp=True, class_weight=torch.ones(V - 1)), "class_weight must have shape"),
    (dict(return_mean_logp=True, class_weight=-torch.ones(V)), "class_weight must be finite and >= 0"),
])
def test_bad_head_options_name_the_argument(kw, match):
    h, w, bias, y, *_ = inputs()
    if "class_weight" in kw:
        kw["class_weight"] = kw["class_weight"].double()
    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs(h, w, y, backend="torch", **kw)


def test_gro_loss_refuses_label_smoothing_where_nothing_reads_it():
    h, w, bias, y, *_ = inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        gro_loss(h, w, y, method="dapo", rewards=torch.ones(3, dtype=torch.float64), group_ids=torch.zeros(3, dtype=torch.long),
                 label_smoothing=0.1, backend="torch")
