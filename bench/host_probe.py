"""Where a GPU forward+backward of CAT spends its host time: a short probe for a CUDA machine.

Writes host_probe.json under the output folder (argv[1], default bench/results/gpu):

* ``host``: perf.cat.host_breakdown (issue against wall time of each piece, cProfile rankings);
* ``launch``: the host cost of one Triton launch, through the JIT (``kernel[grid](...)``) and straight
  through the compiled kernel's launcher, for a no-op kernel with 4 and with 32 arguments, and for each
  of CAT's backward kernels with its real arguments;
* ``captured``: the forward+backward of ours and of dense causal SDPA captured whole in a CUDA graph and
  replayed (their kernels' GPU time), beside their eager times.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

import fusedlab
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
    import torch.nn.functional as F

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


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu"
    os.makedirs(out_dir, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    t0 = time.time()
    for name, fn in (("launch", launch_costs), ("captured", captured),
                     ("host", lambda: perf_cat.host_breakdown("cuda"))):
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
