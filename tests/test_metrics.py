"""What gro_loss returns besides the loss: one shape per field (metrics 0-d, per_sequence [B], per_token
[B,T]), and the preference methods' reward metrics as TRL 1.16's DPOTrainer / KTOTrainer log them
(chosen / rejected rewards, accuracies, margins; TRL's definitions written out here, the TRL wrapper's
run against TRL itself in test_integration_trl.py)."""
import os

import pytest
import torch

from gro_kernels import METHODS, gro_loss
from gro_kernels.objective import gro_objective
from gro_kernels.objective.inputs import read_inputs

from helpers_objective import IGNORE, pairs, plain_token_logp, tiny_batch

F64 = torch.float64
DOCS = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "options.md")).read()
B, T = 8, 6
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
LABELS = torch.tensor([1, -1, -1, 1, 1, -1, 1, -1])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.9, 0.1], dtype=F64)


def inputs(method, d):
    """Every method's inputs on one batch (pairs for the pairwise ones, labels for KTO, groups of two)."""
    with torch.no_grad():
        ref = plain_token_logp(d.ref_hidden, d.ref_weight, d.targets)
    kw = dict(ref_logp=ref, old_logp=(ref + 0.05 * d.noise).masked_fill(d.targets == IGNORE, 0.0))
    if method in ("remax", "reinforce"):
        kw.update(baselines=torch.full((B,), 0.4, dtype=F64), anchor="baseline")
    if method in ("dpo", "ipo", "cpl", "simpo", "orpo", "cpo"):
        kw.update(labels=LABELS, group_ids=GROUPS)
    elif method in ("kto", "apo_zero_unpaired"):
        kw.update(labels=LABELS)
    elif method not in ("sft", "dft"):
        kw.update(rewards=REWARDS, group_ids=GROUPS)
    if method == "kto":
        kw["anchor_value"] = 0.05
    if method in ("luffy", "chord", "hpt"):  # an offline row per group
        kw["offline"] = torch.arange(B) % 2 == 1
    if method == "distill":  # the reference head as a teacher
        kw.update(teacher_hidden=d.ref_hidden, teacher_weight=d.ref_weight)
    return read_inputs(method, kw)  # old_logp, group_ids, ... only where the method reads them (else refused)


@pytest.mark.parametrize("method", METHODS)
def test_metrics_are_scalars_and_row_values_have_one_shape_per_field(method):
    d = tiny_batch(seed=1)
    out = gro_loss(d.hidden, d.weight, d.targets, method=method, return_entropy=True, **inputs(method, d))
    assert out.metrics and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics.values()), \
        {k: tuple(v.shape) for k, v in out.metrics.items()}
    assert all(isinstance(float(v), float) for v in out.metrics.values())  # what every logger does
    assert all(v.shape == (B,) for v in out.per_sequence.values()), {k: v.shape for k, v in out.per_sequence.items()}
    assert all(v.shape == (B, T) for v in out.per_token.values()), {k: v.shape for k, v in out.per_token.items()}
    assert "advantages" in out.per_token and not any(v.requires_grad for v in out.per_token.values())
    token_level = method == "reinforce_pp"
    assert ("scores" in out.per_token) == token_level and ("weights" in out.per_sequence) == (not token_level)
    # every name is documented (docs/options.md, "What comes back")
    documented = DOCS.split("## What comes back")[1].split("\n## ")[0]
    missing = [k for k in [*out.metrics, *out.per_sequence, *out.per_token] if f"`{k}`" not in documented]
    assert not missing, f"not in docs/options.md: {missing}"


def test_given_token_advantages_are_per_token():
    d = tiny_batch(seed=2)
    A = torch.randn(B, T, dtype=F64)
    out = gro_loss(d.hidden, d.weight, d.targets, method="dapo", advantages=A)
    m = d.targets != IGNORE
    torch.testing.assert_close(out.per_token["advantages"], A * m)
    assert out.per_sequence == {}
    assert type(out.metrics) is dict  # plain: torch.save / torch.load(weights_only=True) round-trip it


def implicit(d, ref, kind):
    """X_i of TRL's trainers: DPO / KTO sum_t (l - lr); CPO (CPL's score) sum_t l; SimPO the mean of l."""
    with torch.no_grad():
        l = plain_token_logp(d.hidden, d.weight, d.targets)
    m = (d.targets != IGNORE).to(F64)
    if kind == "ref":
        return (m * (l - ref)).sum(1)
    return (m * l).sum(1) / (m.sum(1) if kind == "mean" else 1)


@pytest.mark.parametrize("method,kind,options", [
    ("dpo", "ref", {}), ("dpo", "ref", dict(pair_loss="hinge", beta=0.3)), ("ipo", "ref", dict(beta=0.5)),
    ("cpl", "sum", {}), ("simpo", "mean", dict(beta=2.0, margin=0.5)),
])
def test_pairwise_reward_metrics_are_trls(method, kind, options):
    """TRL DPOTrainer: chosen_rewards = beta (chosen_logps - ref_chosen_logps); rewards/chosen their mean,
    rewards/accuracies mean(chosen_rewards > rejected_rewards), rewards/margins mean(chosen - rejected)."""
    d = tiny_batch(seed=3)
    kw = inputs(method, d)
    beta = options.get("beta", 0.1)
    r = beta * implicit(d, kw["ref_logp"], kind)
    chosen, rejected = pairs(GROUPS, LABELS)
    out = gro_loss(d.hidden, d.weight, d.targets, method=method, **kw, **options)
    want = {"rewards/chosen": r[chosen].mean(), "rewards/rejected": r[rejected].mean(),
            "rewards/accuracies": (r[chosen] > r[rejected]).to(F64).mean(),
            "rewards/margins": (r[chosen] - r[rejected]).mean()}
    for name, value in want.items():
        torch.testing.assert_close(out.metrics[name], value, msg=name)
    assert 0 < want["rewards/accuracies"] < 1, "the case must have pairs on both sides"
    torch.testing.assert_close(out.per_sequence["scores"], r)


def test_ld_dpo_rewards_are_trls_length_desensitized_ones():
    """TRL with ld_alpha: each completion's log-probs (and the reference's) beyond the pair's shared
    length count ld_alpha times."""
    d = tiny_batch(seed=4)
    kw = inputs("dpo", d)
    with torch.no_grad():
        l = plain_token_logp(d.hidden, d.weight, d.targets)
    m = (d.targets != IGNORE).to(F64)
    chosen, rejected = pairs(GROUPS, LABELS)
    shared = torch.zeros(B, dtype=F64)
    shared[chosen] = shared[rejected] = torch.minimum(m.sum(1)[chosen], m.sum(1)[rejected])
    u = torch.where(m.cumsum(1) <= shared[:, None], 1.0, 0.4) * m
    r = 0.1 * (u * (l - kw["ref_logp"])).sum(1)
    out = gro_loss(d.hidden, d.weight, d.targets, method="dpo", pair_loss="sigmoid", ld_alpha=0.4, **kw)
    torch.testing.assert_close(out.metrics["rewards/chosen"], r[chosen].mean())
    torch.testing.assert_close(out.metrics["rewards/margins"], (r[chosen] - r[rejected]).mean())


@pytest.mark.parametrize("method", ["kto", "apo_zero_unpaired"])
def test_kto_reward_metrics_are_trls(method):
    """TRL KTOTrainer: rewards = beta (logps - ref_logps); rewards/chosen the mean over desirable rows,
    rewards/rejected over undesirable ones, rewards/margins their difference (no accuracies)."""
    d = tiny_batch(seed=5)
    kw = inputs(method, d)
    r = 0.1 * implicit(d, kw["ref_logp"], "ref")
    out = gro_loss(d.hidden, d.weight, d.targets, method=method, **kw)
    good, bad = LABELS > 0, LABELS < 0
    torch.testing.assert_close(out.metrics["rewards/chosen"], r[good].mean())
    torch.testing.assert_close(out.metrics["rewards/rejected"], r[bad].mean())
    torch.testing.assert_close(out.metrics["rewards/margins"], r[good].mean() - r[bad].mean())
    assert "rewards/accuracies" not in out.metrics
    # A batch of desirable rows only: the same names (they never depend on the data), the absent side 0.
    only = gro_objective(torch.randn(B, T, dtype=F64), method=method, labels=torch.ones(B),
                         ref_logp=torch.zeros(B, T, dtype=F64), **({"anchor_value": 0.0} if method == "kto" else {}))
    assert only.metrics.keys() == out.metrics.keys() - {"token_accuracy"}   # gro_loss's own, from the head
    assert only.metrics["rewards/rejected"] == 0 and only.metrics["rewards/margins"] == 0
