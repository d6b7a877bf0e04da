"""Public wrappers of every fusedlab op: argument checks, backend dispatch, fake kernels and autograd.

Each op is also reachable as ``torch.ops.fusedlab.<name>`` (the C++ schema in csrc/fusedlab.cpp).
"""
from fusedlab.ops.cat import cat_attention, cat_decode
from fusedlab.ops.newton_schulz import newton_schulz
from fusedlab.ops.resample import ResampleResult, gather, gather_, resample
from fusedlab.ops.symile import mip, symile_loss

__all__ = ["ResampleResult", "cat_attention", "cat_decode", "gather", "gather_", "mip", "newton_schulz", "resample", "symile_loss"]
