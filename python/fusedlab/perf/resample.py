"""Resample + gather of a [B, K, D] particle state: ours against what a user would otherwise write.

Peers: (a) the naive pipeline (softmax, torch.multinomial, gather); (b) the best plain-PyTorch systematic
resampling (softmax, cumsum, searchsorted, index_select); (c) state.clone(), the memory floor.
"""
from __future__ import annotations

import math

import torch

import fusedlab
from fusedlab.perf.timing import capture, cuda_launches, measure, measure_interleaved

SHAPES = ((1, 1024), (1024, 16), (4096, 64), (256, 1024))  # (B, K): the benchmark target points
STATE_DIM = 16


def peer_naive(lw, state):
    B, K = lw.shape
    anc = torch.multinomial(torch.softmax(lw, -1), K, replacement=True)
    return torch.gather(state, 1, anc.unsqueeze(-1).expand_as(state))


def peer_plain_systematic(lw, state):
    B, K = lw.shape
    cdf = torch.cumsum(torch.softmax(lw, -1), -1)
    cdf[:, -1] = 1.0
    points = (torch.arange(K, device=lw.device) + torch.rand(B, 1, device=lw.device)) / K
    anc = torch.searchsorted(cdf, points, right=True).clamp_(max=K - 1)
    flat = (anc + torch.arange(B, device=lw.device).unsqueeze(-1) * K).flatten()
    return state.reshape(B * K, -1).index_select(0, flat).view_as(state)


def peer_clone(lw, state):
    return state.clone()


PEERS = {"naive": peer_naive, "plain_systematic": peer_plain_systematic, "clone": peer_clone}


def ours(backend):
    def run(lw, state):
        # on a GPU, the no-synchronization setting an SMC loop uses there (the peers check nothing either);
        # "raise" would add a device-to-host sync per call
        on_degenerate = "uniform" if lw.is_cuda else "raise"
        return fusedlab.smc.resample(lw, "systematic", 1.0, state=state, on_degenerate=on_degenerate,
                                     backend=backend).state

    return run


def inputs(B, K, device, D=STATE_DIM, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lw = (torch.randn(B, K, generator=g) * 2).to(device)
    state = torch.randn(B, K, D, generator=g).to(device)
    return lw, state


def check(backend, device, B=64, K=33, seed=1):
    """Largest disagreement with the reference on fresh inputs, every method and threshold: the number of
    differing ancestors plus the largest absolute error of the carried log-weights and log_norm."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for method in fusedlab.smc.METHODS:
        for thr in (0.0, 0.5, 1.0):
            lw = torch.randn(B, K, generator=g)
            lw[torch.rand(B, K, generator=g) < 0.2] = -math.inf
            lw[:, 0] = 0.0
            shape = (B,) if method == "systematic" else (B, K)
            u = torch.rand(shape, generator=g, dtype=torch.float64)
            state = torch.randn(B, K, 3, generator=g)
            a = fusedlab.smc.resample(lw.to(device), method, thr, uniforms=u.to(device), state=state.to(device),
                                      backend=backend)
            b = fusedlab.smc.resample(lw, method, thr, uniforms=u, state=state, backend="reference")
            mism = (a.ancestors.cpu() != b.ancestors).sum().item() + (a.state.cpu() != b.state).sum().item()
            err = max((a.log_weights.cpu() - b.log_weights).abs().max().item(),
                      (a.log_norm.cpu() - b.log_norm).abs().max().item())
            worst = max(worst, mism + err)
    return worst


def rows(device, backends, shapes=SHAPES, min_run_time=0.2, progress=None):
    """One row per (shape, implementation): median time and ratios against peers (b) and (c)."""
    out = []
    for B, K in shapes:
        lw, state = inputs(B, K, device)
        fns = {**{name: (lambda f=f: f(lw, state)) for name, f in PEERS.items()},
               **{("ours", be): (lambda be=be: ours(be)(lw, state)) for be in backends}}
        timed = measure_interleaved(fns, min_run_time)
        times = {name: timed[name] for name in PEERS}
        gpu = lw.is_cuda
        launches = {name: cuda_launches(lambda f=f: f(lw, state)) for name, f in PEERS.items()} if gpu else {}
        for be in backends:
            t = timed[("ours", be)]
            if gpu:
                launches[be] = cuda_launches(lambda be=be: ours(be)(lw, state))
            out.append(dict(family="resample", op="resample+gather (systematic)", backend=be, B=B, K=K,
                            D=STATE_DIM, ms=t.median_ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms, launches=launches.get(be),
                            vs_plain=times["plain_systematic"].median_ms / t.median_ms,
                            vs_naive=times["naive"].median_ms / t.median_ms,
                            over_clone=t.median_ms / times["clone"].median_ms))
        for name, t in times.items():
            out.append(dict(family="resample", op=f"peer: {name}", backend="torch", B=B, K=K, D=STATE_DIM,
                            ms=t.median_ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms, launches=launches.get(name)))
        if progress is not None:
            progress.update(1)
    return out


def graph_rows(backends, shapes=SHAPES, min_run_time=0.2, device="cuda"):
    """Resample + gather (systematic, on_degenerate="uniform", uniforms drawn from the default generator)
    and each peer captured in one CUDA graph and replayed: their launches' GPU time without the host's
    per-call cost, which dominates eager calls at these sizes. One row per (shape, implementation)."""
    out = []
    for B, K in shapes:
        lw, state = inputs(B, K, device)
        times, notes = {}, {}
        for name, fn in [(be, ours(be)) for be in backends] + list(PEERS.items()):
            try:
                graph = capture(lambda fn=fn: fn(lw, state))
                times[name] = measure(graph.replay, min_run_time).median_ms
            except Exception as err:  # a path that cannot be captured is reported, not fatal
                times[name], notes[name] = None, f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        for name, ms in times.items():
            ok = ms is not None and times.get("clone") and times.get("plain_systematic")
            out.append(dict(family="resample", op="resample+gather in a CUDA graph" if name in backends else
                            f"peer: {name}, in a CUDA graph", backend=name if name in backends else "torch", B=B, K=K,
                            D=STATE_DIM, ms=ms, vs_plain=times["plain_systematic"] / ms if ok else None,
                            over_clone=ms / times["clone"] if ok else None, note=notes.get(name, "")))
    return out
