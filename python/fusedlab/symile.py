"""Symile (Saporta et al., NeurIPS 2024): a contrastive loss for any number of modalities and MIP scoring.

Drop-in for the ``symile`` package: ``from fusedlab.symile import Symile, MIPSimilarity`` takes the same
arguments and gives the same values and gradients (``Symile`` is ``SymileLoss``, with the package's
compute_logits_n and compute_logits_n_squared methods). Differences: both are nn.Modules; an unknown
negative_sampling fails at construction; "n_squared" works at M = 2 (where it is the symmetric CLIP loss)
and runs without the package's N^(M-1) x d products; MIPSimilarity broadcasts a [d] query against [B, d]
ones in any order.

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

    def compute_logits_n(self, anchor_rep: torch.Tensor, non_anchor_reps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The package's "n" logits for one anchor, unscaled: [N, N], the positive MIPs on the diagonal and
        off it MIP(anchor[i], each other modality's row perm[j]), one torch.randperm per other modality
        (from ``generator``, a CPU generator, when set, else the global RNG, drawn as the package draws
        them). From this process's rows only (no ``process_group``). The loss never builds this matrix; it
        is here for code written against the package's method."""
        _check_reps([anchor_rep, *non_anchor_reps])
        n = anchor_rep.shape[0]
        shuffled, positives = torch.ones_like(anchor_rep), anchor_rep
        for r in non_anchor_reps:
            shuffled = shuffled * r[torch.randperm(n, generator=self.generator).to(r.device)]
            positives = positives * r
        logits = anchor_rep @ shuffled.T
        eye = torch.eye(n, dtype=torch.bool, device=anchor_rep.device)
        return torch.where(eye, positives.sum(1), logits)

    def compute_logits_n_squared(self, anchor_rep: torch.Tensor,
                                 non_anchor_reps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The package's "n_squared" logits for one anchor, unscaled: [N, N^(M-1)] in the package's column
        order, the positives on the main diagonal. With others (t_1, ..., t_k) and row shifts s_m, entry
        (i, c) is MIP(anchor[i], t_1[b - s_1], ..., t_(k-2)[b - s_(k-2)], t_(k-1)[b], t_k[b - s_k]) (rows
        mod N) for the column c whose digits in base N are s_1, ..., s_(k-2), s_k, b (b the last). At M = 2,
        where the package fails, the columns are the other modality's rows (the CLIP logits). From this
        process's rows only (no ``process_group``). Builds the N^(M-1) x d products, as the package does;
        the loss never does."""
        _check_reps([anchor_rep, *non_anchor_reps])
        n = anchor_rep.shape[0]
        if len(non_anchor_reps) == 1:
            return anchor_rep @ non_anchor_reps[0].T
        rows = torch.arange(n, device=anchor_rep.device)
        shifted = (rows[None, :] - rows[:, None]) % n  # [shift, b] -> b - shift
        *outer, unshifted, last = non_anchor_reps
        products = unshifted[None] * last[shifted]  # [s_k, b, d]
        for t in reversed(outer):  # each earlier modality's shift becomes the new leading index
            products = t[shifted].reshape((n,) + (1,) * (products.dim() - 2) + (n, -1)) * products[None]
        return anchor_rep @ products.reshape(-1, anchor_rep.shape[1]).T

    def extra_repr(self) -> str:
        return f"negative_sampling={self.negative_sampling!r}"


def _check_reps(reps: Sequence[torch.Tensor]) -> None:
    if any(not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape != reps[0].shape for r in reps):
        raise ValueError("anchor_rep and non_anchor_reps must be 2-D tensors of one shape [N, d], got "
                         f"{[tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__ for r in reps]}")
    if len(reps) < 2:
        raise ValueError("non_anchor_reps must hold at least one tensor")


Symile = SymileLoss


class MIPSimilarity(nn.Module):
    """``MIPSimilarity()(candidates, query_reps)`` -> [B, C]: each query tuple's multilinear inner product
    with every candidate (candidates [C, d]; query_reps a list of [B, d] or [d] tensors). No logit scale."""

    def forward(self, candidates: torch.Tensor, query_reps: Sequence[torch.Tensor]) -> torch.Tensor:
        return _ops.mip(candidates, query_reps)
