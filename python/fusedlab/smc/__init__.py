"""Sequential Monte Carlo building blocks: batched resampling and particle-state reordering.

    >>> import torch, fusedlab
    >>> g = torch.Generator().manual_seed(0)
    >>> lw = torch.randn(4, 8, generator=g)             # 4 groups of 8 particles
    >>> state = torch.randn(4, 8, 3, generator=g)       # any per-particle tensor
    >>> r = fusedlab.smc.resample(lw, method="stratified", generator=g, state=state)
    >>> r.ancestors.shape, r.state.shape, r.resampled.all().item()
    (torch.Size([4, 8]), torch.Size([4, 8, 3]), True)
"""
from fusedlab.ops.resample import METHODS, ResampleResult, gather, gather_, resample
from fusedlab.smc.adapters import DiffusersSampler, best_of_n, importance_resample, sample
from fusedlab.smc.fk import POTENTIALS, FKResult, FKSteering, FKTrace, schedule

__all__ = ["METHODS", "POTENTIALS", "DiffusersSampler", "FKResult", "FKSteering", "FKTrace", "ResampleResult",
           "best_of_n", "gather", "gather_", "importance_resample", "resample", "sample", "schedule"]
