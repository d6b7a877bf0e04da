"""CAT attention forward + backward: ours against what a user would otherwise run (on the CPU, where
FlexAttention has no backward, its forward against ours).

Peers: dense causal scaled_dot_product_attention over the L raw tokens (FlashAttention on a GPU), and
FlexAttention over the reference's interleaved sequence [F_0, x_0..x_{l-1}, F_1, ...] with its mask
(allowed(q, k) = (same block or k is a compressed slot) and k <= q, blocks of l + 1). Useful FLOPs count
only the allowed (query, key) pairs: 4 d per pair forward, 10 d backward (FlashAttention's accounting).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

import fusedlab
from fusedlab.perf.timing import capture, measure, measure_interleaved

GPU_POINTS = [(L, l) for L in (1024, 4096, 16384) for l in (4, 8, 16, 32)]
FLEX_POINTS = {(1024, 16), (4096, 4), (4096, 8), (4096, 16), (4096, 32)}  # each costs a compile
CPU_POINTS = [(1024, 16), (4096, 16)]  # B = 1, H = 4, float32: the issue's CPU target point and a small one
QUICK_POINTS = [(64, 8)]


def allowed_pairs(L: int, l: int) -> int:
    """Raw-query (query, key) pairs CAT computes: per token, its chunk's slots 0..b plus its chunk prefix."""
    t = torch.arange(L, dtype=torch.int64)
    return int((t // l + 1 + t % l + 1).sum())


def inputs(B, H, L, l, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nc = -(-L // l) + 1
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, H, L, d), mk(B, H, L, d), mk(B, H, L, d), mk(B, H, Nc, d), mk(B, H, Nc, d)


def _fwd_bwd(fn, tensors, grad):
    out = fn(*tensors)
    torch.autograd.grad(out, tensors, grad)


def flex_interleaved(B, H, L, l, d, device, dtype, forward_only=False):
    """A forward+backward (or forward) closure of FlexAttention over the interleaved sequence and its mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    blk = l + 1
    n = -(-L // l) * blk + 1

    def mask(b, h, q_idx, kv_idx):
        return ((q_idx // blk == kv_idx // blk) | (kv_idx % blk == 0)) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask, None, None, n, n, device=device)
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(not forward_only)
           for _ in range(3)]
    grad = torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype)
    attn = torch.compile(flex_attention, dynamic=False)
    if forward_only:  # FlexAttention has no CPU backward
        def run():
            with torch.no_grad():
                attn(*qkv, block_mask=block_mask)
        return run
    return lambda: _fwd_bwd(lambda q, k, v: attn(q, k, v, block_mask=block_mask), qkv, grad)


def _captured(fns, min_run_time):
    """Each forward+backward of ``fns`` ("ours", "dense", "flex" when present) captured whole in a CUDA graph
    and replayed, interleaved: the GPU time of its kernels, without the host's cost per launch (which bounds
    our eager forward+backward at L = 4096 on an H200, see bench/host_probe.py)."""
    graphs, notes = {}, []
    for name in ("ours", "dense", "flex"):
        if name in fns:
            try:
                graphs[name] = capture(fns[name])
            except Exception as err:  # a side that cannot be captured is reported, not fatal
                notes.append(f"{name} not captured: {type(err).__name__}")
    timed = measure_interleaved({n: g.replay for n, g in graphs.items()}, min_run_time / 3) if graphs else {}
    ms = {n: t.median_ms for n, t in timed.items()}
    out = dict(captured_ms=ms.get("ours"), sdpa_captured_ms=ms.get("dense"), flex_captured_ms=ms.get("flex"))
    if "ours" in ms:
        out.update(vs_sdpa_captured=ms["dense"] / ms["ours"] if "dense" in ms else None,
                   vs_flex_captured=ms["flex"] / ms["ours"] if "flex" in ms else None)
    if notes:
        out["capture_note"] = "; ".join(notes)
    return out


def rows(device, points=GPU_POINTS, B=2, H=8, d=64, dtype=torch.bfloat16, min_run_time=0.2, flex=True,
         progress=None):
    out = []
    for L, l in points:
        q, k, v, kc, vc = inputs(B, H, L, l, d, device, dtype)
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        fns = {
            "ours": lambda: _fwd_bwd(lambda *a: fusedlab.ops.cat_attention(*a, l), (q, k, v, kc, vc), grad),
            "ours_fwd": lambda: fusedlab.ops.cat_attention(q.detach(), k.detach(), v.detach(), kc.detach(),
                                                           vc.detach(), l),
            "dense": lambda: _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                      (q, k, v), grad)}
        if q.is_cuda and "cuda" in fusedlab.backends():  # the CUDA-core kernel beside the default (Triton)
            fns["cuda"] = lambda: _fwd_bwd(lambda *a: fusedlab.ops.cat_attention(*a, l, backend="cuda"),
                                           (q, k, v, kc, vc), grad)
        note = None
        if flex and (L, l) in FLEX_POINTS:
            try:  # FlexAttention has no CPU backward: the forward alone there
                flex_fn = flex_interleaved(B, H, L, l, d, device, dtype, forward_only=not q.is_cuda)
                flex_fn()  # compiles it
                fns["flex"] = flex_fn
            except Exception as err:  # a peer that fails to build is reported, not fatal
                note = f"flex failed: {type(err).__name__}"
        # three interleaved rounds of a third of the time each: a machine whose speed drifts moves every side
        # alike, and the point takes no longer than one round of the full time
        try:
            timed = measure_interleaved(fns, min_run_time / 3)
        except Exception as err:  # Flex failing in the rounds: reported, the rest timed without it
            if "flex" not in fns:
                raise
            note = f"flex failed: {type(err).__name__}"
            del fns["flex"]
            timed = measure_interleaved(fns, min_run_time / 3)
        ours, ours_fwd, dense = timed["ours"], timed["ours_fwd"], timed["dense"]
        flops = (4 + 10) * d * allowed_pairs(L, l) * B * H
        row = dict(family="cat", op="cat_attention fwd+bwd", backend=fusedlab._backend.resolve("auto", "cat", q.device),
                   B=B, H=H, L=L, l=l, d=d, dtype=str(dtype).replace("torch.", ""), ms=ours.median_ms,
                   fwd_ms=ours_fwd.median_ms, sdpa_ms=dense.median_ms, vs_sdpa=dense.median_ms / ours.median_ms,
                   tflops=flops / ours.median_ms / 1e9)
        if "cuda" in timed:
            t = timed["cuda"].median_ms
            row.update(cuda_kernel_ms=t, cuda_kernel_vs_auto=ours.median_ms / t)
        if "flex" in timed and q.is_cuda:
            row.update(flex_ms=timed["flex"].median_ms, vs_flex=timed["flex"].median_ms / ours.median_ms)
        elif "flex" in timed:
            row.update(flex_fwd_ms=timed["flex"].median_ms, vs_flex_fwd=timed["flex"].median_ms / ours_fwd.median_ms)
        if note:
            row.update(flex_ms=None, note=note)
        if q.is_cuda:
            row.update(_captured(fns, min_run_time))
        out.append(row)
        if progress is not None:
            progress.update(1)
    return out


#: Points of the captured (CUDA graph) comparison: each costs two compiles of a forward and a backward.
GRAPH_POINTS = [(4096, 16), (16384, 16)]


def graph_rows(device, points=GRAPH_POINTS, B=2, H=8, d=64, dtype=torch.bfloat16, min_run_time=0.2,
               mode="reduce-overhead", manual_capture=None):
    """Forward+backward of ours and of dense causal SDPA, each compiled with ``mode`` (on a GPU
    "reduce-overhead": CUDA graphs, so the host's per-launch cost leaves both; at L = 4096 eager CAT is
    bound by that cost, not by its kernels). Both are compiled the same way, in the same process; the eager
    times are measured beside them. Other modes run the same harness (the CPU test uses "default").

    With ``manual_capture`` (default: on CUDA devices) each eager forward+backward is also captured whole in
    one CUDA graph (torch.cuda.graph) and replayed: the GPU time of its kernels with one launch of host work,
    without the Python that torch.compile's graph trees run around each replay."""
    if manual_capture is None:
        manual_capture = torch.device(device).type == "cuda"
    out = []
    for L, l in points:
        q, k, v, kc, vc = inputs(B, H, L, l, d, device, dtype)
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        ours_fn = lambda a, b, c, e, f: fusedlab.ops.cat_attention(a, b, c, e, f, l)  # noqa: E731
        sdpa_fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
        row = dict(family="cat", op="cat_attention fwd+bwd, compiled", mode=mode, B=B, H=H, L=L, l=l, d=d,
                   dtype=str(dtype).replace("torch.", ""))
        for name, fn, args in (("ours", ours_fn, (q, k, v, kc, vc)), ("sdpa", sdpa_fn, (q, k, v))):
            compiled = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)

            def step(compiled=compiled, args=args):
                # each step starts a new graph replay, so the previous step's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
                torch.autograd.grad(compiled(*args), args, grad)

            row[f"{name}_compiled_ms"] = measure(step, min_run_time).median_ms
            row[f"{name}_eager_ms"] = measure(lambda fn=fn, args=args: _fwd_bwd(fn, args, grad), min_run_time).median_ms
            if manual_capture:
                try:
                    graph = capture(lambda fn=fn, args=args: _fwd_bwd(fn, args, grad))
                    row[f"{name}_captured_ms"] = measure(graph.replay, min_run_time).median_ms
                except Exception as err:  # a side that cannot be captured is reported, not fatal
                    row[f"{name}_captured_ms"] = None
                    row["note"] = (row.get("note", "") + f"{name} not captured: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:100]}; ")
        row["vs_sdpa_compiled"] = row["sdpa_compiled_ms"] / row["ours_compiled_ms"]
        if manual_capture and row["ours_captured_ms"] and row["sdpa_captured_ms"]:
            row["vs_sdpa_captured"] = row["sdpa_captured_ms"] / row["ours_captured_ms"]
        row["tflops"] = (4 + 10) * d * allowed_pairs(L, l) * B * H / row["ours_compiled_ms"] / 1e9
        out.append(row)
    return out


def check(device, seed=0) -> float:
    """Largest relative error of the output and every gradient (fp32, "auto" backend) against the float64
    reference, with grouped heads, compressed queries and a ragged last chunk."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, l, d = 1, 4, 2, 100, 16, 32
    Nc = -(-L // l) + 1
    shapes = [(B, H, L, d), (B, Hkv, L, d), (B, Hkv, L, d), (B, Hkv, Nc, d), (B, Hkv, Nc, d), (B, H, Nc, d)]
    exact = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    ours = [t.detach().float().to(device).requires_grad_() for t in exact]
    gouts = [torch.randn(B, H, L, d, generator=g, dtype=torch.float64), torch.randn(B, H, Nc, d, generator=g,
                                                                                  dtype=torch.float64)]
    a = fusedlab.ops.cat_attention(*ours[:5], l, qc=ours[5])
    b = fusedlab.ops.cat_attention(*exact[:5], l, qc=exact[5], backend="reference")
    ga = torch.autograd.grad(a, ours, [x.float().to(device) for x in gouts])
    gb = torch.autograd.grad(b, exact, gouts)
    pairs = list(zip(a, b)) + list(zip(ga, gb))
    return max(((x.detach().double().cpu() - y.detach()).norm() / y.detach().norm()).item() for x, y in pairs)


def demo_row(device, quick=False, min_run_time=0.2):
    """One row of `python -m fusedlab demo`: forward+backward against dense causal SDPA (the issue's CPU
    target point on the CPU; B = 2, H = 8, bf16 on a GPU)."""
    if device == "cuda":
        kw = dict(B=2, H=8, dtype=torch.bfloat16, flex=False)
    else:
        kw = dict(B=1, H=4, dtype=torch.float32, flex=False)
    (L, l), = QUICK_POINTS if quick else [(4096, 16)]
    r = rows(device, [(L, l)], min_run_time=min_run_time, **kw)[0]
    return dict(op="cat_attention (fwd+bwd)", backend=r["backend"], shape=f"B={r['B']} H={r['H']} L={L} l={l} d=64",
                time=f"{r['ms']:.2f} ms", peer="dense causal SDPA", err=f"{check(device):.1e}",
                speedup=f"{r['vs_sdpa']:.2f}x", note=f"each token sees <= {L // l + l} keys, not up to {L}")


# ---------------------------------------------------------------------------------------------- generation


class DenseDecoder(torch.nn.Module):
    """The CAT model's decoder run as a dense causal transformer with a full KV cache (the same weights,
    global rotary positions, no compressor): the baseline a CAT cache is compared with."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def generate(self, prompt, new_tokens):
        from fusedlab.nn.cat import rotary

        m = self.model
        B, P = prompt.shape
        total = P + new_tokens
        caches = []
        x = m.wte(prompt)
        pos = torch.arange(P, device=prompt.device)
        for blk in m.blocks:  # prefill: causal attention over the prompt, keys kept
            q, k, v = blk.attn.qkv(blk.attn_norm(x), pos, blk.rope_base)
            kc = k.new_zeros(B, k.shape[1], total, k.shape[3])
            vc = torch.zeros_like(kc)
            kc[:, :, :P], vc[:, :, :P] = k, v
            caches.append((kc, vc))
            g = q.shape[1] // k.shape[1]
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                               is_causal=True)
            x = x + blk.attn.out(o)
            x = x + blk.mlp(blk.mlp_norm(x))
        nxt = m.lm_head(m.norm(x[:, -1:])).argmax(-1)
        out = [prompt, nxt]
        for t in range(P, total - 1):
            h = m.wte(nxt)
            p = torch.tensor([t], device=prompt.device)
            for blk, (kc, vc) in zip(m.blocks, caches):
                q, k, v = blk.attn.qkv(blk.attn_norm(h), p, blk.rope_base)
                kc[:, :, t: t + 1], vc[:, :, t: t + 1] = k, v
                g = q.shape[1] // k.shape[1]
                o = F.scaled_dot_product_attention(q, kc[:, :, : t + 1].repeat_interleave(g, 1),
                                                   vc[:, :, : t + 1].repeat_interleave(g, 1))
                h = h + blk.attn.out(o)
                h = h + blk.mlp(blk.mlp_norm(h))
            nxt = m.lm_head(m.norm(h)).argmax(-1)
            out.append(nxt)
        cache_bytes = sum(kc.numel() * kc.element_size() * 2 for kc, _ in caches)
        return torch.cat(out, 1), cache_bytes


def decode_rows(device, backends, B=256, H=8, Hkv=8, L=4096, l=16, d=64, dtype=torch.bfloat16, min_run_time=0.2):
    """One decode step of attention alone (fusedlab.ops.cat_decode) per backend, with the cache a sequence has
    at position L - 1: ceil(L / l) compressed slots and a chunk of raw keys, every sequence filled to a
    different point; against a dense cache's step, single-query SDPA over L keys."""
    g = torch.Generator().manual_seed(0)
    S, R = -(-L // l) + 1, l
    q = torch.randn(B, H, d, generator=g).to(device, dtype)
    kc, vc = (torch.randn(B, Hkv, S, d, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, R, d, generator=g).to(device, dtype) for _ in range(2))
    n_slots = torch.randint(max(1, S - 8), S + 1, (B,), generator=g).to(device)
    n_raw = torch.randint(0, R + 1, (B,), generator=g).to(device)
    kd, vd = (torch.randn(B, Hkv, L, d, generator=g).to(device, dtype) for _ in range(2))
    qd = q.unsqueeze(2)
    dense = measure(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=H != Hkv), min_run_time)
    out = []
    for be in backends:
        t = measure(lambda be=be: fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend=be),
                    min_run_time)
        out.append(dict(family="cat", op="decode step (attention)", backend=be, dtype=str(dtype).replace("torch.", ""),
                        B=B, H=H, Hkv=Hkv, L=L, l=l, d=d, slots=S, raw=R, ms=t.median_ms,
                        dense_ms=dense.median_ms, vs_dense=dense.median_ms / t.median_ms))
    return out


def generation_row(device, B=256, L=4096, l=16, new_tokens=128, dim=512, layers=8, heads=8, vocab=32000,
                   dtype=torch.bfloat16):
    """Greedy decoding of ``new_tokens`` after a prompt of L - new_tokens, CAT's compressed cache against the
    same decoder with a dense cache: decode tokens/s (the prompt's prefill timed apart), peak memory."""
    import time

    from fusedlab.nn import CATConfig, CATTransformer

    torch.manual_seed(0)
    cfg = CATConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, compressor_dim=dim // 2,
                    compressor_heads=max(1, heads // 2), compressor_layers=max(1, layers // 4), chunk_sizes=(l,),
                    max_seq_len=L)
    model = CATTransformer(cfg).to(device=device, dtype=dtype).eval()
    dense = DenseDecoder(model)
    prompt = torch.randint(0, vocab, (B, L - new_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    cuda = torch.device(device).type == "cuda"

    def run(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
        return out, time.perf_counter() - t0, peak

    # decode time = (prompt + n tokens) - (prompt + 1 token): the prefill cancels out
    (_, stats), t_cat, peak_cat = run(lambda: model.generate(prompt, new_tokens, chunk_size=l, return_stats=True))
    _, t_cat1, _ = run(lambda: model.generate(prompt, 1, chunk_size=l))
    (_, dense_bytes), t_dense, peak_dense = run(lambda: dense.generate(prompt, new_tokens))
    _, t_dense1, _ = run(lambda: dense.generate(prompt, 1))
    tps_cat = B * (new_tokens - 1) / max(t_cat - t_cat1, 1e-9)
    tps_dense = B * (new_tokens - 1) / max(t_dense - t_dense1, 1e-9)
    return dict(family="cat", op="generation (greedy, bf16)" if dtype == torch.bfloat16 else "generation (greedy)",
                B=B, L=L, l=l, layers=layers, dim=dim, tokens_per_s=tps_cat, dense_tokens_per_s=tps_dense,
                speedup=tps_cat / tps_dense, cache_bytes=stats["cache_bytes"], dense_cache_bytes=dense_bytes,
                cache_ratio=dense_bytes / stats["cache_bytes"], peak_bytes=peak_cat, dense_peak_bytes=peak_dense,
                slots=stats["cache_slots_per_layer"], dense_slots=L)


def profile_breakdown(device, B=2, H=8, L=4096, l=16, d=64, dtype=torch.bfloat16, top=12):
    """Where one forward+backward spends its time (torch.profiler; the GPU's kernels on CUDA): the top
    events by device time and by host time, to tell kernel time from per-call overhead."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, kc, vc = inputs(B, H, L, l, d, device, dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    run = lambda: _fwd_bwd(lambda *a: fusedlab.ops.cat_attention(*a, l), (q, k, v, kc, vc), grad)  # noqa: E731
    for _ in range(3):
        run()
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(5):
            run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    def rows(key):
        picked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
        return [dict(name=e.key, calls=e.count // 5, self_us_per_call_step=getattr(e, key, 0) / 5) for e in picked]

    return dict(B=B, H=H, L=L, l=l, d=d, by_device=rows(dev_key), by_host=rows("self_cpu_time_total"))


def host_breakdown(device, B=2, H=8, L=4096, l=16, d=64, dtype=torch.bfloat16, calls=50, top=15):
    """Where the host's time goes in one forward+backward, without the profiler's own cost: each piece called
    ``calls`` times back to back, timed to the last call's return ("issue", what the host spends) and to the
    device's end ("wall"), so that a piece whose issue time matches its wall time holds the GPU up. Pieces:
    the forward with and without an autograd graph, the whole forward+backward (also with the backward kept on
    the calling thread), dense causal SDPA's forward+backward, and on CUDA with the Triton
    backend the backward's kernels called directly (no autograd) and the forward kernel alone. Then the top
    functions by own time under cProfile over the forward+backward and the direct backward (per call, us)."""
    import cProfile
    import pstats
    import time

    q, k, v, kc, vc = inputs(B, H, L, l, d, device, dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plain = [t.detach() for t in (q, k, v, kc, vc)]
    scale = 1.0 / math.sqrt(d)
    pieces = {
        "forward (no graph)": lambda: fusedlab.ops.cat_attention(*plain, l),
        "forward (autograd graph)": lambda: fusedlab.ops.cat_attention(q, k, v, kc, vc, l),
        "forward+backward": lambda: _fwd_bwd(lambda *a: fusedlab.ops.cat_attention(*a, l), (q, k, v, kc, vc), grad),
        "dense SDPA forward+backward": lambda: _fwd_bwd(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v), grad),
    }

    def on_calling_thread():
        # the autograd engine runs a CUDA backward on its device thread, handing the work over and back per
        # call; with multithreading off it stays on this one
        with torch.autograd.set_multithreading_enabled(False):
            _fwd_bwd(lambda *a: fusedlab.ops.cat_attention(*a, l), (q, k, v, kc, vc), grad)

    pieces["forward+backward (backward on the calling thread)"] = on_calling_thread
    # this machine's cost of one dispatched op and one allocation, the units the pieces above are made of
    one = torch.zeros(1, device=device)
    pieces["one small op (in-place add on 1 element)"] = lambda: one.add_(1.0)
    pieces["one allocation (torch.empty like q)"] = lambda: torch.empty_like(plain[0])
    if cuda and "triton" in fusedlab.backends():
        from fusedlab.ops.cat import _cat_triton_backward_eager
        from fusedlab.triton_kernels import cat as tk

        o, lse, oc, lse_c = tk.forward(*plain, None, l, scale)
        pieces["forward kernel alone (tk.forward)"] = lambda: tk.forward(*plain, None, l, scale)
        pieces["backward kernels alone (no autograd)"] = lambda: _cat_triton_backward_eager(
            grad, None, *plain, None, o, lse, oc, lse_c, l, scale)
    out = {}
    for name, fn in pieces.items():
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        out[name] = dict(issue_us=(t1 - t0) / calls * 1e6, wall_us=(t2 - t0) / calls * 1e6)
    profiled = {}
    # cProfile sees the calling thread only: on CUDA the autograd engine runs a backward on its device thread,
    # so the backward's kernels are profiled again called directly
    for name in ("forward+backward", "backward kernels alone (no autograd)"):
        if name not in pieces:
            continue
        prof, run = cProfile.Profile(), pieces[name]
        prof.enable()
        for _ in range(calls):
            run()
        sync()
        prof.disable()
        stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
        ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        profiled[name] = [dict(name=f"{os.path.basename(f)}:{line}({fn})", calls=c / calls, own_us=own / calls * 1e6,
                               cum_us=cum / calls * 1e6) for (f, line, fn), (_, c, own, cum, _) in ranked]
    return dict(B=B, H=H, L=L, l=l, d=d, calls=calls, pieces=out, by_own_time=profiled)

