"""Tail-risk estimation on an exact toy: how many samples Monte Carlo and importance sampling need.

A first-order Markov "language model" over 4 tokens emits the harmful token 3 with probability eps per
step; the probability that it appears among the first L tokens is exact by dynamic programming. For a
range of sample counts, plain Monte Carlo and importance sampling with a logit-bias proposal (defensive
mixture b = 0.5) estimate it over many seeds; the table and plot show the median relative error, and the
sample count each needs for a 20% median error.

    python examples/tailrisk_markov.py            # writes tailrisk_markov.png
    python examples/tailrisk_markov.py --smoke
"""
from __future__ import annotations

import argparse
import math

import torch

from fusedlab import tailrisk

V, HARM = 4, 3


def markov(eps, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(V, V, generator=g, dtype=torch.float64) + 0.5
    P[:, HARM] = 0
    P = P / P.sum(-1, keepdim=True) * (1 - eps)
    P[:, HARM] = eps
    return P.log()


def exact(logP, L, start=0):
    v = torch.zeros(HARM, dtype=torch.float64)
    v[start] = 1.0
    for _ in range(L):
        v = v @ logP.exp()[:HARM, :HARM]
    return 1.0 - v.sum().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--eps", type=float, default=1e-5, help="per-step probability of the harmful token")
    p.add_argument("--L", type=int, default=10, help="continuation length")
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--out", default="tailrisk_markov.png")
    args = p.parse_args(argv)
    counts = (100, 400) if args.smoke else (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
    seeds = 5 if args.smoke else args.seeds
    logP = markov(args.eps)
    truth = exact(logP, args.L)
    target = lambda toks: logP[toks[:, -1]]  # noqa: E731
    bias = torch.zeros(V, dtype=torch.float64)
    bias[HARM] = math.log(0.1 / args.eps)  # the proposal emits token 3 about 10% of the time
    proposal = tailrisk.LogitBiasProposal(target, bias)
    harm = lambda toks: (toks[:, 1:] == HARM).any(-1).double()  # noqa: E731
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(counts) * 2, desc="estimators", disable=args.smoke) as bar:
        for method in ("mc", "is"):
            for n in counts:
                errs = []
                for s in range(seeds):
                    e = tailrisk.estimate_tail_probability(target, proposal if method == "is" else None, harm,
                                                           torch.tensor([0]), n, args.L, method=method,
                                                           n_bootstrap=10, generator=torch.Generator().manual_seed(s))
                    errs.append(abs(e.estimate - truth) / truth)
                rows.append(dict(method=method, n=n, median_rel_error=float(torch.tensor(errs).median())))
                bar.update(1)
    print(f"exact probability: {truth:.3e} (eps={args.eps}, L={args.L}); median relative error over {seeds} seeds")
    print(f"{'samples':>8} {'Monte Carlo':>12} {'importance':>12}")
    for n in counts:
        mc = next(r for r in rows if r["method"] == "mc" and r["n"] == n)["median_rel_error"]
        is_ = next(r for r in rows if r["method"] == "is" and r["n"] == n)["median_rel_error"]
        print(f"{n:>8} {mc:>12.3f} {is_:>12.3f}")
    need = {m: next((r["n"] for r in rows if r["method"] == m and r["median_rel_error"] < 0.2), None)
            for m in ("mc", "is")}
    print(f"samples for a 20% median error: Monte Carlo {need['mc'] or '> ' + str(counts[-1])}, "
          f"importance sampling {need['is']}")
    if not args.smoke:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, label in (("mc", "Monte Carlo"), ("is", "importance sampling")):
            sel = [r for r in rows if r["method"] == m]
            ax.loglog([r["n"] for r in sel], [max(r["median_rel_error"], 1e-3) for r in sel], "o-", label=label)
        ax.axhline(0.2, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("samples")
        ax.set_ylabel("median relative error")
        ax.set_title(f"P(harm) = {truth:.1e}: Markov toy, exact by DP")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
