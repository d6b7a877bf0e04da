"""Optimizers built on fusedlab's kernels: a drop-in ``Muon`` and ``MuonWithAuxAdam``."""
from fusedlab.optim.muon import Muon, MuonWithAuxAdam, split_muon_params

__all__ = ["Muon", "MuonWithAuxAdam", "split_muon_params"]
