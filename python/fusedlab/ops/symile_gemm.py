"""Symile "n_squared" as tiles of library GEMMs: the GPU path of the "cuda" backend.

The logits of all anchors share one tensor S[i, j, u] = s * sum_d r_0[i, d] r_1[j, d] W_u[d], where u runs
over the N^(M-2) tuples of modalities 2..M-1 and W_u is the product of their rows (W = 1 for M = 2). For a
chunk of tuples, P = W_u * r_1 ([chunk * N, d]) turns the chunk into one GEMM, r_0 @ P^T, whose fp32 output
feeds every anchor's online log-sum-exp: over (u, j) per row i, over (i, u) per column j and, per tuple, over
(i, j) (the outer anchors' log-sum-exps are log-sum-exps of those). The backward recomputes each chunk's
tile, forms dL/dS = g s / (M N) * sum_a exp(S - L_a) and runs two more GEMMs (dr_0 += G P, dP = G^T r_0).

Only one chunk's logits exist at a time (at most ``tile_elems`` of them, fp32), with a few buffers of at
most that size around them (exponentials, the [chunk * N, d] operand and its gradient: a chunk is sized so
that neither N x chunk x N nor chunk x N x d passes ``tile_elems``): bounded memory whatever N, d and M,
about 1.35 GB at N = 512, d = 1024 (measured on an H100), at the speed of the vendor GEMM. fp16/bf16 products run on tensor cores with fp32 outputs on CUDA
(torch.mm's out_dtype); elsewhere they are computed in fp32. Both passes run with autocast off, so under
torch.autocast the backward recomputes exactly the forward's logits. These are ATen ops, so the same code
runs on CPU tensors (that is how it is tested against the reference).
"""
from __future__ import annotations

import math

import torch

#: logits per tile (fp32): about 128 MiB for S plus as much for the exponentials
TILE_ELEMS = 1 << 25


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 (fp64 for fp64) result: tensor cores with fp32 output for half types on CUDA."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b)


def _tuple_rows(reps, u: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of modalities 2..M-1 for tuple numbers u (modality 2 the most significant digit)."""
    N, idx, rest = reps[0].shape[0], [], u
    for _ in reps[2:]:
        idx.append(rest % N)
        rest = rest // N
    return idx[::-1]


def _tuple_products(reps, rows: list[torch.Tensor], acc) -> torch.Tensor:
    """W_u = prod over modalities 2..M-1 of their rows (in ``acc``), [chunk, d]; ones for M = 2."""
    w = torch.ones(rows[0].shape[0] if rows else 1, reps[0].shape[1], dtype=acc, device=reps[0].device)
    for r, i in zip(reps[2:], rows):
        w = w * r[i].to(acc)
    return w


def _chunks(reps, tile_elems: int):
    """(u0, u1, row indices of modalities 2..M-1) per chunk of tuples, about tile_elems logits each."""
    (N, d), M = reps[0].shape, len(reps)
    U = N ** (M - 2)
    # a chunk holds N x chunk x N logits and the [chunk * N, d] operand P (and its gradient): both bounded
    per = max(1, min(U, tile_elems // max(N * max(N, d), 1)))
    dev = reps[0].device
    for u0 in range(0, U, per):
        u1 = min(U, u0 + per)
        yield u0, u1, _tuple_rows(reps, torch.arange(u0, u1, device=dev))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(reps, w, acc):
    """The unscaled logits of one chunk, [N, chunk, N] (i, u, j) in ``acc``, and the GEMM operand P
    [chunk * N, d] in the reps' dtype."""
    N, d = reps[0].shape
    P = (w[:, None, :] * reps[1].to(acc)[None]).reshape(w.shape[0] * N, d).to(reps[0].dtype)
    return _mm(reps[0], P.T).view(N, w.shape[0], N), P


def forward(reps: list[torch.Tensor], logit_scale: torch.Tensor, tile_elems: int = TILE_ELEMS):
    """(loss in the reps' dtype, [M, N] per-anchor log-sum-exps in fp32/fp64)."""
    M, (N, d) = len(reps), reps[0].shape
    acc = _acc(reps[0].dtype)
    scale = logit_scale.to(acc).reshape(())
    neg = torch.full((N,), -math.inf, dtype=acc, device=reps[0].device)
    lse0, lse1, per_tuple = neg.clone(), neg.clone(), []
    for u0, u1, rows in _chunks(reps, tile_elems):
        S = _logits(reps, _tuple_products(reps, rows, acc), acc)[0] * scale
        lse0 = torch.logaddexp(lse0, torch.logsumexp(S, dim=(1, 2)))
        lse1 = torch.logaddexp(lse1, torch.logsumexp(S, dim=(0, 1)))
        if M > 2:
            per_tuple.append(torch.logsumexp(S, dim=(0, 2)))
    lse = [lse0, lse1]
    if M > 2:
        t = torch.cat(per_tuple).view([N] * (M - 2))
        for m in range(M - 2):
            lse.append(torch.logsumexp(t, dim=[a for a in range(M - 2) if a != m]) if M > 3 else t)
    lse = torch.stack(lse)
    positive = reps[0].to(acc)
    for r in reps[1:]:
        positive = positive * r.to(acc)
    positive = scale * positive.sum(dim=1)
    loss = (lse - positive).mean(dim=1).mean()
    return loss.to(reps[0].dtype), lse


def backward(grad: torch.Tensor, reps: list[torch.Tensor], logit_scale: torch.Tensor, lse: torch.Tensor,
             tile_elems: int = TILE_ELEMS):
    """(gradients of the reps in their dtypes, gradient of logit_scale) for the loss's gradient ``grad``."""
    M, (N, d) = len(reps), reps[0].shape
    acc = _acc(reps[0].dtype)
    scale = logit_scale.to(acc).reshape(())
    g = grad.to(acc).reshape(())
    coef = g / (M * N)  # dL/dS = coef * sum_a exp(S - L_a)
    grads = [torch.zeros(N, d, dtype=acc, device=reps[0].device) for _ in reps]
    grad_s = torch.zeros((), dtype=acc, device=reps[0].device)
    r1 = reps[1].to(acc)
    for u0, u1, rows in _chunks(reps, tile_elems):
        w = _tuple_products(reps, rows, acc)
        R, P = _logits(reps, w, acc)
        S = R * scale
        # E = sum_a exp(S - L_a) lies in [0, M]: the GEMMs take it unscaled (no fp16 underflow) and coef * s
        # is applied to their fp32 outputs
        E = torch.exp(S - lse[0][:, None, None]) + torch.exp(S - lse[1][None, None, :])
        for m in range(2, M):
            E += torch.exp(S - lse[m][rows[m - 2]][None, :, None])
        grad_s += coef * (E * R).sum()
        G = E.view(N, -1).to(reps[0].dtype)
        grads[0] += (coef * scale) * _mm(G, P)
        dP = (coef * scale) * _mm(G.T, reps[0]).view(w.shape[0], N, d)  # [chunk, N, d]: dL/dP[u, j]
        grads[1] += (dP * w[:, None, :]).sum(dim=0)
        if M > 2:
            dw = (dP * r1[None]).sum(dim=1)  # [chunk, d]: dL/dW_u
            for m in range(2, M):
                others = torch.ones_like(dw)
                for k in range(2, M):
                    if k != m:
                        others = others * reps[k][rows[k - 2]].to(acc)
                grads[m].index_add_(0, rows[m - 2], dw * others)
    # the positives: loss -= mean_n p[n] with p[n] = s * sum_d prod_m r_m[n, d]
    full = [r.to(acc) for r in reps]
    for m in range(M):
        rest = torch.ones_like(full[0])
        for k in range(M):
            if k != m:
                rest = rest * full[k]
        grads[m] -= (g * scale / N) * rest
    prod = full[0]
    for r in full[1:]:
        prod = prod * r
    grad_s -= g * prod.sum() / N
    return [gr.to(r.dtype) for gr, r in zip(grads, reps)], grad_s.to(logit_scale.dtype).reshape(logit_scale.shape)
