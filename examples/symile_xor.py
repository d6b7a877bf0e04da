"""Symile against pairwise CLIP where the information is higher-order: c = a XOR b.

a and b are independent random bit vectors; each bit of c is a XOR b with probability p and a copy of a's
bit otherwise. At p = 1, c is independent of a alone and of b alone, so every pairwise objective (CLIP on
the pairs (a, b), (a, c), (b, c)) has nothing to learn, while Symile's multilinear inner product
MIP(a, b, c) scores the triple jointly. Small MLP encoders are trained with each loss, and the table and
plot report zero-shot retrieval accuracy of c given (a, b) among all 2^D candidate bit vectors, for p from
0 (c = a: pairwise information) to 1 (pure XOR).

    python examples/symile_xor.py            # about 3 minutes on 2 CPU cores; writes symile_xor.png
    python examples/symile_xor.py --smoke
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from torch import nn

import fusedlab


def triples(n, bits, p, g):
    a = torch.randint(0, 2, (n, bits), generator=g)
    b = torch.randint(0, 2, (n, bits), generator=g)
    xor = torch.rand(n, bits, generator=g) < p
    c = torch.where(xor, a ^ b, a)
    return a, b, c


def encoder(bits, d):
    return nn.Sequential(nn.Linear(bits, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, d))


def embed(encoders, xs):
    return [F.normalize(e(2.0 * x.float() - 1.0), dim=-1) for e, x in zip(encoders, xs)]


def pairwise_clip(reps, scale):
    """The sum of symmetric CLIP losses over the three pairs."""
    target = torch.arange(reps[0].shape[0])
    loss = 0.0
    for x, y in itertools.combinations(reps, 2):
        logits = scale * x @ y.T
        loss = loss + (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss


def train(kind, bits, p, steps, batch, d, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    encoders = nn.ModuleList(encoder(bits, d) for _ in range(3))
    log_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ~ 10, learned
    opt = torch.optim.AdamW(list(encoders.parameters()) + [log_scale], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.2)  # lr set here
    symile = fusedlab.symile.SymileLoss("n_squared")
    for _ in range(steps):
        reps = embed(encoders, triples(batch, bits, p, g))
        scale = log_scale.exp()
        loss = symile(reps, scale) if kind == "Symile" else pairwise_clip(reps, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return encoders


@torch.no_grad()
def retrieval_accuracy(kind, encoders, bits, p, n, seed):
    """Rank every possible c for each test (a, b); a hit when the true c scores highest."""
    g = torch.Generator().manual_seed(seed + 1)
    a, b, c = triples(n, bits, p, g)
    candidates = torch.tensor(list(itertools.product([0, 1], repeat=bits)))
    ra, rb = embed(encoders[:2], (a, b))
    rc = embed(encoders[2:], (candidates,))[0]
    if kind == "Symile":
        scores = fusedlab.ops.mip(rc, [ra, rb])  # MIP(a, b, c) for every candidate c
    else:
        scores = (ra + rb) @ rc.T  # the pairwise scores a.c + b.c
    truth = (c[:, None, :] == candidates[None]).all(-1).float().argmax(-1)
    return (scores.argmax(-1) == truth).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests (seconds); no plot unless --out is given")
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--dim", type=int, default=32, help="embedding width (16 leaves some seeds one bit short)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="plot path (default symile_xor.png; none in --smoke)")
    args = ap.parse_args(argv)
    if args.out is None and not args.smoke:
        args.out = "symile_xor.png"
    steps = 30 if args.smoke else args.steps
    ps = (0.0, 1.0) if args.smoke else (0.0, 0.25, 0.5, 0.75, 1.0)
    from tqdm import tqdm

    results = {}
    n_eval = 500 if args.smoke else 2000
    for kind, p in tqdm(list(itertools.product(("Symile", "pairwise CLIP"), ps)), desc="training", disable=None):
        enc = train(kind, args.bits, p, steps, 256, args.dim, args.seed)
        results[(kind, p)] = retrieval_accuracy(kind, enc, args.bits, p, n_eval, args.seed)
    print(f"\nzero-shot retrieval of c given (a, b) among {2 ** args.bits} candidates (chance "
          f"{1 / 2 ** args.bits:.3f}), {steps} steps per model\n")
    print(f"{'p (XOR share)':<16}{'Symile':>10}{'pairwise CLIP':>16}")
    for p in ps:
        print(f"{p:<16}{results[('Symile', p)]:>10.3f}{results[('pairwise CLIP', p)]:>16.3f}")
    if args.out:
        plot(results, ps, args.bits, args.out)
        print(f"\nwrote {args.out}")
    return results


def plot(results, ps, bits, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("Symile", "o-"), ("pairwise CLIP", "s--")):
        ax.plot(ps, [results[(kind, p)] for p in ps], style, label=kind)
    ax.axhline(1 / 2 ** bits, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("p: share of c's bits that are a XOR b (0: c = a)")
    ax.set_ylabel("retrieval accuracy of c given (a, b)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Higher-order information: Symile vs pairwise CLIP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
