"""How the objective splits for one fused pass (GRO.md section 6).

(a) Sequence-level quantities, formed before any pass over the vocabulary: the weights A[i,t]
    (from rewards, labels, baselines, given advantages) and the aggregation coefficients c[i,t].
(b) The token-local loss `ell(l, H, KL)` of each token given (a): `token_loss` below. `gro_objective`
    evaluates it on the whole [B,T] batch; the fused single pass evaluates it on each chunk of
    tokens and takes its derivatives (dL/dl, dL/dH, dL/dKL) by autograd on the chunk's small
    vectors, so the loss math has one copy.

A configuration is token-local when (a) does not depend on the policy's own log-probs. Otherwise
(implicit scores of DPO/IPO/CPL/SimPO/KTO, GSPO's sequence ratio, a reward-placed KL without
`old_logp`) it needs a forward-only pass first: `needs_policy_logp` says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .options import Options
from .surrogates import Surrogate, kl_estimate, policy_surrogate


def needs_policy_logp(opts: Options, *, has_old_logp: bool, has_advantages: bool) -> bool:
    """Whether the weights depend on the policy's own (detached) log-probs: then the fused path
    runs a forward-only pass for them first (four GEMMs instead of three)."""
    if opts.surrogate != "logp" and opts.importance_sampling == "sequence":
        return True  # GSPO: rho_i = exp(mean_t (l - lo)) couples the tokens of a sequence
    if has_advantages:
        return False  # given advantages replace the weights
    if opts.score == "implicit":
        return True   # X_i = S_i or D_i
    reward_kl = opts.kl_coef != 0 and opts.kl_placement == "reward" and opts.score in ("reward", "token_return")
    return reward_kl and not has_old_logp  # the reward KL reads lo, which is sg[l] on-policy


@dataclass
class TokenTerms:
    loss: torch.Tensor                       # 0-d: sum over the tokens given
    surrogate: Surrogate
    kl: Optional[torch.Tensor]               # the per-token KL estimate (or None)


def token_loss(opts: Options, *, logp, old_logp, ref_logp, entropy, kl, advantages, coef, online,
               mask, kl_in_loss: bool) -> TokenTerms:
    """sum c * ( -surrogate(A, l, lo) + kl_coef * k(l, lr) - entropy_coef * H ) over the tokens given.

    Every argument is shaped like `logp` ([B,T], or one chunk of tokens as [1, n]); `online` is
    broadcastable to it (False on offline rows, which use the plain A l surrogate). `mask` is used
    only by sequence-level importance sampling, which needs whole rows.
    """
    surrogate = policy_surrogate(opts, logp, old_logp, advantages, mask, online)
    loss = -(coef * surrogate.value).sum()
    has_kl = kl is not None if opts.kl_estimator == "full" else ref_logp is not None
    k = kl_estimate(opts.kl_estimator, logp, ref_logp, kl) if has_kl else None
    if kl_in_loss and k is not None:
        loss = loss + opts.kl_coef * (coef * k).sum()
    if entropy is not None and opts.entropy_coef != 0:
        loss = loss - opts.entropy_coef * (coef * entropy).sum()
    return TokenTerms(loss=loss, surrogate=surrogate, kl=k)
