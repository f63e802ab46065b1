"""Shared fixtures for the objective tests: a tiny LM head batch and a plain-torch reference.

Nothing here calls gro_kernels: the references in the tests are built from these.
"""
from types import SimpleNamespace

import torch

IGNORE = -100


def tiny_batch(seed=0, B=8, T=6, d=12, V=40, dtype=torch.float64):
    """hidden [B,T,d] and weight [V,d] (leaves with grad), targets with padding/prompt ignored,
    a frozen reference head close to the policy, and per-row noise for behaviour log-probs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, d, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 5, 4, 6, 3, 6, 2, 5])[:B].clamp(max=T)
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE  # right padding
    targets[1, 0] = IGNORE                                            # an ignored token mid-row
    ref_hidden = (hidden + 0.1 * torch.randn(B, T, d, generator=g, dtype=dtype)).detach()
    ref_weight = (weight + 0.1 * torch.randn(V, d, generator=g, dtype=dtype)).detach()
    noise = torch.randn(B, T, generator=g, dtype=dtype)
    return SimpleNamespace(hidden=hidden, weight=weight, targets=targets, ref_hidden=ref_hidden,
                           ref_weight=ref_weight, noise=noise, generator=g)


def plain_logprobs(hidden, weight, targets, temperature=1.0):
    """log softmax(W h / T) over the vocabulary, [B,T,V], in plain torch."""
    return torch.log_softmax(hidden @ weight.T / temperature, dim=-1)


def plain_token_logp(hidden, weight, targets, temperature=1.0):
    """Per-token log-prob of the target, 0 where ignored."""
    logprobs = plain_logprobs(hidden, weight, targets, temperature)
    mask = targets != IGNORE
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(mask, picked, torch.zeros_like(picked))


def plain_full_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature=1.0):
    """Exact KL(pi || pi_ref) per position, 0 where ignored."""
    lp = plain_logprobs(hidden, weight, targets, temperature)
    lq = plain_logprobs(ref_hidden, ref_weight, targets, temperature)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return torch.where(targets != IGNORE, kl, torch.zeros_like(kl))


def grads(loss, params):
    return torch.autograd.grad(loss, params)


def pairs(ids, labels):
    """(chosen rows, rejected rows) of each pair."""
    chosen, rejected = [], []
    for gid in ids.unique():
        rows = torch.nonzero(ids == gid).flatten()
        chosen.append(int(rows[labels[rows] == 1]))
        rejected.append(int(rows[labels[rows] == -1]))
    return torch.tensor(chosen), torch.tensor(rejected)


def k3(l, ref):
    """k3 = exp(lr - l) - (lr - l) - 1, the KL estimator of the textbook losses."""
    return torch.exp(ref - l) - (ref - l) - 1


def assert_loss_and_gradients(loss, expected, params, names=("hidden", "weight"), tol=1e-8):
    """loss and its gradients w.r.t. params equal the textbook `expected`'s (which must not be degenerate)."""
    want_grads = grads(expected, params)
    got_grads = grads(loss, params)
    torch.testing.assert_close(loss, expected, atol=tol, rtol=tol)
    for got, want, name in zip(got_grads, want_grads, names):
        assert want.abs().max() > 1e-6, f"degenerate case: textbook gradient w.r.t. {name} is zero"
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda s: f"grad {name}: {s}")
