"""Symile's "n_squared" loss, forward and backward: ours against the symile package in the same process.

Peer: ``symile.Symile("n_squared")`` (the package a user would otherwise call), given the same tensors. On
CUDA both sides get bfloat16 inputs (our kernels accumulate in fp32); on the CPU float32.

* ``rows``: time of one forward+backward at each (N, d) of a grid, M = 3, for each of our backends on the
  device and for the package, with the speedup over the package. A side is skipped with a note where its
  estimated memory (notes §1.11 for the package: about 2 N^2 d + 3 N^3 elements per anchor, times M) exceeds
  what is free, or where its time, extrapolated from its last point, exceeds a per-call cap.
* ``fresh_process_peak``: one forward+backward of one implementation at one (N, d) in a fresh Python
  process, reporting peak memory growth (CPU: ru_maxrss; CUDA: torch.cuda.max_memory_allocated, both above
  the level reached after imports, input creation and a tiny warm-up call).
* ``largest_n``: the largest N (doubling from 512, d = 1024, bf16) one card runs, each try in a fresh
  process so an out-of-memory error cannot poison the next.

``python -m fusedlab.perf.symile --one IMPL --N N --d D --device DEV`` is the fresh-process worker: it prints
one json line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

import fusedlab

M_DEFAULT = 3
GRID = [(N, d) for d in (256, 1024) for N in (64, 128, 256, 512, 1024)]  # (N, d)
QUICK_GRID = [(8, 16)]
CPU_MEMORY_POINT = (256, 256)  # the CPU target point
GPU_MEMORY_POINT = (512, 1024)  # the GPU target point
QUICK_MEMORY_POINT = (8, 16)
#: a side whose forward+backward would take longer than this (extrapolated from its previous point) is skipped
TIME_CAP_S = {"cpu": 20.0, "cuda": 5.0}
#: largest N on one card: start, stop, and the longest one forward+backward may take
LARGEST_START, LARGEST_MAX_N, LARGEST_TIME_CAP_S, LARGEST_D = 512, 16384, 20.0, 1024
SCALE = 20.0
PACKAGE = "package"
PACKAGE_NAME = "symile 0.1.0"


def label(impl: str) -> str:
    return PACKAGE_NAME if impl == PACKAGE else f"fusedlab[{impl}]"


def bench_dtype(device) -> torch.dtype:
    """bfloat16 on CUDA (fp32 accumulation inside the kernels), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def inputs(N, d, M=M_DEFAULT, device="cpu", dtype=torch.float32, seed=0):
    """M L2-normalized [N, d] representations (drawn in float32 on the CPU, then cast and moved) that require
    grad, and a float32 logit scale that requires grad."""
    g = torch.Generator().manual_seed(seed)
    reps = [torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=-1).to(device=device, dtype=dtype)
            .requires_grad_() for _ in range(M)]
    return reps, torch.tensor(SCALE, device=device, requires_grad=True)


def _inputs(N, d, M, seed=0):
    return inputs(N, d, M, seed=seed)


def loss_fn(impl: str):
    """The loss callable ``(reps, scale) -> loss`` of one implementation: a fusedlab backend or "package"."""
    if impl == PACKAGE:
        import symile

        return symile.Symile("n_squared")
    return lambda reps, scale: fusedlab.ops.symile_loss(reps, scale, "n_squared", backend=impl)


def package_available() -> bool:
    try:
        import symile  # noqa: F401
    except ImportError:
        return False
    return True


def _fwd_bwd(loss_fn, reps, scale):
    for r in reps:
        r.grad = None
    scale.grad = None
    loss = loss_fn(reps, scale)
    loss.backward()
    return loss.detach(), [r.grad for r in reps] + [scale.grad]


def useful_flops(N: int, d: int, M: int = M_DEFAULT) -> int:
    """FLOPs of one forward+backward of the shared-logits algorithm: one pass over the N^M logits forward,
    one recomputation and M gradient contractions backward, 2 d FLOPs per logit each (the recomputation is
    counted, as FlashAttention's backward accounting does)."""
    return 2 * d * N ** M * (M + 2)


def estimated_bytes(impl: str, N: int, d: int, M: int, elem: int) -> int:
    """Rough peak working memory of the materializing implementations (0 for our streaming kernels).

    package (notes §1.11): per anchor, N rolled copies of a modality and the concatenated products
    (2 N^(M-1) d) and the logits, scaled logits and log-softmax (3 N^M), kept for the backward, for each of
    the M anchors; plus about 2 N^(M-1) d of transients. reference: the N^(M-1) x d products once, the N^M
    tensor, its scaled copy, and per-anchor permuted copies and log-sum-exp buffers (about 6 N^M)."""
    big, prods = N ** M, N ** (M - 1) * d
    if impl == PACKAGE:
        return (M * (2 * prods + 3 * big) + 2 * prods) * elem
    if impl == "reference":
        return (2 * prods + 6 * big) * elem
    return 0


def free_bytes(device) -> int:
    """Memory free for a new allocation: the GPU's free memory (after emptying torch's cache), or the
    system's MemAvailable."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, min_run_time, time_cap_s):
    """(timing dict, last output): the first call (timed) warms up; a call slower than a second is timed once
    more by hand (once at all when it exceeded the cap), faster ones by ``perf.timing.measure``."""
    from fusedlab.perf.timing import measure

    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > time_cap_s:
        return dict(ms=first * 1e3, q20_ms=None, q80_ms=None, runs=1, first_call=True), out
    if first > 1.0:
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return dict(ms=(time.perf_counter() - t0) * 1e3, q20_ms=None, q80_ms=None, runs=1, first_call=False), out
    t = measure(fn, min_run_time)
    return dict(ms=t.median_ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms, runs=None, first_call=False), out


def rows(device, backends, grid=GRID, min_run_time=0.2, progress=None, M=M_DEFAULT, package=True,
         time_cap_s=None, dtype=None):
    """Forward+backward of "n_squared" at each (N, d) of ``grid`` for each backend in ``backends`` and for the
    symile package, in this process. One row per (point, implementation); skipped or failed sides keep their
    row with ``ms`` None and a ``status`` ("skipped", "oom", "error") and note."""
    device = str(device)
    dtype = dtype or bench_dtype(device)
    cap = time_cap_s if time_cap_s is not None else TIME_CAP_S[torch.device(device).type]
    impls = list(backends) + ([PACKAGE] if package else [])
    have_package = package_available()
    last = {}  # impl -> (N, d, seconds) of its last measured point: extrapolates the next one
    cuda, warm = torch.device(device).type == "cuda", set()
    out = []
    for N, d in sorted(grid, key=lambda p: (p[1], p[0])):
        reps, scale = inputs(N, d, M, device, dtype)
        point = []
        for impl in impls:
            row = dict(family="symile", op="symile_loss n_squared fwd+bwd", device=device, impl=label(impl),
                       backend=impl, M=M, N=N, d=d, dtype=str(dtype).replace("torch.", ""), ms=None, q20_ms=None,
                       q80_ms=None, runs=None, peer_ms=None, speedup=None, tflops=None, loss=None, loss_diff=None,
                       status="ok", note="")
            point.append(row)
            if impl == PACKAGE and not have_package:
                row.update(status="skipped", note="symile package not installed")
                continue
            if impl in last:
                N0, d0, t0 = last[impl]
                predicted = t0 * (N / N0) ** M * (d / d0)
                if predicted > cap:
                    row.update(status="skipped", note=f"skipped: about {predicted:.3g} s per call extrapolated from "
                                                      f"N={N0} d={d0} (cap {cap:g} s)")
                    continue
            need = estimated_bytes(impl, N, d, M, reps[0].element_size())
            if need:
                free = free_bytes(device)
                if need > 0.8 * free:
                    row.update(status="skipped", note=f"skipped: needs about {need / 2**30:.1f} GiB (estimate), "
                                                      f"{free / 2**30:.1f} GiB free")
                    continue
            fn_loss = loss_fn(impl)
            if cuda and (impl, d) not in warm:  # kernel compilation and library set-up kept out of the timings
                try:
                    _fwd_bwd(fn_loss, *inputs(min(N, 64), d, M, device, dtype))
                except Exception:  # noqa: BLE001 - reported by the timed call below
                    pass
                warm.add((impl, d))
            args = (reps, scale)
            run = lambda: _fwd_bwd(fn_loss, *args)  # noqa: E731
            try:
                t, (loss, _) = _time(run, device, min_run_time, cap)
            except Exception as err:  # noqa: BLE001 - a side that fails is reported, not fatal
                if _is_oom(err):
                    row.update(status="oom", note=f"out of memory: {str(err).splitlines()[0][:120]}")
                elif impl == PACKAGE and dtype != torch.float32:
                    # the package given float32 copies instead, said in the row
                    args = ([r.detach().float().requires_grad_() for r in reps], scale)
                    try:
                        t, (loss, _) = _time(run, device, min_run_time, cap)
                        row.update(dtype="float32", note=f"package given float32 ({type(err).__name__} in "
                                                         f"{row['dtype']})")
                    except Exception as err2:  # noqa: BLE001
                        row.update(status="oom" if _is_oom(err2) else "error",
                                   note=f"{type(err2).__name__}: {str(err2).splitlines()[0][:120]}")
                else:
                    row.update(status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
                if row["status"] != "ok":
                    del err
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
            first_call = t.pop("first_call")
            row.update(t, loss=loss.float().item(), tflops=useful_flops(N, d, M) / (t["ms"] * 1e-3) / 1e12)
            if first_call:
                row["note"] = (row["note"] + "; " if row["note"] else "") + f"one call (over the {cap:g} s cap)"
            last[impl] = (N, d, t["ms"] * 1e-3)
            del args, run
            if cuda:
                torch.cuda.empty_cache()
        peer = next((r for r in point if r["backend"] == PACKAGE and r["ms"] is not None), None)
        for r in point:
            if r["backend"] != PACKAGE and peer is not None and r["ms"] is not None:
                r.update(peer_ms=peer["ms"], speedup=peer["ms"] / r["ms"], loss_diff=abs(r["loss"] - peer["loss"]))
        out += point
        del reps, scale
        gc.collect()
        if progress is not None:
            progress.update(1)
    return out


# --------------------------------------------------------------------------------------------- fresh process


#: mip scoring points (B queries of two modalities against C candidates, d features): zero-shot retrieval
MIP_POINTS = {"cpu": (256, 1024, 256), "cuda": (4096, 8192, 1024)}


def mip_rows(device, backends, quick=False, min_run_time=0.2) -> list[dict]:
    """``fusedlab.ops.mip`` on each backend against the package's MIPSimilarity (same inputs, same process):
    time and the largest difference of the scores."""
    B, C, d = (8, 16, 8) if quick else MIP_POINTS[torch.device(device).type]
    dtype = bench_dtype(device)
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cand, queries = mk(C, d), [mk(B, d), mk(B, d)]
    want = fusedlab.reference.symile.mip(cand.double(), [q.double() for q in queries])
    peer = None
    if package_available():
        import symile

        peer_fn = symile.MIPSimilarity()
        peer = _time(lambda: peer_fn(cand, queries), device, min_run_time, 30.0)[0]["ms"]
    out = []
    with torch.no_grad():
        for be in backends:
            t, scores = _time(lambda be=be: fusedlab.ops.mip(cand, queries, backend=be), device, min_run_time, 30.0)
            out.append(dict(family="symile", op="mip", backend=be, device=str(device), dtype=str(dtype)[6:], B=B,
                            C=C, d=d, ms=t["ms"], peer_ms=peer, speedup=None if peer is None else peer / t["ms"],
                            max_err=(scores.double() - want).abs().max().item()))
    return out


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set size to its current size (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    """The process's peak resident set size: VmHWM (which /proc/self/clear_refs resets) where Linux has it;
    elsewhere ru_maxrss (getrusage keeps its own maximum, which the reset does not lower)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def one(impl, N, d, device="cpu", dtype=None, M=M_DEFAULT) -> dict:
    """One forward+backward in this process (meant to be a fresh one): the peak memory growth over the level
    after imports, input creation and a tiny warm-up call (which loads kernels and starts thread pools),
    and the call's time. CPU: growth of ru_maxrss (the peak is first reset to the current RSS where Linux
    allows); CUDA: torch.cuda.max_memory_allocated minus the bytes allocated before the call."""
    cuda = torch.device(device).type == "cuda"
    dtype = dtype or bench_dtype(device)
    res = dict(impl=label(impl), backend=impl, N=N, d=d, M=M, device=str(device),
               dtype=str(dtype).replace("torch.", ""), status="ok", peak_bytes=None, seconds=None, note="")
    fn = loss_fn(impl)
    reps, scale = inputs(N, d, M, device, dtype)
    # warm-up: on CUDA at the same d and a small N (kernel compilation); on the CPU at a tiny size
    w_reps, w_scale = inputs(min(N, 64) if cuda else min(N, 8), d if cuda else min(d, 16), M, device, dtype)
    _fwd_bwd(fn, w_reps, w_scale)
    del w_reps, w_scale
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        res["peak_reset"] = _reset_peak_rss()
        base = _max_rss_bytes()
    t0 = time.perf_counter()
    try:
        _fwd_bwd(fn, reps, scale)
        _sync(device)
    except Exception as err:  # noqa: BLE001
        res.update(status="oom" if _is_oom(err) else "error",
                   note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return res
    res["seconds"] = time.perf_counter() - t0
    res["peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()) - base
    return res


def fresh_process_peak(impl, N, d, device="cpu", dtype=None, M=M_DEFAULT, timeout_s=600.0) -> dict:
    """``one`` run in a fresh ``python -m fusedlab.perf.symile --one`` process; its result dict (status
    "timeout" when it ran past ``timeout_s``, "error" when the process died without a result)."""
    dtype = dtype or bench_dtype(device)
    cmd = [sys.executable, "-m", "fusedlab.perf.symile", "--one", impl, "--N", str(N), "--d", str(d), "--M", str(M),
           "--device", str(device), "--dtype", str(dtype).replace("torch.", "")]
    base = dict(impl=label(impl), backend=impl, N=N, d=d, M=M, device=str(device),
                dtype=str(dtype).replace("torch.", ""), peak_bytes=None, seconds=None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout", note=f"the process ran past {timeout_s:.0f} s")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return dict(base, status="oom" if "out of memory" in proc.stderr else "error",
                note=f"exit {proc.returncode}: {tail}")


def memory_rows(device, impls, point, dtype=None, M=M_DEFAULT, cache=None, progress=None):
    """Peak memory growth of one forward+backward at ``point`` = (N, d), each implementation in a fresh
    process. ``cache`` (a dict) keeps results for ``largest_n`` to reuse."""
    out = []
    for impl in impls:
        N, d = point
        r = _cached_one(impl, N, d, device, dtype or bench_dtype(device), M, cache)
        out.append(dict(r, family="symile", kind="memory"))
        if progress is not None:
            progress.update(1)
    return out


def _cached_one(impl, N, d, device, dtype, M, cache, timeout_s=600.0):
    key = (impl, N, d, str(device), str(dtype), M)
    if cache is not None and key in cache:
        return cache[key]
    r = fresh_process_peak(impl, N, d, device, dtype, M, timeout_s=timeout_s)
    if cache is not None:
        cache[key] = r
    return r


def largest_n(impl, device="cuda", d=LARGEST_D, dtype=torch.bfloat16, start=LARGEST_START, max_n=LARGEST_MAX_N,
              time_cap_s=LARGEST_TIME_CAP_S, M=M_DEFAULT, cache=None, progress=None) -> dict:
    """Double N from ``start`` while one forward+backward runs (each try in a fresh process): stop at an
    out-of-memory error, a call over ``time_cap_s`` (a try whose time, extrapolated as N^M from the last one,
    would exceed the cap is not made), N > ``max_n``, or, for the materializing implementations, an
    estimated footprint over twice the card's memory (not tried). Returns the largest N that ran and why the
    search stopped."""
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory if torch.device(device).type == "cuda" \
        else free_bytes(device)
    elem = torch.empty((), dtype=dtype).element_size()
    tries, best, stopped, N = [], None, f"reached N > {max_n}", start
    while N <= max_n:
        need = estimated_bytes(impl, N, d, M, elem)
        if need > 2 * total:
            stopped = (f"N={N} not tried: needs about {need / 2**30:.0f} GiB (estimate), over twice the "
                       f"{total / 2**30:.0f} GiB here")
            break
        if tries and tries[-1]["seconds"] is not None:
            predicted = tries[-1]["seconds"] * (N / tries[-1]["N"]) ** M
            if predicted > time_cap_s:
                stopped = f"N={N} not tried: about {predicted:.3g} s per call extrapolated (cap {time_cap_s:g} s)"
                break
        r = _cached_one(impl, N, d, device, dtype, M, cache, timeout_s=time_cap_s * 3 + 120)
        tries.append(dict(N=N, status=r["status"], seconds=r["seconds"], peak_bytes=r["peak_bytes"]))
        if progress is not None:
            progress.update(1)
        if r["status"] != "ok":
            stopped = f"N={N}: {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
            break
        best = N
        if r["seconds"] > time_cap_s:
            stopped = f"N={N} took {r['seconds']:.1f} s (cap {time_cap_s:g} s)"
            break
        N *= 2
    last_ok = next((t for t in reversed(tries) if t["status"] == "ok"), None)
    return dict(family="symile", kind="largest_n", impl=label(impl), backend=impl, device=str(device), M=M, d=d,
                dtype=str(dtype).replace("torch.", ""), largest_n=best,
                seconds=last_ok["seconds"] if last_ok else None, peak_bytes=last_ok["peak_bytes"] if last_ok else None,
                stopped=stopped, tries=tries)


# ---------------------------------------------------------------------------------------------- demo row


def symile_row(N=256, d=256, M=3, runs=3):
    """Time (best of `runs`) and the largest gradient difference against the package; the package row is
    skipped when it is not installed."""
    reps, scale = inputs(N, d, M)
    ours = fusedlab.symile.SymileLoss("n_squared")
    t_ours = _best(lambda: _fwd_bwd(ours, reps, scale), runs)
    row = dict(op="symile loss n_squared (fwd+bwd)", backend="cpu", shape=f"M={M} N={N} d={d}",
               time=f"{t_ours * 1e3:.1f} ms", peer="symile 0.1.0 package", err="", speedup="", note="")
    try:
        import symile
    except ImportError:
        row["note"] = "symile package not installed"
        return row
    theirs = symile.Symile("n_squared")
    t_theirs = _best(lambda: _fwd_bwd(theirs, reps, scale), runs)
    a, ga = _fwd_bwd(ours, reps, scale)
    b, gb = _fwd_bwd(theirs, reps, scale)
    err = max([(a - b).abs().item()] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])
    row.update(err=f"{err:.1e}", speedup=f"{t_theirs / t_ours:.2f}x",
               note="the package materializes N^(M-1) x d per anchor; ours keeps O(N M) statistics")
    return row


def _best(fn, runs):
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _main(argv=None):
    p = argparse.ArgumentParser(description="one forward+backward in this process: peak memory growth and time "
                                            "(one json line)")
    p.add_argument("--one", required=True, help="a fusedlab backend (cpu, triton, reference) or 'package'")
    p.add_argument("--N", type=int, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--M", type=int, default=M_DEFAULT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, else fp32)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    print(json.dumps(one(a.one, a.N, a.d, a.device, dtype, a.M)), flush=True)


if __name__ == "__main__":
    _main()
