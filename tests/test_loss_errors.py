"""Bad input is a clear error naming the argument; degenerate input is finite (docs/options.md, Inputs)."""
import pytest
import torch

from gro_kernels.loss import GROLoss, gro_loss
from gro_kernels.objective import gro_objective
from gro_kernels.objective.inputs import read_inputs

from helpers_objective import IGNORE, tiny_batch

F64 = torch.float64
B, T = 4, 3


def good():
    """A valid gro_objective call for method='gro' (kl_coef=0: no reference needed)."""
    return dict(
        logp=-torch.rand(B, T, dtype=F64), rewards=torch.tensor([1.0, 0.0, 0.5, 0.2], dtype=F64),
        group_ids=torch.tensor([0, 0, 1, 1]),
    )


def call(method="gro", **changes):
    kw = good()
    if method in ("remax", "kto"):  # they read no groups (refused)
        kw.pop("group_ids")
    kw.update(changes)
    return gro_objective(kw.pop("logp"), method=method, **kw)


def test_the_good_call_works():
    assert torch.isfinite(call().loss)


BAD = [  # (id, error type, argument named in the message, method, changed inputs)
    ("logp 1-D", ValueError, "logp", "gro", dict(logp=-torch.rand(B, dtype=F64))),
    ("logp int", TypeError, "logp", "gro", dict(logp=torch.zeros(B, T, dtype=torch.long))),
    ("mask shape", ValueError, "mask", "gro", dict(mask=torch.ones(B, T + 1, dtype=torch.bool))),
    ("mask values", ValueError, "mask", "gro", dict(mask=torch.full((B, T), 2))),
    ("rewards shape", ValueError, "rewards", "gro", dict(rewards=torch.ones(B + 1, dtype=F64))),
    ("rewards 2-D", ValueError, "rewards", "gro", dict(rewards=torch.ones(B, T, dtype=F64))),
    ("rewards nan", ValueError, "rewards", "gro", dict(rewards=torch.tensor([1.0, float("nan"), 0, 0], dtype=F64))),
    ("rewards inf", ValueError, "rewards", "gro", dict(rewards=torch.tensor([1.0, float("inf"), 0, 0], dtype=F64))),
    ("rewards list", TypeError, "rewards", "gro", dict(rewards=[1.0, 0.0, 0.5, 0.2])),
    ("group_ids float", TypeError, "group_ids", "gro", dict(group_ids=torch.tensor([0.0, 0, 1, 1]))),
    ("group_ids shape", ValueError, "group_ids", "gro", dict(group_ids=torch.tensor([0, 0, 1]))),
    ("old_logp shape", ValueError, "old_logp", "gro", dict(old_logp=torch.zeros(B, T + 1, dtype=F64))),
    ("old_logp int", TypeError, "old_logp", "gro", dict(old_logp=torch.zeros(B, T, dtype=torch.long))),
    ("ref_logp shape", ValueError, "ref_logp", "gro", dict(ref_logp=torch.zeros(B - 1, T, dtype=F64))),
    ("entropy shape", ValueError, "entropy", "gro", dict(entropy=torch.zeros(B, 1, dtype=F64))),
    ("kl shape", ValueError, "kl", "gro", dict(kl=torch.zeros(T, B, dtype=F64))),
    ("offline shape", ValueError, "offline", "gro", dict(offline=torch.zeros(B + 2, dtype=torch.bool))),
    ("offline float", TypeError, "offline", "gro", dict(offline=torch.zeros(B, dtype=F64) + 0.5)),
    ("advantages shape", ValueError, "advantages", "gro", dict(rewards=None, advantages=torch.zeros(B, T + 1, dtype=F64))),
    ("advantages and rewards", ValueError, "advantages", "gro", dict(advantages=torch.zeros(B, dtype=F64))),
    ("advantages nan", ValueError, "advantages", "gro", dict(rewards=None, advantages=torch.full((B,), float("nan"), dtype=F64))),
    ("baselines shape", ValueError, "baselines", "remax", dict(baselines=torch.zeros(B + 1, dtype=F64))),
    ("baselines unused", ValueError, "baselines", "grpo", dict(baselines=torch.zeros(B, dtype=F64), kl_coef=0.0)),
    ("labels values", ValueError, "labels", "kto", dict(labels=torch.tensor([1, 0, -1, 1]), ref_logp=torch.zeros(B, T, dtype=F64))),
    ("labels shape", ValueError, "labels", "kto", dict(labels=torch.tensor([1, -1]), ref_logp=torch.zeros(B, T, dtype=F64))),
    ("num_items_in_batch", ValueError, "num_items_in_batch", "gro", dict(num_items_in_batch=0)),
    ("num_items_in_batch agg", ValueError, "num_items_in_batch", "grpo", dict(num_items_in_batch=10, kl_coef=0.0)),
    # groups too small, malformed pairs
    ("leave_one_out singleton", ValueError, "group_ids", "rloo", dict(group_ids=torch.tensor([0, 0, 0, 1]))),
    ("pair of three", ValueError, "group_ids", "cpl", dict(rewards=None, group_ids=torch.tensor([0, 0, 0, 1]),
                                                           labels=torch.tensor([1, -1, 1, -1]))),
    ("pair two chosen", ValueError, "labels", "cpl", dict(rewards=None, group_ids=torch.tensor([0, 0, 1, 1]),
                                                          labels=torch.tensor([1, 1, 1, -1]))),
    # inputs a method needs
    ("grpo without rewards", ValueError, "rewards", "grpo", dict(rewards=None, kl_coef=0.0)),
    ("grpo without group_ids", ValueError, "group_ids", "grpo", dict(group_ids=None, kl_coef=0.0)),
    ("grpo kl without ref", ValueError, "ref_logp", "grpo", {}),
    ("remax without baselines", ValueError, "baselines", "remax", {}),
    ("dpo without labels", ValueError, "labels", "dpo", dict(rewards=None, ref_logp=torch.zeros(B, T, dtype=F64))),
    ("dpo without ref", ValueError, "ref_logp", "dpo", dict(rewards=None, labels=torch.tensor([1, -1, 1, -1]))),
    ("kto without labels", ValueError, "labels", "kto", dict(rewards=None, ref_logp=torch.zeros(B, T, dtype=F64))),
    ("entropy_coef without entropy", ValueError, "entropy", "gro", dict(entropy_coef=0.01)),
    ("full kl without kl", ValueError, "kl", "gro", dict(kl_coef=0.1, kl_estimator="full")),
    # option values
    ("unknown option", TypeError, "eps_hgh", "gro", dict(eps_hgh=0.3)),
    ("bad choice", ValueError, "anchor", "gro", dict(anchor="median")),
    ("negative eps", ValueError, "eps_low", "gro", dict(eps_low=-0.1)),
    ("delta not above 1", ValueError, "delta", "gro", dict(delta=0.5)),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, error, name, method, changes = case
    with pytest.raises(error, match=name):
        call(method, **changes)


# ---- through gro_loss ---------------------------------------------------------------------------

def lm(seed=0):
    return tiny_batch(seed=seed, B=4, T=5, d=8, V=20)


LM_BAD = [
    ("targets out of vocab", ValueError, "targets", lambda d: dict(targets=d.targets.masked_fill(d.targets == IGNORE, 25))),
    ("hidden shape", ValueError, "hidden", lambda d: dict(hidden=d.hidden[:, :-1])),
    ("weight dim", ValueError, "weight", lambda d: dict(weight=d.weight[:, :-1])),
    ("mask shape", ValueError, "mask", lambda d: dict(mask=torch.ones(4, 4, dtype=torch.bool))),
    ("full kl without ref head", ValueError, "ref_hidden", lambda d: dict(kl_estimator="full", kl_coef=0.1)),
    ("ref_hidden alone", ValueError, "ref_weight", lambda d: dict(ref_hidden=d.ref_hidden)),
    ("dpo without reference", ValueError, "ref_logp", lambda d: dict(method="dpo", rewards=None, labels=torch.tensor([1, -1, 1, -1]))),
    ("unknown option", TypeError, "kl_cof", lambda d: dict(kl_cof=0.1)),
]


@pytest.mark.parametrize("case", LM_BAD, ids=[c[0] for c in LM_BAD])
def test_gro_loss_bad_input_names_the_argument(case):
    _, error, name, change = case
    d = lm()
    kw = dict(hidden=d.hidden, weight=d.weight, targets=d.targets, rewards=torch.tensor([1.0, 0, 1, 0], dtype=F64),
              group_ids=torch.tensor([0, 0, 1, 1]), backend="naive")
    kw.update(change(d))
    with pytest.raises(error, match=name):
        gro_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_groloss_module_rejects_unknown_options_at_construction():
    with pytest.raises(TypeError, match="valid options"):
        GROLoss(method="grpo", clip_eps=0.2)
    with pytest.raises(ValueError, match="method"):
        GROLoss(method="ppo")


@pytest.mark.parametrize("call_with", ["gro_loss", "GROLoss", "gro_objective"])
def test_misspelled_option_suggests_the_right_name(call_with):
    """kl_coeff: the error names kl_coef first, not only the list of every option."""
    d = lm()
    with pytest.raises(TypeError, match=r"'kl_coeff' \(did you mean 'kl_coef'"):
        if call_with == "GROLoss":
            GROLoss(method="grpo", kl_coeff=0.1)
        elif call_with == "gro_loss":
            gro_loss(d.hidden, d.weight, d.targets, method="grpo", kl_coeff=0.1)
        else:
            gro_objective(torch.zeros(4, 5), method="grpo", kl_coeff=0.1)
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        GROLoss(method="grp")


def test_groloss_module_matches_gro_loss():
    d = lm()
    kw = dict(rewards=torch.tensor([1.0, 0, 1, 0], dtype=F64), group_ids=torch.tensor([0, 0, 1, 1]), backend="naive")
    module = GROLoss(method="dapo", eps_high=0.3)
    assert "dapo" in repr(module)
    torch.testing.assert_close(module(d.hidden, d.weight, d.targets, **kw).loss,
                               gro_loss(d.hidden, d.weight, d.targets, method="dapo", eps_high=0.3, **kw).loss)


# ---- degenerate but valid input -----------------------------------------------------------------

EMPTY_ROW_CASES = [
    ("grpo", dict(kl_coef=0.0)),
    ("gspo", {}),
    ("dr_grpo", {}),
    ("cispo", {}),
    ("reinforce_pp", {}),
    ("rloo", {}),
    ("gro", dict(loss_agg="seq_mean_token_mean", entropy_coef=0.01)),
    ("simpo", {}),
    ("cpl", dict(length_normalize=True)),
    ("dpo", {}),
    ("kto", {}),
    ("sft", {}),
]


@pytest.mark.parametrize("method, options", EMPTY_ROW_CASES, ids=[c[0] for c in EMPTY_ROW_CASES])
def test_fully_masked_sequence_contributes_zero_and_never_nan(method, options):
    d = lm(seed=3)
    targets = d.targets.clone()
    targets[1] = IGNORE  # row 1: nothing to score
    old = torch.full((4, 5), float("-inf"), dtype=F64)  # garbage everywhere, including the empty row
    old[targets != IGNORE] = -2.0
    kw = dict(backend="naive", ref_hidden=d.ref_hidden, ref_weight=d.ref_weight, **options)
    if method not in ("dpo", "kto", "simpo", "cpl", "sft"):  # their surrogate has no ratio (old_logp refused)
        kw["old_logp"] = old
    if method in ("dpo", "cpl", "simpo"):
        kw.update(group_ids=torch.tensor([0, 0, 1, 1]), labels=torch.tensor([1, -1, -1, 1]))
    elif method == "kto":
        kw.update(labels=torch.tensor([1, -1, -1, 1]), anchor_value=0.1)
    elif method != "sft":
        kw.update(rewards=torch.tensor([1.0, 0.5, 0.0, 0.3], dtype=F64), group_ids=torch.tensor([0, 0, 1, 1]))
    kw = read_inputs(method, kw)  # the reference head only where read
    out = gro_loss(d.hidden, d.weight, targets, method=method, **kw)
    assert torch.isfinite(out.loss)
    assert (out.per_token["advantages"][1] == 0).all(), "an empty sequence has zero weight"
    assert "weights" not in out.per_sequence or out.per_sequence["weights"][1] == 0
    g_h, g_w = torch.autograd.grad(out.loss, (d.hidden, d.weight))
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()
    assert (g_h[1] == 0).all(), "an empty sequence gets no gradient"
    assert g_h.abs().sum() > 0


def test_whole_batch_masked_gives_zero_loss():
    d = lm()
    targets = torch.full_like(d.targets, IGNORE)
    out = gro_loss(d.hidden, d.weight, targets, method="dapo", rewards=torch.tensor([1.0, 0, 1, 0], dtype=F64),
                   group_ids=torch.tensor([0, 0, 1, 1]), backend="naive")
    assert out.loss.item() == 0.0
    g_h, g_w = torch.autograd.grad(out.loss, (d.hidden, d.weight))
    assert (g_h == 0).all() and (g_w == 0).all()


@pytest.mark.parametrize("method", ["grpo", "dapo", "rloo", "reinforce_pp", "gro"])
def test_zero_variance_group_gives_zero_weights_and_finite_loss(method):
    d = lm()
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7], dtype=F64)  # every sample equally good
    groups = {} if method == "reinforce_pp" else dict(group_ids=torch.tensor([0, 0, 0, 0]))  # batch_mean anchor
    out = gro_loss(d.hidden, d.weight, d.targets, method=method, rewards=rewards, kl_coef=0.0, backend="naive", **groups)
    assert torch.isfinite(out.loss)
    assert (out.per_token["advantages"] == 0).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.loss, (d.hidden, d.weight)))


def test_backend_options_reach_the_backend():
    # The torch backend's chunk size changes nothing numerically; an unknown option is an error.
    import torch
    from gro_kernels import gro_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (2, 4), generator=g)
    a = gro_loss(h, w, y, method="sft", backend="torch").loss
    b = gro_loss(h, w, y, method="sft", backend="torch", backend_options={"chunk_elements": 16}).loss
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="chunk_size"):
        gro_loss(h, w, y, method="sft", backend="torch", backend_options={"chunk_size": 16})


def test_entropy_is_computed_only_when_needed():
    import torch
    from gro_kernels import gro_loss

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (2, 4), generator=g)
    assert "entropy" not in gro_loss(h, w, y, method="sft").metrics
    asked = gro_loss(h, w, y, method="sft", return_entropy=True).metrics["entropy"]
    bonus = gro_loss(h, w, y, method="sft", entropy_coef=0.01).metrics["entropy"]
    p = torch.softmax(h @ w.T, -1)
    torch.testing.assert_close(asked, -(p * p.log()).sum(-1).mean())
    torch.testing.assert_close(bonus, asked)


def test_kto_needs_its_reference_point():
    # Without anchor_value, method='kto' silently used z0 = 0: that is APO-zero, not KTO (issue 15
    # item 4). KTO's z0 is a batch estimate of KL(policy || reference): the caller passes it.
    d = lm()
    kw = dict(labels=torch.tensor([1, -1, -1, 1]), ref_logp=torch.full((4, 5), -2.0, dtype=F64), backend="naive")
    with pytest.raises(ValueError, match="anchor_value.*apo_zero_unpaired"):
        gro_loss(d.hidden, d.weight, d.targets, method="kto", **kw)
    with pytest.raises(ValueError, match="anchor_value"):
        gro_objective(torch.full((4, 5), -1.0, dtype=F64), method="kto", labels=kw["labels"], ref_logp=kw["ref_logp"])
    # z0 = 0 is the APO-zero method; a KTO z0 moves the weights
    apo = gro_loss(d.hidden, d.weight, d.targets, method="apo_zero_unpaired", **kw).per_sequence["weights"]
    kto0 = gro_loss(d.hidden, d.weight, d.targets, method="kto", anchor_value=0.0, **kw).per_sequence["weights"]
    kto = gro_loss(d.hidden, d.weight, d.targets, method="kto", anchor_value=0.5, **kw).per_sequence["weights"]
    torch.testing.assert_close(apo, kto0, rtol=0, atol=0)
    assert (kto - kto0).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["grpo", "dapo", "gro", "dr_grpo"])
def test_groups_of_one_under_a_group_anchor_are_an_error(method):
    # group_ids=torch.arange(B) (a forgotten repeat_interleave): every sequence is its own group's
    # mean, so every weight was 0 and nothing trained, silently (issue 15 item 5). That is an error;
    # groups of equal rewards (zero weights that carry information) and some singletons stay allowed.
    d = lm()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2], dtype=F64)
    with pytest.raises(ValueError, match="group_ids.*one sequence"):
        gro_loss(d.hidden, d.weight, d.targets, method=method, rewards=rewards, group_ids=torch.arange(4),
                 kl_coef=0.0, backend="naive")
    out = gro_loss(d.hidden, d.weight, d.targets, method=method, rewards=rewards, group_ids=torch.tensor([0, 0, 1, 2]),
                   kl_coef=0.0, backend="naive")
    w = out.per_sequence["weights"]
    assert (w[2:] == 0).all() and (w[:2] != 0).all()
    equal = gro_loss(d.hidden, d.weight, d.targets, method=method, rewards=torch.full((4,), 0.5, dtype=F64),
                     group_ids=torch.tensor([0, 0, 1, 1]), kl_coef=0.0, backend="naive")
    assert (equal.per_sequence["weights"] == 0).all()
