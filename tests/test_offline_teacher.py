"""Issue 19's methods against their published formulas: LUFFY, CHORD, HPT-style switching, ORPO, CPO,
on-policy distillation (a teacher head), and GRO's no-push-down ablation.

Each row: a method and options, the inputs it gets, and the method's loss written here from its paper
(docs/methods.md gives each one's definition and source) in plain torch on float64 log-probs and the
full-vocabulary distributions of both heads. The loss and its gradients w.r.t. the LM head must
match to 1e-8 on the naive and the chunked torch backends (on torch a token-local configuration
takes the fused single pass). Then: each option changes the result, and is refused where it cannot apply.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gro_kernels.logprobs import token_logprobs
from gro_kernels.loss import GROLoss, gro_loss
from gro_kernels.objective import gro_objective
from gro_kernels.objective.offline import sft_token_counts
from gro_kernels.objective.options import resolve_options

from helpers_objective import (IGNORE, assert_loss_and_gradients, grads, pairs, plain_logprobs, plain_token_logp,
                               tiny_batch)

STD_EPS = 1e-4
GROUP_IDS = torch.tensor([3, 7, 3, 7, 7, 3, 3, 7])
OFFLINE = torch.tensor([False, False, False, False, False, True, False, True])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.9], dtype=torch.float64)
PAIR_IDS = torch.tensor([5, 9, 5, 2, 9, 2, 0, 0])
PAIR_LABELS = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1])
OLD_NOISE = torch.tensor([0.0, 1e-4, 0.3, 2.0, 5e-4, 0.1, 0.5, 1e-3], dtype=torch.float64)
TEACHER_D = 9   # the teacher's hidden size differs from the student's (12)


# ---- plain-torch building blocks (nothing here calls gro_kernels) ----------------------------

def normalized(r, groups, rows):
    """(r - group mean) / (group std + eps) over `rows` (a [B] bool) of each group; 0 elsewhere."""
    A = torch.zeros_like(r)
    for g in groups.unique():
        sel = (groups == g) & rows
        if sel.any():
            v = r[sel]
            std = v.std() if v.numel() > 1 else torch.zeros((), dtype=v.dtype)
            A[sel] = (v - v.mean()) / (std + STD_EPS)
    return A


def ppo(tb, A, eps=0.2):
    ratio = torch.exp(tb.l - tb.old)
    return torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)


def token_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def rows(mask_rows, m):
    return m * mask_rows[:, None].to(m.dtype)


# ---- LUFFY (arXiv 2504.14945) ----------------------------------------------------------------

def luffy(gamma=0.1):
    def loss(tb):
        """Offline traces in the group: A over the mixed group; online tokens PPO clip, offline tokens
        A f(p), f(p) = p / (p + gamma), no clip; token mean over all rows."""
        A = normalized(REWARDS, GROUP_IDS, torch.ones(8, dtype=torch.bool))[:, None]
        p = torch.exp(tb.l)
        term = torch.where(OFFLINE[:, None], A * p / (p + gamma), ppo(tb, A))
        return -token_mean(term, tb.m)
    return loss


# ---- CHORD (arXiv 2508.11408; Trinity-RFT mix_chord) -----------------------------------------

def chord(mu, phi=True):
    def loss(tb):
        """(1 - mu) GRPO on the online rows (A over the online rows of the group, token mean over the
        online tokens) + mu SFT on the offline rows, token weight sg[p (1 - p)] (CHORD-phi)."""
        online = ~OFFLINE
        A = normalized(REWARDS, GROUP_IDS, online)[:, None]
        grpo = -token_mean(ppo(tb, A), rows(online, tb.m))
        p = torch.exp(tb.l).detach()
        w = p * (1 - p) if phi else torch.ones_like(p)
        sft = -token_mean(w * tb.l, rows(OFFLINE, tb.m))
        return (1 - mu) * grpo + mu * sft
    return loss


# ---- HPT-style switching (arXiv 2509.04419) -------------------------------------------------

def hpt(threshold):
    def loss(tb):
        """Per prompt: mean online reward <= threshold -> SFT on its offline answer (online rows dropped),
        else GRPO on its online rows (offline dropped); each part a token mean over its own rows."""
        online = ~OFFLINE
        sft_group = {}
        for g in GROUP_IDS.unique().tolist():
            sel = (GROUP_IDS == g) & online
            sft_group[g] = bool(REWARDS[sel].mean() <= threshold) and bool((OFFLINE & (GROUP_IDS == g)).any())
        in_sft = torch.tensor([sft_group[int(g)] for g in GROUP_IDS])
        rl_rows, sft_rows = online & ~in_sft, OFFLINE & in_sft
        A = normalized(REWARDS, GROUP_IDS, rl_rows)[:, None]
        rl = -token_mean(ppo(tb, A), rows(rl_rows, tb.m))
        sft = -token_mean(tb.l, rows(sft_rows, tb.m))
        return rl + sft
    return loss


# ---- the no-push-down ablation ----------------------------------------------------------------

def gro_no_push_down(tb):
    """GRO (offline rows in the group, A l for them), with offline weights below the anchor set to 0."""
    A = normalized(REWARDS, GROUP_IDS, torch.ones(8, dtype=torch.bool))[:, None]
    A = torch.where(OFFLINE[:, None] & (A < 0), torch.zeros_like(A), A)
    term = torch.where(OFFLINE[:, None], A * tb.l, ppo(tb, A))
    return -token_mean(term, tb.m)


# ---- ORPO (arXiv 2403.07691) and CPO (arXiv 2401.08417), as TRL defines them ----------------

def chosen_nll(tb):
    c, _ = pairs(PAIR_IDS, PAIR_LABELS)
    return -(tb.l * tb.m)[c].sum() / tb.m[c].sum()


def orpo(beta=0.1, nll=1.0):
    def loss(tb):
        """NLL(chosen) - beta mean log sigma(log odds_w - log odds_l), odds = P / (1 - P), P = exp(mean log-prob)."""
        c, r = pairs(PAIR_IDS, PAIR_LABELS)
        x = (tb.l * tb.m).sum(1) / tb.m.sum(1)
        log_odds = lambda v: v - torch.log(1 - torch.exp(v))  # noqa: E731
        return nll * chosen_nll(tb) - beta * F.logsigmoid(log_odds(x[c]) - log_odds(x[r])).mean()
    return loss


def cpo(beta=0.1, alpha=1.0, eps=0.0, average=False, gamma=0.0):
    def loss(tb):
        """-(1-eps) log sigma(beta (S_w - S_l) - gamma) - eps log sigma(-...) + alpha NLL(chosen);
        S the summed (or, CPO-SimPO, averaged) log-probs."""
        c, r = pairs(PAIR_IDS, PAIR_LABELS)
        S = (tb.l * tb.m).sum(1)
        if average:
            S = S / tb.m.sum(1)
        h = beta * (S[c] - S[r]) - gamma
        pref = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return pref.mean() + alpha * chosen_nll(tb)
    return loss


# ---- on-policy distillation: the exact divergence to a teacher head --------------------------

def divergence(tb, kind, beta=0.5):
    """Per-token divergence between the policy p and the teacher q over the whole vocabulary."""
    lp, lq = tb.logprobs, tb.teacher_logprobs
    p, q = lp.exp(), lq.exp()
    if kind == "reverse_kl":
        d = (p * (lp - lq)).sum(-1)
    elif kind == "forward_kl":
        d = (q * (lq - lp)).sum(-1)
    else:
        m = (1 - beta) * p + beta * q
        d = beta * (q * (lq - m.log())).sum(-1) + (1 - beta) * (p * (lp - m.log())).sum(-1)
    return d * tb.m


def distill(kind, beta=0.5, coef=1.0, rl=False, kl=None):
    def loss(tb):
        """coef x token mean of D(p, q) [+ GRPO-style clipped term with group-normalized rewards]
        [+ 0.1 x token mean of a KL to the reference: exact (full) or k3]."""
        total = coef * token_mean(divergence(tb, kind, beta), tb.m)
        if rl:
            A = normalized(REWARDS, GROUP_IDS, torch.ones(8, dtype=torch.bool))[:, None]
            total = total - token_mean(ppo(tb, A), tb.m)
        if kl == "full":
            p = tb.logprobs.exp()
            total = total + 0.1 * token_mean((p * (tb.logprobs - tb.ref_logprobs)).sum(-1), tb.m)
        elif kl == "k3":
            u = tb.ref - tb.l
            total = total + 0.1 * token_mean(torch.exp(u) - u - 1, tb.m)
        return total
    return loss


# ---- the table ------------------------------------------------------------------------------
RL = ("rewards", "group_ids", "old_logp", "offline")
PAIRS = ("pairs",)
ROWS = [
    ("luffy", {}, RL, luffy()),
    ("luffy", {"shaping_gamma": 0.3}, RL, luffy(0.3)),
    ("chord", {}, RL, chord(0.1)),
    ("chord", {"mu": 0.6}, RL, chord(0.6)),
    ("chord", {"mu": 0.6, "offline_surrogate": "logp"}, RL, chord(0.6, phi=False)),
    ("hpt", {"switch_threshold": 0.5}, RL, hpt(0.5)),
    ("hpt", {}, RL, hpt(0.0)),
    ("gro", {"offline_neg_coef": 0.0}, RL, gro_no_push_down),
    ("orpo", {}, PAIRS, orpo()),
    ("orpo", {"beta": 0.5, "nll_coef": 0.3}, PAIRS, orpo(0.5, 0.3)),
    ("cpo", {}, PAIRS, cpo()),
    ("cpo", {"beta": 0.5, "nll_coef": 0.2, "label_smoothing": 0.1}, PAIRS, cpo(0.5, 0.2, eps=0.1)),
    ("cpo", {"length_normalize": True, "margin": 0.3, "beta": 2.0}, PAIRS, cpo(2.0, average=True, gamma=0.3)),
    ("distill", {}, ("teacher",), distill("reverse_kl")),
    ("distill", {"divergence": "forward_kl"}, ("teacher",), distill("forward_kl")),
    ("distill", {"divergence": "jsd"}, ("teacher",), distill("jsd")),
    ("distill", {"divergence": "jsd", "jsd_beta": 0.2}, ("teacher",), distill("jsd", 0.2)),
    ("distill", {"divergence": "jsd", "jsd_beta": 0.0}, ("teacher",), distill("forward_kl")),
    ("distill", {"divergence": "jsd", "jsd_beta": 1.0}, ("teacher",), distill("reverse_kl")),
    ("distill", {"distill_coef": 0.5, "divergence": "jsd", "jsd_beta": 0.7}, ("teacher",) + RL[:3],
     distill("jsd", 0.7, 0.5, rl=True)),
    ("grpo", {"distill_coef": 0.5, "kl_coef": 0.0, "loss_agg": "token_mean"}, ("teacher",) + RL[:3],
     distill("reverse_kl", coef=0.5, rl=True)),
    # a teacher and a reference head together: the exact KL (composable path, two sweeps) or k3 (one pass)
    ("distill", {"kl_coef": 0.1, "kl_estimator": "full", "divergence": "forward_kl"}, ("teacher", "ref_head"),
     distill("forward_kl", kl="full")),
    ("distill", {"kl_coef": 0.1, "divergence": "jsd"}, ("teacher", "ref_head"), distill("jsd", kl="k3")),
]


def _row_id(row):
    return row[0] + "".join(f"-{k}={v}" for k, v in row[1].items())


def _data(seed=0):
    data = tiny_batch(seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    data.teacher_hidden = torch.randn(*data.targets.shape, TEACHER_D, generator=g, dtype=torch.float64)
    data.teacher_weight = 0.7 * torch.randn(data.weight.shape[0], TEACHER_D, generator=g, dtype=torch.float64)
    data.teacher_bias = 0.3 * torch.randn(data.weight.shape[0], generator=g, dtype=torch.float64)
    m = (data.targets != IGNORE).to(torch.float64)
    l = plain_token_logp(data.hidden, data.weight, data.targets)
    old = (l + OLD_NOISE[:, None] * data.noise).detach() * m
    teacher_logprobs = torch.log_softmax(data.teacher_hidden @ data.teacher_weight.T + data.teacher_bias, -1)
    tb = SimpleNamespace(l=l, m=m, old=old, logprobs=plain_logprobs(data.hidden, data.weight, data.targets),
                         teacher_logprobs=teacher_logprobs,
                         ref_logprobs=plain_logprobs(data.ref_hidden, data.ref_weight, data.targets),
                         ref=plain_token_logp(data.ref_hidden, data.ref_weight, data.targets))
    return data, tb


def _run(data, tb, method, inputs, options, backend):
    given = {
        "rewards": {"rewards": REWARDS}, "group_ids": {"group_ids": GROUP_IDS},
        "old_logp": {"old_logp": tb.old}, "offline": {"offline": OFFLINE},
        "pairs": {"group_ids": PAIR_IDS, "labels": PAIR_LABELS},
        "teacher": {"teacher_hidden": data.teacher_hidden, "teacher_weight": data.teacher_weight,
                    "teacher_bias": data.teacher_bias},
        "ref_head": {"ref_hidden": data.ref_hidden, "ref_weight": data.ref_weight},
    }
    kwargs = {k: v for name in inputs for k, v in given[name].items()}
    return gro_loss(data.hidden, data.weight, data.targets, method=method, backend=backend, **kwargs, **options)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_loss_and_gradient_equal_the_published_formula(row, backend):
    method, options, inputs, textbook = row
    data, tb = _data()
    expected = textbook(tb)
    out = _run(data, tb, method, inputs, options, backend)
    assert_loss_and_gradients(out.loss, expected, (data.hidden, data.weight))


def test_the_rows_exercise_both_hpt_modes_and_negative_offline_weights():
    """The fixtures are not degenerate: HPT at 0.5 switches one group to SFT and keeps the other on RL,
    and an offline row lies below its group's anchor (so the ablation changes something)."""
    online = ~OFFLINE
    means = {g: float(REWARDS[(GROUP_IDS == g) & online].mean()) for g in (3, 7)}
    assert means[3] > 0.5 >= means[7]
    A = normalized(REWARDS, GROUP_IDS, torch.ones(8, dtype=torch.bool))
    assert (A[OFFLINE] < 0).any() and (A[OFFLINE] > 0).any()


# ---- each new option changes the result, and is refused where it cannot apply ---------------
CHANGES = [  # (method, inputs, option, value)
    ("luffy", RL, "shaping_gamma", 0.5),
    ("chord", RL, "mu", 0.5),
    ("chord", RL, "offline_surrogate", "shaping"),
    ("hpt", RL, "switch_threshold", 0.5),
    ("gro", RL, "offline_neg_coef", 0.3),
    ("gro", RL, "offline_role", "sft"),
    ("gro", RL, "offline_surrogate", "phi"),
    ("orpo", PAIRS, "nll_coef", 0.0),
    ("cpo", PAIRS, "nll_coef", 2.0),
    ("distill", ("teacher",), "divergence", "forward_kl"),
    ("distill", ("teacher",), "distill_coef", 2.0),
]


@pytest.mark.parametrize("case", CHANGES, ids=lambda c: f"{c[0]}-{c[2]}={c[3]}")
def test_each_option_changes_the_result(case):
    method, inputs, name, value = case
    data, tb = _data()
    base = _run(data, tb, method, inputs, {}, "naive")
    other = _run(data, tb, method, inputs, {name: value}, "naive")
    g0, g1 = grads(base.loss, (data.weight,))[0], grads(other.loss, (data.weight,))[0]
    assert (g0 - g1).abs().max() > 1e-6


def test_jsd_beta_changes_the_result():
    data, tb = _data()
    a = _run(data, tb, "distill", ("teacher",), {"divergence": "jsd", "jsd_beta": 0.3}, "naive")
    b = _run(data, tb, "distill", ("teacher",), {"divergence": "jsd", "jsd_beta": 0.6}, "naive")
    assert abs(float(a.loss.detach()) - float(b.loss.detach())) > 1e-6


REFUSED = [  # (method, options, a fragment of the error)
    ("gro", {"shaping_gamma": 0.2}, "offline_surrogate='shaping'"),
    ("luffy", {"shaping_gamma": 0.0}, "shaping_gamma must be > 0"),
    ("gro", {"mu": 0.3}, "offline_role='sft'"),
    ("grpo", {"switch_threshold": 0.3}, "offline_role='sft'"),
    ("chord", {"mu": 1.5}, "mu must be <= 1"),
    ("chord", {"offline_neg_coef": 0.0}, "offline_role='group'"),
    ("dpo", {"offline_role": "sft"}, "reward-scored"),
    ("grpo", {"nll_coef": 1.0}, "nll_coef"),
    ("dpo", {"pair_loss": "sigmoid", "nll_coef": 1.0}, "nll_coef"),
    ("orpo", {"label_smoothing": 0.1}, "odds_ratio"),
    ("orpo", {"margin": 0.1}, "odds_ratio"),
    ("orpo", {"pos_coef": 2.0}, "odds_ratio"),
    ("grpo", {"divergence": "jsd"}, "distill_coef"),
    ("distill", {"jsd_beta": 0.3}, "divergence='jsd'"),
    ("distill", {"divergence": "jsd", "jsd_beta": 1.5}, "jsd_beta must be <= 1"),
    ("distill", {"divergence": "tv"}, "divergence must be one of"),
    ("orpo", {"offline_role": "sft"}, "reward-scored"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: f"{c[0]}-{'-'.join(c[1])}")
def test_inapplicable_options_are_refused(case):
    method, options, fragment = case
    with pytest.raises((ValueError, TypeError), match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_options(method, options)
    with pytest.raises((ValueError, TypeError)):
        GROLoss(method=method, **options)


def test_teacher_inputs_are_checked():
    data, tb = _data()
    common = dict(method="distill", backend="torch")
    with pytest.raises(ValueError, match="needs the teacher head"):
        gro_loss(data.hidden, data.weight, data.targets, **common)
    with pytest.raises(ValueError, match="distill_coef is 0"):
        gro_loss(data.hidden, data.weight, data.targets, method="grpo", rewards=REWARDS, group_ids=GROUP_IDS,
                 teacher_hidden=data.teacher_hidden, teacher_weight=data.teacher_weight)
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight must be given together"):
        gro_loss(data.hidden, data.weight, data.targets, teacher_hidden=data.teacher_hidden, **common)
    with pytest.raises(ValueError, match="teacher_weight has vocabulary"):
        gro_loss(data.hidden, data.weight, data.targets, teacher_hidden=data.teacher_hidden,
                 teacher_weight=data.teacher_weight[:-1], **common)
    with pytest.raises(ValueError, match="teacher_hidden's last dim"):
        gro_loss(data.hidden, data.weight, data.targets, teacher_hidden=data.teacher_hidden[..., :-1],
                 teacher_weight=data.teacher_weight, **common)
    with pytest.raises(ValueError, match="pass distill"):
        gro_objective(tb.l, method="distill", mask=tb.m > 0)


def test_sft_role_inputs_are_checked():
    _, tb = _data()
    kw = dict(mask=tb.m > 0, rewards=REWARDS, group_ids=GROUP_IDS, offline=OFFLINE)
    with pytest.raises(ValueError, match="as a pair"):
        gro_objective(tb.l, method="chord", num_items_in_batch=30, **kw)
    with pytest.raises(ValueError, match="a pair only with offline_role='sft'"):
        gro_objective(tb.l, method="gro", num_items_in_batch=(20, 10), **kw)
    with pytest.raises(ValueError, match="switches each group"):
        gro_objective(tb.l, method="hpt", mask=tb.m > 0, advantages=REWARDS, offline=OFFLINE)


@pytest.mark.parametrize("method", ["chord", "hpt"])
def test_sft_role_accumulates_exactly_with_the_token_counts(method):
    """Two micro-batches (whole groups) with num_items_in_batch = the whole batch's (online, offline)
    token counts sum to the whole batch's loss and gradient."""
    data, tb = _data()
    kw = dict(rewards=REWARDS, group_ids=GROUP_IDS, offline=OFFLINE, switch_threshold=0.5) if method == "hpt" else \
        dict(rewards=REWARDS, group_ids=GROUP_IDS, offline=OFFLINE, mu=0.4)
    logp = lambda: plain_token_logp(data.hidden, data.weight, data.targets)  # noqa: E731  (a fresh graph per use)
    whole = gro_objective(logp(), method=method, mask=tb.m > 0, **kw)
    want = grads(whole.loss, (data.weight,))[0]
    opts = resolve_options(method, {k: v for k, v in kw.items() if k in ("mu", "switch_threshold")})
    from gro_kernels.objective.inputs import prepare_batch
    b = prepare_batch(tb.l.detach(), mask=tb.m > 0, entropy=None, kl=None, rewards=REWARDS, advantages=None,
                      group_ids=GROUP_IDS, labels=None, baselines=None, offline=OFFLINE, old_logp=None,
                      ref_logp=None, num_items_in_batch=None)
    counts = sft_token_counts(opts, b)
    assert counts[0] > 0 and counts[1] > 0
    total, got = 0.0, torch.zeros_like(want)
    for g in (3, 7):
        sel = GROUP_IDS == g
        part = gro_objective(logp()[sel], method=method, mask=tb.m[sel] > 0, num_items_in_batch=counts,
                             **{k: (v[sel] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        total = total + part.loss
        got = got + grads(part.loss, (data.weight,))[0]
    torch.testing.assert_close(total, whole.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_orpo_is_finite_when_a_sequence_is_certain():
    """log(1 - exp(x)) at x = 0 (probability 1, here an empty row's mean) must not make NaN."""
    logp = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    out = gro_objective(logp, method="orpo", labels=torch.tensor([1, -1, 1, -1]), group_ids=torch.tensor([0, 0, 1, 1]),
                        mask=torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]]).bool())
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grads(out.loss, (logp,))[0]).all()


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("backend, extra", [("naive", {}), ("torch", {}), ("torch", {"top_entropy_quantile": 0.5})])
def test_teacher_with_masked_vocabulary_rows_is_the_head_without_them(divergence, beta, backend, extra):
    """-inf bias rows (a padded vocabulary) masked in both heads: the divergence and its gradient are those
    of the heads without those rows (torch: the fused pass, and with top_entropy_quantile the composable
    path's recomputed backward); a row only one head masks is an error naming teacher_bias."""
    data, _ = _data()
    V = data.weight.shape[0]
    masked = torch.zeros(V, dtype=torch.bool)
    masked[[3, 17, V - 1]] = True
    targets = data.targets.masked_fill(torch.isin(data.targets, torch.nonzero(masked).flatten()), IGNORE)
    bias = torch.where(masked, -torch.inf, 0.1 * torch.arange(V, dtype=torch.float64))
    t_bias = torch.where(masked, -torch.inf, data.teacher_bias)
    opts = dict(divergence=divergence, **({"jsd_beta": beta} if divergence == "jsd" else {}), **extra)
    out = gro_loss(data.hidden, data.weight, targets, bias=bias, method="distill", teacher_hidden=data.teacher_hidden,
                   teacher_weight=data.teacher_weight, teacher_bias=t_bias, backend=backend, temperature=0.8, **opts)
    got = grads(out.loss, (data.hidden, data.weight))
    keep = ~masked   # the same heads without the masked rows
    remap = torch.cumsum(keep.long(), 0) - 1
    small = torch.where(targets == IGNORE, IGNORE, remap[targets.clamp(min=0)])
    w_small = data.weight.detach()[keep].clone().requires_grad_()
    h = data.hidden.detach().clone().requires_grad_()
    ref = gro_loss(h, w_small, small, bias=bias[keep], method="distill", teacher_hidden=data.teacher_hidden,
                   teacher_weight=data.teacher_weight[keep], teacher_bias=t_bias[keep], backend="naive",
                   temperature=0.8, **opts)
    want_h, want_w = grads(ref.loss, (h, w_small))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], want_h, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[1][keep], want_w, atol=1e-10, rtol=1e-10)
    assert (got[1][masked] == 0).all()
    with pytest.raises(ValueError, match="teacher_bias"):
        gro_loss(data.hidden, data.weight, targets, bias=bias, method="distill", teacher_hidden=data.teacher_hidden,
                 teacher_weight=data.teacher_weight, teacher_bias=data.teacher_bias, backend=backend)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("head", [{"softcap": 30.0}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}])
def test_teacher_with_a_soft_cap_or_truncation_is_refused(head, backend):
    """The policy's soft cap and the sampler's kept set are the policy's: the teacher's divergence is over its
    own full distribution, so a teacher with either is refused, naming both (the one pass, the composable path
    and token_logprobs)."""
    data, _ = _data()
    name = next(iter(head))
    fragment = "softcap" if name == "softcap" else "top_k / top_p / min_p"
    teacher = dict(teacher_hidden=data.teacher_hidden, teacher_weight=data.teacher_weight)
    for extra in ({}, {"top_entropy_quantile": 0.5}):   # the one pass (torch), the composable path
        with pytest.raises(ValueError, match=fragment) as err:
            gro_loss(data.hidden, data.weight, data.targets, method="distill", backend=backend, **teacher, **head,
                     **extra)
        assert "teacher" in str(err.value)
    with pytest.raises(ValueError, match=fragment):
        token_logprobs(data.hidden.detach(), data.weight.detach(), data.targets, backend=backend, **teacher, **head)


def _tempered_divergence(data, temperature, kind, beta):
    """The per-token divergence with both heads' logits divided by the temperature ([B, T] per token), as TRL's
    GKD divides the student's and the teacher's: written here from the logits."""
    T = temperature[..., None]
    lp = torch.log_softmax((data.hidden @ data.weight.T) / T, -1)
    lq = torch.log_softmax((data.teacher_hidden @ data.teacher_weight.T + data.teacher_bias) / T, -1)
    return divergence(SimpleNamespace(logprobs=lp, teacher_logprobs=lq, m=(data.targets != IGNORE).double()),
                      kind, beta)


@pytest.mark.parametrize("backend, extra", [("naive", {}), ("torch", {}), ("torch", {"top_entropy_quantile": 1.0 - 1e-9})])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("per", ["token", "sequence"])
def test_teacher_takes_the_policy_temperature(per, kind, beta, backend, extra):
    """A temperature (a float, a [B] or a [B, T] tensor) divides both heads' logits, the teacher's too: loss and
    gradients equal the formula written from the logits (the one pass; top_entropy_quantile just below 1
    moves torch to the composable path without dropping a token)."""
    data, _ = _data()
    B, T = data.targets.shape
    temp = torch.linspace(0.6, 1.5, B * T, dtype=torch.float64).reshape(B, T) if per == "token" else \
        torch.linspace(0.7, 1.4, B, dtype=torch.float64)
    per_token = temp if per == "token" else temp[:, None].expand(B, T)
    m = (data.targets != IGNORE).double()
    expected = token_mean(_tempered_divergence(data, per_token, kind, beta), m)
    opts = dict(divergence=kind, **({"jsd_beta": beta} if kind == "jsd" else {}), **extra)
    out = gro_loss(data.hidden, data.weight, data.targets, method="distill", teacher_hidden=data.teacher_hidden,
                   teacher_weight=data.teacher_weight, teacher_bias=data.teacher_bias, temperature=temp,
                   backend=backend, **opts)
    assert_loss_and_gradients(out.loss, expected, (data.hidden, data.weight))
    # and not the teacher at temperature 1 (the test would tell the difference)
    untempered = token_mean(_tempered_divergence(data, torch.ones_like(per_token), kind, beta), m)
    assert abs(float(untempered.detach()) - float(expected.detach())) > 1e-4


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_teacher_head_precision_fp32_on_bf16_heads(kind):
    """head_precision='fp32' on bf16 heads with a teacher: the loss equals the float64 formula on the same bf16
    values to fp32 accuracy (both heads' logits in fp32), and the gradients are the exact ones rounded once to
    bf16; 'native' (dz rounded to bf16 before the gradient GEMMs) is further from them."""
    data, _ = _data()
    bf = lambda t: t.detach().to(torch.bfloat16)   # noqa: E731
    h, w, th, tw, tb = (bf(t) for t in (data.hidden, data.weight, data.teacher_hidden, data.teacher_weight,
                                        data.teacher_bias))
    exact = SimpleNamespace(hidden=h.double().requires_grad_(), weight=w.double().requires_grad_(),
                            teacher_hidden=th.double(), teacher_weight=tw.double(), teacher_bias=tb.double(),
                            targets=data.targets)
    m = (data.targets != IGNORE).double()
    want = token_mean(_tempered_divergence(exact, torch.ones_like(m), kind, 0.5), m)
    want_grads = grads(want, (exact.hidden, exact.weight))
    errs = {}
    for precision in ("fp32", "native"):
        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = gro_loss(hp, wp, data.targets, method="distill", teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
                       divergence=kind, backend="torch", head_precision=precision)
        got = grads(out.loss, (hp, wp))
        assert abs(float(out.loss.detach()) - float(want.detach())) < 1e-5 * abs(float(want.detach()))
        errs[precision] = max(float(((g.double() - r).abs() - r.abs() * 2 ** -8).max()) for g, r in zip(got, want_grads))
    assert errs["fp32"] <= 1e-7, errs     # within half a bf16 ulp of the exact gradient: rounded once
    assert errs["native"] > errs["fp32"], errs
