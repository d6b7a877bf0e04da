"""Symile's "n_squared" loss, forward and backward: ours against the symile package in the same process."""
from __future__ import annotations

import time

import torch

import fusedlab


def _inputs(N, d, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    reps = [torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=-1).requires_grad_() for _ in range(M)]
    return reps, torch.tensor(20.0, requires_grad=True)


def _fwd_bwd(loss_fn, reps, scale):
    for r in reps:
        r.grad = None
    scale.grad = None
    loss = loss_fn(reps, scale)
    loss.backward()
    return loss.detach(), [r.grad for r in reps] + [scale.grad]


def symile_row(N=256, d=256, M=3, runs=3):
    """Time (best of `runs`) and the largest gradient difference against the package; the package row is
    skipped when it is not installed."""
    reps, scale = _inputs(N, d, M)
    ours = fusedlab.symile.SymileLoss("n_squared")
    t_ours = _best(lambda: _fwd_bwd(ours, reps, scale), runs)
    row = dict(op="symile loss n_squared (fwd+bwd)", backend="cpu", shape=f"M={M} N={N} d={d}",
               time=f"{t_ours * 1e3:.1f} ms", peer="symile 0.1.0 package", err="", speedup="", note="")
    try:
        import symile
    except ImportError:
        row["note"] = "symile package not installed"
        return row
    theirs = symile.Symile("n_squared")
    t_theirs = _best(lambda: _fwd_bwd(theirs, reps, scale), runs)
    a, ga = _fwd_bwd(ours, reps, scale)
    b, gb = _fwd_bwd(theirs, reps, scale)
    err = max([(a - b).abs().item()] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])
    row.update(err=f"{err:.1e}", speedup=f"{t_theirs / t_ours:.2f}x",
               note="the package materializes N^(M-1) x d per anchor; ours keeps O(N M) statistics")
    return row


def _best(fn, runs):
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
