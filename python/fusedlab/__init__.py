"""fusedlab: fused GPU kernels with honest CPU fallbacks, exposed as PyTorch ops.

    >>> import torch, fusedlab
    >>> "cpu" in fusedlab.backends() and "reference" in fusedlab.backends()
    True
    >>> lw = torch.log(torch.tensor([[0.0, 0.5, 0.5]]))
    >>> r = fusedlab.smc.resample(lw, uniforms=torch.tensor([0.0]))
    >>> r.ancestors.tolist()   # a zero-weight particle is never chosen, even at u = 0
    [[1, 1, 2]]
"""
from __future__ import annotations

import torch

from fusedlab import _C  # noqa: F401  (loads the op schemas and the C++ CPU kernels)
from fusedlab._backend import BACKENDS, backends, cuda_kernels_loaded  # noqa: F401
from fusedlab import nn, ops, optim, reference, smc, symile, tailrisk  # noqa: F401,E402

cuda_kernels_loaded()  # registers the CUDA kernels (fusedlab._C_cuda) when there is a GPU and they were built

__version__ = "0.1.0"

__all__ = ["backends", "nn", "ops", "optim", "reference", "smc", "symile", "tailrisk", "__version__"]
