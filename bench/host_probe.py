"""Where a GPU forward+backward of CAT spends its host time: a short probe for a CUDA machine.

Writes host_probe.json under the output folder (argv[1], default bench/results/gpu):

* ``host``: perf.cat.host_breakdown (issue against wall time of each piece, cProfile rankings);
* ``launch``: the host cost of one Triton launch, through the JIT (``kernel[grid](...)``) and straight
  through the compiled kernel's launcher, for a no-op kernel with 4 and with 32 arguments, beside one
  allocation and one small torch op;
* ``captured``: the forward+backward of ours and of dense causal SDPA captured whole in a CUDA graph and
  replayed (their kernels' GPU time), beside their eager times;
* ``engine_thread``: CAT's backward on the autograd engine's device thread against the calling thread.
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import threading
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusedlab
import fusedlab.ops.cat as ops_cat
from fusedlab.perf import cat as perf_cat
from fusedlab.perf.timing import capture, measure


@triton.jit
def _noop4(a, b, n, m):
    pass


@triton.jit
def _noop32(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
            i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, f0, f1, X: tl.constexpr, Y: tl.constexpr):
    pass


def _issue_us(fn, calls=300):
    """Host time per call until the last call returns (issue) and until the GPU is done (wall), in us."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return dict(issue_us=(t1 - t0) / calls * 1e6, wall_us=(t2 - t0) / calls * 1e6)


def _direct(kernel, grid, args):
    """A closure that launches an already compiled kernel with the JIT's own launcher call, minus the JIT."""
    from triton.runtime import driver

    dev = driver.active.get_current_device()
    stream = driver.active.get_current_stream(dev)
    g = tuple(grid) + (1,) * (3 - len(grid))
    run, fn, meta = kernel.run, kernel.function, kernel.packed_metadata
    return lambda: run(g[0], g[1], g[2], stream, fn, meta, None, None, None, *args)


def launch_costs():
    out = {}
    x = torch.zeros(1024, device="cuda")
    k4 = _noop4[(1,)](x, x, 7, 9)
    out["noop, 4 args: JIT"] = _issue_us(lambda: _noop4[(1,)](x, x, 7, 9))
    out["noop, 4 args: launcher"] = _issue_us(_direct(k4, (1,), (x, x, 7, 9)))
    args = [x] * 16 + list(range(3, 15)) + [0.5, 0.25]
    k32 = _noop32[(1,)](*args, X=4, Y=8)
    out["noop, 32 args: JIT"] = _issue_us(lambda: _noop32[(1,)](*args, X=4, Y=8))
    out["noop, 32 args: launcher"] = _issue_us(_direct(k32, (1,), args + [4, 8]))
    out["torch.empty(16 MiB)"] = _issue_us(lambda: torch.empty(4 << 20, device="cuda"))
    out["x.add_(1)"] = _issue_us(lambda: x.add_(1.0))
    return out


def captured(B=2, H=8, L=4096, l=16, d=64, dtype=torch.bfloat16):
    q, k, v, kc, vc = perf_cat.inputs(B, H, L, l, d, "cuda", dtype)
    grad = torch.randn(q.shape, device="cuda", dtype=dtype)
    rows = {}
    for name, fn, args in (
            ("ours", lambda *a: fusedlab.ops.cat_attention(*a, l), (q, k, v, kc, vc)),
            ("sdpa", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v))):
        step = lambda fn=fn, args=args: torch.autograd.grad(fn(*args), args, grad)  # noqa: E731
        row = dict(eager_ms=measure(step, 0.3).median_ms)
        try:
            graph = capture(step)
            row["captured_ms"] = measure(graph.replay, 0.3).median_ms
        except Exception as err:  # reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows[name] = row
    return rows


def engine_thread():
    """Why a CUDA backward through the autograd engine's device thread costs more host time than on the calling
    thread: CAT's and SDPA's forward+backward with the backward on either thread (and with a 1 us GIL switch
    interval), the Python backward timed from inside, the engine's time before and after it, and cProfile of
    the backward on each thread."""
    B, H, L, l, d = 2, 8, 4096, 16, 64
    q, k, v, kc, vc = perf_cat.inputs(B, H, L, l, d, "cuda", torch.bfloat16)
    grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    ours = lambda: torch.autograd.grad(fusedlab.ops.cat_attention(q, k, v, kc, vc, l), (q, k, v, kc, vc), grad)
    sdpa = lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)
    res = {}

    def no_mt(fn):
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    res["ours"] = _issue_us(ours)
    res["ours, calling thread"] = _issue_us(no_mt(ours))
    res["sdpa"] = _issue_us(sdpa)
    res["sdpa, calling thread"] = _issue_us(no_mt(sdpa))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    res["ours, switchinterval 1us"] = _issue_us(ours)
    sys.setswitchinterval(old)
    # the Python backward timed (and profiled) from inside, on whichever thread the engine runs it
    inner, marks, prof = [], {}, cProfile.Profile()
    real = ops_cat._cat_triton_backward_eager

    def timed(*a):
        marks["enter"] = time.perf_counter()
        t0 = time.perf_counter()
        if marks.get("profile"):
            prof.enable()
        r = real(*a)
        if marks.get("profile"):
            prof.disable()
        inner.append(((time.perf_counter() - t0) * 1e6, threading.get_ident() == threading.main_thread().ident))
        marks["exit"] = time.perf_counter()
        return r

    ops_cat._cat_triton_backward_eager = timed
    gaps = []
    for mt in (True, False):
        inner.clear(), gaps.clear()
        with torch.autograd.set_multithreading_enabled(mt):
            for i in range(60):
                o = fusedlab.ops.cat_attention(q, k, v, kc, vc, l)
                t0 = time.perf_counter()
                torch.autograd.grad(o, (q, k, v, kc, vc), grad)
                t1 = time.perf_counter()
                if i >= 10:
                    gaps.append(((marks["enter"] - t0) * 1e6, (t1 - marks["exit"]) * 1e6, (t1 - t0) * 1e6))
        n = len(gaps)
        res[f"inside, multithreading={mt}"] = dict(
            backward_python_us=sum(x for x, _ in inner[10:]) / n, on_main_thread=inner[-1][1],
            grad_call_to_backward_us=sum(g[0] for g in gaps) / n, backward_to_grad_return_us=sum(g[1] for g in gaps) / n,
            grad_call_us=sum(g[2] for g in gaps) / n)
    for mt in (True, False):
        prof = cProfile.Profile()
        marks["profile"] = True
        with torch.autograd.set_multithreading_enabled(mt):
            for _ in range(50):
                ours()
        marks["profile"] = False
        stats = pstats.Stats(prof).stats
        ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:14]
        res[f"profile inside backward, multithreading={mt}"] = [
            dict(name=f"{os.path.basename(f)}:{line}({fn})", calls=c / 50, own_us=own / 50 * 1e6, cum_us=cum / 50 * 1e6)
            for (f, line, fn), (_, c, own, cum, _) in ranked]
    ops_cat._cat_triton_backward_eager = real
    return res


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu"
    os.makedirs(out_dir, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    t0 = time.time()
    for name, fn in (("launch", launch_costs), ("captured", captured),
                     ("host", lambda: perf_cat.host_breakdown("cuda")), ("engine_thread", engine_thread)):
        try:
            result[name] = fn()
        except Exception as err:  # one part failing must not cost the others
            result[name] = f"failed: {type(err).__name__}: {err}"
        print(f"== {name} ({time.time() - t0:.0f} s)")
        print(json.dumps(result[name], indent=1)[:6000])
        with open(os.path.join(out_dir, "host_probe.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
