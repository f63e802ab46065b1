"""Every loss type and correction added for issue 9, against its published formula.

Each row: a method and options, the inputs it gets, and a textbook loss written here from the
paper / the peer's definition (docs/methods.md) in plain torch on float64 log-probs. The loss and
its gradients w.r.t. the LM head (hidden, weight) must match to 1e-8 on the naive and the chunked
torch backends. Then: each option changes the result, and is refused where it cannot apply.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gro_kernels.logprobs import token_logprobs
from gro_kernels.loss import gro_loss
from gro_kernels.objective import METHODS, gro_objective

from helpers_objective import IGNORE, assert_loss_and_gradients, grads, k3, pairs, plain_logprobs, plain_token_logp, tiny_batch

STD_EPS = 1e-4
GROUP_IDS = torch.tensor([3, 7, 3, 7, 7, 3, 3, 7])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.3], dtype=torch.float64)
PAIR_IDS = torch.tensor([5, 9, 5, 2, 9, 2, 0, 0])
PAIR_LABELS = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1])
KTO_LABELS = torch.tensor([1, -1, 1, 1, -1, -1, 1, -1])
TRUNCATED = torch.tensor([False, True, False, False, False, True, False, False])
OLD_NOISE = torch.tensor([0.0, 1e-4, 0.3, 2.0, 5e-4, 0.1, 0.5, 1e-3], dtype=torch.float64)


# ---- plain-torch building blocks ------------------------------------------------------------

def group_normalized(r, groups, eps=STD_EPS):
    A = torch.empty_like(r)
    for g in groups.unique():
        v = r[groups == g]
        A[groups == g] = (v - v.mean()) / (v.std() + eps)
    return A


def token_mean(x, m):
    return (x * m).sum() / m.sum()


def seq_mean_token_mean(x, m):
    return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def ppo_min(ratio, A, lo=0.2, hi=0.2):
    return torch.minimum(ratio * A, ratio.clamp(1 - lo, 1 + hi) * A)


def grpo_A():
    return group_normalized(REWARDS, GROUP_IDS)[:, None]


# ---- policy losses --------------------------------------------------------------------------

def bnpo(tb):
    """TRL bnpo: PPO clip, normalized by the batch's tokens."""
    return -token_mean(ppo_min(torch.exp(tb.l - tb.old), grpo_A()), tb.m)


def sapo(tb, tau_pos=1.0, tau_neg=1.05):
    """SAPO (arXiv 2511.20347): -f(r) A with f(r) = sigmoid(tau (r - 1)) 4/tau; sequence mean of token means."""
    A = grpo_A().expand_as(tb.l)
    r = torch.exp(tb.l - tb.old)
    tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=A.dtype), torch.tensor(tau_neg, dtype=A.dtype))
    return -seq_mean_token_mean(torch.sigmoid(tau * (r - 1)) * 4 / tau * A, tb.m)


def luspo(tb, lo=3e-4, hi=4e-4):
    """LUSPO (arXiv 2602.05261): GSPO's sequence loss scaled by the sequence's length, mean over sequences."""
    A = grpo_A()[:, 0]
    s = torch.exp(((tb.l - tb.old) * tb.m).sum(1) / tb.m.sum(1))
    seq_loss = -torch.minimum(s * A, s.clamp(1 - lo, 1 + hi) * A)
    return (tb.m.sum(1) * seq_loss).mean()


def vespo_phi(A, log_w, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    w = torch.exp(log_w)
    k = torch.where(A >= 0, torch.tensor(k_pos, dtype=A.dtype), torch.tensor(k_neg, dtype=A.dtype))
    lam = torch.where(A >= 0, torch.tensor(lam_pos, dtype=A.dtype), torch.tensor(lam_neg, dtype=A.dtype))
    return math.e ** lam * w ** k * torch.exp(-lam * w)  # phi(w) = e^lam w^k e^(-lam w), phi(1) = 1


def vespo(tb):
    """VESPO: -sg[phi(w)] A l, w the sequence ratio prod_t r_t; token mean."""
    A = grpo_A()
    log_w = ((tb.l - tb.old) * tb.m).sum(1, keepdim=True).detach().clamp(math.log(1e-8), 20)
    return -token_mean(vespo_phi(A, log_w) * A * tb.l, tb.m)


def gpg(tb):
    """GPG (verl): A = alpha (r - group mean), alpha = B / #nonzero rewards; -A l, token mean."""
    A = torch.empty_like(REWARDS)
    for g in GROUP_IDS.unique():
        A[GROUP_IDS == g] = REWARDS[GROUP_IDS == g] - REWARDS[GROUP_IDS == g].mean()
    A = A * len(REWARDS) / (REWARDS != 0).sum()
    return -token_mean(A[:, None] * tb.l, tb.m)


def geo_mean(tb, eps=0.4):
    """GMPO (arXiv 2507.20673, verl geo_mean): -A exp(mean_t sgn(A) min(sgn(A) lr, sgn(A) clip(lr, -eps, eps))), mean over sequences."""
    A = grpo_A().expand_as(tb.l)
    lr = tb.l - tb.old
    s = torch.sign(A)
    kept = s * torch.minimum(s * lr, s * lr.clamp(-eps, eps))
    rho = torch.exp((kept * tb.m).sum(1) / tb.m.sum(1))
    return -(grpo_A()[:, 0] * rho).mean()


def covariance(tb):
    A = grpo_A().expand_as(tb.l)
    valid = tb.m > 0
    l = tb.l.detach()
    return (A - A[valid].mean()) * (l - l[valid].mean())


def clip_cov(tb, ratio=0.1, lb=1.0, ub=5.0):
    """Clip-Cov (arXiv 2505.22617, verl): drop from the PPO loss a random max(1, floor(ratio N)) of the
    tokens PPO leaves unclipped whose covariance (A - mean A)(l - mean l) is in (lb, ub); token mean."""
    A = grpo_A().expand_as(tb.l)
    r = torch.exp(tb.l - tb.old)
    surrogate = ppo_min(r, A)
    unclipped = (r * A <= r.clamp(0.8, 1.2) * A)
    cov = covariance(tb)
    cand = torch.nonzero((cov > lb) & (cov < ub) & (tb.m > 0) & unclipped.detach())
    n = max(int(ratio * tb.m.sum().item()), 1)
    drop = cand[torch.randperm(len(cand))[:n]]
    keep = torch.ones_like(tb.m)
    keep[drop[:, 0], drop[:, 1]] = 0
    assert 0 < len(drop) < len(cand), "the case must drop some candidates and keep others"
    return -token_mean(keep * surrogate, tb.m)


def kl_cov(tb, ratio=0.1, coef=1.0):
    """KL-Cov (arXiv 2505.22617, verl): -r A, plus coef |l - lo| on the max(1, floor(ratio N)) tokens of
    largest covariance; token mean."""
    A = grpo_A().expand_as(tb.l)
    r = torch.exp(tb.l - tb.old)
    cov = covariance(tb).masked_fill(tb.m == 0, -math.inf)
    n = max(int(ratio * tb.m.sum().item()), 1)
    top = torch.topk(cov.flatten(), n).indices
    pen = torch.zeros(cov.numel(), dtype=cov.dtype)
    pen[top] = coef
    pen = pen.view_as(cov)
    return token_mean(-r * A + pen * (tb.l - tb.old).abs(), tb.m)


def dual_clip(tb, c=1.1):
    """Dual-clip PPO (arXiv 1912.09729): for A < 0 the loss is at most -c A; token mean."""
    A = grpo_A().expand_as(tb.l)
    r = torch.exp(tb.l - tb.old)
    clipped = ppo_min(r, A, 0.2, 0.28)
    return -token_mean(torch.where(A < 0, torch.maximum(clipped, c * A), clipped), tb.m)


def apo_zero_unpaired(tb, beta=0.1):
    """KTO's apo_zero_unpaired (TRL): chosen 1 - sigma(beta D), rejected sigma(beta D), class weights; mean."""
    D = ((tb.l - tb.ref) * tb.m).sum(1)
    lam = torch.where(KTO_LABELS > 0, torch.tensor(1.0, dtype=D.dtype), torch.tensor(1.33, dtype=D.dtype))
    return (lam * torch.where(KTO_LABELS > 0, 1 - torch.sigmoid(beta * D), torch.sigmoid(beta * D))).mean()


def dft(tb):
    """DFT (arXiv 2508.05629): -sg[p] log p per token, token mean."""
    return -token_mean(tb.l.exp().detach() * tb.l, tb.m)


# ---- KL variants (grpo, kl_coef 0.04, sequence mean of token means) -------------------------

def grpo_with_kl(kl_fn, bias_correction=False):
    def loss(tb):
        r = torch.exp(tb.l - tb.old)
        k = kl_fn(tb.l, tb.ref)
        if bias_correction:
            k = k * r
        return seq_mean_token_mean(-ppo_min(r, grpo_A()) + 0.04 * k, tb.m)
    loss.__name__ = getattr(kl_fn, "__name__", "kl")
    return loss


def st(value_fn):
    """verl's straight-through '+': the value of value_fn, the gradient of k2."""
    def k(l, ref):
        k2 = 0.5 * (l - ref) ** 2
        return k2 - k2.detach() + value_fn(l, ref).detach()
    return k


def low_var_kl(l, ref):
    x = (ref - l).clamp(-20, 20)
    return (torch.exp(x) - x - 1).clamp(-10, 10)


KL_ROWS = {
    "k1": lambda l, ref: l - ref,
    "k2": lambda l, ref: 0.5 * (l - ref) ** 2,
    "abs": lambda l, ref: (l - ref).abs(),
    "low_var_kl": low_var_kl,
    "k1+": st(lambda l, ref: l - ref),
    "k3+": st(k3),
    "low_var_kl+": st(low_var_kl),
    "abs+": st(lambda l, ref: (l - ref).abs()),
}


# ---- train/inference mismatch, token selection (DAPO: eps_high 0.28, token mean) ------------

def dapo_times(weight_fn):
    def loss(tb):
        r = torch.exp(tb.l - tb.old)
        return -token_mean(weight_fn(tb) * ppo_min(r, grpo_A(), 0.2, 0.28), tb.m)
    return loss


def _d(tb):
    return (tb.old - tb.rollout) * tb.m


ROLLOUT_MODES = {   # TRL vllm_importance_sampling_mode / OpenRLHF is_correction, default bounds
    "token_truncate": lambda tb: torch.exp(_d(tb)).clamp(max=3.0),
    "token_mask": lambda tb: torch.where(torch.exp(_d(tb)) <= 3.0, torch.exp(_d(tb)), 0.0),
    "sequence_truncate": lambda tb: torch.exp(_d(tb).sum(1, keepdim=True)).clamp(max=3.0),
    "sequence_mask": lambda tb: torch.where(torch.exp(_d(tb).sum(1, keepdim=True)) <= 3.0,
                                            torch.exp(_d(tb).sum(1, keepdim=True)), 0.0),
    "icepop": lambda tb: torch.where((torch.exp(_d(tb)) >= 0.5) & (torch.exp(_d(tb)) <= 5.0), torch.exp(_d(tb)), 0.0),
    "seq_mask_tis": lambda tb: torch.where(
        ((g := torch.exp(_d(tb).sum(1, keepdim=True) / tb.m.sum(1, keepdim=True))) >= 0.5) & (g <= 5.0),
        torch.exp(_d(tb)), 0.0),
}


def off_policy(delta, use_rollout):
    """DeepSeek-V3.2 off-policy sequence mask: drop rows with A < 0 and mean(l_behaviour - l) > delta."""
    def w(tb):
        behaviour = tb.rollout if use_rollout else tb.old
        kl = ((behaviour - tb.l.detach()) * tb.m).sum(1, keepdim=True) / tb.m.sum(1, keepdim=True)
        return ((grpo_A() >= 0) | (kl <= delta)).to(tb.l.dtype)
    return w


def top_entropy(tb, rho=0.5, entropy_coef=0.01):
    """Beyond the 80/20 rule: the policy term (and entropy bonus) only on tokens with entropy >= the
    (1 - rho) quantile of the batch's entropies."""
    H = tb.entropy
    thr = torch.quantile(H[tb.m > 0].detach(), 1 - rho)
    keep = ((H.detach() >= thr) & (tb.m > 0)).to(H.dtype)
    r = torch.exp(tb.l - tb.old)
    return token_mean(-keep * ppo_min(r, grpo_A(), 0.2, 0.28) - entropy_coef * keep * H, tb.m)


def top_entropy_trl(tb, rho=0.5, entropy_coef=0.01):
    """As TRL: the entropy bonus is the mean entropy of the selected tokens (entropy_agg='token_mean')."""
    H = tb.entropy
    thr = torch.quantile(H[tb.m > 0].detach(), 1 - rho)
    keep = ((H.detach() >= thr) & (tb.m > 0)).to(H.dtype)
    r = torch.exp(tb.l - tb.old)
    return -token_mean(keep * ppo_min(r, grpo_A(), 0.2, 0.28), tb.m) - entropy_coef * (keep * H).sum() / keep.sum()


def grpo_entropy_token_mean(tb, entropy_coef=0.02):
    """GRPO's sequence mean of token means for the policy, TRL's token mean for the entropy bonus."""
    r = torch.exp(tb.l - tb.old)
    return seq_mean_token_mean(-ppo_min(r, grpo_A()), tb.m) - entropy_coef * token_mean(tb.entropy, tb.m)


def truncated_dapo(tb):
    """mask_truncated_completions: truncated rows leave the loss mask (advantages use every reward)."""
    m = tb.m * (~TRUNCATED)[:, None].to(tb.m.dtype)
    return -token_mean(ppo_min(torch.exp(tb.l - tb.old), grpo_A(), 0.2, 0.28), m)


# ---- preference losses (TRL DPOTrainer, mean over pairs) ------------------------------------

def dpo_parts(tb):
    c, r = pairs(PAIR_IDS, PAIR_LABELS)
    S = (tb.l * tb.m).sum(1)
    R = (tb.ref * tb.m).sum(1)
    n = tb.m.sum(1)
    return SimpleNamespace(Sw=S[c], Sl=S[r], Rw=R[c], Rl=R[r], nw=n[c], nl=n[r], c=c)


F_DIVERGENCES = {   # f'(t) as a function of u = log t (f-DPO, arXiv 2309.16240)
    "reverse_kl": lambda u: u,
    "forward_kl": lambda u: 1 - 1 / torch.exp(u),
    "js_divergence": lambda u: torch.log(2 * torch.exp(u) / (torch.exp(u) + 1)),
    "alpha_divergence": lambda u: (torch.exp(u) ** (0.5 - 1) - 1) / (0.5 - 1),   # alpha = 0.5
}


def pref(kind, beta=0.1, eps=0.0, tau=0.05, f="reverse_kl"):
    def loss(tb):
        p = dpo_parts(tb)
        cw, cl = p.Sw - p.Rw, p.Sl - p.Rl
        fw, fl = F_DIVERGENCES[f](cw), F_DIVERGENCES[f](cl)
        h = beta * (fw - fl)
        ls = F.logsigmoid
        if kind == "hinge":
            v = torch.relu(1 - h)
        elif kind == "robust":
            v = (-(1 - eps) * ls(h) + eps * ls(-h)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -ls(beta * cw) - ls(-beta * cl)
        elif kind == "sppo_hard":
            v = (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2
        elif kind == "aot":
            d = torch.sort(p.Sw - p.Sl).values - torch.sort(p.Rw - p.Rl).values
            v = -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
        elif kind == "aot_unpaired":
            d = torch.sort(cw).values - torch.sort(cl).values
            v = -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
        elif kind == "apo_zero":
            v = 1 - torch.sigmoid(beta * cw) + torch.sigmoid(beta * cl)
        elif kind == "apo_down":
            v = torch.sigmoid(beta * cw) + 1 - torch.sigmoid(beta * (cw - cl))
        elif kind == "exo_pair":   # KL(softmax over {w, l} of beta*logratio || [1 - eps, eps])
            q = torch.stack([torch.sigmoid(h), torch.sigmoid(-h)])
            pr = torch.tensor([1 - eps, eps], dtype=h.dtype)[:, None]
            v = (q * (q.log() - pr.log())).sum(0)
        elif kind == "nca_pair":
            v = -ls(beta * cw) - 0.5 * ls(-beta * cw) - 0.5 * ls(-beta * cl)
        elif kind == "discopop":
            mix = torch.sigmoid(h / tau)
            v = -ls(h) * (1 - mix) + torch.exp(-h) * mix
        elif kind == "sigmoid_norm":
            v = -ls(beta * (fw / p.nw - fl / p.nl))
        elif kind == "ipo":
            v = (fw / p.nw - fl / p.nl - 1 / (2 * beta)) ** 2
        elif kind == "sigmoid":
            v = -ls(h)
        return v.mean()
    return loss


def sft_on_chosen(tb):
    p = dpo_parts(tb)
    return -(tb.l * tb.m)[p.c].sum() / tb.m[p.c].sum()


def wpo(tb, beta=0.1):
    """WPO (arXiv 2406.11827, TRL use_weighting): each pair's loss times w_w w_l,
    w = sg[exp(mean_t (l - log sum_v p_v^2))]; here sigmoid + 0.5 sft."""
    w = torch.exp(((tb.l - tb.log_sum_sq) * tb.m).sum(1) / tb.m.sum(1)).detach()
    p = dpo_parts(tb)
    c, r = pairs(PAIR_IDS, PAIR_LABELS)
    scale = w[c] * w[r]
    v = -F.logsigmoid(beta * ((p.Sw - p.Rw) - (p.Sl - p.Rl)))
    return (scale * v).mean() + 0.5 * (scale * sft_on_chosen(tb)).mean()


def ld_dpo(tb, alpha=0.4, beta=0.1):
    """LD-DPO (arXiv 2409.06411, TRL ld_alpha): the tokens beyond the pair's shared length count
    alpha in the sequence sums of policy and reference; sigmoid + 0.5 sft (on plain sums)."""
    c, r = pairs(PAIR_IDS, PAIR_LABELS)
    n = tb.m.sum(1)
    shared = torch.zeros_like(n)
    shared[c] = torch.minimum(n[c], n[r])
    shared[r] = shared[c]
    pos = tb.m.cumsum(1)
    u = torch.where(pos <= shared[:, None], torch.tensor(1.0, dtype=tb.m.dtype), torch.tensor(alpha, dtype=tb.m.dtype)) * tb.m
    S, R = (u * tb.l).sum(1), (u * tb.ref).sum(1)
    v = -F.logsigmoid(beta * ((S[c] - R[c]) - (S[r] - R[r])))
    return v.mean() + 0.5 * sft_on_chosen(tb)


def mpo(tb):
    """MPO-style combination (TRL loss_weights): 0.8 sigmoid + 0.2 bco_pair + 1.0 sft."""
    return 0.8 * pref("sigmoid")(tb) + 0.2 * pref("bco_pair")(tb) + 1.0 * sft_on_chosen(tb)


# ---- the table ------------------------------------------------------------------------------
RL = ("rewards", "group_ids", "old_logp")
ROWS = [
    ("bnpo", {}, RL, bnpo),
    ("sapo", {}, RL, sapo),
    ("luspo", {}, RL, luspo),
    ("vespo", {}, RL, vespo),
    ("gpg", {}, ("rewards", "group_ids"), gpg),
    ("geo_mean", {}, RL, geo_mean),
    ("clip_cov", {"clip_cov_ratio": 0.1}, RL, clip_cov),
    ("kl_cov", {"kl_cov_ratio": 0.1}, RL, kl_cov),
    ("dapo", {"clip_ratio_c": 1.1}, RL, dual_clip),
    ("apo_zero_unpaired", {"neg_coef": 1.33}, ("kto_labels", "ref_logp"), apo_zero_unpaired),
    ("dft", {}, (), dft),
    *[("grpo", {"kl_estimator": k}, RL + ("ref_logp",), grpo_with_kl(fn)) for k, fn in KL_ROWS.items()],
    ("grpo", {"use_bias_correction_kl": True}, RL + ("ref_logp",), grpo_with_kl(k3, bias_correction=True)),
    *[("dapo", {"rollout_correction": mode}, RL + ("rollout_logp",), dapo_times(fn)) for mode, fn in ROLLOUT_MODES.items()],
    ("dapo", {"rollout_correction": "token_mask", "rollout_clip_min": 0.8, "rollout_clip_max": 1.5},
     RL + ("rollout_logp",), dapo_times(lambda tb: torch.where((torch.exp(_d(tb)) >= 0.8) & (torch.exp(_d(tb)) <= 1.5), torch.exp(_d(tb)), 0.0))),
    ("dapo", {"off_policy_mask_threshold": 0.05}, RL, dapo_times(off_policy(0.05, False))),
    ("dapo", {"off_policy_mask_threshold": 0.05}, RL + ("rollout_only",), dapo_times(off_policy(0.05, True))),
    ("dapo", {"top_entropy_quantile": 0.5, "entropy_coef": 0.01}, RL + ("entropy",), top_entropy),
    ("dapo", {"top_entropy_quantile": 0.5, "entropy_coef": 0.01, "entropy_agg": "token_mean"}, RL + ("entropy",), top_entropy_trl),
    ("grpo", {"kl_coef": 0.0, "entropy_coef": 0.02, "entropy_agg": "token_mean"}, RL + ("entropy",), grpo_entropy_token_mean),
    ("dapo", {"mask_truncated_completions": True}, RL + ("truncated",), truncated_dapo),
    *[("dpo", {"pair_loss": k, **o}, ("pairs", "ref_logp"), pref(k, eps=o.get("label_smoothing", 0.0))) for k, o in [
        ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1}), ("bco_pair", {}),
        ("sppo_hard", {}), ("aot", {"label_smoothing": 0.1}), ("aot_unpaired", {}), ("apo_zero", {}),
        ("apo_down", {}), ("exo_pair", {"label_smoothing": 0.1}), ("nca_pair", {}), ("discopop", {}),
        ("sigmoid_norm", {})]],
    ("dpo", {"pair_loss": ("sigmoid", "bco_pair", "sft"), "loss_weights": (0.8, 0.2, 1.0)}, ("pairs", "ref_logp"), mpo),
    ("dpo", {"pair_loss": ("sigmoid", "sft"), "loss_weights": (1.0, 0.5), "ld_alpha": 0.4}, ("pairs", "ref_logp"), ld_dpo),
    ("dpo", {"pair_loss": ("sigmoid", "sft"), "loss_weights": (1.0, 0.5), "use_weighting": True},
     ("pairs", "ref_logp", "log_sum_sq_probs"), wpo),
    *[("dpo", {"pair_loss": k, "f_divergence_type": f}, ("pairs", "ref_logp"), pref(k, f=f)) for k, f in [
        ("sigmoid", "forward_kl"), ("sigmoid", "js_divergence"), ("sigmoid", "alpha_divergence"),
        ("hinge", "js_divergence"), ("ipo", "forward_kl"), ("sigmoid_norm", "alpha_divergence")]],
]


def _row_id(row):
    return row[0] + "".join(f"-{k}={v}" for k, v in row[1].items())


def _data(seed=0):
    data = tiny_batch(seed=seed)
    m = (data.targets != IGNORE).to(torch.float64)
    l = plain_token_logp(data.hidden, data.weight, data.targets)
    ref = plain_token_logp(data.ref_hidden, data.ref_weight, data.targets)
    old = (l + OLD_NOISE[:, None] * data.noise).detach() * m
    g = torch.Generator().manual_seed(seed + 100)
    rollout = (old + 0.4 * torch.randn(old.shape, generator=g, dtype=old.dtype)) * m
    lp = plain_logprobs(data.hidden, data.weight, data.targets)
    entropy = -(lp.exp() * lp).sum(-1) * m
    log_sum_sq = torch.logsumexp(2 * lp, -1).detach() * m
    tb = SimpleNamespace(l=l, m=m, old=old, ref=ref, rollout=rollout, entropy=entropy, log_sum_sq=log_sum_sq)
    return data, tb


def _run(data, tb, method, inputs, options, backend):
    """gro_loss with the inputs the row names (on the torch backend a token-local configuration
    takes the single fused pass, the others the composable path)."""
    given = {
        "rewards": {"rewards": REWARDS}, "group_ids": {"group_ids": GROUP_IDS}, "old_logp": {"old_logp": tb.old},
        "ref_logp": {"ref_logp": tb.ref}, "kto_labels": {"labels": KTO_LABELS},
        "pairs": {"group_ids": PAIR_IDS, "labels": PAIR_LABELS},
        "rollout_logp": {"rollout_logp": tb.rollout}, "rollout_only": {"rollout_logp": tb.rollout},
        "truncated": {"truncated": TRUNCATED}, "entropy": {}, "log_sum_sq_probs": {"log_sum_sq_probs": tb.log_sum_sq},
    }
    kwargs = {k: v for name in inputs for k, v in given[name].items()}
    return gro_loss(data.hidden, data.weight, data.targets, method=method, backend=backend,
                    return_entropy="entropy" in inputs, **kwargs, **options)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_loss_and_gradient_equal_the_published_formula(row, backend):
    method, options, inputs, textbook = row
    data, tb = _data()
    torch.manual_seed(0)
    expected = textbook(tb)
    torch.manual_seed(0)  # clip_cov draws its tokens from torch's default generator, as verl does
    out = _run(data, tb, method, inputs, options, backend)
    assert_loss_and_gradients(out.loss, expected, (data.hidden, data.weight))


# ---- each option changes the result ---------------------------------------------------------
BASE = {"bnpo": "grpo", "sapo": "grpo", "luspo": "gspo", "vespo": "dapo", "gpg": "dapo", "geo_mean": "grpo",
        "clip_cov": "dapo", "kl_cov": "dapo", "apo_zero_unpaired": "kto", "dft": "sft"}


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_each_option_changes_the_result(row):
    """Against the same call without the option (or the preset's base method): the loss or its
    gradient differs. pair_loss='sigmoid' is DPO itself and must agree with it instead."""
    method, options, inputs, _ = row
    data, tb = _data()
    base_inputs = tuple(i for i in inputs if i not in ("rollout_logp", "rollout_only", "truncated", "log_sum_sq_probs"))
    torch.manual_seed(0)
    out = _run(data, tb, method, inputs, options, "naive")
    g = grads(out.loss, (data.hidden, data.weight))[1]
    for name in ("entropy_agg", "use_weighting", "ld_alpha"):
        if name not in options:
            continue
        base = _run(data, tb, method, base_inputs if name == "use_weighting" else inputs,
                    {k: v for k, v in options.items() if k != name}, "naive")
        g0 = grads(base.loss, (data.hidden, data.weight))[1]
        assert not torch.allclose(g, g0, atol=1e-6, rtol=1e-6), f"{name} does not change the gradient"
        return
    if options.get("kl_estimator") == "low_var_kl":
        return  # k3 with clamps that bite only at |log-ratio| > 20: test_low_var_kl_clamps
    base_options = {"neg_coef": 1.33} if method == "apo_zero_unpaired" else {}
    if BASE.get(method) == "grpo":
        base_options["kl_coef"] = 0.0
    if method == "dpo" and options.get("pair_loss") == "sigmoid" and "f_divergence_type" not in options:
        base = _run(data, tb, "dpo", base_inputs, {}, "naive")
        torch.testing.assert_close(out.loss, base.loss, atol=1e-12, rtol=1e-12)
        return
    if method == "apo_zero_unpaired":
        base_options["anchor_value"] = 0.3
    base = _run(data, tb, BASE.get(method, method), base_inputs, base_options if method in BASE else {}, "naive")
    g0 = grads(base.loss, (data.hidden, data.weight))[1]
    assert not torch.allclose(g, g0, atol=1e-6, rtol=1e-6), f"{options} does not change the gradient"


def test_low_var_kl_clamps():
    """low_var_kl is k3 with the log-ratio clamped to [-20, 20] and the value to [-10, 10] (verl)."""
    from gro_kernels.objective.surrogates import kl_estimate
    l = torch.tensor([-30.0, -5.0, 0.3, 4.0, 25.0], dtype=torch.float64)
    ref = torch.zeros_like(l)
    k3v = kl_estimate("k3", l, ref)
    low = kl_estimate("low_var_kl", l, ref)
    x = (ref - l).clamp(-20, 20)
    torch.testing.assert_close(low, (torch.exp(x) - x - 1).clamp(-10, 10))
    assert low[2] == k3v[2] and low[0] == 10.0 and k3v[0] > 1e12


# ---- refused where it cannot apply ----------------------------------------------------------
REFUSED = [  # (method, options, inputs, the error names)
    ("cispo", {"importance_sampling": "sequence"}, RL, "importance_sampling"),
    ("sapo", {"importance_sampling": "sequence"}, RL, "importance_sampling"),
    ("vespo", {"importance_sampling": "sequence"}, RL, "importance_sampling"),
    ("grpo", {"sapo_temperature_pos": 2.0}, RL, "sapo_temperature_pos"),
    ("sapo", {"clip_ratio_c": 3.0}, RL, "clip_ratio_c"),
    ("cispo", {"delta": 2.0}, RL, "delta"),
    ("dapo", {"vespo_k_pos": 1.0}, RL, "vespo_k_pos"),
    ("dapo", {"clip_cov_ratio": 0.1}, RL, "clip_cov_ratio"),
    ("dapo", {"ppo_kl_coef": 0.1}, RL, "ppo_kl_coef"),
    ("dapo", {"clip_ratio_c": 1.0}, RL, "clip_ratio_c"),
    ("dapo", {"rollout_clip_max": 2.0}, RL, "rollout_clip"),
    ("dapo", {"rollout_correction": "token_mask", "rollout_clip_min": 2.0, "rollout_clip_max": 1.5}, RL + ("rollout_logp",), "rollout_clip_min"),
    ("dapo", {"rollout_correction": "token_truncate"}, RL, "rollout_logp"),
    ("dapo", {}, RL + ("rollout_logp",), "rollout_logp"),
    ("vespo", {"rollout_correction": "sequence_mask"}, RL + ("rollout_logp",), "vespo"),
    ("dapo", {"rollout_correction": "bogus"}, RL, "rollout_correction"),
    ("dapo", {"top_entropy_quantile": 1.5}, RL, "top_entropy_quantile"),
    ("dapo", {"mask_truncated_completions": True}, RL, "truncated"),
    ("dapo", {}, RL + ("truncated",), "mask_truncated_completions"),
    ("dpo", {"mask_truncated_completions": True}, ("pairs", "ref_logp", "truncated"), "mask_truncated_completions"),
    ("rloo", {"use_bias_correction_kl": True, "kl_coef": 0.1}, ("rewards", "group_ids"), "use_bias_correction_kl"),
    ("dpo", {"top_entropy_quantile": 0.5}, ("pairs", "ref_logp", "entropy"), "top_entropy_quantile"),
    ("kto", {"rollout_correction": "token_mask"}, ("kto_labels", "ref_logp", "rollout_logp"), "rollout_correction"),
    ("dapo", {"entropy_agg": "token_mean"}, RL, "entropy_agg"),
    ("dapo", {"entropy_agg": "token_mean", "entropy_coef": 0.1, "num_items_in_batch": 30}, RL + ("entropy",), "entropy_agg"),
    ("dpo", {"pair_loss": "bogus"}, ("pairs", "ref_logp"), "pair_loss"),
    ("sapo", {"eps_high": 0.3}, RL, "eps_high"),
    ("dpo", {"ld_alpha": 0.5}, ("pairs", "ref_logp"), "ld_alpha"),
    ("dpo", {"pair_loss": "sigmoid", "ld_alpha": 1.5}, ("pairs", "ref_logp"), "ld_alpha"),
    ("dpo", {"use_weighting": True}, ("pairs", "ref_logp", "log_sum_sq_probs"), "use_weighting"),
    ("dpo", {"pair_loss": "aot", "use_weighting": True}, ("pairs", "ref_logp", "log_sum_sq_probs"), "use_weighting"),
    ("dpo", {"pair_loss": "sigmoid"}, ("pairs", "ref_logp", "log_sum_sq_probs"), "use_weighting"),
    ("cispo", {"eps_low": 0.1}, RL, "eps_low"),
    ("vespo", {"eps_low": 0.1}, RL, "eps_low"),
    ("grpo", {"use_bias_correction_kl": True, "kl_coef": 0.0}, RL, "use_bias_correction_kl"),
    ("dpo", {"pair_loss": "sft", "beta": 0.5}, ("pairs", "ref_logp"), "beta"),
    ("grpo", {"pair_loss": "hinge"}, RL, "pair_loss"),
    ("dpo", {"pair_loss": "hinge", "label_smoothing": 0.1}, ("pairs", "ref_logp"), "label_smoothing"),
    ("dpo", {"pair_loss": "exo_pair"}, ("pairs", "ref_logp"), "exo_pair"),
    ("dpo", {"pair_loss": "robust", "label_smoothing": 0.5}, ("pairs", "ref_logp"), "robust"),
    ("dpo", {"pair_loss": "hinge", "margin": 0.5}, ("pairs", "ref_logp"), "margin"),
    ("dpo", {"pair_loss": ("sigmoid", "sft"), "loss_weights": (1.0,)}, ("pairs", "ref_logp"), "loss_weights"),
    ("dpo", {"loss_weights": (1.0,)}, ("pairs", "ref_logp"), "loss_weights"),
    ("dpo", {"pair_loss": "hinge", "discopop_tau": 0.1}, ("pairs", "ref_logp"), "discopop_tau"),
    ("dpo", {"pair_loss": "bco_pair", "f_divergence_type": "forward_kl"}, ("pairs", "ref_logp"), "f_divergence_type"),
    ("dpo", {"f_divergence_type": "forward_kl"}, ("pairs", "ref_logp"), "f_divergence_type"),
    ("dpo", {"pair_loss": "sigmoid", "f_alpha_divergence_coef": 0.3}, ("pairs", "ref_logp"), "f_alpha_divergence_coef"),
    ("gpg", {}, ("rewards", "group_ids_with_singleton"), "nonzero_fraction"),
]


@pytest.mark.parametrize("row", REFUSED, ids=lambda r: r[0] + "-" + "-".join(f"{k}={v}" for k, v in r[1].items()))
def test_refused_with_an_error_naming_the_option(row):
    method, options, inputs, name = row
    data, tb = _data()
    inputs = tuple(i if i != "group_ids_with_singleton" else "singleton" for i in inputs)
    if "singleton" in inputs:
        inputs = tuple(i for i in inputs if i != "singleton")
        options = dict(options, group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 2, 3]))
    with pytest.raises((ValueError, TypeError), match=name):
        _run(data, tb, method, inputs, options, "naive")


# ---- the split contract: token-local configurations run chunk by chunk ----------------------
from gro_kernels.objective.core import sequence_plan                      # noqa: E402
from gro_kernels.objective.inputs import prepare_batch                    # noqa: E402
from gro_kernels.objective.options import resolve_options                 # noqa: E402
from gro_kernels.objective.split import needs_policy_logp, token_loss     # noqa: E402

TOKEN_LOCAL = [
    ("bnpo", {}), ("sapo", {}), ("gpg", {}), ("dft", {}), ("dapo", {"clip_ratio_c": 1.1}),
    ("grpo", {"kl_estimator": "k3+", "use_bias_correction_kl": True}),
    ("dapo", {"rollout_correction": "token_truncate"}), ("dapo", {"rollout_correction": "sequence_mask"}),
    ("dapo", {"rollout_correction": "seq_mask_tis", "entropy_coef": 0.01}),
]
NOT_TOKEN_LOCAL = [
    ("gspo", {}), ("luspo", {}), ("vespo", {}), ("geo_mean", {}), ("clip_cov", {}), ("kl_cov", {}),
    ("dapo", {"top_entropy_quantile": 0.2}), ("dapo", {"off_policy_mask_threshold": 0.1}),
    ("dpo", {"pair_loss": "hinge"}), ("apo_zero_unpaired", {}),
]


def test_needs_policy_logp_names_the_configurations_that_read_whole_rows():
    for method, options in TOKEN_LOCAL:
        assert not needs_policy_logp(resolve_options(method, options), has_old_logp=True, has_advantages=False), method
    for method, options in NOT_TOKEN_LOCAL:
        assert needs_policy_logp(resolve_options(method, options), has_old_logp=True, has_advantages=False), method
    one_pass = {"reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "cispo", "reinforce_pp", "sft", "gro",
                "bnpo", "sapo", "gpg", "dft", "luffy", "chord", "hpt", "distill"}   # as the README's method tables say
    for method in METHODS:
        assert needs_policy_logp(resolve_options(method, {}), has_old_logp=True, has_advantages=False) \
            == (method not in one_pass), method
    rollout = resolve_options("dapo", {"rollout_correction": "token_mask"})
    assert needs_policy_logp(rollout, has_old_logp=False, has_advantages=False)  # the train side is then sg[l]


@pytest.mark.parametrize("config", TOKEN_LOCAL, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_token_local_configurations_run_chunk_by_chunk(config):
    """The plan of a token-local configuration never reads the policy's log-probs, and token_loss
    over chunks of 7 tokens ([1, n], per-token inputs gathered) gives the batch's loss and gradients."""
    method, options = config
    _, tb = _data()
    opts = resolve_options(method, options)
    inputs = dict(mask=tb.m > 0, rewards=REWARDS, advantages=None, group_ids=GROUP_IDS, labels=None,
                  baselines=None, offline=None, old_logp=tb.old, ref_logp=tb.ref, kl=None,
                  num_items_in_batch=None, rollout_logp=tb.rollout if opts.rollout_correction else None)
    l = tb.l.detach().clone().requires_grad_()
    H = tb.entropy.detach().clone().requires_grad_()
    b = prepare_batch(l, entropy=H, **inputs)
    plan = sequence_plan(method, opts, b)
    other = prepare_batch(torch.randn_like(l), entropy=H, **inputs)   # a different policy, same inputs
    other_plan = sequence_plan(method, opts, other)
    for name in ("coef", "policy_weight", "entropy_weight", "abs_kl_coef"):
        x, y = getattr(plan, name), getattr(other_plan, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert torch.equal(plan.weights.advantages, other_plan.weights.advantages)

    online = (~b.offline[:, None]).expand_as(b.logp)
    full = token_loss(opts, logp=b.logp, old_logp=b.old_logp, ref_logp=b.ref_logp, entropy=b.entropy, kl=None,
                      advantages=plan.weights.advantages, coef=plan.coef, online=online, mask=b.mask,
                      kl_in_loss=plan.kl_in_loss, policy_weight=plan.policy_weight,
                      entropy_weight=plan.entropy_weight, abs_kl_coef=plan.abs_kl_coef).loss
    want = torch.autograd.grad(full, (l, H), allow_unused=True, retain_graph=True)

    def flat(x):
        return None if x is None else x.reshape(1, -1)

    total = 0
    n = b.logp.numel()
    for start in range(0, n, 7):
        sl = slice(start, min(start + 7, n))
        pick = lambda x: None if x is None else flat(x)[:, sl]   # noqa: E731
        total = total + token_loss(
            opts, logp=pick(b.logp), old_logp=pick(b.old_logp), ref_logp=pick(b.ref_logp), entropy=pick(b.entropy),
            kl=None, advantages=pick(plan.weights.advantages), coef=pick(plan.coef), online=pick(online),
            mask=pick(b.mask), kl_in_loss=plan.kl_in_loss, policy_weight=pick(plan.policy_weight),
            entropy_weight=pick(plan.entropy_weight), abs_kl_coef=pick(plan.abs_kl_coef)).loss
    got = torch.autograd.grad(total, (l, H), allow_unused=True)
    torch.testing.assert_close(total, full, atol=1e-12, rtol=1e-12)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


ROBUST = [("dapo", {"rollout_correction": m}) for m in ("token_truncate", "token_mask", "sequence_truncate",
                                                          "sequence_mask", "icepop", "seq_mask_tis")] + [
    ("vespo", {"rollout_correction": "token_mask"}), ("dapo", {"off_policy_mask_threshold": 0.05}),
    ("geo_mean", {}), ("luspo", {}), ("sapo", {}), ("clip_cov", {}), ("kl_cov", {}), ("dapo", {"clip_ratio_c": 2.0}),
    ("dapo", {"top_entropy_quantile": 0.3, "entropy_coef": 0.01}),
]


@pytest.mark.parametrize("config", ROBUST, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_empty_rows_and_unscored_rollout_tokens_give_no_nan(config):
    """A fully masked row contributes 0; a NaN rollout log-prob (a token the sampler could not
    score) counts as no mismatch, as TRL does."""
    method, options = config
    data, tb = _data()
    mask = data.targets != IGNORE
    mask[4] = False
    rollout = tb.rollout.clone()
    rollout[0, 1] = float("nan")
    stats = token_logprobs(data.hidden, data.weight, data.targets, return_entropy=True, backend="naive")
    kw = dict(rollout_logp=rollout) if "rollout_correction" in options or "off_policy_mask_threshold" in options else {}
    out = gro_objective(stats.logp, method=method, mask=mask, entropy=stats.entropy, rewards=REWARDS,
                        group_ids=GROUP_IDS, old_logp=tb.old, **kw, **options)
    dh, dw = grads(out.loss, (data.hidden, data.weight))
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert dh[4].abs().max() == 0, "the empty row must get no gradient"


def test_quantile_is_torch_quantile():
    """The top-entropy threshold: torch.quantile's value exactly, without its size limit."""
    from gro_kernels.objective.corrections import quantile
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 25, 1000):
        for dtype in (torch.float32, torch.float64):
            x = torch.rand(n, generator=g, dtype=dtype) * 5
            x[: n // 3] = x[0]   # ties
            for q in (0.0, 0.1, 0.2, 0.5, 0.8, 0.999, 1.0):
                assert quantile(x, q) == torch.quantile(x, q), (n, dtype, q)


def test_top_entropy_selection_needs_the_entropy_in_gro_objective():
    # gro_loss computes the entropy itself for top_entropy_quantile; gro_objective must be given it.
    _, tb = _data()
    with pytest.raises(ValueError, match="entropy"):
        gro_objective(tb.l.detach(), method="dapo", mask=tb.m > 0, rewards=REWARDS, group_ids=GROUP_IDS,
                      old_logp=tb.old, top_entropy_quantile=0.5)


def test_wpo_weights_from_the_statistics_pass():
    # Without log_sum_sq_probs, gro_loss takes log sum_v p_v^2 from the same statistics pass.
    data, tb = _data()
    kw = dict(method="dpo", group_ids=PAIR_IDS, labels=PAIR_LABELS, ref_logp=tb.ref, use_weighting=True,
              pair_loss="sigmoid")
    auto = gro_loss(data.hidden, data.weight, data.targets, backend="torch", **kw)
    given = gro_loss(data.hidden, data.weight, data.targets, backend="naive", log_sum_sq_probs=tb.log_sum_sq, **kw)
    torch.testing.assert_close(auto.loss, given.loss, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(auto.loss, (data.hidden, data.weight)), grads(given.loss, (data.hidden, data.weight))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="use_weighting"):
        gro_objective(tb.l.detach(), mask=tb.m > 0, **kw)
