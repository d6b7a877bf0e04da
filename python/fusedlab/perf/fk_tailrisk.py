"""FK steering and tail-risk estimation on exact toys: accuracy against the closed form, and the cost of
FK's bookkeeping against the loop the reference implementation writes (softmax, torch.multinomial,
indexing)."""
from __future__ import annotations

import math
import time

import torch

import fusedlab
from fusedlab import tailrisk

MU, S, T = 0.5, 0.7, 25
ABAR = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.98, 0.02, T, dtype=torch.float64)])


def gaussian_sampler(gen):
    """Exact reverse steps of a variance-preserving diffusion of N(MU, S^2) data, and E[x0 | x_t]."""
    def step(x, i):
        t = T - i
        alpha = ABAR[t] / ABAR[t - 1]
        a_prev = ABAR[t - 1].sqrt()
        P = ABAR[t - 1] * S**2 + 1 - ABAR[t - 1]
        k = P * alpha.sqrt() / (alpha * P + 1 - alpha)
        x = a_prev * MU + k * (x - alpha.sqrt() * a_prev * MU) + (P - k * alpha.sqrt() * P).clamp_min(0).sqrt() * \
            torch.randn(x.shape, generator=gen, dtype=x.dtype)
        a = ABAR[t - 1]
        return x, MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
    return step


def _start(B, K, gen):
    a = ABAR[T]
    return a.sqrt() * MU + (a * S**2 + 1 - a).sqrt() * torch.randn(B * K, 4, generator=gen, dtype=torch.float64)


def naive_fk(step, x, B, K, lam, gen):
    """The reference implementation's loop: linear weights exp(lambda (r - r_prev)), softmax over each
    prompt's particles, torch.multinomial, then indexing every per-particle tensor."""
    prev = torch.zeros(B * K, dtype=torch.float64)
    for i in range(T):
        x, x0 = step(x, i)
        r = (x if i == T - 1 else x0)[:, 0]
        w = torch.exp(lam * (r - prev)).clamp(0, 1e10).nan_to_num(0.0).view(B, K)
        anc = torch.multinomial(w / w.sum(-1, keepdim=True), K, replacement=True, generator=gen)
        flat = (anc + torch.arange(B).unsqueeze(-1) * K).view(-1)
        x, prev = x[flat], r[flat]
    return x


def fk_row(B=64, K=16, lam=1.0, runs=7):
    """Accuracy on the exact Gaussian sampler; bookkeeping time with a near-free sampler (precomputed noise),
    so both loops' times are their weights, resampling and gathers (best of `runs`)."""
    gen = torch.Generator().manual_seed(0)
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=lam, num_particles=K, generator=gen, progress=False)
    out = fk.run(gaussian_sampler(gen), _start(B, K, gen), T)
    err = abs(out.samples[:, 0].mean().item() - (MU + lam * S**2))
    noise = torch.randn(T, B * K, 4, generator=gen, dtype=torch.float64)
    cheap = lambda x, i: (0.9 * x + noise[i], x)  # noqa: E731

    def best(fn):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: fk.run(cheap, _start(B, K, gen), T))
    theirs = best(lambda: naive_fk(cheap, _start(B, K, gen), B, K, lam, gen))
    return dict(op="FK steering (diff, every step)", backend="auto", shape=f"B={B} K={K} T={T}",
                err=f"{err:.1e}", time=f"{ours * 1e3:.3f} ms", peer="softmax + multinomial + index loop",
                speedup=f"{theirs / ours:.2f}x",
                note="time of a run with a near-free sampler; err: steered mean vs the exact tilted mean")


def tailrisk_row(n=500, seeds=20):
    V, HARM, eps, L = 4, 3, 1e-5, 10
    g = torch.Generator().manual_seed(0)
    P = torch.rand(V, V, generator=g, dtype=torch.float64) + 0.5
    P[:, HARM] = 0
    P = P / P.sum(-1, keepdim=True) * (1 - eps)
    P[:, HARM] = eps
    logP = P.log()
    v = torch.zeros(HARM, dtype=torch.float64)
    v[0] = 1.0
    for _ in range(L):
        v = v @ P[:HARM, :HARM]
    truth = 1.0 - v.sum().item()
    target = lambda toks: logP[toks[:, -1]]  # noqa: E731
    bias = torch.zeros(V, dtype=torch.float64)
    bias[HARM] = math.log(0.1 / eps)
    prop = tailrisk.LogitBiasProposal(target, bias)
    harm = lambda toks: (toks[:, 1:] == HARM).any(-1).double()  # noqa: E731
    errs, mc_errs = [], []
    t0 = time.perf_counter()
    for s in range(seeds):
        e = tailrisk.estimate_tail_probability(target, prop, harm, torch.tensor([0]), n, L, n_bootstrap=10,
                                               generator=torch.Generator().manual_seed(s))
        errs.append(abs(e.estimate - truth) / truth)
    t_is = (time.perf_counter() - t0) / seeds
    for s in range(seeds):
        e = tailrisk.estimate_tail_probability(target, None, harm, torch.tensor([0]), n, L, method="mc",
                                               n_bootstrap=10, generator=torch.Generator().manual_seed(s))
        mc_errs.append(abs(e.estimate - truth) / truth)
    med = float(torch.tensor(errs).median())
    mc_med = float(torch.tensor(mc_errs).median())
    return dict(op="tail probability (importance sampling)", backend="auto", shape=f"N={n} L={L} P={truth:.0e}",
                err=f"{med:.1e}", time=f"{t_is * 1e3:.3f} ms", peer="Monte Carlo, same samples",
                speedup="", note=f"median relative error {med:.2f} vs Monte Carlo {mc_med:.2f} ({seeds} seeds)")
