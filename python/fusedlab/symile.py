"""Symile (Saporta et al., NeurIPS 2024): a contrastive loss for any number of modalities and MIP scoring.

Drop-in for the ``symile`` package: ``from fusedlab.symile import Symile, MIPSimilarity`` takes the same
arguments and gives the same values and gradients (``Symile`` is ``SymileLoss``). Differences: both are
nn.Modules; an unknown negative_sampling fails at construction; "n_squared" works at M = 2 (where it is
the symmetric CLIP loss) and runs without the package's N^(M-1) x d products; MIPSimilarity broadcasts a
[d] query against [B, d] ones in any order.

    >>> import torch
    >>> from fusedlab.symile import SymileLoss, MIPSimilarity
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y, z = (torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(3))
    >>> loss = SymileLoss("n_squared")([x, y, z], torch.tensor(20.0))
    >>> loss.shape, bool(loss > 0)
    (torch.Size([]), True)
    >>> MIPSimilarity()(x, [y, z]).shape        # score every x against each (y, z) pair
    torch.Size([16, 16])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fusedlab.ops import symile as _ops

__all__ = ["MIPSimilarity", "Symile", "SymileLoss"]


class SymileLoss(nn.Module):
    """The Symile loss: ``SymileLoss(negative_sampling)(representations, logit_scale)``.

    Args:
        negative_sampling: "n" (N - 1 negatives per row, the default, as the package's) or "n_squared"
            (all N^(M-1) - 1 combinations of the other modalities' rows).
        generator: "n" only: draw the permutations from this generator instead of the global RNG (with
            the global RNG, seeding torch as for the package replays its draws exactly).
        backend: see fusedlab.ops.symile_loss.
        process_group: negatives from every rank's rows (all-gathered with gradient), the global batch's
            loss on every rank; see fusedlab.ops.symile_loss.

    forward(representations, logit_scale, permutations=None): a list of M tensors [N, d] and the
    already-exponentiated scale (float or one-element tensor); returns the scalar loss averaged over the
    M anchors. ``permutations`` [M, M-1, N] fixes the "n" negatives (fusedlab.ops.symile_loss).
    """

    def __init__(self, negative_sampling: str = "n", *, generator: Optional[torch.Generator] = None,
                 backend: str = "auto", process_group=None):
        super().__init__()
        if not isinstance(negative_sampling, str) or negative_sampling not in _ops.STRATEGIES:
            raise ValueError(f"negative_sampling must be one of {_ops.STRATEGIES}, got {negative_sampling!r}")
        if generator is not None and negative_sampling != "n":
            raise ValueError("generator applies to negative_sampling='n' only")
        self.negative_sampling = negative_sampling
        self.generator = generator
        self.backend = backend
        self.process_group = process_group

    def forward(self, representations: Sequence[torch.Tensor], logit_scale,
                permutations: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ops.symile_loss(representations, logit_scale, self.negative_sampling, permutations=permutations,
                                generator=self.generator, backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"negative_sampling={self.negative_sampling!r}"


Symile = SymileLoss


class MIPSimilarity(nn.Module):
    """``MIPSimilarity()(candidates, query_reps)`` -> [B, C]: each query tuple's multilinear inner product
    with every candidate (candidates [C, d]; query_reps a list of [B, d] or [d] tensors). No logit scale."""

    def forward(self, candidates: torch.Tensor, query_reps: Sequence[torch.Tensor]) -> torch.Tensor:
        return _ops.mip(candidates, query_reps)
