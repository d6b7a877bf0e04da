"""CAT against a dense and a sliding-window transformer on recall and on character-level text.

Three decoders of equal width and depth are trained for the same number of steps on CPU:

* CAT (``fusedlab.nn.CATTransformer``), adaptive: trained on chunk sizes 4, 8 and 16 round-robin (one per
  step, as the reference trains), then evaluated at each of them without retraining;
* a dense causal transformer;
* a sliding-window transformer (each token sees the previous ``--window`` tokens).

Tasks: multi-query associative recall (key-value pairs, then queried keys whose values must be recalled
from far back: accuracy on the answers) and next-character prediction on text every machine has (the
docstrings of Python's standard library: validation loss in nats per character). CAT's memory of the past
is the compressed chunks, so recall gets harder as chunks grow, while a sliding window forgets whatever
left its window. A table and a plot (cat_recall.png) show both.

    python examples/cat_recall.py            # about 6 minutes on 2 CPU cores
    python examples/cat_recall.py --smoke    # seconds
"""
from __future__ import annotations

import argparse
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

import fusedlab
from fusedlab.nn.cat import rotary
from fusedlab.nn.cat_model import SwiGLU

CHUNKS = (4, 8, 16)


# ------------------------------------------------------------------------------------------------ data


def mqar_batch(B, pairs, queries, n_keys, n_values, g):
    """[key value]*pairs then [key value]*queries (queried keys drawn from the pairs); the loss and the
    accuracy count the values of the queries only. Returns tokens [B, L] and a mask of answer positions."""
    keys = torch.stack([torch.randperm(n_keys, generator=g)[:pairs] for _ in range(B)])
    values = torch.randint(0, n_values, (B, pairs), generator=g) + n_keys
    pick = torch.randint(0, pairs, (B, queries), generator=g)
    q_keys, q_values = keys.gather(1, pick), values.gather(1, pick)
    seq = torch.cat([torch.stack([keys, values], 2).flatten(1), torch.stack([q_keys, q_values], 2).flatten(1)], 1)
    answer = torch.zeros(seq.shape)
    answer[:, 2 * pairs + 1::2] = 1.0
    return seq, answer


def stdlib_text(min_chars=200_000):
    """Docstrings of standard-library modules: plain text present on every Python installation."""
    import argparse as a, collections, csv, email, json, logging, pathlib, textwrap, typing, unittest  # noqa: E401

    parts = []
    for mod in (a, collections, csv, email, json, logging, pathlib, textwrap, typing, unittest):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    text = "\n\n".join(dict.fromkeys(parts))
    while len(text) < min_chars:
        text += text
    return text


def char_batches(text, L, B, g, vocab):
    data = torch.tensor([vocab.get(ch, 0) for ch in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    def batch(source):
        idx = torch.randint(0, len(source) - L - 1, (B,), generator=g)
        return torch.stack([source[i: i + L] for i in idx.tolist()])

    return lambda: batch(train), lambda: batch(val)


# ------------------------------------------------------------------------------------------ baselines


class Block(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim, 32)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(L)
        q, k = rotary(q, pos), rotary(k, pos)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(o.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class DenseLM(nn.Module):
    """A plain decoder (window=None) or a sliding-window one, the same width and depth as CAT's decoder."""

    def __init__(self, vocab, dim, heads, layers, window=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, window) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, chunk_size=None):
        x = self.wte(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


# ------------------------------------------------------------------------------------------- training


def train(model, batches, steps, lr, chunked, desc):
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in tqdm(range(steps), desc=desc, leave=False, disable=None):
        tokens, weight = batches()
        l = CHUNKS[step % len(CHUNKS)] if chunked else None
        logits = model(tokens, l)[:, :-1]
        loss = (F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none") * weight[:, 1:]).sum()
        loss = loss / weight[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def evaluate(model, batches, n, l, metric):
    total = 0.0
    for _ in range(n):
        tokens, weight = batches()
        logits = model(tokens, l)[:, :-1]
        if metric == "accuracy":
            hit = (logits.argmax(-1) == tokens[:, 1:]).float() * weight[:, 1:]
            total += (hit.sum() / weight[:, 1:].sum()).item()
        else:
            total += F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).item()
    return total / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (seconds); no plot unless --out is given")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=16, help="the sliding-window baseline's window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="plot path (default cat_recall.png; none in --smoke)")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        args.out = "cat_recall.png"
    steps = 12 if args.smoke else args.steps
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    B, heads = 32, 4

    # recall: 12 pairs then 12 queries, L = 48; keys 0..23, values 24..47
    pairs, queries, n_keys, n_values = 12, 12, 24, 24
    mqar = lambda: mqar_batch(B, pairs, queries, n_keys, n_values, g)  # noqa: E731
    text = stdlib_text(20_000 if args.smoke else 200_000)
    chars = sorted(set(text))
    vocab = {ch: i for i, ch in enumerate(chars)}
    train_chars, val_chars = char_batches(text, 128, B, g, vocab)
    ones = lambda t: (t, torch.ones_like(t, dtype=torch.float))  # noqa: E731
    tasks = {
        "recall accuracy": (n_keys + n_values, 2 * (pairs + queries), mqar, mqar, "accuracy"),
        "text loss (nats/char)": (len(chars), 128, lambda: ones(train_chars()), lambda: ones(val_chars()), "loss"),
    }
    results = {}
    for task, (V, L, train_b, eval_b, metric) in tasks.items():
        cfg = fusedlab.nn.CATConfig(vocab_size=V, dim=args.dim, n_heads=heads, n_layers=args.layers,
                                    compressor_dim=args.dim // 2, compressor_heads=2, compressor_layers=1,
                                    chunk_sizes=CHUNKS, max_seq_len=L)
        models = {"CAT (adaptive)": (fusedlab.nn.CATTransformer(cfg), True),
                  "dense": (DenseLM(V, args.dim, heads, args.layers), False),
                  f"sliding window {args.window}": (DenseLM(V, args.dim, heads, args.layers, args.window), False)}
        n_eval = 2 if args.smoke else 20
        for name, (model, chunked) in models.items():
            train(model, train_b, steps, 3e-3, chunked, f"{task}: {name}")
            if chunked:
                for l in CHUNKS:
                    results[(task, f"CAT l={l}")] = evaluate(model, eval_b, n_eval, l, metric)
            else:
                results[(task, name)] = evaluate(model, eval_b, n_eval, None, metric)
    names = list(dict.fromkeys(n for _, n in results))
    print(f"\n{steps} training steps per model, batch {B}, width {args.dim}, {args.layers} layers\n")
    print(f"{'model':<22}" + "".join(f"{t:>24}" for t in tasks))
    for n in names:
        print(f"{n:<22}" + "".join(f"{results[(t, n)]:>24.3f}" for t in tasks))
    if args.out:
        plot(results, list(tasks), names, args.out)
        print(f"\nwrote {args.out}")
    return results


def plot(results, tasks, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 4))
    colors = ["#1f77b4", "#4a98d3", "#8dbde8", "#d62728", "#7f7f7f"]
    for ax, task in zip(axes, tasks):
        vals = [results[(task, n)] for n in names]
        ax.bar(range(len(names)), vals, color=colors[: len(names)])
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_title(task)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("One adaptive CAT evaluated at three chunk sizes, against dense and sliding-window attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
