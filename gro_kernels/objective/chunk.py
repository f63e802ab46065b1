"""The token-local loss, one chunk of tokens at a time: step (b) of GRO.md section 6.

The fused single pass of `gro_loss` visits the tokens in chunks. For each chunk it has the policy's
statistics (log-prob l, entropy H, exact KL) of those tokens only, and needs the per-token
derivatives of the loss wrt them, to form the logits gradient. `ChunkCoefficients` holds
everything formed before the pass (the sequence plan: weights A, aggregation coefficients c,
corrections, behaviour and reference log-probs) and, for one chunk, evaluates `token_loss` on
the chunk's [n] vectors and differentiates it by autograd: the loss math keeps one copy.

    coefficients = ChunkCoefficients(opts, objective_kwargs, shape=(B, T), dtype=torch.float32, ...)
    g_logp, g_entropy, g_kl = coefficients(positions, chunk_stats)   # positions: indices into B*T
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .core import prepare_objective
from .options import Options
from .split import token_loss


class ChunkCoefficients:
    """dL/dl, dL/dH, dL/dKL of the token-local loss for any chunk of tokens.

    Built once per call from the arguments of `gro_objective` (`objective`): the sequence plan
    is formed on stand-in zeros for l, H and KL, which a token-local plan never reads
    (`split.needs_policy_logp` is what guarantees it). `want_entropy` / `want_kl`: whether the
    chunk statistics carry H / KL (the KL only from a reference head, kl_estimator="full")."""

    def __init__(self, opts: Options, objective: dict, *, shape: Tuple[int, int], dtype: torch.dtype,
                 device: torch.device, want_entropy: bool, want_kl: bool):
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        _, b, plan = prepare_objective(zeros, entropy=zeros if want_entropy else None,
                                       kl=zeros if want_kl else None, **objective)
        B, T = shape

        def flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.reshape(-1)

        self.opts, self.plan = opts, plan
        self.entropy_grad = opts.entropy_coef != 0
        self.kl_grad = want_kl and opts.kl_coef != 0
        self.advantages, self.coef, self.ref_logp = flat(plan.weights.advantages), flat(plan.coef), flat(b.ref_logp)
        self.policy_weight, self.entropy_weight = flat(plan.policy_weight), flat(plan.entropy_weight)
        self.abs_kl_coef = flat(plan.abs_kl_coef)
        self.online = flat((~b.offline)[:, None].expand(B, T))
        # On-policy rows (no old_logp given) and offline rows use sg[l] as the behaviour log-prob.
        self.old_logp = flat(b.old_logp) if objective.get("old_logp") is not None else None

    def __call__(self, pos: torch.Tensor, cs):
        """(g_logp, g_entropy or None, g_kl or None), each [n], for the tokens at `pos` whose
        statistics are `cs` (attributes logp, entropy, kl: [n] each)."""
        def pick(t):
            return None if t is None else t[pos][None]

        with torch.enable_grad():
            l = cs.logp.detach().requires_grad_()
            H = cs.entropy.detach().requires_grad_() if self.entropy_grad else None
            K = cs.kl.detach().requires_grad_() if self.kl_grad else None
            leaves = [t for t in (l, H, K) if t is not None]
            lo = l.detach() if self.old_logp is None else torch.where(self.online[pos], self.old_logp[pos], l.detach())
            terms = token_loss(self.opts, logp=l[None], old_logp=lo[None], ref_logp=pick(self.ref_logp),
                               entropy=None if H is None else H[None], kl=None if K is None else K[None],
                               advantages=self.advantages[pos][None], coef=self.coef[pos][None],
                               online=self.online[pos][None], mask=None, kl_in_loss=self.plan.kl_in_loss,
                               policy_weight=pick(self.policy_weight), entropy_weight=pick(self.entropy_weight),
                               abs_kl_coef=pick(self.abs_kl_coef))
            grads = torch.autograd.grad(terms.loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        g_logp = grads[0]
        g_entropy = grads[1] if H is not None else None
        g_kl = grads[-1] if K is not None else None
        return g_logp, g_entropy, g_kl
