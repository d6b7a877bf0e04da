"""Plain PyTorch reference of Newton-Schulz orthogonalization (Muon's inner loop): the test oracle.

X <- G / max(s * ||G||_F, eps), transposed to wide (rows <= cols), then per step with (a, b, c):
    A = X X^T,   B = b A + c A A,   X = a X + B X
and transposed back. `s` is the coefficient set's normalization factor (1 for Keller's, 1.02 for the
Polar Express set). Works on a batch [..., m, n] and in any floating dtype (float64 for the oracle).
"""
from __future__ import annotations

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
        if len(seq) == 3 and all(isinstance(v, (int, float)) for v in seq):
            seq = [tuple(seq)]
        triples = []
        for t in seq:
            t = tuple(float(v) for v in t)
            if len(t) != 3:
                raise ValueError(f"coefficients: each step needs an (a, b, c) triple, got {t}")
            triples.append(t)
        if not triples:
            raise ValueError("coefficients: got an empty sequence")
        scale = 1.0
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    out = [triples[min(i, len(triples) - 1)] for i in range(steps)]
    return out, scale


def frobenius_norm_fp32(G: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """||G||_F over the last two dims in ``dtype`` (float32 by default) without underflow or overflow:
    scaled by max |G| first."""
    g = G.to(dtype)
    amax = g.abs().amax(dim=(-2, -1), keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (g / safe).square().sum(dim=(-2, -1), keepdim=True).sqrt() * safe


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference Newton-Schulz in ``dtype`` (normalization in float32, or float64 when dtype is float64)."""
    triples, scale = resolve_coefficients(coefficients, steps)
    norm = frobenius_norm_fp32(G) if dtype != torch.float64 else torch.linalg.matrix_norm(G.double(), keepdim=True)
    X = (G.to(norm.dtype) / (norm * scale).clamp(min=eps)).to(dtype)
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
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.dim() == 3 else torch.addmm(X, B, X, beta=a)
    return X.mT if G.size(-2) > G.size(-1) else X
