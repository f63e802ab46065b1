"""Vocabulary rows masked with a -inf bias (padded vocabularies) give the numbers of the head
without those rows, on every backend: statistics, gradients (exactly 0 at the masked rows, never
NaN), `gro_loss` with an entropy bonus, top-entropy selection and the exact KL (issue 15 item 2;
`0 * -inf` in the entropy and KL sums made them NaN). A reference head that masks a row the policy
gives mass to makes the exact KL infinite: an error naming ref_bias.

References: an independent float64 textbook computation over the kept rows (written here), and
`gro_loss` on the head without the masked rows."""
import os

import pytest
import torch

from gro_kernels import gro_loss, token_logprobs
from gro_kernels.objective.inputs import read_inputs

IGNORE = -100
B, T, D, V = 3, 4, 5, 13
MASKED = [2, 5, 6, 12]
KEEP = [v for v in range(V) if v not in MASKED]
HAS_TRITON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()
# (backend, dtype): float64 takes the torch epilogue; the Triton kernels run in float32.
BACKENDS = [("naive", torch.float64), ("torch", torch.float64), ("torch", torch.float32)] + (
    [("triton", torch.float32)] if HAS_TRITON else [])


def heads(ref_masks=MASKED, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x = dict(hidden=torch.randn(B, T, D, generator=g, **f64), weight=torch.randn(V, D, generator=g, **f64),
             bias=0.5 * torch.randn(V, generator=g, **f64))
    x["ref_hidden"] = x["hidden"] + 0.3 * torch.randn(B, T, D, generator=g, **f64)
    x["ref_weight"] = x["weight"] + 0.3 * torch.randn(V, D, generator=g, **f64)
    x["ref_bias"] = x["bias"] + 0.3 * torch.randn(V, generator=g, **f64)
    x["bias"][MASKED] = float("-inf")
    x["ref_bias"][list(ref_masks)] = float("-inf")
    keep = torch.tensor(KEEP)
    targets = keep[torch.randint(0, len(KEEP), (B, T), generator=g)]   # never a masked row
    targets[0, 1] = IGNORE
    coefs = torch.randn(3, B, T, generator=g, **f64)
    return x, targets, coefs


def reduced(x, targets):
    """The same model without the masked rows (targets renumbered)."""
    keep = torch.tensor(KEEP)
    new_id = torch.full((V,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(len(KEEP))
    y = torch.where(targets == IGNORE, targets, new_id[targets.clamp(min=0)])
    return dict(x, weight=x["weight"][keep], bias=x["bias"][keep], ref_weight=x["ref_weight"][keep],
                ref_bias=x["ref_bias"][keep]), y


def textbook(x, targets, coefs, temperature):
    """Float64 statistics over the kept rows and the gradients of sum(a logp + b H + c KL) wrt
    hidden, weight[KEEP], bias[KEEP]; the reference's normalizer runs over its own unmasked rows."""
    h = x["hidden"].clone().requires_grad_()
    w, b = x["weight"][KEEP].clone().requires_grad_(), x["bias"][KEEP].clone().requires_grad_()
    lp = torch.log_softmax((h @ w.T + b) / temperature, -1)
    ref_keep = [v for v in range(V) if x["ref_bias"][v] != float("-inf")]
    lq_all = torch.log_softmax((x["ref_hidden"] @ x["ref_weight"][ref_keep].T + x["ref_bias"][ref_keep]) / temperature, -1)
    lq = lq_all[..., [ref_keep.index(v) for v in KEEP]]   # every kept row is a row of the reference
    p = lp.exp()
    valid = targets != IGNORE
    y = torch.tensor([KEEP.index(int(t)) if t != IGNORE else 0 for t in targets.flatten()]).view(B, T)
    logp = lp.gather(-1, y[..., None])[..., 0] * valid
    ent = -(p * lp).sum(-1) * valid
    kl = (p * (lp - lq)).sum(-1) * valid
    a, bb, c = coefs
    loss = (a * logp + bb * ent + c * kl).sum()
    return (logp, ent, kl), torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize("ref_masks", [MASKED, MASKED[:2]], ids=["same_rows", "fewer_rows"])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_token_logprobs_statistics_and_gradients_ignore_masked_rows(backend, dtype, ref_masks):
    x, targets, coefs = heads(ref_masks)
    temperature = 0.7
    want, (dh_want, dw_want, db_want) = textbook(x, targets, coefs, temperature)
    h, w, b = (x[k].to(dtype).clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    st = token_logprobs(h, w, targets, bias=b, ref_hidden=x["ref_hidden"].to(dtype), ref_weight=x["ref_weight"].to(dtype),
                        ref_bias=x["ref_bias"].to(dtype), temperature=temperature, return_entropy=True,
                        backend=backend, **({} if backend == "naive" else {"chunk_elements": 2 * V}))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for name, got, ref in zip(("logp", "entropy", "kl"), (st.logp, st.entropy, st.kl), want):
        torch.testing.assert_close(got.double(), ref.detach(), **tol, msg=lambda m: f"{name}: {m}")
    a, bb, c = (t.to(dtype) for t in coefs)
    (a * st.logp + bb * st.entropy + c * st.kl).sum().backward()
    for t in (h.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()
    assert (w.grad[MASKED] == 0).all() and (b.grad[MASKED] == 0).all()   # exactly 0, not NaN
    torch.testing.assert_close(h.grad.double(), dh_want, **tol)
    torch.testing.assert_close(w.grad[KEEP].double(), dw_want, **tol)
    torch.testing.assert_close(b.grad[KEEP].double(), db_want, **tol)


LOSSES = [
    ("grpo", dict(entropy_coef=0.05, kl_coef=0.1, kl_estimator="full")),          # one pass
    ("rloo", dict(entropy_coef=0.05, kl_coef=0.1, kl_estimator="full")),          # exact KL in the reward
    ("dapo", dict(top_entropy_quantile=0.5, entropy_coef=0.01)),                  # entropy selects tokens
    ("dpo", dict(entropy_coef=0.05)),                                             # composable path
]


@pytest.mark.parametrize("method,options", LOSSES, ids=[m for m, _ in LOSSES])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_gro_loss_equals_the_head_without_masked_rows(backend, dtype, method, options):
    x, targets, _ = heads()
    if method == "dpo":   # one chosen / rejected pair: the first two rows
        rows, extra = 2, dict(group_ids=torch.tensor([0, 0]), labels=torch.tensor([1, -1]))
    else:
        g = torch.Generator().manual_seed(1)
        rows, extra = B, dict(rewards=torch.tensor([1.0, 0.0, 0.5]), group_ids=torch.zeros(B, dtype=torch.long),
                              old_logp=-2 * torch.rand(B, T, generator=g, dtype=dtype))
    bo = {"chunk_elements": 2 * V} if backend != "naive" else None
    results = []
    for head, y in ((x, targets), reduced(x, targets)):
        h, w, b = (head[k].to(dtype).clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        ref = dict(ref_hidden=head["ref_hidden"][:rows].to(dtype), ref_weight=head["ref_weight"].to(dtype),
                   ref_bias=head["ref_bias"].to(dtype))
        kw = read_inputs(method, {**ref, **extra, **options})  # old_logp, the reference head only where read
        out = gro_loss(h[:rows], w, y[:rows], bias=b, method=method, backend=backend, backend_options=bo,
                       return_entropy=True, **kw)
        assert torch.isfinite(out.loss)
        results.append((out, torch.autograd.grad(out.loss, (h, w, b))))
    (full, (dh, dw, db)), (small, (dh_r, dw_r, db_r)) = results
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.loss, small.loss, **tol)
    assert dh.abs().max() > 1e-4, "degenerate case: zero gradient"
    for k in ("entropy", "kl"):
        if k in small.metrics:
            torch.testing.assert_close(full.metrics[k], small.metrics[k], **tol)
    torch.testing.assert_close(dh, dh_r, **tol)
    torch.testing.assert_close(dw[KEEP], dw_r, **tol)
    torch.testing.assert_close(db[KEEP], db_r, **tol)
    assert (dw[MASKED] == 0).all() and (db[MASKED] == 0).all()


@pytest.mark.parametrize("backend", [b for b, _ in BACKENDS[::-1] if b != "torch"] + ["torch"])
def test_reference_masking_a_row_the_policy_keeps_is_an_error(backend):
    # KL(policy || reference) is +inf when the reference gives probability 0 to a token the policy
    # does not: refused up front, naming ref_bias (never NaN, never a silently infinite loss).
    x, targets, _ = heads(ref_masks=MASKED + [0])
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = {k: v.to(dtype) for k, v in x.items()}
    with pytest.raises(ValueError, match="ref_bias"):
        token_logprobs(x["hidden"], x["weight"], targets, bias=x["bias"], ref_hidden=x["ref_hidden"],
                       ref_weight=x["ref_weight"], ref_bias=x["ref_bias"], backend=backend)
    with pytest.raises(ValueError, match="ref_bias"):
        gro_loss(x["hidden"].requires_grad_(), x["weight"], targets, bias=x["bias"], method="grpo", backend=backend,
                 rewards=torch.tensor([1.0, 0.0, 0.5]), group_ids=torch.zeros(B, dtype=torch.long),
                 kl_estimator="full", ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"], ref_bias=x["ref_bias"])


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_a_target_in_a_masked_row_is_an_error(backend):
    # Its log-prob is -inf (log 0): token_logprobs reports it; a loss on it is refused, naming targets.
    x, targets, _ = heads()
    targets[1, 2] = MASKED[1]
    st = token_logprobs(x["hidden"], x["weight"], targets, bias=x["bias"], return_entropy=True, backend=backend)
    assert st.logp[1, 2] == float("-inf") and torch.isfinite(st.entropy).all()
    with pytest.raises(ValueError, match="targets"):
        gro_loss(x["hidden"].requires_grad_(), x["weight"], targets, bias=x["bias"], method="sft", backend=backend)
