"""Simplicity bias: SGD finds the shared low-rank solution of a multi-task problem, Muon a higher-rank one.

T regression tasks share a rank-r input subspace V (d x r, orthonormal columns):

    y_t = A_t x + s_noise e,    A_t = U_t S V^T,    x ~ N(0, I_d),    t = 1..T

Each task has its own n training inputs. The model is a two-layer linear network with a shared first layer
W1 (h x d) and one head H_t (k x h) per task, y_t = H_t W1 x, started from a small random init. It is
trained full-batch three times for the same number of steps and the same cosine learning-rate decay:
SGD with momentum, fusedlab.optim.Muon and torch.optim.Muon (Muon on every matrix: W1 and the heads).

SGD learns the singular modes of the shared map one after another, largest first, and the directions that
only the label noise asks for stay near their tiny init: W1 ends up with rank about r. Muon's orthogonalized
update moves every direction of the gradient at the same speed, so W1 also grows along the noise
directions and ends up with a much higher rank; it fits the training set's noise and does worse on fresh
inputs. The extra rank is fitted noise: with --noise 0 both optimizers end at rank about r. The small init
matters too, since SGD's untrained directions keep their init scale (--init).

The table gives, for the learned W1, the effective rank exp(H(s / sum s)) (H: entropy of the normalized
singular values) and the number of singular values above 1% of the largest, with the final training loss
and the loss on fresh inputs against the noiseless maps; the two Muon lines should agree, fusedlab's
being a drop-in for torch's.

    python examples/muon_simplicity_bias.py            # full run, writes muon_simplicity_bias.png
    python examples/muon_simplicity_bias.py --smoke    # a few seconds, no plot unless --out is given
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import fusedlab


def make_tasks(T, d, k, r, n, noise, gen):
    """Task maps A [T, k, d] sharing the input subspace V, training set (X [T, n, d], Y noisy), and V."""
    V = torch.linalg.qr(torch.randn(d, r, generator=gen))[0]                 # d x r, shared by every task
    U = torch.linalg.qr(torch.randn(T, k, r, generator=gen))[0]              # T x k x r, per task
    S = torch.linspace(3.0, 1.0, r)                                           # the shared map's strengths
    A = U * S @ V.T
    X = torch.randn(T, n, d, generator=gen)
    Y = X @ A.transpose(1, 2) + noise * torch.randn(T, n, k, generator=gen)
    return A, X, Y, V


class MultiTaskLinear(torch.nn.Module):
    """y_t = H_t W1 x: a shared first layer W1 [h, d] and T heads H_t [k, h], all started at scale ``init``."""

    def __init__(self, T, d, h, k, init, gen):
        super().__init__()
        self.W1 = torch.nn.Parameter(init * torch.randn(h, d, generator=gen))
        self.heads = torch.nn.ParameterList(torch.nn.Parameter(init * torch.randn(k, h, generator=gen))
                                            for _ in range(T))

    def forward(self, X):                                                     # X [T, n, d] -> [T, n, k]
        return X @ self.W1.T @ torch.stack(list(self.heads)).transpose(1, 2)


def spectrum_stats(W):
    """Singular values, effective rank exp(entropy of s / sum s), and the count above 1% of the largest."""
    s = torch.linalg.svdvals(W.detach().double())
    p = s / s.sum()
    erank = math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())
    return s, erank, int((s > 0.01 * s[0]).sum())


def train(name, make_opt, data, shape, steps, init, seed, bar, log_every):
    A, X, Y, _ = data
    model = MultiTaskLinear(*shape, init, torch.Generator().manual_seed(seed))
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    losses, ranks = [], []
    for i in range(steps):
        loss = (model(X) - Y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i % log_every == 0 or i == steps - 1:
            ranks.append((i, spectrum_stats(model.W1)[1]))
        bar.update(1)
    with torch.no_grad():
        train_loss = (model(X) - Y).square().mean().item()
        Xt = torch.randn(X.shape, generator=torch.Generator().manual_seed(seed + 1))
        test_loss = (model(Xt) - Xt @ A.transpose(1, 2)).square().mean().item()    # against the clean map
    s, erank, n_above = spectrum_stats(model.W1)
    return dict(optimizer=name, effective_rank=erank, rank_1pct=n_above, final_loss=train_loss,
                test_loss=test_loss, singular_values=s.tolist(), losses=losses, rank_curve=ranks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (a few seconds)")
    p.add_argument("--tasks", type=int, default=8, help="number of tasks T")
    p.add_argument("--d", type=int, default=32, help="input dimension")
    p.add_argument("--hidden", type=int, default=64, help="width h of the shared layer W1")
    p.add_argument("--k", type=int, default=8, help="outputs per task")
    p.add_argument("--rank", type=int, default=4, help="rank r of the shared input subspace")
    p.add_argument("--n", type=int, default=512, help="training inputs per task")
    p.add_argument("--noise", type=float, default=0.1, help="label noise sd")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--init", type=float, default=1e-3, help="init scale of every weight")
    p.add_argument("--sgd-lr", type=float, default=0.05)
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="plot file (default muon_simplicity_bias.png; none in --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.d, args.hidden, args.k, args.rank, args.n, args.steps = 4, 16, 32, 4, 2, 128, 300
    out = args.out or (None if args.smoke else "muon_simplicity_bias.png")
    data = make_tasks(args.tasks, args.d, args.k, args.rank, args.n, args.noise,
                      torch.Generator().manual_seed(args.seed))
    shape = (args.tasks, args.d, args.hidden, args.k)
    optimizers = [
        ("SGD (momentum 0.9)", lambda ps: torch.optim.SGD(ps, lr=args.sgd_lr, momentum=0.9)),
        ("fusedlab Muon", lambda ps: fusedlab.optim.Muon(ps, lr=args.muon_lr, weight_decay=0.0)),
        ("torch Muon", lambda ps: torch.optim.Muon(ps, lr=args.muon_lr, weight_decay=0.0)),
    ]
    from tqdm import tqdm

    rows = []
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: extra threads only add overhead, worse on a busy machine
    try:
        with tqdm(total=len(optimizers) * args.steps, desc="training", disable=args.smoke) as bar:
            for name, make_opt in optimizers:
                t1 = time.perf_counter()
                # the same data and the same init for every optimizer
                rows.append(train(name, make_opt, data, shape, args.steps, args.init, args.seed + 1, bar,
                                  max(1, args.steps // 200)))
                rows[-1]["seconds"] = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)
    print(f"T={args.tasks} tasks, d={args.d}, W1 {args.hidden}x{args.d}, shared rank r={args.rank}, "
          f"n={args.n} inputs per task, noise sd {args.noise} (noise variance {args.noise ** 2:.4f}), "
          f"{args.steps} full-batch steps, {time.perf_counter() - t0:.2f} s")
    print(f"{'optimizer':<20} {'eff. rank W1':>12} {'sv > 1%':>8} {'train loss':>11} {'held-out loss':>14} "
          f"{'time s':>7}")
    for r in rows:
        print(f"{r['optimizer']:<20} {r['effective_rank']:>12.2f} {r['rank_1pct']:>8d} {r['final_loss']:>11.5f} "
              f"{r['test_loss']:>14.5f} {r['seconds']:>7.2f}")
    if out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        styles = {"SGD (momentum 0.9)": "-", "fusedlab Muon": "-", "torch Muon": "--"}
        for r in rows:
            s = r["singular_values"]
            axes[0].semilogy(range(1, len(s) + 1), s, styles[r["optimizer"]], marker=".", label=r["optimizer"])
            axes[1].semilogy(r["losses"], styles[r["optimizer"]], label=r["optimizer"])
            it, er = zip(*r["rank_curve"])
            axes[2].plot(it, er, styles[r["optimizer"]], label=r["optimizer"])
        axes[0].axvline(args.rank + 0.5, color="gray", lw=0.8, ls=":")
        axes[0].set(xlabel="index", ylabel="singular value",
                    title=f"spectrum of the learned W1 (true rank {args.rank})")
        axes[1].axhline(args.noise ** 2, color="gray", lw=0.8, ls=":", label="noise variance")
        axes[1].set(xlabel="step", ylabel="training loss (MSE)", title="training loss")
        axes[2].set(xlabel="step", ylabel="effective rank of W1", title="effective rank during training")
        for ax in axes:
            ax.legend()
        fig.suptitle(f"{args.tasks} tasks sharing a rank-{args.rank} input subspace: SGD vs Muon")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
