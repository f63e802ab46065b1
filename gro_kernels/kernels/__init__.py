"""Layer 1: the Triton kernels of the GPU path (the fused epilogue between the vendor GEMMs).

Each file reads like a Triton tutorial: the kernel, its launcher, a check against torch.
`row_stats.row_stats` (log-sum-exp, log-prob, entropy, exact KL of each row: partial sums per
vocabulary split, then their combination) and `logits_grad.logits_grad` (dz into a buffer of its
own) work on one fp32 logits chunk; `launch.py` holds what they share; `gro_kernels.logprobs.engine`
runs the GEMMs around them. `compile_check` compiles every variant for sm_90 without a GPU.
"""
