"""Plain PyTorch reference of CAT's compress-attend attention: a dense boolean mask over exactly the op's
semantics, the test oracle.

Two key streams per (batch, kv head): compressed slots kc/vc [Nc] and raw keys k/v [L]. With chunk size l,
raw token t sits in chunk b = t // l and attends, in one softmax, to

    compressed slots 0..b   (slot 0: the learned start slot; slot c >= 1: the compression of chunk c-1)
    raw keys b*l .. t       (the causal prefix of its own chunk)

A compressed query c (the decoder state at compressed position c, when ``qc`` is given) attends to slots
0..c and to no raw key. Query heads share kv heads in groups of H // Hkv (grouped-query attention).

Scores and the softmax run in float64 for float64 inputs and in float32 otherwise; outputs come back in the
inputs' dtype and the log-sum-exp (natural log, of the scaled scores) in float32 (float64 for float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def raw_mask(L: int, Nc: int, chunk_size: int, device=None) -> torch.Tensor:
    """[L, Nc + L] bool: which of (compressed slots, raw keys) raw query t may see."""
    t = torch.arange(L, device=device)
    chunk = t // chunk_size
    slots = torch.arange(Nc, device=device)
    see_slot = slots[None, :] <= chunk[:, None]
    see_raw = (chunk[None, :] == chunk[:, None]) & (t[None, :] <= t[:, None])
    return torch.cat([see_slot, see_raw], dim=1)


def compressed_mask(Nc: int, device=None) -> torch.Tensor:
    """[Nc, Nc] bool: compressed query c sees slots 0..c."""
    c = torch.arange(Nc, device=device)
    return c[None, :] <= c[:, None]


def _attend(q, k, v, mask, scale):
    """Masked softmax attention with kv heads broadcast over query-head groups; returns (o, lse)."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.to(work).repeat_interleave(group, dim=1)
    v = v.to(work).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(work), k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v)
    return o.to(q.dtype), lse


def cat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  chunk_size: int, qc: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Reference CAT attention. Returns (o, lse) or, with ``qc``, (o, lse, oc, lse_c).

    q [B, H, L, d]; k, v [B, Hkv, L, d]; kc, vc [B, Hkv, Nc, d] with Nc >= ceil(L / chunk_size);
    qc [B, H, Nc, d]. Differentiable in every input.
    """
    L, Nc, d = q.shape[2], kc.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = torch.cat([kc, k], dim=2)
    values = torch.cat([vc, v], dim=2)
    o, lse = _attend(q, keys, values, raw_mask(L, Nc, chunk_size, q.device), scale)
    if qc is None:
        return o, lse
    oc, lse_c = _attend(qc, kc, vc, compressed_mask(Nc, q.device), scale)
    return o, lse, oc, lse_c


def keys_seen(L: int, chunk_size: int) -> int:
    """Most keys any raw query sees (compressed slots plus its chunk's prefix), for cost statements."""
    return (L - 1) // chunk_size + 1 + min(chunk_size, L)


def cat_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, n_raw: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """One query per sequence against its cache: q [B, H, d]; compressed slots kc, vc [B, Hkv, S, d] of which
    the first n_slots[b] are filled; the current chunk's raw keys k, v [B, Hkv, R, d], the first n_raw[b]
    filled. One softmax over both; returns [B, H, d] (float32 math for half inputs)."""
    B, H, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    S, R = kc.shape[2], k.shape[2]
    seen = torch.cat([torch.arange(S, device=q.device)[None, :] < n_slots[:, None],
                      torch.arange(R, device=q.device)[None, :] < n_raw[:, None]], 1)  # [B, S + R]
    o, _ = _attend(q[:, :, None], torch.cat([kc, k], 2), torch.cat([vc, v], 2), seen[:, None, None, :], scale)
    return o[:, :, 0]
