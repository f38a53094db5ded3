"""Kernel tests run the Triton kernels themselves: on CUDA when present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process (Triton reads it
when a kernel is decorated), hence at the top of this conftest, before any test module imports a kernel.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
