"""Feynman-Kac steering of a small diffusion model on 8x8 digits toward a target class, against best-of-N.

scikit-learn's bundled digits (1797 images, 8x8, no download) are scaled to [-1, 1] and used as 64-dim
vectors. The script trains, on one CPU thread in under a minute:

* a denoising diffusion model: an MLP with a sinusoidal timestep embedding predicting the noise (DDPM
  objective, T steps of a cosine schedule, Adam, weights averaged with an EMA);
* a reward classifier (MLP) on clean digits and on the diffusion model's x0 predictions from noisy inputs,
  so that it also scores the intermediate x0 predictions FK steering rewards;
* a second, independent classifier (an RBF support-vector machine on clean digits only) that only scores
  the final samples: a check that a gain in the reward is not just the reward classifier being fooled.

The reward is r(x) = log p(c | x) under the reward classifier for a target class c. Sampling is ancestral
DDPM written as a step function ``step(x, i) -> (x_{t-1}, x0_pred)``, so every method below makes the same
K * T model evaluations per prompt (B independent prompts of K particles each; FK also scores the x0
predictions at its resampling steps with the small classifier, a few percent of the model's time):

* base: the K samples as drawn (accuracy = fraction of samples classified as c);
* best-of-N: the highest-reward sample of the same K (fusedlab.smc.best_of_n);
* FK: fusedlab.smc.FKSteering with the "diff" potential, log G_i = lambda (r_i - r_{i-1}), resampling on a
  schedule; "FK best" is the highest-reward particle per prompt, "FK mean" averages over all K particles
  (the particles follow p(x) p(c | x)^lambda, so the mean says how much of the population was steered).

With K = 1 there is nothing to choose from and all methods are the base sampler. A second part times the
FK bookkeeping (potentials, resampling, gathers: everything in an FK run outside the sampler step and the
reward) at B = 64, K = 16, for the table's resampling schedule and for resampling at every step, against
two batched loops with the same step and reward calls: the usual way (softmax over each prompt's
log-weights, torch.multinomial, indexing the latents) and the reference implementation's step as it is
written (linear weights exp(lambda (r - r_prev)) clamped and NaN-zeroed, torch.multinomial on them, the
latents, the stored rewards and the product of potentials indexed). A loop that only calls the step and the
reward measures what the loop and the timers themselves cost; the "net" column takes that out.

    python examples/fk_digits.py                      # full run (about a minute), writes fk_digits.png
    python examples/fk_digits.py --cache              # reuse trained weights (fk_digits_weights.pt)
    python examples/fk_digits.py --smoke              # seconds; no plot unless --out is given
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time

import torch
from torch import nn

import fusedlab

# ----------------------------------------------------------------------------------------------- data


def load_data(seed):
    """Digits as [N, 64] in [-1, 1], labels, and an 80/20 train/test split (fixed by ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# -------------------------------------------------------------------------------------------- models


class Schedule:
    """DDPM noise schedule: cosine alpha-bar (Nichol & Dhariwal, valid for any T), betas and the posterior
    coefficients of q(x_{t-1} | x_t, x0)."""

    def __init__(self, T):
        self.T = T
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        self.betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.abar = torch.cumprod(1 - self.betas, 0)  # abar[t - 1] for t = 1..T
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.post_var = self.betas * (1 - abar_prev) / (1 - self.abar)
        self.c_x0 = abar_prev.sqrt() * self.betas / (1 - self.abar)
        self.c_xt = (1 - self.betas).sqrt() * (1 - abar_prev) / (1 - self.abar)
        self.__dict__.update({k: v.float() for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


class EpsMLP(nn.Module):
    """eps(x_t, t): residual MLP over the 64 pixels, a sinusoidal timestep embedding added to every block."""

    def __init__(self, dim=64, hidden=256, depth=3, T=100):
        super().__init__()
        self.T = T
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), 32)))
        self.temb = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t):
        """x [N, 64], t [N] integer timesteps in 1..T (or a scalar)."""
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0]) / self.T
        ang = t[:, None] * self.freqs
        e = self.temb(torch.cat([ang.sin(), ang.cos()], -1))
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h + e)
        return self.out(h)


def classifier(hidden=256):
    return nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 10))


def x0_from_eps(sched, x, t, eps):
    """The x0 prediction from x_t and predicted noise, clipped to the data range [-1, 1]."""
    a = sched.abar[t - 1].view(-1, 1) if torch.is_tensor(t) and t.dim() else sched.abar[t - 1]
    return ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)


def train_diffusion(x, sched, iters, gen, batch=256, lr=2e-3, desc="diffusion"):
    from tqdm import tqdm

    torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))  # weight init
    model = EpsMLP(T=sched.T)
    ema = EpsMLP(T=sched.T)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)
    for n in tqdm(range(iters), desc=desc, leave=False, mininterval=1.0, disable=None):
        x0 = x[torch.randint(len(x), (batch,), generator=gen)]
        t = torch.randint(1, sched.T + 1, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = sched.abar[t - 1].view(-1, 1)
        loss = nn.functional.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        decay = min(0.995, (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
    return ema.eval().requires_grad_(False), loss.item()


def train_classifier(x, y, eps_model, sched, iters, gen, batch=256, lr=2e-3, desc="classifier"):
    """Half of each batch: clean digits with light noise; the other half: the diffusion model's x0 prediction
    from x_t at a random t (labelled with the digit it was noised from), the inputs the reward sees."""
    from tqdm import tqdm

    torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
    clf = classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=1e-4)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)
    h = batch // 2
    for _ in tqdm(range(iters), desc=desc, leave=False, mininterval=1.0, disable=None):
        idx = torch.randint(len(x), (batch,), generator=gen)
        x0, lab = x[idx], y[idx]
        clean = (x0[:h] + 0.1 * torch.randn(x0[:h].shape, generator=gen)).clamp(-1, 1)
        t = torch.randint(1, sched.T + 1, (batch - h,), generator=gen)
        a = sched.abar[t - 1].view(-1, 1)
        xt = a.sqrt() * x0[h:] + (1 - a).sqrt() * torch.randn(x0[h:].shape, generator=gen)
        with torch.no_grad():
            denoised = x0_from_eps(sched, xt, t, eps_model(xt, t))
        loss = nn.functional.cross_entropy(clf(torch.cat([clean, denoised])), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
    return clf.eval().requires_grad_(False)


def train_or_load(args, xtr, ytr, sched):
    """The EMA diffusion model and the reward classifier: trained, or read from ``args.cache`` when it holds
    weights trained with the same settings (and written there after training)."""
    config = dict(T=sched.T, iters=args.iters, clf_iters=args.clf_iters, seed=args.seed, version=1)
    if args.cache and os.path.exists(args.cache):
        saved = torch.load(args.cache, weights_only=True)
        if saved.get("config") == config:
            eps_model, clf = EpsMLP(T=sched.T), classifier()
            eps_model.load_state_dict(saved["eps"])
            clf.load_state_dict(saved["clf"])
            print(f"loaded trained weights from {args.cache}")
            return eps_model.eval().requires_grad_(False), clf.eval().requires_grad_(False), None
        print(f"{args.cache} holds weights for other settings: training")
    gen = torch.Generator().manual_seed(args.seed)
    eps_model, loss = train_diffusion(xtr, sched, args.iters, gen)
    clf = train_classifier(xtr, ytr, eps_model, sched, args.clf_iters, gen)
    if args.cache:
        torch.save(dict(config=config, eps=eps_model.state_dict(), clf=clf.state_dict()), args.cache)
        print(f"wrote trained weights to {args.cache}")
    return eps_model, clf, loss


# ------------------------------------------------------------------------------------- sampling


def ddpm_step_fn(eps_model, sched, gen):
    """Ancestral DDPM as a step function: step i takes x_t to x_{t-1} with t = T - i, and returns the x0
    prediction made from x_t (the last step returns the posterior mean, with no noise)."""

    def step(x, i):
        t = sched.T - i
        x0 = x0_from_eps(sched, x, t, eps_model(x, t))
        mean = sched.c_x0[t - 1] * x0 + sched.c_xt[t - 1] * x
        if t == 1:
            return mean, x0
        return mean + sched.post_var[t - 1].sqrt() * torch.randn(x.shape, generator=gen), x0

    return step


class Timed:
    """Wraps a callable and adds up the wall time spent inside it (CPU ops are synchronous)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def multinomial_fk(step_fn, reward_fn, x, num_steps, K, lmbda, steps, gen):
    """The same "diff"-potential FK loop done the usual way: per prompt, softmax of the log-weights,
    torch.multinomial with replacement, then indexing the latents (and the stored rewards) with the draws."""
    B = x.shape[0] // K
    offsets = (torch.arange(B) * K).view(B, 1)
    r_prev = torch.zeros(B * K, dtype=torch.float64)
    for i in range(num_steps):
        x, x0 = step_fn(x, i)
        if i not in steps:
            continue
        r = reward_fn(x if i == num_steps - 1 else x0).to(torch.float64)
        log_w = torch.nan_to_num(lmbda * (r - r_prev), nan=-math.inf)
        p = torch.softmax(log_w.view(B, K), -1)
        idx = (torch.multinomial(p, K, replacement=True, generator=gen) + offsets).view(-1)
        x, r_prev = x[idx], r[idx]
    return x, r_prev


def reference_fk(step_fn, reward_fn, x, num_steps, K, lmbda, steps, gen):
    """The reference implementation's non-adaptive "diff" step, batched over the B prompts: linear weights
    exp(lambda (r - r_prev)) clamped to [0, 1e10] with NaN set to 0, torch.multinomial on them, then the
    latents, the stored rewards and the product of potentials indexed by the draws."""
    B = x.shape[0] // K
    offsets = (torch.arange(B) * K).view(B, 1)
    population_rs = torch.zeros(B * K)
    product_of_potentials = torch.ones(B * K)
    for i in range(num_steps):
        x, x0 = step_fn(x, i)
        if i not in steps:
            continue
        rs = reward_fn(x if i == num_steps - 1 else x0)
        w = torch.exp(lmbda * (rs - population_rs))
        w = torch.clamp(w, 0, 1e10)
        w[torch.isnan(w)] = 0.0
        idx = (torch.multinomial(w.view(B, K), K, replacement=True, generator=gen) + offsets).view(-1)
        x, population_rs = x[idx], rs[idx]
        product_of_potentials = product_of_potentials[idx] * w[idx]
    return x, population_rs


def step_and_reward_only(step_fn, reward_fn, x, num_steps, steps):
    """The loop with nothing but the step and reward calls: what iterating and timing cost by themselves."""
    for i in range(num_steps):
        x, x0 = step_fn(x, i)
        if i in steps:
            reward_fn(x if i == num_steps - 1 else x0)
    return x


# -------------------------------------------------------------------------------------- experiment


def run_cell(method_runs, step_fn, reward_fn, clf, judge, sched, B, K, args, gen):
    """Rows for one K: base and best-of-N from the same K samples per prompt, then FK with K particles."""
    rows = []
    target = args.target
    x = torch.randn(B * K, 64, generator=gen)
    bon = fusedlab.smc.best_of_n(step_fn, reward_fn, x, sched.T, K)
    r_all = bon.rewards.float()
    best = bon.best()
    r_best = bon.rewards.view(B, K).max(-1).values.float()
    rows.append(("base", bon.samples, r_all))
    rows.append(("best-of-N", best, r_best))
    fk = fusedlab.smc.FKSteering(reward_fn, lmbda=args.lmbda, potential="diff", num_particles=K, start=args.start,
                                 every=args.every, generator=gen, progress=False)
    out = fk.run(step_fn, torch.randn(B * K, 64, generator=gen), sched.T)
    fk_best = out.best()
    rows.append(("FK best", fk_best, out.rewards.view(B, K).max(-1).values.float()))
    rows.append(("FK mean", out.samples, out.rewards.float()))
    method_runs[K] = {"base": bon.samples.view(B, K, 64)[:, 0], "best-of-N": best, "FK best": fk_best}
    result = []
    for name, xs, r in rows:
        pred = clf(xs).argmax(-1)
        result.append(dict(table="quality", K=K, method=name, nfe=K * sched.T, reward=r.mean().item(),
                           acc=(pred == target).float().mean().item(),
                           acc2=float((judge(xs) == target).mean()), n=len(xs)))
    return result


def measure_overhead(eps_model, reward_fn, sched, args, B, K, every, repeats):
    """FK bookkeeping time (an FK run minus the time inside the sampler step and the reward) against the
    softmax/multinomial/indexing loop and the reference's step with the same step and reward calls, and the
    same for a loop with only those calls (its "bookkeeping" is the loop's own cost); medians over
    ``repeats`` runs, the loops interleaved within each repeat in a seeded random order."""
    start = args.start if every == args.every else 0
    steps = set(fusedlab.smc.schedule(sched.T, start, None, every))
    res = {"fusedlab FKSteering": [], "softmax + multinomial": [], "reference FKD step": [],
           "step + reward only": []}
    for rep in range(-1, repeats):  # rep -1: an untimed warm-up of every loop
        # a fresh order each repeat (seeded): a loop's time depends on what ran just before it
        for name in random.Random(rep).sample(list(res), len(res)):
            gen = torch.Generator().manual_seed(args.seed + 100 + rep)
            step = Timed(ddpm_step_fn(eps_model, sched, gen))
            reward = Timed(reward_fn)
            x = torch.randn(B * K, 64, generator=gen)
            t0 = time.perf_counter()
            if name == "fusedlab FKSteering":
                fk = fusedlab.smc.FKSteering(reward, lmbda=args.lmbda, potential="diff", num_particles=K,
                                             start=start, every=every, generator=gen, progress=False)
                fk.run(step, x, sched.T)
            elif name == "softmax + multinomial":
                multinomial_fk(step, reward, x, sched.T, K, args.lmbda, steps, gen)
            elif name == "reference FKD step":
                reference_fk(step, reward, x, sched.T, K, args.lmbda, steps, gen)
            else:
                step_and_reward_only(step, reward, x, sched.T, steps)
            total = time.perf_counter() - t0
            if rep >= 0:
                book = total - step.seconds - reward.seconds
                res[name].append((book, total, step.seconds, reward.seconds, book / total))
    rows = []
    floor = statistics.median(r[0] for r in res["step + reward only"])
    for name, runs in res.items():
        book, total, step_s, rew, frac = (statistics.median(v) for v in zip(*runs))
        rows.append(dict(table="overhead", method=name, B=B, K=K, every=every, steps=sched.T,
                         resample_steps=len(steps), bookkeeping_s=book, total_s=total, step_s=step_s,
                         reward_s=rew, fraction=frac, per_resample_us=1e6 * book / len(steps),
                         net_s=max(book - floor, 0.0)))
    return rows


def plot(rows, samples, K_show, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [r for r in rows if r["table"] == "quality"]
    methods = ["base", "best-of-N", "FK best", "FK mean"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw=dict(width_ratios=[1, 1, 1.25]))
    for m, color in zip(methods, ["0.45", "C0", "C3", "C1"]):
        sel = [r for r in q if r["method"] == m]
        Ks = [r["K"] for r in sel]
        axes[0].plot(Ks, [r["acc"] for r in sel], "o-", color=color, label=m)
        axes[0].plot(Ks, [r["acc2"] for r in sel], "x--", color=color, alpha=0.6)
        axes[1].plot(Ks, [r["reward"] for r in sel], "o-", color=color, label=m)
    for ax, lab in zip(axes[:2], [f"fraction classified {args.target}: reward clf (o), SVM (x)",
                                  f"mean reward log p({args.target} | x)"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ks, [str(k) for k in Ks])
        ax.set_xlabel("K per prompt (K x T model evaluations)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    n, pad = min(10, samples["base"].shape[0]), 1

    def strip(xs):  # one row of n digits, white borders
        imgs = [(xs[j].view(8, 8) + 1) / 2 for j in range(n)]
        return torch.cat([torch.nn.functional.pad(im, (pad, pad, pad, pad)) for im in imgs], 1)

    names = ["base", "best-of-N", "FK best"]
    grid = torch.cat([strip(samples[k]) for k in names], 0).clamp(0, 1)
    axes[2].imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
    axes[2].set_xticks([])
    axes[2].set_yticks([5 + 10 * j for j in range(len(names))], names)
    axes[2].set_title(f"one sample per prompt, first {n} prompts (K = {K_show})", fontsize=10)
    fig.suptitle(f"FK steering of a DDPM on 8x8 digits toward class {args.target} (T={args.steps}, "
                 f"lambda={args.lmbda:g}, resampling every {args.every} steps from step {args.start}, "
                 f"{args.B} prompts per point)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (seconds)")
    p.add_argument("--B", type=int, default=64, help="prompts (independent groups) per cell")
    p.add_argument("--Ks", default="1,2,4,8,16", help="comma-separated particle counts")
    p.add_argument("--steps", type=int, default=100, help="diffusion steps T")
    p.add_argument("--iters", type=int, default=3000, help="diffusion model training iterations")
    p.add_argument("--clf-iters", type=int, default=1500, help="reward classifier training iterations")
    p.add_argument("--target", type=int, default=3, help="target class c of the reward log p(c | x)")
    p.add_argument("--lmbda", type=float, default=10.0, help="FK inverse temperature lambda")
    p.add_argument("--start", type=int, default=0, help="first FK resampling step")
    p.add_argument("--every", type=int, default=5, help="FK resampling interval in steps")
    p.add_argument("--overhead-B", type=int, default=64)
    p.add_argument("--overhead-K", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per loop for the overhead (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (these small MLPs gain little from more; 1 keeps timings steady)")
    p.add_argument("--out", default=None, help="plot path (default fk_digits.png; none in --smoke)")
    p.add_argument("--cache", nargs="?", const="", default=None,
                   help="reuse trained weights from this file (default: next to --out), training them once")
    args = p.parse_args(argv)
    if args.smoke:
        args.B, args.Ks, args.steps, args.iters, args.clf_iters, args.repeats = 4, "1,4", 10, 200, 200, 1
        args.every = min(args.every, 2)
    elif args.out is None:
        args.out = "fk_digits.png"
    if args.cache == "":
        args.cache = os.path.splitext(args.out or "fk_digits.png")[0] + "_weights.pt"
    Ks = [int(k) for k in args.Ks.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, Ks)
    finally:
        torch.set_num_threads(threads)


def run(args, Ks):
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = load_data(args.seed)
    sched = Schedule(args.steps)
    eps_model, clf, loss = train_or_load(args, xtr, ytr, sched)
    from sklearn.svm import SVC

    svm = SVC(C=10.0, gamma="scale").fit(xtr.numpy(), ytr.numpy())
    t_train = time.perf_counter() - t_start
    test_acc = (clf(xte).argmax(-1) == yte).float().mean().item()
    print(f"models ready in {t_train:.1f} s" + (f" (final diffusion loss {loss:.3f})" if loss is not None else "")
          + f"; held-out accuracy on clean digits: reward classifier {test_acc:.3f}, "
          f"SVM {svm.score(xte.numpy(), yte.numpy()):.3f}")

    def reward_fn(x0):
        return torch.log_softmax(clf(x0), -1)[:, args.target]

    def judge(xs):
        return svm.predict(xs.numpy())

    from tqdm import tqdm

    rows, shown = [], {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(args.seed + 1)
        step_fn = ddpm_step_fn(eps_model, sched, gen)
        for K in tqdm(Ks, desc="K", disable=args.smoke):
            rows += run_cell(shown, step_fn, reward_fn, clf, judge, sched, args.B, K, args, gen)
        t_quality = time.perf_counter() - t0
        t0 = time.perf_counter()
        over = []
        for every in dict.fromkeys([args.every, 1]):  # the table's schedule, and resampling at every step
            over += measure_overhead(eps_model, reward_fn, sched, args, args.overhead_B, args.overhead_K, every,
                                     args.repeats)
        t_over = time.perf_counter() - t0
    rows += over

    print(f"\ntarget class {args.target}, T={args.steps} DDPM steps, B={args.B} prompts per cell, FK lambda="
          f"{args.lmbda}, 'diff' potential, resampling every {args.every} steps from step {args.start} "
          f"({t_quality:.1f} s)")
    print(f"{'K':>3} {'method':>10} {'NFE/prompt':>10} {'reward':>8} {'acc (reward clf)':>17} {'acc (SVM)':>10}")
    for r in rows:
        if r["table"] == "quality":
            print(f"{r['K']:>3} {r['method']:>10} {r['nfe']:>10} {r['reward']:>8.3f} {r['acc']:>17.3f} "
                  f"{r['acc2']:>10.3f}")
    print(f"\nFK bookkeeping (run time outside the sampler step and the reward) at B={args.overhead_B}, "
          f"K={args.overhead_K}, {args.steps} steps, median of {args.repeats} runs ({t_over:.1f} s)")
    print(f"{'resampling':>17} {'loop':>22} {'run s':>7} {'step s':>7} {'reward s':>8} {'bookkeeping s':>13} "
          f"{'net s':>7} {'per resample':>13} {'share of run':>12}")
    for r in over:
        print(f"{'every %d (%d)' % (r['every'], r['resample_steps']):>17} {r['method']:>22} {r['total_s']:>7.3f} "
              f"{r['step_s']:>7.3f} {r['reward_s']:>8.3f} {r['bookkeeping_s']:>13.4f} {r['net_s']:>7.4f} "
              f"{r['per_resample_us']:>10.0f} us {100 * r['fraction']:>11.2f}%")
    for every in dict.fromkeys(r["every"] for r in over):
        o = {r["method"]: r for r in over if r["every"] == every}
        fk_o = o["fusedlab FKSteering"]
        ratios = "; ".join(f"{name}'s / FK's {o[name]['bookkeeping_s'] / fk_o['bookkeeping_s']:.2f}x "
                           f"(net {o[name]['net_s'] / max(fk_o['net_s'], 1e-9):.2f}x)"
                           for name in ("softmax + multinomial", "reference FKD step"))
        print(f"resampling every {every}: FK bookkeeping {100 * fk_o['fraction']:.2f}% of the FK run (target < 5%); "
              f"bookkeeping {ratios} (target >= 2x)")
    if args.out:
        plot(rows, shown[max(Ks)], max(Ks), args)
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
