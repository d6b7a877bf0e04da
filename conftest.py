# Loaded by pytest before any test module or doctest: Triton reads TRITON_INTERPRET when a kernel is
# decorated (import time), so on a machine without a GPU the interpreter must be selected first.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
