"""How the objective splits for one fused pass (docs/objective.md, "One pass or two").

(a) Sequence-level quantities, formed before any pass over the vocabulary: the weights A[i,t]
    (from rewards, labels, baselines, given advantages) and the aggregation coefficients c[i,t].
(b) The token-local loss `ell(l, H, KL)` of each token given (a): `token_loss` below. `gro_objective`
    evaluates it on the whole [B,T] batch; the fused single pass evaluates it on each chunk of
    tokens and takes its derivatives (dL/dl, dL/dH, dL/dKL) by autograd on the chunk's small
    vectors, so the loss math has one copy.

A configuration is token-local when (a) does not depend on the policy's own log-probs. Otherwise
(implicit scores of DPO/IPO/CPL/SimPO/KTO, GSPO's sequence ratio, a reward-placed KL without
`old_logp` or with the exact KL) it needs a forward-only pass first: `needs_policy_logp` says which.
The one pass forms (a) with `NotYetComputed` in place of the policy's statistics, so a configuration
that `needs_policy_logp` wrongly calls token-local fails loudly instead of reading placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .options import Options
from .surrogates import Surrogate, kl_estimate, policy_surrogate


# The surrogates whose per-token weights are formed from the policy's own log-probs over whole rows
# (VESPO's sequence weight, Clip-Cov / KL-Cov's covariance selection) or whose term couples the
# tokens of a row (GMPO's geometric mean).
_ROW_SURROGATES = ("vespo", "geo_mean", "clip_cov", "kl_cov")


def needs_policy_logp(opts: Options, *, has_old_logp: bool, has_advantages: bool, has_offline: bool = False) -> bool:
    """Whether the configuration is not token-local: its weights read the policy's own (detached)
    log-probs or entropies over whole rows or the whole batch, or a token's term reads other tokens'
    log-probs. Then the fused path runs a forward-only pass first (four GEMMs instead of three) and
    evaluates the objective on the full [B,T] batch."""
    if opts.surrogate != "logp" and opts.importance_sampling == "sequence":
        return True  # GSPO / LUSPO: rho_i = exp(mean_t (l - lo)) couples the tokens of a sequence
    if opts.surrogate in _ROW_SURROGATES:
        return True
    if opts.top_entropy_quantile < 1.0:
        return True  # the entropy threshold is a quantile over every token of the batch
    if opts.use_weighting:
        return True  # WPO's weights read the policy's log-probs and log sum_v p_v^2 over whole rows
    if opts.off_policy_mask_threshold is not None:
        return True  # the mask reads the row's mean of (rollout or old log-prob - sg[l])
    if opts.rollout_correction is not None and not has_old_logp:
        return True  # the train-side log-prob of the correction is then sg[l]
    if has_advantages:
        return False  # given advantages replace the weights
    if opts.score == "implicit":
        return True   # X_i = S_i or D_i
    reward_kl = opts.kl_coef != 0 and opts.kl_placement == "reward" and opts.score in ("reward", "token_return")
    if reward_kl and opts.kl_estimator == "full":
        return True  # the exact KL in the reward is the policy's own, over the whole vocabulary
    # A sampled reward KL reads lo, which is sg[l] on-policy and on offline rows.
    return reward_kl and (not has_old_logp or has_offline)


class NotYetComputed:
    """Stands in for a per-token statistic of the policy (log-prob, entropy, exact KL, or sg[l] as
    the on-policy behaviour log-prob) while the one pass forms its sequence plan: they exist only
    once the pass has run. Any use raises, so a configuration whose plan reads one (it is not
    token-local, and `needs_policy_logp` missed it) is an error, never a gradient from placeholders."""

    def __init__(self, name: str):
        self.name = name

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(
            f"gro_loss's one pass formed its sequence plan from the policy's {self.name}, which exists only "
            "after the pass: this configuration is not token-local and objective/split.needs_policy_logp "
            "must say so (please report it; backend='naive' computes it correctly meanwhile)")

    def __getattr__(self, attr):
        self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        pending = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, cls)]
        pending[0]._refuse()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __pow__ = __rpow__ = __matmul__ = __rmatmul__ = __neg__ = __abs__ = __getitem__ = __iter__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __bool__ = __float__ = __len__ = _refuse
    __hash__ = None


@dataclass
class TokenTerms:
    loss: torch.Tensor                       # 0-d: sum over the tokens given
    policy: torch.Tensor                     # 0-d: the policy term's part of it
    surrogate: Surrogate
    kl: Optional[torch.Tensor]               # the per-token KL estimate (or None)
    per_token: Optional[torch.Tensor] = None  # the loss before the sum, shaped like logp


def token_loss(opts: Options, *, logp, old_logp, ref_logp, entropy, kl, advantages, coef, online,
               mask, kl_in_loss: bool, policy_weight=None, entropy_weight=None, abs_kl_coef=None,
               lse=None, mean_logp=None, lse_coef=None, distill=None) -> TokenTerms:
    """sum c * ( -g * (surrogate(A, l, lo) - a |l - lo|) + kl_coef * k(l, lr) [* r] ) - entropy_coef * sum e * H
    + z_loss_coef * sum c_z lse^2 + distill_coef * sum c D.

    Every argument is shaped like `logp` ([B,T], or one chunk of tokens as [1, n]); `online` is
    broadcastable to it (False on offline rows, which use the plain A l surrogate). `mask` is used
    only by the surrogates that read whole rows (sequence ratio, geo_mean).

    Per-token inputs formed before the pass (detached, carried by `SequencePlan`, None = not used);
    with `advantages` (A), `coef` (c), `old_logp`, `ref_logp` and `online` they are everything a
    chunk needs besides its own l, H, KL:
      policy_weight  g [B,T]: multiplies the policy term: the rollout importance weight
                     (`rollout_correction`), the off-policy sequence mask, the top-entropy token mask,
                     VESPO's sequence weight phi, Clip-Cov's dropped tokens (0);
      entropy_weight e [B,T]: the entropy bonus's coefficient per token, in place of c (the top-entropy
                     token mask times c, or TRL's token mean with entropy_agg='token_mean');
      abs_kl_coef    a [B,T]: KL-Cov's penalty coefficient (ppo_kl_coef on the selected tokens, else 0).
    `[* r]`: with use_bias_correction_kl the KL term is multiplied by the importance ratio r (with its
    gradient; DeepSeek-V3.2).
      lse, lse_coef  the head's log normalizer and its z-loss coefficient c_z (None: c);
      mean_logp      (1/V) sum_v w_v log p_v: SFT's label smoothing eps makes its surrogate
                     (1 - eps) A l + eps mean_logp (torch's cross-entropy with label_smoothing).
      distill        D, the exact per-token divergence to the teacher head (differentiable).
    """
    surrogate = policy_surrogate(opts, logp, old_logp, advantages, mask, online)
    value = surrogate.value
    if mean_logp is not None:
        value = (1 - opts.label_smoothing) * value + opts.label_smoothing * mean_logp
    if abs_kl_coef is not None:
        value = value - abs_kl_coef * (logp - old_logp).abs()
    if policy_weight is not None:
        value = policy_weight * value
    per_token = -(coef * value)
    policy = per_token.sum()
    loss = policy
    has_kl = kl is not None if opts.kl_estimator == "full" else ref_logp is not None
    k = kl_estimate(opts.kl_estimator, logp, ref_logp, kl) if has_kl else None
    if kl_in_loss and k is not None:
        k_loss = k
        if opts.use_bias_correction_kl:
            ratio = surrogate.live_ratio
            if ratio is None:
                ratio = torch.where(online, torch.exp(logp - old_logp), torch.ones_like(logp))
            k_loss = k * ratio
        term = opts.kl_coef * (coef * k_loss)
        loss, per_token = loss + term.sum(), per_token + term
    if entropy is not None and opts.entropy_coef != 0:
        e = coef if entropy_weight is None else entropy_weight
        term = opts.entropy_coef * (e * entropy)
        loss, per_token = loss - term.sum(), per_token - term
    if lse is not None and opts.z_loss_coef != 0:
        term = opts.z_loss_coef * ((coef if lse_coef is None else lse_coef) * lse * lse)
        loss, per_token = loss + term.sum(), per_token + term
    if distill is not None and opts.distill_coef != 0:
        term = opts.distill_coef * (coef * distill)
        loss, per_token = loss + term.sum(), per_token + term
    return TokenTerms(loss=loss, policy=policy, surrogate=surrogate, kl=k, per_token=per_token)
