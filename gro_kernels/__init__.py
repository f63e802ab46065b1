"""gro_kernels."""
