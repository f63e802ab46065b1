"""Each knob of gro_objective in isolation, against a hand-computed expectation (docs/objective.md)."""
import math

import pytest
import torch

from gro_kernels.objective import DEFAULTS, METHODS, PRESETS, gro_objective

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def leaf(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (-0.1 - torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()


def weights_of(rewards, B=None, **kw):
    """The per-sequence weights w_i of a plain linear, unscaled REINFORCE configuration."""
    opts = dict(surrogate="logp", weighting="linear", scale="none", loss_agg="seq_mean_token_sum")
    opts.update(kw)
    out = gro_objective(leaf(B or len(rewards), 3), rewards=rewards, **opts)
    return out.per_sequence["weights"]


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=tol, rtol=tol)


# ---- anchors ----------------------------------------------------------------------------------

def test_anchor_group_mean():
    w = weights_of(t(1, 0, 3, 1), anchor="group_mean", group_ids=torch.tensor([0, 0, 1, 1]))
    close(w, t(0.5, -0.5, 1, -1))


def test_anchor_leave_one_out():
    w = weights_of(t(1, 2, 6), anchor="leave_one_out", group_ids=torch.tensor([4, 4, 4]))
    close(w, t(1 - 4, 2 - 3.5, 6 - 1.5))


def test_anchor_batch_mean():
    close(weights_of(t(1, 2, 6), anchor="batch_mean"), t(-2, -1, 3))


def test_anchor_baseline():
    close(weights_of(t(1, 2, 6), anchor="baseline", baselines=t(0.5, 3, 6)), t(0.5, -1, 0))


def test_anchor_pair_with_anchor_separation():
    w = weights_of(t(1, 2, 6, 4), anchor="pair", group_ids=torch.tensor([0, 1, 0, 1]))
    close(w, t(1 - 6, 2 - 4, 6 - 1, 4 - 2))


def test_anchor_constant_and_none():
    close(weights_of(t(1, 2, 6), anchor="constant", anchor_value=2.5), t(-1.5, -0.5, 3.5))
    close(weights_of(t(1, 2, 6), anchor="none"), t(1, 2, 6))


# ---- scales -----------------------------------------------------------------------------------

def test_scale_group_std_is_bessel_corrected_plus_eps():
    r, groups = t(1, 0, 3, 1, 2), torch.tensor([0, 0, 1, 1, 1])
    w = weights_of(r, anchor="group_mean", scale="group_std", group_ids=groups, std_eps=1e-3)
    std0 = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)
    std1 = math.sqrt((1 + 1 + 0) / 2)
    close(w, t(0.5 / (std0 + 1e-3), -0.5 / (std0 + 1e-3), 1 / (std1 + 1e-3), -1 / (std1 + 1e-3), 0))


def test_scale_batch_std():
    w = weights_of(t(1, 2, 6), anchor="batch_mean", scale="batch_std")
    std = math.sqrt((4 + 1 + 9) / 2)
    close(w, t(-2, -1, 3) / (std + 1e-4))


def test_zero_variance_group_gives_exactly_zero_weights():
    r = t(0.1, 0.1, 0.1, 1.0, 0.0, 0.7)
    w = weights_of(r, anchor="group_mean", scale="group_std", group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert (w[:3] == 0).all() and (w[3:] != 0).all()


# ---- separation and coefficients --------------------------------------------------------------

def test_pos_and_neg_coef_scale_by_side_of_anchor():
    w = weights_of(t(1, 0, 3, 1), anchor="group_mean", group_ids=torch.tensor([0, 0, 1, 1]), pos_coef=2.0, neg_coef=0.25)
    close(w, t(1.0, -0.125, 2.0, -0.25))


def test_label_separation_picks_the_coefficient_by_label():
    w = weights_of(t(1, 0, 3), anchor="none", separation="label", labels=torch.tensor([1, -1, -1]), neg_coef=0.5)
    close(w, t(1, 0, 1.5))


# ---- weightings (their gradients against the textbooks are in test_unification) ------------

def test_weighting_constant():
    w = weights_of(None, B=3, score="none", anchor="none", separation="label", weighting="constant",
                   labels=torch.tensor([1, -1, 1]), neg_coef=0.5)
    close(w, t(1, -0.5, 1))


def _pair_logp():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logp, mask  # S = (-3, -2), |y| = (2, 3)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_weighting_sigmoid_with_margin_label_smoothing_and_neg_coef():
    logp, mask = _pair_logp()
    beta, margin, eps, lam = 0.5, 0.2, 0.1, 0.7
    out = gro_objective(logp, mask=mask, method="cpl", group_ids=torch.tensor([0, 0]), labels=torch.tensor([-1, 1]),
                        beta=beta, margin=margin, label_smoothing=eps, neg_coef=lam)
    h = beta * (-2 - lam * -3) - margin  # chosen is row 1
    phi = beta * ((1 - eps) * sigmoid(-h) - eps * sigmoid(h))
    close(out.per_sequence["weights"], t(-lam * phi, phi))
    close(out.loss, -(1 - eps) * math.log(sigmoid(h)) - eps * math.log(sigmoid(-h)))


def test_weighting_sigmoid_length_normalized_carries_one_over_length():
    logp, mask = _pair_logp()
    out = gro_objective(logp, mask=mask, method="simpo", group_ids=torch.tensor([0, 0]), labels=torch.tensor([1, -1]),
                        beta=2.0, margin=0.3)
    h = 2.0 * (-3 / 2 - -2 / 3) - 0.3
    close(out.per_sequence["weights"], t(2.0 * sigmoid(-h) / 2, -2.0 * sigmoid(-h) / 3))


def test_weighting_squared():
    logp, mask = _pair_logp()
    ref = torch.full_like(logp, -1.0)  # D = (-1, 1)
    out = gro_objective(logp, mask=mask, method="ipo", group_ids=torch.tensor([0, 0]), labels=torch.tensor([1, -1]),
                        ref_logp=ref, beta=0.25)
    gap = -1 - 1 - 1 / (2 * 0.25)
    close(out.per_sequence["weights"], t(-2 * gap, 2 * gap))
    close(out.loss, gap ** 2)


def test_weighting_sigmoid_bell():
    logp, mask = _pair_logp()
    ref = torch.full_like(logp, -1.0)  # D = (-1, 1)
    out = gro_objective(logp, mask=mask, method="kto", labels=torch.tensor([1, -1]), ref_logp=ref,
                        beta=0.5, anchor_value=0.2, pos_coef=2.0, neg_coef=3.0)
    u = [0.5 * 1 * (-1 - 0.2), 0.5 * -1 * (1 - 0.2)]
    w = [1 * 2.0 * 0.5 * sigmoid(u[0]) * sigmoid(-u[0]), -1 * 3.0 * 0.5 * sigmoid(u[1]) * sigmoid(-u[1])]
    close(out.per_sequence["weights"], t(*w))
    close(out.loss, (2.0 * (1 - sigmoid(u[0])) + 3.0 * (1 - sigmoid(u[1]))) / 2)


# ---- aggregation ------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
ADV = t(1.0, -2.0, 0.5)


@pytest.mark.parametrize("agg, coef", [
    ("token_mean", lambda m: m / 6),
    ("seq_mean_token_mean", lambda m: m / (3 * m.sum(1, keepdim=True))),
    ("seq_mean_token_sum", lambda m: m / 3),
    ("seq_mean_token_sum_norm", lambda m: m / (3 * 10)),
])
def test_aggregation_coefficients(agg, coef):
    logp = leaf(3, 4)
    norm = dict(max_completion_length=10) if agg == "seq_mean_token_sum_norm" else {}  # read by that one only
    out = gro_objective(logp, mask=MASK, advantages=ADV, surrogate="logp", loss_agg=agg, **norm)
    (g,) = torch.autograd.grad(out.loss, logp)
    c = coef(MASK.to(F64))
    close(g, -c * ADV[:, None])
    close(out.loss, -(c * ADV[:, None] * logp.detach()).sum())


def test_max_completion_length_defaults_to_T():
    logp = leaf(3, 4)
    out = gro_objective(logp, mask=MASK, advantages=ADV, surrogate="logp", loss_agg="seq_mean_token_sum_norm")
    close(torch.autograd.grad(out.loss, logp)[0], -MASK.to(F64) / 12 * ADV[:, None])


def test_num_items_in_batch_makes_gradient_accumulation_exact():
    """Two micro-batches (whole groups each) summed == one batch, under token_mean."""
    logp = leaf(6, 4, seed=3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    old = (logp.detach() + 0.3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64))
    kw = dict(method="dapo", rewards=t(1, 0, 0.5, 0, 1, 1), group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    full = gro_objective(logp, mask=mask, old_logp=old, **kw).loss
    (g_full,) = torch.autograd.grad(full, logp)
    n = int(mask.sum())
    parts = [
        gro_objective(logp[rows], mask=mask[rows], old_logp=old[rows], rewards=kw["rewards"][rows],
                      group_ids=kw["group_ids"][rows], method="dapo", num_items_in_batch=n).loss
        for rows in (slice(0, 3), slice(3, 6))
    ]
    (g_acc,) = torch.autograd.grad(parts[0] + parts[1], logp)
    close(g_acc, g_full)
    close(parts[0] + parts[1], full)
    # Without num_items_in_batch each micro-batch normalizes by its own token count: not exact.
    naive = sum(gro_objective(logp[r], mask=mask[r], old_logp=old[r], rewards=kw["rewards"][r],
                              group_ids=kw["group_ids"][r], method="dapo").loss for r in (slice(0, 3), slice(3, 6)))
    assert not torch.allclose(naive, full)


# ---- KL -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator, k", [
    ("k1", lambda d: d),
    ("k2", lambda d: d ** 2 / 2),
    ("k3", lambda d: math.exp(-d) + d - 1),
])
def test_kl_estimators_in_the_loss(estimator, k):
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    ref = t(-1.5, -1.0)[None]
    out = gro_objective(logp, advantages=t(0.0), kl_coef=0.5, kl_estimator=estimator, ref_logp=ref)
    d = [0.5, -1.0]  # l - lr
    close(out.loss, 0.5 * (k(d[0]) + k(d[1])) / 2)
    close(out.metrics["kl"], (k(d[0]) + k(d[1])) / 2)


def test_kl_full_uses_the_given_exact_kl_with_its_gradient():
    logp = leaf(2, 3)
    kl = torch.rand(2, 3, dtype=F64, requires_grad=True)
    out = gro_objective(logp, advantages=t(0, 0), kl_coef=0.3, kl_estimator="full", kl=kl)
    close(out.loss, 0.3 * kl.detach().mean())
    close(torch.autograd.grad(out.loss, kl)[0], torch.full((2, 3), 0.3 / 6, dtype=F64))


def test_kl_placement_reward_penalizes_the_score_with_the_behaviour_kl():
    logp = leaf(2, 3)
    old = logp.detach() - 0.2
    ref = torch.full((2, 3), -1.0, dtype=F64)
    out = gro_objective(logp, method="reinforce", rewards=t(1, 0), old_logp=old, ref_logp=ref, kl_coef=0.1)
    seq_kl = (old - ref).sum(1)
    close(out.per_sequence["weights"], t(1, 0) - 0.1 * seq_kl)
    # The KL is not also added to the loss.
    close(out.loss, -(out.per_sequence["weights"][:, None] * logp.detach()).sum() / 2)


# ---- surrogates -----------------------------------------------------------------------------

def _ratio_case(ratios, adv, **kw):
    logp = torch.full((1, len(ratios)), -1.0, dtype=F64, requires_grad=True)
    old = logp.detach() - torch.log(t(*ratios))[None]
    out = gro_objective(logp, old_logp=old, advantages=t(*adv)[None], loss_agg="seq_mean_token_sum", **kw)
    (g,) = torch.autograd.grad(out.loss, logp)
    return out, g[0]


def test_ratio_clip_gradient_and_clip_fractions():
    ratios, adv = (0.5, 0.5, 1.5, 1.5, 1.1), (-1.0, 1.0, 1.0, -1.0, 2.0)
    out, g = _ratio_case(ratios, adv, method="gro")
    # clipped (no gradient): rho < 0.8 with A < 0, rho > 1.2 with A > 0; else gradient -rho A
    close(g, t(0, -0.5, 0, 1.5, -2.2))
    close(out.metrics["clip_frac_low"], 1 / 5)
    close(out.metrics["clip_frac_high"], 1 / 5)
    close(out.metrics["clip_frac"], 2 / 5)
    close(out.metrics["ratio_mean"], sum(ratios) / 5)


def test_asymmetric_clip_eps_low_eps_high():
    # 1.25 < 1 + 0.3 with A > 0: unclipped; 0.85 < 1 - 0.1 with A < 0: clipped, no gradient
    _, g = _ratio_case((1.25, 0.85), (1.0, -1.0), method="gro", eps_low=0.1, eps_high=0.3)
    close(g, t(-1.25, 0))
    # 1.35 > 1.3 with A > 0: clipped; 0.95 > 0.9: unclipped
    _, g = _ratio_case((1.35, 0.95), (1.0, -1.0), method="gro", eps_low=0.1, eps_high=0.3)
    close(g, t(0, 0.95))


def test_delta_bounds_the_unclipped_ratio():
    out, g = _ratio_case((3.0, 1.5), (-1.0, -1.0), method="gro", delta=2.0)
    close(out.loss, -(-2.0 + -1.5))  # rho=3 with A<0: min(2 A, 1.2 A) = 2 A, no gradient
    close(g, t(0, 1.5))


def test_sequence_importance_sampling_uses_one_ratio_per_sequence():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64, requires_grad=True)
    old = logp.detach() - t(0.1, 0.3, -0.1)[None]  # mean log-ratio 0.1
    out = gro_objective(logp, old_logp=old, advantages=t(1.0), method="gspo", eps_low=0.5, eps_high=0.5)
    s = math.exp(0.1)
    close(out.metrics["ratio_mean"], s)
    close(out.loss, -s)
    close(torch.autograd.grad(out.loss, logp)[0], -s / 3 * torch.ones(1, 3, dtype=F64))


def test_cispo_detached_clipped_weight():
    logp = torch.full((1, 3), -1.0, dtype=F64, requires_grad=True)
    old = logp.detach() - torch.log(t(0.5, 2.0, 7.0))[None]
    out = gro_objective(logp, old_logp=old, advantages=t(-1.0, 1.0, 2.0)[None], method="cispo")
    close(torch.autograd.grad(out.loss, logp)[0], t(0.5, -2.0, -5.0 * 2.0)[None] / 3)
    close(out.metrics["clip_frac_high"], 1 / 3)


def test_on_policy_without_old_logp_has_ratio_one_and_reinforce_gradient():
    logp = leaf(2, 3)
    out = gro_objective(logp, method="grpo", kl_coef=0.0, rewards=t(1, 0), group_ids=torch.tensor([0, 0]))
    close(out.metrics["ratio_mean"], 1.0)
    A = out.per_sequence["weights"]
    close(torch.autograd.grad(out.loss, logp)[0], -A[:, None].expand(2, 3) / (2 * 3))


def test_entropy_bonus():
    logp = leaf(2, 3)
    H = torch.rand(2, 3, dtype=F64, requires_grad=True)
    base = gro_objective(logp, advantages=t(1, -1), entropy=H).loss
    out = gro_objective(logp, advantages=t(1, -1), entropy=H, entropy_coef=0.01)
    close(out.loss, base - 0.01 * H.detach().mean())
    close(torch.autograd.grad(out.loss, H)[0], torch.full((2, 3), -0.01 / 6, dtype=F64))
    close(out.metrics["entropy"], H.detach().mean())


def test_given_advantages_per_token():
    logp = leaf(2, 3)
    A = torch.randn(2, 3, dtype=F64)
    out = gro_objective(logp, advantages=A, surrogate="logp")
    close(torch.autograd.grad(out.loss, logp)[0], -A / 6)


# ---- presets and options ----------------------------------------------------------------------

def test_presets_table_rows():
    assert set(PRESETS) == set(METHODS)
    assert PRESETS["grpo"]["kl_coef"] == 0.04 and PRESETS["grpo"]["loss_agg"] == "seq_mean_token_mean"
    assert PRESETS["dapo"]["eps_high"] == 0.28 and PRESETS["dapo"]["loss_agg"] == "token_mean"
    assert PRESETS["gspo"]["importance_sampling"] == "sequence"
    assert (PRESETS["gspo"]["eps_low"], PRESETS["gspo"]["eps_high"]) == (3e-4, 4e-4)
    assert PRESETS["cispo"]["eps_high"] == 5.0
    assert PRESETS["rloo"]["anchor"] == "leave_one_out" and PRESETS["remax"]["anchor"] == "baseline"
    assert PRESETS["dr_grpo"]["scale"] == "none" and PRESETS["dr_grpo"]["loss_agg"] == "seq_mean_token_sum_norm"
    assert PRESETS["kto"]["weighting"] == "sigmoid_bell" and PRESETS["ipo"]["weighting"] == "squared"
    assert PRESETS["simpo"]["length_normalize"] is True
    assert DEFAULTS["eps_low"] == DEFAULTS["eps_high"] == 0.2 and DEFAULTS["beta"] == 0.1 and DEFAULTS["kl_coef"] == 0.0


def test_options_override_preset_values():
    r, groups = t(1, 0, 0, 0), torch.tensor([0, 0, 0, 0])
    logp = leaf(4, 3)
    grpo = gro_objective(logp, method="grpo", kl_coef=0.0, rewards=r, group_ids=groups).per_sequence["weights"]
    unscaled = gro_objective(logp, method="grpo", kl_coef=0.0, scale="none", rewards=r, group_ids=groups).per_sequence["weights"]
    close(unscaled, t(0.75, -0.25, -0.25, -0.25))
    close(grpo, unscaled / (0.5 + 1e-4))
    # grpo's own kl_coef (0.04) needs ref_logp; the override to 0 above did not.
    with pytest.raises(ValueError, match="ref_logp"):
        gro_objective(logp, method="grpo", rewards=r, group_ids=groups)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match="klcoef") as err:
        gro_objective(leaf(1, 2), advantages=t(1.0), klcoef=0.1)
    for name in ("kl_coef", "eps_high", "loss_agg", "offline_coef", "length_normalize"):
        assert name in str(err.value)


def test_bad_option_values():
    with pytest.raises(ValueError, match="method"):
        gro_objective(leaf(1, 2), method="ppo2", advantages=t(1.0))
    with pytest.raises(ValueError, match="loss_agg"):
        gro_objective(leaf(1, 2), advantages=t(1.0), loss_agg="mean")
    with pytest.raises(ValueError, match="beta"):
        gro_objective(leaf(1, 2), advantages=t(1.0), beta=0.0)
    with pytest.raises(ValueError, match="anchor='pair'"):
        gro_objective(leaf(2, 2), rewards=t(1.0, 0.0), weighting="sigmoid")
