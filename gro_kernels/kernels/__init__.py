"""Layer 1: Triton kernels (forward sweep, backward recompute) and their launchers.

`forward.launch_forward` and `backward.launch_backward` work on compacted, contiguous rows;
`gro_kernels.logprobs.triton_op` is the autograd op that calls them. Block sizes: `tuning.py`.
"""
from .backward import launch_backward
from .forward import launch_forward, merge_partials
from .tuning import OVERRIDE_KEYS, backward_config, forward_config

__all__ = ["launch_forward", "launch_backward", "merge_partials", "forward_config", "backward_config",
           "OVERRIDE_KEYS"]
