"""Layer 2: the autograd op `token_logprobs` and its backends (naive, torch, triton)."""
from .api import BACKENDS, TokenStats, resolve_backend, token_logprobs

__all__ = ["BACKENDS", "TokenStats", "resolve_backend", "token_logprobs"]
