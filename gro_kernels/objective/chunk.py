"""The token-local loss, one chunk of tokens at a time: step (b) of docs/objective.md, "One pass or two".

The fused single pass of `gro_loss` visits the tokens in chunks. For each chunk it has the policy's
statistics (log-prob l, entropy H, exact KL, lse, mean log-prob) of those tokens only, and needs
the per-token derivatives of the loss wrt them, to form the logits gradient. `ChunkCoefficients`
holds everything formed before the pass (the sequence plan: weights A, aggregation coefficients c,
corrections, behaviour and reference log-probs) and, for one chunk, evaluates `token_loss` on the
chunk's [n] vectors and differentiates it by autograd: the loss math keeps one copy.

    coefficients = ChunkCoefficients(opts, objective_kwargs, zeros=..., layout=..., want_entropy=...)
    g_logp, g_entropy, g_kl, g_lse, g_mean_logp = coefficients(positions, chunk_stats)

(g_kl: the derivative wrt the second head's statistic, the exact KL or a teacher's divergence.)
"""
from __future__ import annotations

import torch

from .core import prepare_objective
from .options import Options
from .split import token_loss


class ChunkCoefficients:
    """dL/dl, dL/dH, dL/dKL, dL/dlse, dL/dM of the token-local loss for any chunk of tokens (None for
    a statistic the loss does not read).

    Built once per call from the arguments of `gro_objective` (`objective`, without the layout
    keys) on stand-in `zeros` [B, T]: a token-local plan gets no logp, H, KL, lse or mean log-prob at
    all (`before_pass`; reading them raises `split.NotYetComputed`). `layout`: the token layout of
    packed rows or a context-parallel group (`objective.core.token_layout`), or None; `positions`
    index this process's tokens, flattened. `want_*`: which statistics the chunks carry. `teacher`: the
    chunks' second-head statistic (`kl`) is the divergence to a teacher head (the loss's `distill`), not
    the exact KL to a reference."""

    def __init__(self, opts: Options, objective: dict, *, zeros: torch.Tensor, layout, want_entropy: bool,
                 want_kl: bool, want_lse: bool, want_mean_logp: bool, teacher: bool = False):
        _, b, plan = prepare_objective(zeros, entropy=zeros if want_entropy else None, kl=zeros if want_kl else None,
                                       lse=zeros if want_lse else None, mean_logp=zeros if want_mean_logp else None,
                                       distill=zeros if teacher else None, layout=layout, before_pass=True,
                                       **objective)
        local = (lambda t: t) if layout is None else layout.local

        def flat(t):
            return None if t is None else local(t).reshape(-1)

        self.opts, self.plan, self.teacher = opts, plan, teacher
        self.want = dict(entropy=opts.entropy_coef != 0, kl=(want_kl and opts.kl_coef != 0) or teacher, lse=want_lse,
                         mean_logp=want_mean_logp)
        self.advantages, self.coef, self.ref_logp = flat(plan.weights.advantages), flat(plan.coef), flat(b.ref_logp)
        # Per-token inputs of token_loss formed before the pass (rollout correction, entropy weights, ...).
        self.policy_weight, self.entropy_weight = flat(plan.policy_weight), flat(plan.entropy_weight)
        self.abs_kl_coef, self.lse_coef = flat(plan.abs_kl_coef), flat(plan.lse_coef)
        self.online = flat((~b.offline)[:, None].expand(b.mask.shape))
        # On-policy rows (no old_logp given) and offline rows use sg[l] as the behaviour log-prob.
        self.old_logp = flat(b.old_logp) if objective.get("old_logp") is not None else None

    def __call__(self, pos: torch.Tensor, cs):
        """(g_logp, g_entropy, g_kl, g_lse, g_mean_logp), each [n] or None, for the tokens at `pos`
        whose statistics are `cs` (attributes logp, entropy, kl, lse, mean_logp: [n] each)."""
        def pick(t):
            return None if t is None else t[pos][None]

        def one(t):
            return None if t is None else t[None]

        with torch.enable_grad():
            def leaf(t, want):
                return t.detach().requires_grad_() if want else None

            l = leaf(cs.logp, True)
            H, K = leaf(cs.entropy, self.want["entropy"]), leaf(cs.kl, self.want["kl"])
            K_kl, K_distill = (None, K) if self.teacher else (K, None)
            Z, M = leaf(cs.lse, self.want["lse"]), leaf(cs.mean_logp, self.want["mean_logp"])
            leaves = [l, H, K, Z, M]
            lo = l.detach() if self.old_logp is None else torch.where(self.online[pos], self.old_logp[pos], l.detach())
            terms = token_loss(self.opts, logp=l[None], old_logp=lo[None], ref_logp=pick(self.ref_logp),
                               entropy=one(H), kl=one(K_kl), advantages=self.advantages[pos][None],
                               coef=self.coef[pos][None], online=self.online[pos][None], mask=None,
                               kl_in_loss=self.plan.kl_in_loss, policy_weight=pick(self.policy_weight),
                               entropy_weight=pick(self.entropy_weight), abs_kl_coef=pick(self.abs_kl_coef),
                               lse=one(Z), mean_logp=one(M), lse_coef=pick(self.lse_coef), distill=one(K_distill))
            present = [x for x in leaves if x is not None]
            g = dict(zip(map(id, present), torch.autograd.grad(terms.loss, present, allow_unused=True)))
        out = []
        for x in leaves:
            gx = None if x is None else g[id(x)]
            out.append(torch.zeros_like(x) if x is not None and gx is None else gx)
        return tuple(out)
