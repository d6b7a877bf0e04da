"""Newton-Schulz and the Muon step: ours against what a user would otherwise run.

Peers: torch.optim.Muon's own Newton-Schulz applied matrix by matrix (its optimizer has no batching), and a
torch.optim.Muon step on the same parameters and gradients.
"""
from __future__ import annotations

import contextlib
import statistics

import torch

import fusedlab
from fusedlab.perf.timing import measure, measure_interleaved
from fusedlab.reference import newton_schulz as ref

KELLER = (3.4445, -4.7750, 2.0315)
SHAPES = ((1, 1024, 1024), (64, 256, 256), (1, 768, 3072))  # (batch, m, n)
GPU_SHAPES = ((1, 1024, 1024), (1, 4096, 4096), (1, 4096, 16384), (64, 768, 768))  # the GPU points
QUICK_SHAPES = ((2, 32, 48),)
GRAM_SHAPES = ((1, 768, 3072), (12, 768, 3072))  # GPT-2 small's MLP matrices: aspect ratio 4
GPT2_SMALL = [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12  # the GPT-2-small matrix set


def torch_loop(G):
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns  # private: imported only to time it

    return torch.stack([torch_ns(g, KELLER, 5, 1e-7) for g in G.unbind(0)])


def check(backend, device, seed=0):
    """Relative error of the float32 kernel against the float64 reference on fresh inputs."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in ((3, 24, 40), (40, 24), (2, 32, 32)):
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        got = fusedlab.ops.newton_schulz(G.float().to(device), dtype=torch.float32, backend=backend).double().cpu()
        exact = ref.newton_schulz(G)
        worst = max(worst, ((got - exact).norm() / exact.norm()).item())
    return worst


@contextlib.contextmanager
def _update_x(choice):
    """Run the Triton path with its UPDATE_X set to ``choice`` (None: unchanged)."""
    if choice is None:
        yield
        return
    from fusedlab.triton_kernels import newton_schulz as tk

    old, tk.UPDATE_X = tk.UPDATE_X, choice
    try:
        yield
    finally:
        tk.UPDATE_X = old


_BY = {"triton": "Triton", "matmul": "cuBLAS"}


def rows(device, backends, shapes=SHAPES, min_run_time=0.2, progress=None):
    out = []
    for bsz, m, n in shapes:
        G = torch.randn(bsz, m, n, generator=torch.Generator().manual_seed(1)).to(device)
        # on a GPU, the Triton path's two ways of computing a X + B X for lone large matrices, where its
        # default ("auto") takes cuBLAS's GEMM: both rows beside the default's
        variants = [(be, None) for be in backends]
        if G.is_cuda and "triton" in backends and bsz == 1 and min(m, n) >= 2048:
            variants += [("triton", "triton"), ("triton", "matmul")]

        def ours(be, update_x):
            with _update_x(update_x):
                return fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, backend=be)

        timed = measure_interleaved({"peer": lambda: torch_loop(G),
                                     **{v: (lambda v=v: ours(*v)) for v in variants}}, min_run_time)
        peer = timed["peer"]
        for be, update_x in variants:
            t = timed[(be, update_x)]
            flops = bsz * 5 * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3)
            out.append(dict(family="newton_schulz", op="newton_schulz (bf16, 5 steps)",
                            backend=be if update_x is None else f"{be} (aX + BX by {_BY[update_x]})",
                            shape=f"{bsz}x{m}x{n}", ms=t.median_ms, peer="torch.optim.Muon's NS, per matrix",
                            peer_ms=peer.median_ms, speedup=peer.median_ms / t.median_ms,
                            note=f"{flops / t.median_ms / 1e6:.0f} GFLOP/s"))
        if progress is not None:
            progress.update(1)
    return out


def _float16_products_slow(device) -> bool:
    """Whether this CPU multiplies float16 matrices over 10x slower than bfloat16 ones (no float16 matrix
    units: the Gram path's bf16 mode, which iterates in float16, then takes about 15 s per 768x3072 matrix)."""
    if torch.device(device).type != "cpu":
        return False
    a = torch.randn(256, 256)
    times = {}
    for dt in (torch.bfloat16, torch.float16):
        x = a.to(dt)
        times[dt] = measure(lambda x=x: x @ x, 0.05).median_ms
    return times[torch.float16] > 10 * times[torch.bfloat16]


def gram_rows(device, shapes=GRAM_SHAPES, min_run_time=0.2, progress=None):
    """Gram Newton-Schulz (method="gram") against the op's standard path (backend "auto": the C++ kernel on
    CPUs) and torch.optim.Muon's NS per matrix, in bf16 (the Gram path iterates in float16; left out on CPUs
    whose float16 products are slow) and in float32. Errors: relative to float64 on the first matrix of the
    batch."""
    out = []
    for bsz, m, n in shapes:
        G = torch.randn(bsz, m, n, generator=torch.Generator().manual_seed(3)).to(device)
        exact = ref.newton_schulz(G[:1].double().cpu())
        err = lambda x: ((x[:1].double().cpu() - exact).norm() / exact.norm()).item()  # noqa: E731
        peer = measure(lambda: torch_loop(G), min_run_time)
        torch_err = err(torch_loop(G[:1]))
        for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            if dt == torch.bfloat16 and _float16_products_slow(device):
                continue  # minutes per call, and "auto" never takes it there
            std = lambda dt=dt: fusedlab.ops.newton_schulz(G, dtype=dt, method="standard")  # noqa: E731
            gram = lambda dt=dt: fusedlab.ops.newton_schulz(G, dtype=dt, method="gram")  # noqa: E731
            t_std, t_gram = measure(std, min_run_time), measure(gram, min_run_time)
            e_std, e_gram = err(std()), err(gram())
            vs_torch = peer.median_ms / t_gram.median_ms
            out.append(dict(family="newton_schulz", op=f"newton_schulz gram ({name}, 5 steps)", backend="gram",
                            shape=f"{bsz}x{m}x{n}", ms=t_gram.median_ms, peer=f"standard path ({name})",
                            peer_ms=t_std.median_ms, speedup=t_std.median_ms / t_gram.median_ms,
                            torch_ms=peer.median_ms, vs_torch=vs_torch, err=e_gram, standard_err=e_std,
                            torch_err=torch_err,
                            note=f"{vs_torch:.2f}x vs torch.optim.Muon's bf16 NS ({peer.median_ms:.1f} ms); err "
                                 f"{e_gram:.1e} (standard {e_std:.1e}, torch {torch_err:.1e})"))
        if progress is not None:
            progress.update(1)
    return out


def optimizer_row(device, quick=False, min_run_time=0.2):
    """One optimizer step over a GPT-2-small-shaped set of matrices (a small set when quick)."""
    shapes = [(64, 32)] * 4 if quick else GPT2_SMALL
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]

    def make(cls):
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, x in zip(params, grads):
            p.grad = x
        return cls(params, lr=0.02)

    ours = make(lambda params, lr: fusedlab.optim.Muon(params, lr=lr, ns_dtype=torch.bfloat16))  # torch's dtype
    theirs = make(torch.optim.Muon)
    # interleaved rounds, medians of the rounds: a CPU step takes about a second, and this machine's speed
    # drifts over a run more than the two steps differ
    t_ours, t_theirs = [], []
    for _ in range(3):
        t_ours.append(measure(ours.step, min_run_time).median_ms)
        t_theirs.append(measure(theirs.step, min_run_time).median_ms)
    t_ours, t_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    return dict(family="newton_schulz", op="Muon optimizer step", backend="auto",
                shape=f"{len(shapes)} matrices" + ("" if quick else " (GPT-2 small)"), ms=t_ours,
                peer="torch.optim.Muon step", peer_ms=t_theirs, speedup=t_theirs / t_ours, note="")
