"""Inputs that used to give a silently wrong number (NaN, inf, 0) now give a finite, correct loss or
a clear error naming the argument. Each case reproduced on the code before this test was added."""
import math

import pytest
import torch

from gro_kernels import gro_loss

from helpers_objective import plain_token_logp, tiny_batch


def _grpo_inputs(rewards, dtype=torch.float64):
    b = tiny_batch(B=4, dtype=dtype)
    return b, dict(method="grpo", kl_coef=0.0, backend="torch", group_ids=torch.tensor([0, 0, 1, 1]),
                   rewards=torch.tensor(rewards, dtype=torch.float32))


def test_zero_std_eps_with_a_constant_group_gives_zero_weight_not_nan():
    # group 0 has equal rewards (no direction), group 1 differs
    b, kw = _grpo_inputs([1.0, 1.0, 0.0, 2.0])
    out = gro_loss(b.hidden, b.weight, b.targets, std_eps=0.0, **kw)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(b.weight.grad).all()
    w = out.per_sequence["weights"]
    assert w[:2].tolist() == [0.0, 0.0]
    # group 1: (r - mean) / std with the Bessel-corrected std sqrt(2): -+1/sqrt(2)
    assert torch.allclose(w[2:].double(), torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2), atol=1e-6)


def test_zero_std_eps_with_an_infinite_weight_is_an_error():
    # anchor 'none' with group_std: a constant group's scores differ from the anchor 0 while the std is 0
    b, kw = _grpo_inputs([1.0, 1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="std_eps"):
        gro_loss(b.hidden, b.weight, b.targets, std_eps=0.0, anchor="none", **kw)


def test_zero_std_eps_reinforce_pp_equal_returns_is_finite():
    b, kw = _grpo_inputs([1.0, 1.0, 1.0, 1.0])
    kw.update(method="reinforce_pp", group_ids=None)
    out = gro_loss(b.hidden, b.weight, b.targets, std_eps=0.0, **kw)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(b.weight.grad).all()


@pytest.mark.parametrize("name", ["old_logp", "ref_logp"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_behaviour_or_reference_logp_is_an_error(name, bad):
    b, kw = _grpo_inputs([1.0, 0.0, 0.0, 2.0])
    kw["kl_coef"] = 0.04
    lp = plain_token_logp(b.hidden, b.weight, b.targets).detach()
    given = dict(old_logp=lp + 0.01, ref_logp=lp - 0.01)
    given[name] = given[name].clone()
    given[name][0, 1] = bad
    with pytest.raises(ValueError, match=name):
        gro_loss(b.hidden, b.weight, b.targets, **given, **kw)


def test_non_finite_logp_at_masked_positions_is_fine():
    b, kw = _grpo_inputs([1.0, 0.0, 0.0, 2.0])
    kw["kl_coef"] = 0.04
    lp = plain_token_logp(b.hidden, b.weight, b.targets).detach()
    old, ref = lp.clone(), lp.clone()
    pad = b.targets == -100
    old[pad], ref[pad] = float("nan"), float("-inf")
    out = gro_loss(b.hidden, b.weight, b.targets, old_logp=old, ref_logp=ref, **kw)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("n", [float("inf"), float("nan"), torch.tensor(float("inf"))])
def test_num_items_in_batch_must_be_finite(n):
    b, kw = _grpo_inputs([1.0, 0.0, 0.0, 2.0])
    kw["method"] = "dapo"
    with pytest.raises(ValueError, match="num_items_in_batch"):
        gro_loss(b.hidden, b.weight, b.targets, num_items_in_batch=n, **kw)


def test_huge_rewards_keep_their_weights():
    """Rewards near 1e30 overflowed the float32 group std (to inf) and silently got weight 0.
    The weights are scale-free: rewards * 1e30 give the weights of the rewards themselves."""
    b, kw = _grpo_inputs([1.0, 3.0, 0.5, 2.0], dtype=torch.float32)
    small = gro_loss(b.hidden, b.weight, b.targets, std_eps=0.0, **kw).per_sequence["weights"]
    kw["rewards"] = kw["rewards"] * 1e30
    big = gro_loss(b.hidden, b.weight, b.targets, std_eps=0.0, **kw).per_sequence["weights"]
    assert torch.allclose(big, small, rtol=1e-5), (big, small)
    assert (big.abs() > 0.5).all()


def test_rewards_whose_weights_overflow_are_an_error():
    # RLOO (no scale to bring it back): 3e38 minus its leave-one-out anchor -1e38 overflows float32
    b, kw = _grpo_inputs([3e38, -3e38, 0.0, 0.0], dtype=torch.float32)
    kw.update(method="rloo", group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow"):
        gro_loss(b.hidden, b.weight, b.targets, **kw)


def _method_inputs(method, B, T):
    """The inputs `method` needs, from its preset (rewards, groups, labels, baselines, reference)."""
    from gro_kernels.objective.options import PRESETS
    p = PRESETS[method]
    kw = {}
    if p["score"] in ("reward", "token_return"):
        kw["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.0])[:B]
    if p["anchor"] in ("group_mean", "leave_one_out", "pair") or p["scale"] in ("group_std", "nonzero_fraction"):
        kw["group_ids"] = torch.tensor([0, 0, 1, 1])[:B]
    if p["separation"] == "label":
        kw["labels"] = torch.tensor([1, -1, 1, -1])[:B]
    if p["anchor"] == "baseline":
        kw["baselines"] = torch.zeros(B)
    if p["score"] == "implicit" or method == "grpo":
        kw["ref_logp"] = torch.zeros(B, T)
    if method == "kto":
        kw["anchor_value"] = 0.2
    return kw


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("empty", ["no_tokens", "all_ignored"])
@pytest.mark.parametrize("method", __import__("gro_kernels").METHODS)
def test_empty_inputs_give_zero_loss_and_zero_gradients(method, empty, backend):
    # targets [B, 0] (reinforce_pp raised an IndexError) or every token ignored: loss 0, gradients
    # 0, nothing NaN, for every method (a pair of empty completions reported DPO's log 2, IPO's 25).
    B, d, V = 4, 3, 7
    T = 0 if empty == "no_tokens" else 3
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=g).requires_grad_()
    w = torch.randn(V, d, generator=g).requires_grad_()
    y = torch.full((B, T), -100, dtype=torch.long)
    kw = _method_inputs(method, B, T)
    if method == "distill":  # a teacher head of another hidden size
        kw.update(teacher_hidden=torch.randn(B, T, 5, generator=g), teacher_weight=torch.randn(V, 5, generator=g))
    out = gro_loss(h, w, y, method=method, backend=backend, return_entropy=True, **kw)
    dh, dw = torch.autograd.grad(out.loss, (h, w), allow_unused=True)
    assert out.loss.item() == 0.0
    assert dh is None or (dh == 0).all()
    assert dw is None or (dw == 0).all()
    for k, v in out.metrics.items():
        assert torch.isfinite(v).all(), k
