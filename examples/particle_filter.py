"""Bootstrap particle filter on a linear-Gaussian state-space model, B replicate filters in one batch.

    x_t = a x_{t-1} + s_x e_t,    y_t = x_t + s_y n_t,    x_0 ~ N(0, s_0^2)

Each step moves the particles, reweights them by the observation density, and calls
fusedlab.smc.resample once for all B replicates (ESS-adaptive, state moved in the same pass). The sum of
the per-step log_norm is the particle filter's unbiased estimate of the likelihood; the Kalman filter gives
the exact value. The table and plot show the estimate's error and spread against K for each scheme.

    python examples/particle_filter.py            # full run, writes particle_filter.png
    python examples/particle_filter.py --smoke    # a few seconds
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import fusedlab

A, SX, SY, S0 = 0.9, 1.0, 0.5, 1.0


def simulate(T, gen):
    x = torch.randn((), generator=gen, dtype=torch.float64) * S0
    ys = []
    for _ in range(T):
        x = A * x + SX * torch.randn((), generator=gen, dtype=torch.float64)
        ys.append(x + SY * torch.randn((), generator=gen, dtype=torch.float64))
    return torch.stack(ys)


def kalman_loglik(y):
    m, P, ll = 0.0, S0**2, 0.0
    for yt in y.tolist():
        m, P = A * m, A * A * P + SX**2
        S = P + SY**2
        ll += -0.5 * (math.log(2 * math.pi * S) + (yt - m) ** 2 / S)
        gain = P / S
        m, P = m + gain * (yt - m), (1 - gain) * P
    return ll


def particle_filter(y, B, K, method, gen, ess_threshold=0.5, backend="auto"):
    """Returns the B replicate log-likelihood estimates and the fraction of steps that resampled."""
    x = torch.randn(B, K, 1, generator=gen) * S0
    lw = torch.zeros(B, K)
    log_z = torch.zeros(B, dtype=torch.float64)
    resampled = 0.0
    for yt in y.tolist():
        x = A * x + SX * torch.randn(B, K, 1, generator=gen)
        lw = lw - 0.5 * (math.log(2 * math.pi * SY**2) + (yt - x[..., 0]) ** 2 / SY**2)
        r = fusedlab.smc.resample(lw, method, ess_threshold, generator=gen, state=x, backend=backend)
        log_z += r.log_norm
        lw, x = r.log_weights, r.state
        resampled += r.resampled.double().mean().item() / len(y)
    return log_z, resampled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (a few seconds)")
    p.add_argument("--T", type=int, default=100, help="time steps")
    p.add_argument("--B", type=int, default=256, help="replicate filters, run as one batch")
    p.add_argument("--out", default="particle_filter.png")
    args = p.parse_args(argv)
    T, B, Ks = (20, 32, (16, 64)) if args.smoke else (args.T, args.B, (16, 64, 256, 1024))
    gen = torch.Generator().manual_seed(0)
    y = simulate(T, gen)
    exact = kalman_loglik(y)
    from tqdm import tqdm

    rows = []
    t0 = time.perf_counter()
    with tqdm(total=len(Ks) * len(fusedlab.smc.METHODS), desc="particle filters", disable=args.smoke) as bar:
        for K in Ks:
            for method in fusedlab.smc.METHODS:
                est, frac = particle_filter(y, B, K, method, gen)
                err = est - exact
                rows.append(dict(K=K, method=method, bias=err.mean().item(), sd=err.std().item(), resampled=frac))
                bar.update(1)
    print(f"exact log-likelihood (Kalman): {exact:.3f}   T={T}, B={B} replicate filters per cell, "
          f"{time.perf_counter() - t0:.2f} s")
    print(f"{'K':>6} {'method':>12} {'mean error':>11} {'sd':>8} {'resampled':>10}")
    for r in rows:
        print(f"{r['K']:>6} {r['method']:>12} {r['bias']:>11.3f} {r['sd']:>8.3f} {r['resampled']:>10.2f}")
    if not args.smoke:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in fusedlab.smc.METHODS:
            sel = [r for r in rows if r["method"] == method]
            ax.loglog([r["K"] for r in sel], [r["sd"] for r in sel], "o-", label=method)
        ax.set_xlabel("particles K")
        ax.set_ylabel("sd of log-likelihood estimate")
        ax.set_title(f"bootstrap PF, linear-Gaussian model (T={T}, {B} replicates)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
