"""The gro_kernels benchmark suite (not part of the installed package): see bench/README.md."""
