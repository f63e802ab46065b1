"""Layer 1: the Triton kernels of the GPU path (the fused epilogue between the vendor GEMMs).

`epilogue.launch_row_stats` and `epilogue.launch_logits_grad` work on one fp32 logits chunk;
`gro_kernels.logprobs.engine` runs the GEMMs around them. `compile_check` compiles them for
sm_90 without a GPU.
"""
