"""gro_kernels: RLHF and preference-optimization losses straight from the LM head.

    from gro_kernels import gro_loss
    out = gro_loss(hidden, lm_head.weight, targets, method="grpo", rewards=r, group_ids=g)
    out.loss.backward()

Layers: `kernels` (Triton) -> `logprobs` (the autograd op `token_logprobs`) -> `objective`
(`gro_objective`, the presets) -> `loss` (`gro_loss`, `GROLoss`) -> `trainer`.
"""
from .logprobs import TokenStats, token_logprobs
from .loss import GROLoss, gro_loss
from .objective import METHODS, PRESETS, GROOutput, gro_objective

__version__ = "0.1.0"
__all__ = ["GROLoss", "GROOutput", "METHODS", "PRESETS", "TokenStats", "gro_loss", "gro_objective",
           "token_logprobs", "__version__"]
