"""Issue 19's preference and distillation losses against the peer libraries themselves, on the same inputs.

TRL 1.16: ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss (called on stand-in trainers, with
TRL's own get_batch_logps and the chosen rows' cross-entropy, as TRL's encoder-decoder branch forms
them: completion tokens only), GKDTrainer.generalized_jsd_loss, and DistillationTrainer's
hidden-state `_chunked_divergence_loss` (float32 inside: matched to 1e-6). Liger-Kernel 0.8.5: LigerFusedLinearORPOLoss,
LigerFusedLinearCPOLoss and LigerFusedLinearJSDLoss (hidden states in, loss out). Each is imported
with importorskip. TRL works in the inputs' float64 (matched to 1e-10); Liger computes in float32
(matched to 1e-5 relative).
"""
import os
from types import SimpleNamespace

import pytest
import torch

from gro_kernels.loss import gro_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
P, T, D, DT, V = 3, 5, 8, 6, 24          # pairs, tokens, student / teacher hidden sizes, vocabulary
TRL_TOL = dict(rtol=1e-10, atol=1e-12)
LIGER_TOL = dict(rtol=1e-5, atol=1e-6)


def _pairs(seed=0, dtype=torch.float64):
    """2P rows, chosen first then rejected (TRL's and Liger's concatenated layout), padded completions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, D, generator=g, dtype=dtype)
    weight = 0.5 * torch.randn(V, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (2 * P, T), generator=g)
    targets[1, 3:] = -100
    targets[4, 2:] = -100
    group_ids = torch.arange(2 * P) % P
    labels = torch.where(torch.arange(2 * P) < P, 1, -1)
    return hidden, weight, targets, group_ids, labels


def _gro(method, hidden, weight, targets, group_ids, labels, backend="naive", **options):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = gro_loss(h, w, targets, method=method, group_ids=group_ids, labels=labels, backend=backend, **options)
    return out.loss, torch.autograd.grad(out.loss, (h, w))


def _check(got, want, tol):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    torch.testing.assert_close(loss_a, loss_b.to(loss_a.dtype), **tol)
    for a, b in zip(grads_a, grads_b):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b.to(a.dtype), **tol)


# ---- TRL: ORPO and CPO loss code ----------------------------------------------------------------

def _trl_pref(trainer_cls, loss_fn, hidden, weight, targets, average, nll_coef, sign):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.T
    # (TRL's encoder-decoder branch writes 0 over the -100 labels in place: give it a copy)
    logps = trainer_cls.get_batch_logps(logits, targets.clone(), average_log_prob=average, is_encoder_decoder=True)
    nll = torch.nn.CrossEntropyLoss()(logits[:P].reshape(-1, V), targets[:P].reshape(-1))
    losses = loss_fn(logps[:P], logps[P:])[0]
    loss = nll_coef * nll + sign * losses.mean()
    return loss, torch.autograd.grad(loss, (h, w))


def test_orpo_against_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    hidden, weight, targets, group_ids, labels = _pairs()
    stand_in = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    fn = lambda c, r: orpo.ORPOTrainer.odds_ratio_loss(stand_in, c, r)  # noqa: E731
    # TRL: loss = NLL(chosen) - mean(beta log sigma(log odds ratio)); its log-probs are float32 (.float())
    want = _trl_pref(orpo.ORPOTrainer, fn, hidden, weight, targets, True, 1.0, -1.0)
    got = _gro("orpo", hidden, weight, targets, group_ids, labels, beta=0.25)
    _check(got, want, dict(rtol=1e-6, atol=1e-7))


@pytest.mark.parametrize("loss_type, options", [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}),
                                                 ("simpo", {"length_normalize": True, "margin": 0.4})])
def test_cpo_against_trl(loss_type, options):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    hidden, weight, targets, group_ids, labels = _pairs(seed=1)
    beta = 0.5 if loss_type == "simpo" else 0.2
    stand_in = SimpleNamespace(beta=beta, alpha=0.0, label_smoothing=options.get("label_smoothing", 0.0),
                               loss_type=loss_type, simpo_gamma=options.get("margin", 0.0),
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    fn = lambda c, r: cpo.CPOTrainer.cpo_loss(stand_in, c, r)  # noqa: E731
    want = _trl_pref(cpo.CPOTrainer, fn, hidden, weight, targets, loss_type == "simpo", 0.7, 1.0)
    for backend in ("naive", "torch"):
        got = _gro("cpo", hidden, weight, targets, group_ids, labels, backend=backend, beta=beta, nll_coef=0.7,
                   **options)
        _check(got, want, TRL_TOL)


# ---- Liger: fused ORPO and CPO ------------------------------------------------------------------

def _liger(module, hidden, weight, targets):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = module(w, h, targets)[0]
    return loss, torch.autograd.grad(loss, (h, w))


def test_orpo_against_liger():
    liger = pytest.importorskip("liger_kernel.chunked_loss.orpo_loss")
    hidden, weight, targets, group_ids, labels = _pairs(seed=2)
    want = _liger(liger.LigerFusedLinearORPOLoss(beta=0.3, compiled=False), hidden, weight, targets)
    got = _gro("orpo", hidden, weight, targets, group_ids, labels, beta=0.3)
    _check(got, want, LIGER_TOL)


@pytest.mark.parametrize("kwargs, options", [({}, {}), ({"alpha": 0.5, "label_smoothing": 0.2},
                                                        {"nll_coef": 0.5, "label_smoothing": 0.2}),
                                              ({"average_log_prob": True}, {"length_normalize": True})])
def test_cpo_against_liger(kwargs, options):
    liger = pytest.importorskip("liger_kernel.chunked_loss.cpo_loss")
    hidden, weight, targets, group_ids, labels = _pairs(seed=3)
    want = _liger(liger.LigerFusedLinearCPOLoss(beta=0.4, compiled=False, **kwargs), hidden, weight, targets)
    got = _gro("cpo", hidden, weight, targets, group_ids, labels, backend="torch", beta=0.4, **options)
    _check(got, want, LIGER_TOL)


# ---- distillation: Liger's fused JSD, TRL's GKD loss and DistillationTrainer's chunked loss ----

def _heads(seed=4, dtype=torch.float64, n=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, D, generator=g, dtype=dtype)
    weight = 0.7 * torch.randn(V, D, generator=g, dtype=dtype)
    t_hidden = torch.randn(1, n, DT, generator=g, dtype=dtype)
    t_weight = 0.7 * torch.randn(V, DT, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (1, n), generator=g)
    targets[0, 3] = targets[0, 7] = -100
    return hidden, weight, t_hidden, t_weight, targets


def _distill(hidden, weight, t_hidden, t_weight, targets, backend="naive", **options):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = gro_loss(h, w, targets, method="distill", teacher_hidden=t_hidden, teacher_weight=t_weight,
                   backend=backend, **options)
    return out.loss, torch.autograd.grad(out.loss, (h, w))


def _options(beta):
    return {"divergence": "jsd", "jsd_beta": beta}


BETAS = [0.0, 0.3, 0.5, 1.0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_against_liger(beta, temperature, backend):
    liger = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    if backend == "triton":   # the kernels' forward KL (beta 0), JSD, reverse KL (beta 1); the CPU under the interpreter
        pytest.importorskip("triton")
    # float32 for triton: float64 inputs always take the torch epilogue
    hidden, weight, t_hidden, t_weight, targets = _heads(dtype=torch.float32 if backend == "triton" else torch.float64)
    peer = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                         temperature=temperature, compiled=False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = peer(h[0], w, t_hidden[0], t_weight, targets[0])
    want = (loss, torch.autograd.grad(loss, (h, w)))
    got = _distill(hidden, weight, t_hidden, t_weight, targets, backend=backend, temperature=temperature,
                   **_options(beta))
    _check(got, want, LIGER_TOL)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_against_trl_gkd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    hidden, weight, t_hidden, t_weight, targets = _heads(seed=5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = gkd.GKDTrainer.generalized_jsd_loss(h @ w.T, (t_hidden @ t_weight.T), labels=targets, beta=beta,
                                               temperature=1.5)
    want = (loss, torch.autograd.grad(loss, (h, w)))
    for backend in ("naive", "torch"):
        got = _distill(hidden, weight, t_hidden, t_weight, targets, backend=backend, temperature=1.5, **_options(beta))
        _check(got, want, TRL_TOL)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_against_trl_distillation_trainer(beta):
    dist = pytest.importorskip("trl.trainer.distillation_trainer")
    hidden, weight, t_hidden, t_weight, targets = _heads(seed=6)
    mask = (targets != -100).long()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = dist._chunked_divergence_loss(h, t_hidden, w, t_weight, mask, beta, temperature=0.8)[0]
    want = (loss, torch.autograd.grad(loss, (h, w)))
    got = _distill(hidden, weight, t_hidden, t_weight, targets, backend="torch", temperature=0.8, **_options(beta))
    _check(got, want, dict(rtol=1e-6, atol=1e-7))   # its chunked kernel computes in float32
