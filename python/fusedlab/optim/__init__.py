"""Optimizers built on fusedlab's kernels: a drop-in ``Muon``."""
from fusedlab.optim.muon import Muon

__all__ = ["Muon"]
