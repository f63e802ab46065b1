"""Shared test setup.

Without a CUDA GPU, run Triton kernels through Triton's CPU interpreter. `triton.jit` reads
TRITON_INTERPRET when a kernel is defined (module import), so this must happen before any test
module imports code that defines kernels; conftest.py is imported first. `import torch` does not
import triton, so asking torch about CUDA here is safe.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Nothing is downloaded at test time: models and tokenizers are built locally (tests/trl_fixtures.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
