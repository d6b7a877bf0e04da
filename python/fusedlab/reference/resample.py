"""Plain PyTorch reference for batched particle resampling: the oracle every kernel is tested against.

Semantics (shared by every backend; see docs/api.md):

per group b of K log-weights x (NaN counts as -inf):
  m = max x; the group is *degenerate* when m is not finite (no finite weight, or a +inf weight).
  w_j = exp(x_j - m) in float64;  S = sum w;  ESS = S^2 / sum w^2;  log_norm = m + log S - log K.
  resample when ess_threshold >= 1 or ESS < ess_threshold * K. A degenerate group is always resampled
  uniformly over its K particles (w_j = 1) and reports ESS = 0, log_norm = -inf; the Python wrapper raises
  for it unless on_degenerate="uniform".
  CDF C_j = cumsum(w)_j / S, and C_j = 1 for j >= the last positive weight.
  points p_i: systematic (i + U)/K, stratified (i + U_i)/K, multinomial sort(U)_i;
  ancestor i = first j with C_j > p_i (clamped to the last positive weight), so zero weights are never chosen.
  residual: n_j = floor(K w_j / S) deterministic copies in particle order, then R = K - sum n_j draws by the
  multinomial rule on the residual weights K w_j / S - n_j with points sort(U[:R]).
  log_weights after: 0 where resampled, x - (m + log S) + log K where carried (mean weight stays 1).
status: [B, 2] uint8 flags, 0 or 1: column 0 resampled, column 1 degenerate (so status.view(torch.bool)
gives both flags as views, without another op).
"""
from __future__ import annotations

import math

import torch

METHODS = ("multinomial", "stratified", "systematic", "residual")
#: residual's deterministic copies: floor(K w / S + RESIDUAL_SNAP * K) (csrc/include/fusedlab/resample.h)
RESIDUAL_SNAP = 1e-13

# the columns of status
FLAG_RESAMPLED = 0
FLAG_DEGENERATE = 1


def _inverse_cdf(cdf: torch.Tensor, points: torch.Tensor, last: int) -> torch.Tensor:
    # first j with cdf[j] > p  ==  number of j with cdf[j] <= p  (cdf is non-decreasing)
    idx = torch.searchsorted(cdf, points, right=True)
    return idx.clamp_(max=last)


def _group(x: torch.Tensor, u: torch.Tensor, method: str, ess_threshold: float):
    K = x.numel()
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    m = x.max()
    degenerate = not bool(torch.isfinite(m))
    if degenerate:
        w = torch.ones(K, dtype=torch.float64)
        ess = torch.tensor(0.0, dtype=torch.float64)
        log_norm = torch.tensor(-math.inf, dtype=torch.float64)
        resample = True
    else:
        w = torch.exp(x - m)
        s = w.sum()
        ess = s * s / (w * w).sum()
        log_norm = m + torch.log(s) - math.log(K)
        resample = ess_threshold >= 1.0 or bool(ess < ess_threshold * K)
    status = (int(resample), int(degenerate))
    if not resample:
        lw_out = x - (m + torch.log(w.sum())) + math.log(K)
        return torch.arange(K), lw_out, ess, log_norm, status
    s = w.sum()
    positive = torch.nonzero(w > 0).flatten()
    last = int(positive[-1])
    if method == "residual":
        kw = K * w / s
        # whole numbers stay whole: rounding puts an exact K w / S a few ulps either side (resample.h,
        # residual_copies: every backend uses this rule)
        n = torch.floor(kw + RESIDUAL_SNAP * K)
        det = torch.repeat_interleave(torch.arange(K), n.to(torch.int64))
        R = K - det.numel()
        if R == 0:
            anc = det
        else:
            r = (kw - n).clamp_min(0.0)
            rlast = int(torch.nonzero(r > 0).flatten()[-1])
            cdf = torch.cumsum(r, 0) / r.sum()
            cdf[rlast:] = 1.0
            pts = torch.sort(u[:R]).values
            anc = torch.cat([det, _inverse_cdf(cdf, pts, rlast)])
    else:
        cdf = torch.cumsum(w, 0) / s
        cdf[last:] = 1.0
        i = torch.arange(K, dtype=torch.float64)
        if method == "systematic":
            pts = (i + u[0]) / K
        elif method == "stratified":
            pts = (i + u) / K
        else:
            pts = torch.sort(u).values
        anc = _inverse_cdf(cdf, pts, last)
    return anc, torch.zeros(K, dtype=torch.float64), ess, log_norm, status


def resample(log_weights: torch.Tensor, uniforms: torch.Tensor, method: str, ess_threshold: float):
    """Reference of ``torch.ops.fusedlab.resample``: a Python loop over groups, float64 throughout.

    ``uniforms`` is [B, 1] for systematic and [B, K] otherwise. Returns (log_weights [B, K] in the input
    dtype, ancestors int64 [B, K], ess float64 [B], log_norm float64 [B], status uint8 [B, 2]).
    """
    B, K = log_weights.shape
    dev, dt = log_weights.device, log_weights.dtype
    lw = log_weights.detach().to("cpu", torch.float64)  # gradients: ops.resample wraps this in autograd
    u = uniforms.detach().to("cpu", torch.float64)
    anc = torch.empty(B, K, dtype=torch.int64)
    lw_out = torch.empty(B, K, dtype=torch.float64)
    ess = torch.empty(B, dtype=torch.float64)
    log_norm = torch.empty(B, dtype=torch.float64)
    status = torch.empty(B, 2, dtype=torch.uint8)
    for b in range(B):
        a, l, e, z, s = _group(lw[b], u[b], method, ess_threshold)
        anc[b], lw_out[b], ess[b], log_norm[b] = a, l, e, z
        status[b, FLAG_RESAMPLED], status[b, FLAG_DEGENERATE] = s
    return (lw_out.to(device=dev, dtype=dt), anc.to(dev), ess.to(dev), log_norm.to(dev), status.to(dev))


def gather(state: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Reference of ``torch.ops.fusedlab.gather``: out[b, i, ...] = state[b, ancestors[b, i], ...]."""
    B, K = ancestors.shape
    idx = ancestors.reshape(B, K, *([1] * (state.dim() - 2))).expand(B, K, *state.shape[2:])
    return torch.gather(state, 1, idx)


def offspring_counts(ancestors: torch.Tensor, K: int) -> torch.Tensor:
    """Number of children of each particle: [B, K] int64."""
    out = torch.zeros(ancestors.shape[0], K, dtype=torch.int64, device=ancestors.device)
    return out.scatter_add_(1, ancestors, torch.ones_like(ancestors))


# Philox4x32-10 constants (multipliers and Weyl key increments)
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 blocks: counter [..., 4] and key (k0, k1) as uint32 numpy arrays / ints -> [..., 4] uint32."""
    import numpy as np

    c = [np.asarray(counter[..., j], dtype=np.uint64) for j in range(4)]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        p0, p1 = c[0] * np.uint64(_PHILOX_M[0]), c[2] * np.uint64(_PHILOX_M[1])
        hi0, lo0 = p0 >> np.uint64(32), p0 & np.uint64(_MASK32)
        hi1, lo1 = p1 >> np.uint64(32), p1 & np.uint64(_MASK32)
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, -1).astype(np.uint32)


def philox_uniforms(seed: int, offset: int, B: int, n: int) -> torch.Tensor:
    """The uniforms the CUDA resample kernels draw when no ``uniforms`` are given: [B, n] float64 in [0, 1).

    Uniform i of group b is built from the 32-bit words 2i and 2i + 1 of the group's stream, whose block m is
    Philox4x32-10 with key (seed low, seed high) and counter (m low, m high, b low, b high), the call's
    ``offset`` (words, a multiple of 4, from torch's CUDA generator) skipping its first offset / 4 blocks: the
    top 53 bits of (word 2i << 32 | word 2i + 1) times 2^-53. Same layout as csrc/include/fusedlab/philox.h.
    """
    import numpy as np

    if offset % 4:
        raise ValueError(f"offset must be a multiple of 4, got {offset}")
    b = np.arange(B, dtype=np.uint64)[:, None]
    i = np.arange(n, dtype=np.uint64)[None, :]
    block = np.uint64(offset // 4) + i // np.uint64(2)
    ctr = np.stack(np.broadcast_arrays(block & np.uint64(_MASK32), block >> np.uint64(32), b & np.uint64(_MASK32),
                                       b >> np.uint64(32)), -1)
    words = philox4x32_10(ctr, (seed & _MASK32, (seed >> 32) & _MASK32)).astype(np.uint64)
    odd = (i % np.uint64(2)).astype(bool)
    hi = np.where(odd, words[..., 2], words[..., 0])
    lo = np.where(odd, words[..., 3], words[..., 1])
    bits = (hi << np.uint64(32)) | lo
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)
