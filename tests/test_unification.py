"""The unification claim (README, Methods; docs/objective.md), proven numerically.

For every row of the preset table: the gradient w.r.t. the LM head (hidden, weight) of
`gro_loss(method=...)` equals the gradient of that method's textbook loss, written here
independently from plain torch log-probs. The loss values agree too (RL methods report their
surrogate, RL-free methods their own loss). float64, atol = rtol = 1e-8, for the naive and the
chunked torch backends.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gro_kernels.loss import gro_loss
from gro_kernels.objective import METHODS

from helpers_objective import IGNORE, grads, k3, pairs, plain_full_kl, plain_token_logp, tiny_batch

STD_EPS = 1e-4

# The batch: 8 sequences in two reward groups with non-contiguous ids, or four labelled pairs.
GROUP_IDS = torch.tensor([3, 7, 3, 7, 7, 3, 3, 7])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.3], dtype=torch.float64)
BASELINES = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.0, 0.4, 0.7, 0.3], dtype=torch.float64)
PAIR_IDS = torch.tensor([5, 9, 5, 2, 9, 2, 0, 0])
PAIR_LABELS = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1])
KTO_LABELS = torch.tensor([1, -1, 1, 1, -1, -1, 1, -1])
OFFLINE = torch.tensor([False, False, True, False, False, False, False, True])
# Per-row size of the behaviour-policy perturbation: on-policy, tiny, large, huge... so that
# token and sequence clipping (and CISPO's bound of 5) are all exercised.
OLD_NOISE = torch.tensor([0.0, 1e-4, 0.3, 2.0, 5e-4, 0.1, 0.5, 1e-3], dtype=torch.float64)


# ---- plain-torch building blocks of the textbook losses -------------------------------------

def seq_sum(x, m):
    return (x * m).sum(1)


def per_group(r, groups, fn):
    out = torch.empty_like(r)
    for gid in groups.unique():
        rows = groups == gid
        out[rows] = fn(r[rows])
    return out


def group_normalized(r, groups):
    mean = per_group(r, groups, lambda v: v.mean().expand_as(v))
    std = per_group(r, groups, lambda v: v.std().expand_as(v))  # torch.std is Bessel-corrected
    return (r - mean) / (std + STD_EPS)


def group_centered(r, groups):
    return r - per_group(r, groups, lambda v: v.mean().expand_as(v))


def leave_one_out(r, groups):
    return per_group(r, groups, lambda v: (v.sum() - v) / (len(v) - 1))


def ppo_clip(ratio, A, eps_low, eps_high):
    return torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)


# ---- the textbook losses, one per row of the table ------------------------------------------
# Each takes tb: l [B,T] (differentiable), m, old, ref [B,T], kl [B,T] exact KL (differentiable).

def reinforce(tb):
    return -(REWARDS * seq_sum(tb.l, tb.m)).mean()


def reinforce_baseline(tb):
    return -((REWARDS - BASELINES) * seq_sum(tb.l, tb.m)).mean()


def rloo(tb):
    return -((REWARDS - leave_one_out(REWARDS, GROUP_IDS)) * seq_sum(tb.l, tb.m)).mean()


def rloo_kl_reward(tb, kl_coef=0.1):
    r = REWARDS - kl_coef * seq_sum(tb.old - tb.ref, tb.m)  # KL-penalized reward, behaviour policy
    return -((r - leave_one_out(r, GROUP_IDS)) * seq_sum(tb.l, tb.m)).mean()


def remax(tb):
    return -((REWARDS - BASELINES) * seq_sum(tb.l, tb.m)).mean()  # baselines = greedy decode's reward


def grpo(tb, eps=0.2, beta=0.04):
    """DeepSeekMath GRPO: group-normalized advantage, PPO clip per token, k3 KL, mean over tokens then sequences."""
    A = group_normalized(REWARDS, GROUP_IDS)[:, None]
    per_token = -(ppo_clip(torch.exp(tb.l - tb.old), A, eps, eps) - beta * k3(tb.l, tb.ref))
    return (seq_sum(per_token, tb.m) / tb.m.sum(1)).mean()


def grpo_full_kl(tb, eps=0.2, beta=0.04):
    A = group_normalized(REWARDS, GROUP_IDS)[:, None]
    per_token = -(ppo_clip(torch.exp(tb.l - tb.old), A, eps, eps) - beta * tb.kl)
    return (seq_sum(per_token, tb.m) / tb.m.sum(1)).mean()


def dr_grpo(tb, eps=0.2, beta=0.02, max_len=8):
    """Dr. GRPO: no std, no per-sequence length normalization: a constant max length."""
    A = group_centered(REWARDS, GROUP_IDS)[:, None]
    per_token = -(ppo_clip(torch.exp(tb.l - tb.old), A, eps, eps) - beta * k3(tb.l, tb.ref))
    return (per_token * tb.m).sum() / (len(REWARDS) * max_len)


def dapo(tb):
    """DAPO: clip-higher (0.2 / 0.28), token-level mean over the whole batch, no KL."""
    A = group_normalized(REWARDS, GROUP_IDS)[:, None]
    return -(ppo_clip(torch.exp(tb.l - tb.old), A, 0.2, 0.28) * tb.m).sum() / tb.m.sum()


def gspo(tb):
    """GSPO: one length-normalized importance ratio per sequence, clipped at 1 -/+ 3e-4 / 4e-4."""
    A = group_normalized(REWARDS, GROUP_IDS)
    s = torch.exp(seq_sum(tb.l - tb.old, tb.m) / tb.m.sum(1))
    return -ppo_clip(s, A, 3e-4, 4e-4).mean()


def cispo(tb):
    """CISPO (MiniMax-M1): REINFORCE with a detached importance weight clipped above at 5."""
    A = group_normalized(REWARDS, GROUP_IDS)[:, None]
    is_weight = torch.exp(tb.l - tb.old).clamp(max=5.0).detach()
    return -(is_weight * A * tb.l * tb.m).sum() / tb.m.sum()


def reinforce_pp(tb, kl_coef=0.05, eps=0.2):
    """REINFORCE++: token rewards = terminal reward - kl_coef * k1, returns to go, normalized
    over every valid token of the batch, PPO clip, token mean."""
    B, T = tb.m.shape
    token_r = -kl_coef * (tb.old - tb.ref) * tb.m
    for i in range(B):
        last = max(t for t in range(T) if tb.m[i, t] > 0)
        token_r[i, last] += REWARDS[i]
    G = torch.zeros_like(token_r)
    for i in range(B):
        running = 0.0
        for t in reversed(range(T)):
            running = running + tb.m[i, t] * token_r[i, t]
            G[i, t] = running
    valid = G[tb.m > 0]
    A = (G - valid.mean()) / (valid.std() + STD_EPS)
    return -(ppo_clip(torch.exp(tb.l - tb.old), A, eps, eps) * tb.m).sum() / tb.m.sum()


def _pair_D(tb):
    D = seq_sum(tb.l - tb.ref, tb.m)
    w, l = pairs(PAIR_IDS, PAIR_LABELS)
    return D[w], D[l]


def dpo(tb, beta=0.1):
    D_w, D_l = _pair_D(tb)
    return -F.logsigmoid(beta * (D_w - D_l)).mean()


def dpo_label_smoothing(tb, beta=0.1, eps=0.1):
    """Conservative DPO (label smoothing eps)."""
    h = beta * (_pair_D(tb)[0] - _pair_D(tb)[1])
    return (-(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)).mean()


def ipo(tb, beta=0.1):
    D_w, D_l = _pair_D(tb)
    return ((D_w - D_l - 1 / (2 * beta)) ** 2).mean()


def cpl(tb, alpha=0.1, lam=0.5):
    S = seq_sum(tb.l, tb.m)
    w, l = pairs(PAIR_IDS, PAIR_LABELS)
    return -F.logsigmoid(alpha * (S[w] - lam * S[l])).mean()


def simpo(tb, beta=2.0, gamma=0.5):
    S_norm = seq_sum(tb.l, tb.m) / tb.m.sum(1)
    w, l = pairs(PAIR_IDS, PAIR_LABELS)
    return -F.logsigmoid(beta * (S_norm[w] - S_norm[l]) - gamma).mean()


def kto(tb, beta=0.1, z0=0.05, lam_d=1.0, lam_u=1.33):
    D = seq_sum(tb.l - tb.ref, tb.m)
    y = KTO_LABELS.to(D.dtype)
    lam = torch.where(KTO_LABELS > 0, lam_d, lam_u).to(D.dtype)
    return (lam * (1 - torch.sigmoid(beta * y * (D - z0)))).mean()


def sft(tb):
    return -(tb.l * tb.m).sum() / tb.m.sum()


def gro(tb, kl_coef=0.05, offline_coef=0.5, eps=0.2):
    """The general form: group anchor shared by online and offline rows; online rows PPO-clipped,
    offline rows plain REINFORCE scaled by offline_coef; k3 KL in the loss; token mean."""
    A = group_normalized(REWARDS, GROUP_IDS)
    A = torch.where(OFFLINE, offline_coef * A, A)[:, None]
    online = ppo_clip(torch.exp(tb.l - tb.old), A, eps, eps)
    surrogate = torch.where(OFFLINE[:, None], A * tb.l, online)
    per_token = -surrogate + kl_coef * k3(tb.l, tb.ref)
    return (per_token * tb.m).sum() / tb.m.sum()


# ---- the table: method, options, inputs given to gro_loss, textbook loss --------------------
ROWS = [
    ("reinforce", {}, ("rewards",), reinforce),
    ("reinforce", {"anchor": "baseline"}, ("rewards", "baselines"), reinforce_baseline),
    ("rloo", {}, ("rewards", "group_ids"), rloo),
    ("rloo", {"kl_coef": 0.1}, ("rewards", "group_ids", "old_logp", "ref_logp"), rloo_kl_reward),
    ("remax", {}, ("rewards", "baselines"), remax),
    ("grpo", {}, ("rewards", "group_ids", "old_logp", "ref_logp"), grpo),
    ("grpo", {"kl_estimator": "full"}, ("rewards", "group_ids", "old_logp", "ref_head"), grpo_full_kl),
    ("dr_grpo", {"kl_coef": 0.02, "max_completion_length": 8}, ("rewards", "group_ids", "old_logp", "ref_logp"), dr_grpo),
    ("dapo", {}, ("rewards", "group_ids", "old_logp"), dapo),
    ("gspo", {}, ("rewards", "group_ids", "old_logp"), gspo),
    ("cispo", {}, ("rewards", "group_ids", "old_logp"), cispo),
    ("reinforce_pp", {"kl_coef": 0.05}, ("rewards", "old_logp", "ref_logp"), reinforce_pp),
    ("dpo", {}, ("pair_ids", "pair_labels", "ref_head"), dpo),
    ("dpo", {"label_smoothing": 0.1}, ("pair_ids", "pair_labels", "ref_logp"), dpo_label_smoothing),
    ("ipo", {}, ("pair_ids", "pair_labels", "ref_logp"), ipo),
    ("cpl", {}, ("pair_ids", "pair_labels"), cpl),
    ("simpo", {"beta": 2.0, "margin": 0.5}, ("pair_ids", "pair_labels"), simpo),
    ("kto", {"anchor_value": 0.05, "neg_coef": 1.33}, ("kto_labels", "ref_logp"), kto),
    ("sft", {}, (), sft),
    ("gro", {"kl_coef": 0.05, "offline_coef": 0.5}, ("rewards", "group_ids", "old_logp", "ref_logp", "offline"), gro),
]
CLIPPED = {"grpo", "dr_grpo", "dapo", "gspo", "reinforce_pp", "gro"}  # clipping must actually happen


def _row_id(row):
    method, options = row[0], row[1]
    return method + "".join(f"-{k}={v}" for k, v in options.items())


def test_table_covers_every_method():
    from test_loss_types import ROWS as ISSUE9_ROWS  # the trainers' other loss types (issue 9)
    from test_offline_teacher import ROWS as ISSUE19_ROWS  # offline data and teachers (issue 19)
    assert {row[0] for row in ROWS} | {row[0] for row in ISSUE9_ROWS} | {row[0] for row in ISSUE19_ROWS} == set(METHODS)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_gro_gradient_equals_textbook_gradient(row, backend):
    method, options, inputs, textbook = row
    data = tiny_batch(seed=0)
    temperature = options.get("temperature", 1.0)
    m = (data.targets != IGNORE).to(torch.float64)
    l = plain_token_logp(data.hidden, data.weight, data.targets, temperature)
    ref = plain_token_logp(data.ref_hidden, data.ref_weight, data.targets, temperature)
    old = (l + OLD_NOISE[:, None] * data.noise).detach() * m
    kl = plain_full_kl(data.hidden, data.weight, data.ref_hidden, data.ref_weight, data.targets, temperature)

    tb = SimpleNamespace(l=l, m=m, old=old, ref=ref, kl=kl)
    expected = textbook(tb)
    expected_grads = grads(expected, (data.hidden, data.weight))

    given = {
        "rewards": {"rewards": REWARDS}, "baselines": {"baselines": BASELINES},
        "group_ids": {"group_ids": GROUP_IDS}, "old_logp": {"old_logp": old}, "ref_logp": {"ref_logp": ref},
        "ref_head": {"ref_hidden": data.ref_hidden, "ref_weight": data.ref_weight},
        "pair_ids": {"group_ids": PAIR_IDS}, "pair_labels": {"labels": PAIR_LABELS},
        "kto_labels": {"labels": KTO_LABELS}, "offline": {"offline": OFFLINE},
    }
    kwargs = {k: v for name in inputs for k, v in given[name].items()}
    out = gro_loss(data.hidden, data.weight, data.targets, method=method, backend=backend, **kwargs, **options)
    got_grads = grads(out.loss, (data.hidden, data.weight))

    torch.testing.assert_close(out.loss, expected, atol=1e-8, rtol=1e-8)
    for got, want, name in zip(got_grads, expected_grads, ("hidden", "weight")):
        assert want.abs().max() > 1e-6, f"degenerate case: textbook gradient w.r.t. {name} is zero"
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8, msg=lambda s: f"grad {name}: {s}")
    if method in CLIPPED:
        assert 0 < out.metrics["clip_frac"] < 1, "the case must clip some tokens and not others"
    if method == "cispo":
        assert out.metrics["clip_frac_high"] > 0


def test_temperature_reaches_the_logprobs():
    """temperature divides the logits of the policy and of the reference head alike."""
    data = tiny_batch(seed=1)
    t = 0.7
    m = (data.targets != IGNORE).to(torch.float64)
    l = plain_token_logp(data.hidden, data.weight, data.targets, t)
    kl = plain_full_kl(data.hidden, data.weight, data.ref_hidden, data.ref_weight, data.targets, t)
    A = group_normalized(REWARDS, GROUP_IDS)[:, None]
    on_policy_ratio = torch.exp(l - l.detach())  # 1, with the gradient of l
    expected = (-(ppo_clip(on_policy_ratio, A, 0.2, 0.2) - 0.1 * kl) * m).sum() / m.sum()
    out = gro_loss(data.hidden, data.weight, data.targets, method="gro", rewards=REWARDS, group_ids=GROUP_IDS,
                   ref_hidden=data.ref_hidden, ref_weight=data.ref_weight, kl_estimator="full", kl_coef=0.1,
                   temperature=t, backend="naive")
    torch.testing.assert_close(out.loss, expected, atol=1e-8, rtol=1e-8)
    for got, want in zip(grads(out.loss, (data.hidden, data.weight)), grads(expected, (data.hidden, data.weight))):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
