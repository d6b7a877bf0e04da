"""Plain PyTorch reference of the Symile loss and of MIP scoring: the test oracle.

For M modalities r_1..r_M, each [N, d], the multilinear inner product is
    T[i_1, ..., i_M] = sum_t r_1[i_1, t] * ... * r_M[i_M, t]
and with the (already exponentiated) logit scale s the loss is the mean over anchors a of a cross-entropy
whose positive for anchor row n is the aligned tuple (n, ..., n):

    "n_squared": every combination of the other modalities' rows is a negative, so
        loss_a = mean_n [ logsumexp_{i_b, b != a; i_a = n} s T  -  s T[n, ..., n] ]
        (the symile package lists the same N^(M-1) columns per anchor in another order; the order does
        not change a cross-entropy with the positive in it, so all anchors share one tensor T).
    "n": per anchor, each other modality b is shuffled by a permutation pi[a, b'] (b' counts the other
        modalities in list order); the logits are anchor @ (prod_b r_b[pi[a, b']])^T with the diagonal
        replaced by the positive, exactly as symile 0.1.0 builds them.

Two n_squared implementations: `symile_loss_n_squared` builds T (N^M entries: the oracle at small N), and
`symile_loss_n_squared_chunked` streams anchor-row blocks and column tiles with an online log-sum-exp (never
N^M nor N^(M-1) x d at once in the forward; run it under torch.no_grad() at large N, since autograd keeps
every tile).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

STRATEGIES = ("n", "n_squared")


def mip(candidates: torch.Tensor, query_reps: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, C] scores: (elementwise product of the query modalities) @ candidates^T, 2-D even for 1-D queries;
    mixed dtypes computed in their promoted dtype."""
    q = query_reps[0]
    for r in query_reps[1:]:
        q = q * r
    dtype = torch.promote_types(q.dtype, candidates.dtype)
    out = q.to(dtype) @ candidates.to(dtype).T
    return out.unsqueeze(0) if out.dim() == 1 else out


def draw_permutations(M: int, N: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[M, M-1, N] int64: the permutations "n" uses, drawn with torch.randperm(N) in the package's order
    (anchor 0's other modalities in list order, then anchor 1's, ...) from ``generator`` or the global RNG."""
    perms = [torch.randperm(N, generator=generator) for _ in range(M * (M - 1))]
    return torch.stack(perms).view(M, M - 1, N)


def symile_loss_n(reps: Sequence[torch.Tensor], logit_scale, permutations: torch.Tensor) -> torch.Tensor:
    """The O(N) strategy with explicit permutations [M, M-1, N] (see draw_permutations)."""
    M, N = len(reps), reps[0].shape[0]
    labels = torch.arange(N, device=reps[0].device)
    eye = torch.eye(N, dtype=torch.bool, device=reps[0].device)
    losses = []
    for a in range(M):
        others = [r for b, r in enumerate(reps) if b != a]
        shuffled = others[0][permutations[a, 0]]
        positive = reps[a] * others[0]
        for k, r in enumerate(others[1:], start=1):
            shuffled = shuffled * r[permutations[a, k]]
            positive = positive * r
        logits = torch.where(eye, positive.sum(dim=1), reps[a] @ shuffled.T)
        losses.append(F.cross_entropy(logit_scale * logits, labels))
    return sum(losses) / M


def mip_tensor(reps: Sequence[torch.Tensor]) -> torch.Tensor:
    """T [N]*M with T[i_1..i_M] = MIP(r_1[i_1], ..., r_M[i_M]); builds N^(M-1) x d on the way."""
    N, d = reps[0].shape
    P = reps[0]
    for r in reps[1:-1]:
        P = (P.unsqueeze(-2) * r).reshape(P.shape[0] * N, d)  # explicit rows: d may be 0
    return (P @ reps[-1].T).reshape([N] * len(reps))


def symile_loss_n_squared(reps: Sequence[torch.Tensor], logit_scale) -> torch.Tensor:
    """The O(N^2) strategy from the shared tensor T: one log-sum-exp over all axes but the anchor's."""
    M, N = len(reps), reps[0].shape[0]
    S = logit_scale * mip_tensor(reps)
    idx = torch.arange(N, device=S.device)
    positive = S[(idx,) * M]
    total = 0
    for a in range(M):
        lse = torch.logsumexp(S.movedim(a, 0).reshape(N, -1), dim=1)
        total = total + (lse - positive).mean()
    return total / M


def symile_loss_n_squared_chunked(reps: Sequence[torch.Tensor], logit_scale, block_rows: int = 64,
                                  block_cols: int = 4096) -> torch.Tensor:
    """The O(N^2) strategy anchor by anchor: anchor rows in blocks of ``block_rows``; for each block the
    N^(M-1) columns (tuples of the other modalities' rows) in tiles of about ``block_cols``, each tile's
    logits formed as (anchor block * product of the outer modalities' rows) @ last_modality^T and folded
    into a running (max, sum of exp) per anchor row. Peak extra memory: one tile of block_rows x block_cols
    logits and one of block_rows x (block_cols / N) x d products."""
    M, N = len(reps), reps[0].shape[0]
    d = reps[0].shape[1]
    s = logit_scale
    positive = reps[0]
    for r in reps[1:]:
        positive = positive * r
    positive = s * positive.sum(dim=1)
    n_outer = N ** (M - 2)  # tuples of the other modalities but the last
    tuples_per_tile = max(1, block_cols // max(N, 1))
    total = 0
    for a in range(M):
        others = [r for b, r in enumerate(reps) if b != a]
        last, outer = others[-1], others[:-1]
        lse_rows = []
        for i0 in range(0, N, block_rows):
            x = reps[a][i0:i0 + block_rows]
            run_max = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
            run_sum = torch.zeros_like(run_max)
            for u0 in range(0, n_outer, tuples_per_tile):
                u = torch.arange(u0, min(u0 + tuples_per_tile, n_outer), device=x.device)
                W = torch.ones(u.shape[0], d, dtype=x.dtype, device=x.device)
                rest = u
                for r in reversed(outer):
                    W = W * r[rest % N]
                    rest = rest // N
                logits = s * ((x.unsqueeze(0) * W.unsqueeze(1)).reshape(-1, d) @ last.T)  # [K*B, N]
                logits = logits.view(u.shape[0], x.shape[0], N)
                tile_max = logits.amax(dim=(0, 2))
                new_max = torch.maximum(run_max, tile_max)
                run_sum = run_sum * torch.exp(run_max - new_max) + \
                    torch.exp(logits - new_max[None, :, None]).sum(dim=(0, 2))
                run_max = new_max
            lse_rows.append(run_max + torch.log(run_sum))
        total = total + (torch.cat(lse_rows) - positive).mean()
    return total / M


def symile_loss(reps: Sequence[torch.Tensor], logit_scale, negative_sampling: str = "n",
                permutations: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Symile loss; "n" needs ``permutations`` [M, M-1, N] (draw_permutations replays the package)."""
    if negative_sampling == "n":
        if permutations is None:
            raise ValueError("permutations: the reference 'n' strategy needs explicit permutations")
        return symile_loss_n(reps, logit_scale, permutations)
    if negative_sampling == "n_squared":
        return symile_loss_n_squared(reps, logit_scale)
    raise ValueError(f"negative_sampling must be one of {STRATEGIES}, got {negative_sampling!r}")
