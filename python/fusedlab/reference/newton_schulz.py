"""Plain PyTorch reference of Newton-Schulz orthogonalization (Muon's inner loop): the test oracle.

X <- G / max(s * ||G||_F, eps), transposed to wide (rows <= cols), then per step with (a, b, c):
    A = X X^T,   B = b A + c A A,   X = a X + B X
and transposed back. `s` is the coefficient set's normalization factor (1 for Keller's, 1.02 for the
Polar Express set). Works on a batch [..., m, n] and in any floating dtype (float64 for the oracle).
"""
from __future__ import annotations

import numbers
import operator

import torch

KELLER = ((3.4445, -4.7750, 2.0315),)  # repeated every step
POLAR_EXPRESS = (  # the 5-step set of modded-nanogpt and Dion (safety factor 1.02 folded in)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFICIENT_SETS = {"keller": (KELLER, 1.0), "polar_express": (POLAR_EXPRESS, 1.02)}


def _is_number(v) -> bool:
    """A real scalar: Python and numpy numbers, one-element real tensors (not bools)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_coefficients(coefficients, steps: int):
    """(list of `steps` (a, b, c) triples, normalization factor) from a name, one triple or a sequence of triples.

    A set shorter than `steps` repeats its last triple (Keller's is one triple used every step).
    """
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(f"coefficients must be one of {tuple(COEFFICIENT_SETS)} or (a, b, c) triples, "
                             f"got {coefficients!r}")
        triples, scale = COEFFICIENT_SETS[coefficients]
    else:
        seq = list(coefficients)
        if seq and all(_is_number(v) for v in seq):  # one flat set: a triple used at every step, or a mistake
            if len(seq) != 3:
                raise ValueError(f"coefficients: one (a, b, c) triple or a sequence of them, got {len(seq)} numbers")
            seq = [tuple(seq)]
        triples = []
        for t in seq:
            if _is_number(t) or isinstance(t, str) or len(t) != 3 or not all(_is_number(v) for v in t):
                raise ValueError(f"coefficients: each step needs an (a, b, c) triple of numbers, got {t!r}")
            triples.append(tuple(float(v) for v in t))
        if not triples:
            raise ValueError("coefficients: got an empty sequence")
        scale = 1.0
    if isinstance(steps, bool) or not hasattr(steps, "__index__") or operator.index(steps) < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    steps = operator.index(steps)
    out = [triples[min(i, len(triples) - 1)] for i in range(steps)]
    return out, scale


def normalize(G: torch.Tensor, scale: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """G / max(scale * ||G||_F, eps) per matrix, computed in float32 (float64 when dtype is float64), cast to dtype.

    Without forming the norm, which can overflow where every element is finite: each matrix is divided by its
    max |G| first (in float64 for a float64 input, so values beyond float32's range survive the cast), and
    G / max(s ||G||, eps) = (G / a) / max(s ||G / a||, eps / a) with ||G / a|| in [1, sqrt(mn)]."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    g = G.to(torch.float64 if G.dtype == torch.float64 else work)
    if g.numel() == 0:
        return g.to(dtype)
    amax = g.abs().amax(dim=(-2, -1), keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    u = (g / safe).to(work)
    norm = u.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    floor = (eps / safe.to(torch.float64)).to(work)  # per matrix, in float64: eps / a can pass float32's range
    return (u / torch.maximum(norm * scale, floor)).to(dtype)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference Newton-Schulz in ``dtype`` (normalization in float32, or float64 when dtype is float64)."""
    triples, scale = resolve_coefficients(coefficients, steps)
    X = normalize(G, scale, eps, dtype)
    wide = G.shape[-2] <= G.shape[-1]
    if not wide:
        X = X.mT
    for a, b, c in triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X if wide else X.mT


def newton_schulz_torch_order(G: torch.Tensor, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315),
                              eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's computation, step for step: bf16 cast, bf16 norm clamped at eps, addmm chain."""
    a, b, c = coefficients
    if G.dim() > 3:  # torch's function takes one matrix or a batch: leading dims flattened into the batch
        return newton_schulz_torch_order(G.reshape(-1, *G.shape[-2:]), steps, coefficients, eps).reshape(G.shape)
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.dim() == 3 else torch.addmm(X, B, X, beta=a)
    return X.mT if G.size(-2) > G.size(-1) else X


GRAM_RESTARTS = (2,)  # restart once, after the second step: the published default


def gram_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The Gram iteration's dtype for a requested ``dtype``: float16 for either half type (the normalized
    values are bounded, and float16 keeps 3 more mantissa bits than bfloat16), else ``dtype`` itself."""
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


def gram_newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                       dtype: torch.dtype = torch.float64, restarts=GRAM_RESTARTS,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gram Newton-Schulz: the same iterate as ``newton_schulz``, carried on the small Gram matrix.

    With X the normalized input (n x m, n <= m after the transpose), every step's X' = (a I + b A + c A^2) X
    is P X with P a polynomial in R = X X^T, so X_k = Q X_0 with Q the product of the P's. Per step:
        Z = b R + c R^2,   Q <- Q Z + a Q   (= Q P),   RZ = R Z + a R   (= R P),   R <- Z RZ + a RZ   (= P R P)
    so every product is n x n; X is touched only to form R and the final Q X. After each step count in
    ``restarts`` (not in exact arithmetic, only against round-off drift in half precision) X <- Q X,
    R <- X X^T, Q <- I. The products run in ``compute_dtype`` (default ``gram_compute_dtype(dtype)``),
    the normalization in float32 as in ``newton_schulz``; the result has ``dtype``.
    """
    triples, scale = resolve_coefficients(coefficients, steps)
    cdt = gram_compute_dtype(dtype) if compute_dtype is None else compute_dtype
    X = normalize(G, scale, eps, cdt)
    wide = G.shape[-2] <= G.shape[-1]
    if not wide:
        X = X.mT
    eye = torch.eye(X.shape[-2], dtype=cdt, device=X.device)
    R = X @ X.mT
    Q = None  # the identity, kept implicit so that the first product after a (re)start is skipped
    for i, (a, b, c) in enumerate(triples):
        if i in restarts and Q is not None:
            X = Q @ X
            R = X @ X.mT
            Q = None
        Z = b * R + c * (R @ R)
        Q = Z + a * eye if Q is None else Q @ Z + a * Q
        if i + 1 < len(triples) and i + 1 not in restarts:  # R is not needed after the last step or before a restart
            RZ = R @ Z + a * R
            R = Z @ RZ + a * RZ
    if Q is not None:
        X = Q @ X
    return (X if wide else X.mT).to(dtype)
