"""Kernel-config sweeps for the Triton kernels whose GPU targets are unmet (CAT attention at L = 4096, l = 16;
Newton-Schulz at 4096^2, a batch of 64 x 768^2 and 1024^2), run by ``bench/gpu_check.sh`` when ``SWEEP=1``.

The kernels run with fixed configs (no autotuning: the interpreter and the AOT spill check see the same
launches). A sweep sets each candidate in the module's ``CONFIGS`` entry, checks the result against the
current default config's on the same inputs, and measures the GPU time of the kernels alone
(torch.profiler's device time per call): eager CAT at these sizes is bound by host launch cost, which would
hide the kernels' differences from a wall-clock timer. A candidate that fails to compile (shared memory,
registers) or disagrees is reported with the reason, never chosen.

    python -m fusedlab.perf.sweep --out bench/results/gpu
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import fusedlab

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per CAT pass at d = 64, half types
CAT_CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    "dkv": [(32, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3)],
}
#: the kernels whose device time decides each pass
CAT_KERNELS = {"fwd": ("_cat_fwd_kernel",), "dq": ("_cat_bwd_dq_kernel",),
               "dkv": ("_cat_bwd_dkv_raw_kernel", "_cat_bwd_dkv_slot_kernel", "_cat_split_sum_kernel")}
#: (BLOCK, BLOCK_K, num_warps, num_stages) candidates per Newton-Schulz size class, half types
NS_CANDIDATES = {
    "large": [(128, 64, 8, 4), (128, 64, 8, 3), (128, 32, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)],
    "small": [(64, 64, 4, 4), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4), (32, 64, 4, 4)],
}


def device_us(fn, names, reps=10) -> float:
    """GPU time per call of the kernels whose names contain any of ``names`` (microseconds)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if any(n in e.key for n in names))
    return total / reps


def _max_rel(a, b) -> float:
    return max(((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


def _sweep(module, key_of, candidates, run, names_of, tol, device_time=device_us):
    """For each (pass, candidate): set module.CONFIGS[key_of(pass)], run, compare with the default's outputs,
    time. Restores the defaults; returns one row per candidate."""
    rows = []
    for pas, cands in candidates.items():
        key = key_of(pas)
        default = module.CONFIGS[key]
        expect = run()
        try:
            for cand in cands:
                module.CONFIGS[key] = cand
                row = dict(pass_=pas, key=list(key), config=list(cand), default=cand == default)
                try:
                    err = _max_rel(run(), expect)
                    row.update(max_rel_vs_default=err, ok=err <= tol)
                    row["us"] = device_time(run, names_of(pas)) if row["ok"] else None
                except Exception as e:  # a config that does not compile or launch is reported, not fatal
                    row.update(ok=False, us=None, note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
        finally:
            module.CONFIGS[key] = default
    return rows


def cat_sweep(device="cuda", B=2, H=8, L=4096, l=16, d=64, dtype=torch.bfloat16, device_time=device_us):
    """Every CAT_CANDIDATES config of each pass at the GPU target point (forward+backward outputs)."""
    from fusedlab.perf.cat import inputs
    from fusedlab.triton_kernels import cat as tk

    q, k, v, kc, vc = inputs(B, H, L, l, d, device, dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    args = (q, k, v, kc, vc)

    def run():
        o = fusedlab.ops.cat_attention(*args, l, backend="triton")
        return [o.detach(), *torch.autograd.grad(o, args, grad)]

    kind = "fp32" if dtype == torch.float32 else "half"
    return _sweep(tk, lambda pas: (kind, pas, 64 if d <= 64 else 128), CAT_CANDIDATES, run, CAT_KERNELS.get,
                  tol=2e-2, device_time=device_time)


#: the Newton-Schulz kernels (X X^T, bA + cA^2, aX + BX), all timed
NS_KERNELS = ("_xxt_kernel", "_gram_update_kernel", "_update_x_kernel")


def ns_sweep(device="cuda", dtype=torch.bfloat16, device_time=device_us, shapes=None):
    """Every NS_CANDIDATES config of each size class at the shapes that take it: "large" at 4096^2 and at
    64 x 768^2 (enough tiles for a wave either way), "small" at 1024^2."""
    from fusedlab.triton_kernels import newton_schulz as tk

    shapes = shapes or [("large", (1, 4096, 4096)), ("large", (64, 768, 768)), ("small", (1, 1024, 1024))]
    kind = "fp32" if dtype == torch.float32 else "half"
    # the configs are those of the Triton kernels: every candidate computes a X + B X with the Triton kernel
    # (the default takes cuBLAS's GEMM for a lone large matrix), the cuBLAS row is added apart
    old_update_x, tk.UPDATE_X = tk.UPDATE_X, "triton"
    try:
        return _ns_sweep_rows(tk, shapes, kind, dtype, device, device_time)
    finally:
        tk.UPDATE_X = old_update_x


def _ns_sweep_rows(tk, shapes, kind, dtype, device, device_time):
    rows = []
    for cls, shape in shapes:
        G = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)

        def run(G=G):
            return [fusedlab.ops.newton_schulz(G, dtype=dtype, backend="triton")]

        part = _sweep(tk, lambda pas: (kind, pas), {cls: NS_CANDIDATES[cls]}, run, lambda pas: NS_KERNELS,
                      tol=2e-2, device_time=device_time)
        rows += [dict(r, shape=list(shape)) for r in part]
        if shape[0] == 1 and cls == "large":  # a lone large matrix: a X + B X by cuBLAS instead (UPDATE_X)
            rows.append(dict(_update_x_row(tk, run, device_time), shape=list(shape), pass_=f"{cls}, aX+BX by cuBLAS",
                             key=[kind, cls], config=list(tk.CONFIGS[(kind, cls)]), default=False))
    return rows


#: the kernels of the UPDATE_X = "matmul" variant: the symmetric ones and cuBLAS's GEMM (named by its kernel
#: families) plus the copy into the caller's layout
_MATMUL_KERNELS = NS_KERNELS + ("gemm", "nvjet", "xmma", "cutlass", "copy", "elementwise")


def _update_x_row(tk, run, device_time) -> dict:
    """The default config with UPDATE_X = "matmul", checked against UPDATE_X = "triton"; both timed over the
    same kernel names (the GEMM's and the copies too, so the normalization's elementwise kernels count on
    both sides)."""
    expect = run()
    triton_us = device_time(run, _MATMUL_KERNELS)
    old, tk.UPDATE_X = tk.UPDATE_X, "matmul"
    row = dict(update_x="matmul", us_triton_update=triton_us)
    try:
        err = _max_rel(run(), expect)
        row.update(max_rel_vs_default=err, ok=err <= 2e-2)
        row["us"] = device_time(run, _MATMUL_KERNELS) if row["ok"] else None
        row["note"] = f"Triton's aX + BX: {triton_us:.1f} us over the same kernels"
    except Exception as e:  # reported, not fatal
        row.update(ok=False, us=None, note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        tk.UPDATE_X = old
    return row


def best(rows):
    """The fastest correct config per pass (None where none was correct)."""
    out = {}
    for r in rows:
        key = (r["pass_"], tuple(r.get("shape", ())))
        if r["ok"] and r["us"] is not None and (key not in out or r["us"] < out[key]["us"]):
            out[key] = r
    return {p + ("@" + "x".join(map(str, s)) if s else ""): dict(config=r["config"], us=r["us"])
            for (p, s), r in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--family", choices=["cat", "newton_schulz", "all"], default="all")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the sweep measures GPU kernel time: it needs a CUDA device")
    os.makedirs(a.out, exist_ok=True)
    result = dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    for fam, fn in (("cat", cat_sweep), ("newton_schulz", ns_sweep)):
        if a.family in (fam, "all"):
            rows = fn()
            result[fam] = dict(rows=rows, best=best(rows))
            for r in rows:
                us = "" if r["us"] is None else f"{r['us']:9.1f} us"
                print(f"{fam:14} {r['pass_']:6} {str(r['config']):22} {'default' if r['default'] else '':8} "
                      f"{us:13} err {r.get('max_rel_vs_default', float('nan')):.1e} {r.get('note', '')}")
            print(f"{fam}: best {result[fam]['best']}")
            with open(os.path.join(a.out, "sweep_gpu.json"), "w") as f:  # after each family: a time limit keeps it
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
