"""Why a CUDA backward through the autograd engine's device thread costs more host time than on the calling
thread: times CAT's forward+backward under several settings and the Python backward inside the engine."""
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

import fusedlab
import fusedlab.ops.cat as ops_cat
from fusedlab.perf import cat as perf_cat


def issue(fn, calls=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return dict(issue_us=(t1 - t0) / calls * 1e6, wall_us=(time.perf_counter() - t0) / calls * 1e6)


def main():
    out_dir = sys.argv[1]
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

    res["ours"] = issue(ours)
    res["ours, calling thread"] = issue(no_mt(ours))
    res["sdpa"] = issue(sdpa)
    res["sdpa, calling thread"] = issue(no_mt(sdpa))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    res["ours, switchinterval 1us"] = issue(ours)
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
    print(json.dumps(res, indent=1))
    with open(os.path.join(out_dir, "thread_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
