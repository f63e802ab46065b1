"""Offline and online data in one batch (docs/objective.md, "Offline rows")."""
import pytest
import torch

from gro_kernels.loss import gro_loss
from gro_kernels.objective import gro_objective

from helpers_objective import IGNORE, plain_token_logp, tiny_batch

F64 = torch.float64
# One prompt: three failed online samples and one offline gold answer.
REWARDS = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64)
GROUPS = torch.tensor([0, 0, 0, 0])
OFFLINE = torch.tensor([False, False, False, True])


def _failing_group(seed=0):
    data = tiny_batch(seed=seed, B=4)
    with torch.no_grad():
        l = plain_token_logp(data.hidden, data.weight, data.targets)
    old = l + 0.05 * data.noise  # slightly off-policy online samples
    return data, old


def _seq_loglik(data):
    with torch.no_grad():
        return plain_token_logp(data.hidden, data.weight, data.targets).sum(1)


def test_offline_gold_answer_is_pushed_up_and_failures_down():
    data, old = _failing_group()
    out = gro_loss(data.hidden, data.weight, data.targets, method="gro", rewards=REWARDS, group_ids=GROUPS,
                   offline=OFFLINE, old_logp=old, backend="naive")
    w = out.per_sequence["weights"]
    assert w[3] > 0 and (w[:3] < 0).all()
    # Shared anchor: mean and std over all four rows, online and offline.
    torch.testing.assert_close(w, (REWARDS - 0.25) / (REWARDS.std() + 1e-4))

    before = _seq_loglik(data)
    out.loss.backward()
    with torch.no_grad():
        for p in (data.hidden, data.weight):
            p -= 0.05 * p.grad
    after = _seq_loglik(data)
    assert after[3] > before[3], "the gold answer's log-likelihood must rise"
    assert (after[:3] < before[:3]).all(), "every failure's log-likelihood must fall"


@pytest.mark.parametrize("method, options", [
    ("gro", {}),
    ("rloo", {"kl_coef": 0.1}),  # KL in the reward: the offline row's behaviour policy is itself, not old_logp
])
def test_offline_rows_never_use_old_logp(method, options):
    data, old = _failing_group(seed=1)
    with torch.no_grad():
        ref = plain_token_logp(data.ref_hidden, data.ref_weight, data.targets)

    def run(old_logp):
        out = gro_loss(data.hidden, data.weight, data.targets, method=method, rewards=REWARDS, group_ids=GROUPS,
                       offline=OFFLINE, old_logp=old_logp, ref_logp=ref, backend="naive", **options)
        return out.loss, torch.autograd.grad(out.loss, (data.hidden, data.weight))

    loss_a, grads_a = run(old)
    moved = old.clone()
    moved[3] -= 3.0  # a wildly different "behaviour" log-prob on the offline row
    loss_b, grads_b = run(moved)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    # ...while moving an online row's old_logp does change the loss.
    moved_online = old.clone()
    moved_online[0] -= 3.0
    assert not torch.equal(run(moved_online)[0], loss_a)


def test_offline_gradient_is_the_logp_surrogate_scaled_by_offline_coef():
    logp = (-0.2 - torch.rand(4, 5, dtype=F64)).requires_grad_()
    old = logp.detach() + 1.0  # far off-policy: online rows would be clipped
    out = gro_objective(logp, method="gro", rewards=REWARDS, group_ids=GROUPS, offline=OFFLINE, old_logp=old,
                        offline_coef=0.3)
    (g,) = torch.autograd.grad(out.loss, logp)
    A = (1 - 0.25) / (REWARDS.std() + 1e-4)
    torch.testing.assert_close(g[3], torch.full((5,), -0.3 * A / 20, dtype=F64))
    torch.testing.assert_close(out.per_sequence["weights"][3], 0.3 * A)
    # Offline tokens do not count in the clip / ratio statistics.
    torch.testing.assert_close(out.metrics["ratio_mean"], torch.exp(torch.tensor(-1.0, dtype=F64)))


def test_pairs_and_reward_groups_side_by_side():
    """A reward-scored group of online samples and an offline preference pair (chosen scored 1,
    rejected 0) in one batch: each is anchored within itself, and the batch loss is the sum of
    the two parts normalized by the batch's token count."""
    data = tiny_batch(seed=2, B=6)
    with torch.no_grad():
        l = plain_token_logp(data.hidden, data.weight, data.targets)
    old = l + 0.1 * data.noise
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.0, 1.0, 0.0], dtype=F64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    offline = torch.tensor([False, False, False, False, True, True])
    n_tokens = int((data.targets != IGNORE).sum())

    def loss(rows, **kw):
        return gro_loss(data.hidden[rows], data.weight, data.targets[rows], method="gro", rewards=rewards[rows],
                        group_ids=groups[rows], offline=offline[rows], old_logp=old[rows], backend="naive", **kw)

    whole = loss(slice(0, 6))
    w = whole.per_sequence["weights"]
    assert w[4] > 0 and w[5] < 0 and torch.isclose(w[4], -w[5])
    parts = loss(slice(0, 4), num_items_in_batch=n_tokens).loss + loss(slice(4, 6), num_items_in_batch=n_tokens).loss
    torch.testing.assert_close(whole.loss, parts, atol=1e-12, rtol=1e-12)
    g_whole = torch.autograd.grad(whole.loss, (data.hidden, data.weight))
    g_parts = torch.autograd.grad(parts, (data.hidden, data.weight))
    for a, b in zip(g_whole, g_parts):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
