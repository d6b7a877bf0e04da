"""python -m fusedlab info | demo | bench

info   versions, backends and the device
demo   the main job: every op family on every backend available here, checked against the reference and
       timed against the peer a user would otherwise use, in one table
bench  the benchmark points of each family, written as json + markdown + a PNG plot
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import fusedlab
from fusedlab._backend import FAMILY_BACKENDS
from fusedlab.perf import cat as perf_cat
from fusedlab.perf import fk_tailrisk as perf_fk
from fusedlab.perf import newton_schulz as perf_ns
from fusedlab.perf import resample as perf_resample
from fusedlab.perf import symile as perf_symile


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def info() -> str:
    lines = [
        f"fusedlab {fusedlab.__version__}",
        f"python   {sys.version.split()[0]}",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton   {triton.__version__}" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    except ImportError:
        lines.append("triton   not installed")
    lines += [f"device   {machine()}", f"backends {', '.join(fusedlab.backends())}"]
    return "\n".join(lines)


def _devices_and_backends(device="all"):
    """(device, backends to run there): CPU tensors go to the C++ kernel; CUDA tensors to each GPU backend."""
    plans = [("cpu", ["cpu"])]
    if torch.cuda.is_available():
        plans.append(("cuda", [b for b in ("cuda", "triton") if b in fusedlab.backends()]))
    elif device == "cuda":
        raise SystemExit("--device cuda: no CUDA device here")
    return [p for p in plans if device in ("all", p[0])]


def _ns_backends(backends):
    """The newton_schulz kernels among a device's backends (on CUDA: "cuda" and "triton" where they load)."""
    return [b for b in backends if b in FAMILY_BACKENDS["newton_schulz"]] or ["reference"]


def _table(rows, cols):
    widths = [max(len(c), *(len(str(r.get(k, ""))) for r in rows)) for c, k in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line([c for c, _ in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r.get(k, "") for _, k in cols]) for r in rows]
    return "\n".join(out)


def _resample_display(rows, errors):
    shown = []
    for r in rows:
        if r["op"].startswith("peer"):
            continue
        shown.append({
            "op": r["op"], "backend": r["backend"], "shape": f"{r['B']}x{r['K']}x{r['D']}",
            "err": f"{errors[r['backend']]:.1e}", "time": f"{r['ms']:.4f} ms", "peer": "plain torch systematic",
            "speedup": f"{r['vs_plain']:.2f}x",
            "note": f"{r['vs_naive']:.1f}x vs naive multinomial; {r['over_clone']:.1f}x the time of state.clone()",
        })
    return shown


def _ns_display(rows, errors):
    return [{"op": r["op"], "backend": r["backend"], "shape": r["shape"],
             "err": f"{errors[r['backend']]:.1e}" if r["backend"] in errors else "",
             "time": f"{r['ms']:.3f} ms", "peer": r["peer"], "speedup": f"{r['speedup']:.2f}x", "note": r["note"]}
            for r in rows]


COLS = [("op", "op"), ("backend", "backend"), ("shape", "shape"), ("max err vs reference", "err"),
        ("time (median)", "time"), ("peer", "peer"), ("speedup vs peer", "speedup"), ("notes", "note")]


class _NoBar:
    """What tqdm's progress bar does when tqdm is not installed (an optional dependency): nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar
    return tqdm


def _save_plot(plot, results, path):
    """Draw with matplotlib (an optional dependency) when it is installed; say so when it is not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path})")
        return
    plot(results, path)
    print(f"wrote {path}")


def demo(quick=False):
    tqdm = _tqdm()

    print(info(), "\n")
    min_run_time = 0.01 if quick else 0.2
    all_rows = []
    for device, backends in _devices_and_backends():
        shapes = ((4, 8),) if quick else perf_resample.SHAPES
        errors = {be: perf_resample.check(be, device) for be in backends}
        with tqdm(total=len(shapes), desc=f"resample on {device}", leave=False, disable=None) as bar:
            rows = perf_resample.rows(device, backends, shapes, min_run_time, progress=bar)
        all_rows += _resample_display(rows, errors)
        ns_backends = _ns_backends(backends)
        errors = {be: perf_ns.check(be, device) for be in ns_backends}
        shapes = perf_ns.QUICK_SHAPES if quick else perf_ns.SHAPES
        with tqdm(total=len(shapes) + 1, desc=f"newton_schulz on {device}", leave=False, disable=None) as bar:
            rows = perf_ns.rows(device, ns_backends, shapes, min_run_time, progress=bar)
            rows.append(perf_ns.optimizer_row(device, quick, min_run_time))
            bar.update(1)
        all_rows += _ns_display(rows, errors)
        all_rows.append(perf_cat.demo_row(device, quick, min_run_time))
    all_rows.append(perf_fk.fk_row(B=4, K=8) if quick else perf_fk.fk_row())
    all_rows.append(perf_fk.tailrisk_row(n=100, seeds=2) if quick else perf_fk.tailrisk_row())
    all_rows.append(perf_symile.symile_row(N=16, d=8, runs=1) if quick else perf_symile.symile_row())
    print(_table(all_rows, COLS))
    print("\nmax err, resample: differing ancestors + largest abs. error of log-weights and log_norm over every "
          "method and threshold (0 = identical); newton_schulz: relative error of the float32 kernel against "
          "float64; cat: largest relative error of output and gradients (fp32) against float64; symile: largest "
          "loss/gradient difference from the package; FK: error of the steered mean; tail risk: median relative error against the exact "
          "probability. Speedups are time ratios measured in this process.")
    return all_rows


def _write_results(out_dir, name, title, rows, shown, cols):
    """bench/results/<name>_<cpu|gpu>.json (every row) and .md (the shown columns); returns the base path. The
    suffix says where the rows ran ("gpu" when any ran on CUDA), not what the machine has."""
    os.makedirs(out_dir, exist_ok=True)
    results = {"machine": machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    devices = {r.get("device") for r in rows} - {None}
    on_gpu = "cuda" in devices if devices else torch.cuda.is_available()
    base = os.path.join(out_dir, f"{name}_{'gpu' if on_gpu else 'cpu'}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# {title}, {results['machine']} (torch {results['torch']}, {results['date']})\n\n")
        f.write(_table(shown, cols) + "\n")
    print(open(base + ".md").read())
    print(f"wrote {base}.json, .md")
    return base, results


def bench(out_dir, min_run_time=0.5, shapes=perf_resample.SHAPES, family="resample", device="all"):
    if family == "newton_schulz":
        return bench_newton_schulz(out_dir, min_run_time, quick=shapes != perf_resample.SHAPES, device=device)
    if family == "cat":
        return bench_cat(out_dir, min_run_time, quick=shapes != perf_resample.SHAPES, device=device)
    if family == "symile":
        return bench_symile(out_dir, min_run_time, quick=shapes != perf_resample.SHAPES, device=device)
    tqdm = _tqdm()

    all_rows = []
    for device, backends in _devices_and_backends(device):
        errors = {be: perf_resample.check(be, device) for be in backends}
        with tqdm(total=len(shapes), desc=f"resample on {device}", disable=None) as bar:
            rows = perf_resample.rows(device, backends, shapes, min_run_time, progress=bar)
        all_rows += [dict(r, device=device, max_err=errors.get(r["backend"])) for r in rows]
    shown = [dict(r, ms=f"{r['ms']:.4f}", **{k: f"{r[k]:.2f}" for k in ("vs_plain", "vs_naive", "over_clone") if k in r})
             for r in all_rows]
    cols = [("device", "device"), ("op", "op"), ("backend", "backend"), ("B", "B"), ("K", "K"), ("D", "D"),
            ("median ms", "ms"), ("speedup vs plain", "vs_plain"), ("speedup vs naive", "vs_naive"),
            ("time / clone", "over_clone")] + ([("kernel launches", "launches")] if torch.cuda.is_available() else [])
    base, results = _write_results(out_dir, "resample", "resample + gather", all_rows, shown, cols)
    _save_plot(_plot, results, base + ".png")
    if shapes == perf_resample.SHAPES and any(dev == "cuda" for dev, _ in _devices_and_backends(device)):
        # the same calls replayed from CUDA graphs: GPU time without the host's per-call cost (written last)
        cuda_backends = dict(_devices_and_backends(device))["cuda"]
        graphs = perf_resample.graph_rows([b for b in cuda_backends if b in ("cuda", "triton")], shapes, min_run_time)
        fmt = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
        shown = [dict(r, device="cuda", ms=fmt(r["ms"]), vs_plain=fmt(r["vs_plain"]), over_clone=fmt(r["over_clone"]))
                 for r in graphs]
        cols = [("device", "device"), ("op", "op"), ("backend", "backend"), ("B", "B"), ("K", "K"), ("D", "D"),
                ("median ms", "ms"), ("speedup vs plain", "vs_plain"), ("time / clone", "over_clone"),
                ("notes", "note")]
        _write_results(out_dir, "resample_graphs", "resample + gather replayed from CUDA graphs", graphs, shown, cols)


def bench_newton_schulz(out_dir, min_run_time=0.5, quick=False, device="all"):
    """Newton-Schulz on every backend here against torch.optim.Muon's per-matrix loop, the Gram path against the
    standard one, and a Muon step."""
    rows = []
    for device, backends in _devices_and_backends(device):
        ns_backends = _ns_backends(backends)
        errors = {be: perf_ns.check(be, device) for be in ns_backends}
        shapes = perf_ns.QUICK_SHAPES if quick else perf_ns.GPU_SHAPES if device == "cuda" else perf_ns.SHAPES
        gram_shapes = ((2, 32, 128),) if quick else perf_ns.GRAM_SHAPES
        for r in (perf_ns.rows(device, ns_backends, shapes, min_run_time)
                  + perf_ns.gram_rows(device, gram_shapes, min_run_time)
                  + [perf_ns.optimizer_row(device, quick, min_run_time)]):
            rows.append(dict(r, device=device, max_err=errors.get(r["backend"])))
    shown = [dict(r, ms=f"{r['ms']:.3f}", peer_ms=f"{r['peer_ms']:.3f}", speedup=f"{r['speedup']:.2f}x") for r in rows]
    cols = [("device", "device"), ("op", "op"), ("backend", "backend"), ("shape", "shape"), ("median ms", "ms"),
            ("peer", "peer"), ("peer ms", "peer_ms"), ("speedup", "speedup"), ("notes", "note")]
    _write_results(out_dir, "newton_schulz", "Newton-Schulz and Muon", rows, shown, cols)


def bench_cat(out_dir, min_run_time=0.5, quick=False, device="all"):
    """CAT attention forward+backward against dense causal SDPA and FlexAttention's interleaved mask."""
    tqdm = _tqdm()

    rows = []
    for dev, _ in _devices_and_backends(device):
        if dev == "cuda":
            points, kw = (perf_cat.QUICK_POINTS if quick else perf_cat.GPU_POINTS), {}
        else:
            points = perf_cat.QUICK_POINTS if quick else perf_cat.CPU_POINTS
            kw = dict(B=1, H=4, dtype=torch.float32, flex=not quick)
        with tqdm(total=len(points), desc=f"cat on {dev}", disable=None) as bar:
            rows += [dict(r, device=dev) for r in perf_cat.rows(dev, points, min_run_time=min(min_run_time, 0.25),
                                                                progress=bar, **kw)]
    fmt = lambda x, p=3: "" if x is None else f"{x:.{p}f}"  # noqa: E731
    shown = [dict(r, ms=fmt(r["ms"]), fwd_ms=fmt(r["fwd_ms"]), sdpa_ms=fmt(r["sdpa_ms"]),
                  vs_sdpa=fmt(r["vs_sdpa"], 2) + "x", flex_ms=fmt(r.get("flex_ms")),
                  vs_flex=fmt(r.get("vs_flex"), 2) + ("x" if r.get("vs_flex") else ""), tflops=fmt(r["tflops"], 1),
                  flex_fwd_ms=fmt(r.get("flex_fwd_ms")),
                  vs_flex_fwd=fmt(r.get("vs_flex_fwd"), 2) + ("x" if r.get("vs_flex_fwd") else ""),
                  cuda_kernel_ms=fmt(r.get("cuda_kernel_ms")), captured_ms=fmt(r.get("captured_ms")),
                  vs_sdpa_captured=fmt(r.get("vs_sdpa_captured"), 2) + ("x" if r.get("vs_sdpa_captured") else ""),
                  vs_flex_captured=fmt(r.get("vs_flex_captured"), 2) + ("x" if r.get("vs_flex_captured") else ""))
             for r in rows]
    cols = [("device", "device"), ("backend", "backend"), ("dtype", "dtype"), ("B", "B"), ("H", "H"), ("L", "L"),
            ("l", "l"), ("d", "d"), ("fwd+bwd ms", "ms"), ("fwd ms", "fwd_ms"), ("SDPA causal ms", "sdpa_ms"),
            ("vs SDPA", "vs_sdpa"), ("Flex interleaved ms", "flex_ms"), ("vs Flex", "vs_flex"),
            ("Flex fwd ms", "flex_fwd_ms"), ("fwd vs Flex fwd", "vs_flex_fwd"), ("useful TFLOP/s", "tflops"),
            ("CUDA kernel fwd+bwd ms", "cuda_kernel_ms"), ("captured fwd+bwd ms", "captured_ms"),
            ("vs SDPA, both captured", "vs_sdpa_captured"), ("vs Flex, both captured", "vs_flex_captured"),
            ("notes", "note")]
    _write_results(out_dir, "cat", "CAT attention forward+backward", rows, shown, cols)
    # each result file is written as soon as its numbers exist (a time limit keeps what was measured)
    # one decode step of attention alone, each decode backend against a dense cache's single-query SDPA
    dec = []
    for dev, backends in _devices_and_backends(device):
        if dev == "cuda":
            kw = dict(B=8, L=256) if quick else {}
            dec += [dict(r, device=dev) for r in perf_cat.decode_rows(dev, backends, **kw)]
        else:
            kw = dict(B=2, L=64, l=8) if quick else dict(B=16)
            dec += [dict(r, device=dev) for r in perf_cat.decode_rows(dev, ["cpu", "reference"],
                                                                      dtype=torch.float32, **kw)]
    if dec:
        shown = [dict(r, ms=f"{r['ms']:.4f}", dense_ms=f"{r['dense_ms']:.4f}", vs_dense=f"{r['vs_dense']:.2f}x")
                 for r in dec]
        cols = [("device", "device"), ("backend", "backend"), ("dtype", "dtype"), ("B", "B"), ("H", "H"),
                ("Hkv", "Hkv"), ("L", "L"), ("l", "l"), ("d", "d"), ("slots", "slots"), ("raw", "raw"),
                ("decode ms", "ms"), ("dense SDPA ms", "dense_ms"), ("vs dense", "vs_dense")]
        _write_results(out_dir, "cat_decode", "CAT decode step (attention alone) against a dense cache", dec, shown,
                       cols)
    # generation: CAT's compressed cache against the same decoder with a dense cache (GPU sizes on a GPU; a
    # tiny run elsewhere, to exercise the path)
    gen = []
    for dev, _ in _devices_and_backends(device):
        if dev == "cuda" and not quick:
            gen.append(dict(perf_cat.generation_row(dev), device=dev))
        elif quick:
            gen.append(dict(perf_cat.generation_row(dev, B=2, L=64, l=8, new_tokens=8, dim=64, layers=2, heads=4,
                                                    vocab=100, dtype=torch.float32), device=dev))
    if gen:
        mb = lambda x: "" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
        shown = [dict(r, tps=f"{r['tokens_per_s']:.0f}", dense_tps=f"{r['dense_tokens_per_s']:.0f}",
                      speedup=f"{r['speedup']:.2f}x", cache=mb(r["cache_bytes"]), dense_cache=mb(r["dense_cache_bytes"]),
                      ratio=f"{r['cache_ratio']:.1f}x", peak=mb(r["peak_bytes"]), dense_peak=mb(r["dense_peak_bytes"]))
                 for r in gen]
        cols = [("device", "device"), ("B", "B"), ("L", "L"), ("l", "l"), ("layers", "layers"), ("dim", "dim"),
                ("CAT tokens/s", "tps"), ("dense tokens/s", "dense_tps"), ("speedup", "speedup"),
                ("CAT cache MiB", "cache"), ("dense cache MiB", "dense_cache"), ("cache ratio", "ratio"),
                ("slots/layer", "slots"), ("dense slots/layer", "dense_slots"), ("CAT peak MiB", "peak"),
                ("dense peak MiB", "dense_peak")]
        _write_results(out_dir, "cat_generation", "CAT cached generation against a dense cache", gen, shown, cols)
    if not quick and torch.cuda.is_available() and device in ("all", "cuda"):
        breakdown = perf_cat.profile_breakdown("cuda")
        with open(os.path.join(out_dir, "cat_profile_gpu.json"), "w") as f:
            json.dump(breakdown, f, indent=1)
        print("one forward+backward at L = 4096, l = 16 (per step, us): by GPU time")
        for e in breakdown["by_device"]:
            print(f"  {e['self_us_per_call_step']:10.1f}  x{e['calls']:<3} {e['name'][:90]}")
        print("by host time")
        for e in breakdown["by_host"]:
            print(f"  {e['self_us_per_call_step']:10.1f}  x{e['calls']:<3} {e['name'][:90]}")
        # the host's share without the profiler: each piece's issue time against its wall time, and cProfile
        host = perf_cat.host_breakdown("cuda")
        with open(os.path.join(out_dir, "cat_host_gpu.json"), "w") as f:
            json.dump(host, f, indent=1)
        print("host time per call (us; issue = until the last call returns, wall = until the GPU is done)")
        for name, t in host["pieces"].items():
            print(f"  issue {t['issue_us']:8.1f}  wall {t['wall_us']:8.1f}  {name}")
        for name, funcs in host["by_own_time"].items():
            print(f"{name} under cProfile: own time per call (us), cumulative, calls per call")
            for e in funcs:
                print(f"  {e['own_us']:8.1f}  {e['cum_us']:8.1f}  x{e['calls']:<4g} {e['name'][:100]}")
    if not quick and any(dev == "cuda" for dev, _ in _devices_and_backends(device)):
        # both sides captured in CUDA graphs: the comparison without the host's per-launch cost
        # (last in the family: under a time limit the other results are already written)
        try:
            graphs = [dict(r, device="cuda") for r in perf_cat.graph_rows("cuda", min_run_time=min(min_run_time, 0.25))]
        except Exception as err:  # a compile that fails is reported, not fatal
            print(f"cat_graphs: failed: {type(err).__name__}: {err}")
            return
        ratio = lambda x: "" if x is None else fmt(x, 2) + "x"  # noqa: E731
        shown = [dict(r, **{k: fmt(r.get(k)) for k in ("ours_compiled_ms", "ours_eager_ms", "sdpa_compiled_ms",
                                                       "sdpa_eager_ms", "ours_captured_ms", "sdpa_captured_ms")},
                      vs_sdpa_compiled=ratio(r["vs_sdpa_compiled"]), vs_sdpa_captured=ratio(r.get("vs_sdpa_captured")),
                      tflops=fmt(r["tflops"], 1)) for r in graphs]
        cols = [("device", "device"), ("mode", "mode"), ("dtype", "dtype"), ("B", "B"), ("H", "H"), ("L", "L"),
                ("l", "l"), ("d", "d"), ("ours compiled ms", "ours_compiled_ms"), ("ours eager ms", "ours_eager_ms"),
                ("SDPA compiled ms", "sdpa_compiled_ms"), ("SDPA eager ms", "sdpa_eager_ms"),
                ("vs SDPA (both compiled)", "vs_sdpa_compiled"), ("useful TFLOP/s", "tflops"),
                ("ours captured ms", "ours_captured_ms"), ("SDPA captured ms", "sdpa_captured_ms"),
                ("vs SDPA (both captured)", "vs_sdpa_captured"), ("notes", "note")]
        _write_results(out_dir, "cat_graphs", "CAT attention forward+backward in CUDA graphs (torch.compile "
                       "reduce-overhead, and each eager step captured whole with torch.cuda.graph), ours and SDPA",
                       graphs, shown, cols)


def bench_symile(out_dir, min_run_time=0.5, quick=False, device="all"):
    """Symile's "n_squared" loss forward+backward (M = 3) against the symile package: time over a grid of
    (N, d), mip scoring against the package's MIPSimilarity, peak memory growth in a fresh process at the
    target points, and (CUDA) the largest N one card runs for each."""
    tqdm = _tqdm()

    # each result file is written as soon as its numbers exist, so that a run stopped by a time limit keeps
    # what it measured (the largest-N search on a GPU starts a fresh process per try and comes last)
    rows, mem, cache = [], [], {}
    devices = list(_devices_and_backends(device))
    for dev, backends in devices:
        ours = [b for b in backends if b in FAMILY_BACKENDS["symile"]]  # cpu; cuda and triton where they load
        if dev == "cuda":  # "auto" there: the GEMM chunks at large N and d, which have no backend name
            ours = ["auto"] + ours
        grid = perf_symile.QUICK_GRID if quick else perf_symile.GRID
        with tqdm(total=len(grid), desc=f"symile on {dev}", disable=None) as bar:
            rows += perf_symile.rows(dev, ours + ["reference"], grid, min_run_time=min(min_run_time, 0.2),
                                     progress=bar)
    fmt = lambda x, p=3: "" if x is None else f"{x:.{p}f}"  # noqa: E731
    shown = [dict(r, ms=fmt(r["ms"]), peer_ms=fmt(r["peer_ms"]),
                  speedup=fmt(r["speedup"], 2) + ("x" if r["speedup"] else ""), tflops=fmt(r["tflops"], 1),
                  loss_diff="" if r["loss_diff"] is None else f"{r['loss_diff']:.1e}") for r in rows]
    cols = [("device", "device"), ("implementation", "impl"), ("dtype", "dtype"), ("M", "M"), ("N", "N"), ("d", "d"),
            ("fwd+bwd ms", "ms"), ("package ms", "peer_ms"), ("speedup vs package", "speedup"),
            ("useful TFLOP/s", "tflops"), ("|loss - package's|", "loss_diff"), ("notes", "note")]
    if not any(r["device"] == "cuda" for r in rows):  # TFLOP/s reported for GPUs (the json keeps every row's)
        cols = [c for c in cols if c[1] != "tflops"]
    base, results = _write_results(out_dir, "symile", "Symile n_squared loss forward+backward", rows, shown, cols)
    _save_plot(_plot_symile, results, base + ".png")
    # mip scoring against the package's MIPSimilarity
    mips = []
    for dev, backends in devices:
        # "reference" is what "auto" runs: the ATen product and one GEMM
        mip_backends = [b for b in backends if b in ("triton", "cuda", "cpu")] + ["reference"]
        mips += perf_symile.mip_rows(dev, mip_backends, quick=quick)
    shown_mip = [dict(r, ms=fmt(r["ms"]), peer_ms=fmt(r["peer_ms"]), speedup=fmt(r["speedup"], 2) +
                      ("x" if r["speedup"] else ""), max_err=f"{r['max_err']:.1e}") for r in mips]
    _write_results(out_dir, "symile_mip", "mip scoring (two query modalities) against symile's MIPSimilarity",
                   mips, shown_mip, [("device", "device"), ("backend", "backend"), ("dtype", "dtype"), ("B", "B"),
                                     ("C", "C"), ("d", "d"), ("ms", "ms"), ("package ms", "peer_ms"),
                                     ("speedup", "speedup"), ("max |score - float64|", "max_err")])

    def write_memory():
        mib = lambda x: "" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
        shown = [dict(r, peak=mib(r["peak_bytes"]), seconds=fmt(r["seconds"]), largest=r.get("largest_n") or "",
                      N=r.get("N", ""), note=r.get("stopped") or r.get("note", "")) for r in mem]
        cols = [("kind", "kind"), ("device", "device"), ("implementation", "impl"), ("dtype", "dtype"),
                ("N", "N"), ("d", "d"), ("peak growth MiB", "peak"), ("one call s", "seconds"),
                ("status", "status"), ("largest N", "largest"), ("notes", "note")]
        for r in shown:
            r.setdefault("kind", "memory")
            r["status"] = r.get("status", "")
        _write_results(out_dir, "symile_memory", "Symile n_squared loss: peak memory growth of one "
                       "forward+backward in a fresh process, largest N per card", mem, shown, cols)

    for dev, backends in devices:
        ours = [b for b in backends if b in FAMILY_BACKENDS["symile"]]
        if dev == "cuda":  # "auto" there is the GEMM chunks, the default path, which has no backend name
            ours = ["auto"] + ours
        impls = ours + ([perf_symile.PACKAGE] if perf_symile.package_available() else [])
        point = perf_symile.QUICK_MEMORY_POINT if quick else \
            perf_symile.GPU_MEMORY_POINT if dev == "cuda" else perf_symile.CPU_MEMORY_POINT
        mem += perf_symile.memory_rows(dev, impls, point, cache=cache)
        write_memory()
        if dev == "cuda":
            kw = dict(d=64, start=64, max_n=128) if quick else {}
            for impl in impls:
                mem.append(perf_symile.largest_n(impl, dev, cache=cache, **kw))
                write_memory()
    return rows, mem


def _plot_symile(results, path):
    """Time against N (log-log), one panel per device and d, a line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["ms"] is not None]
    panels = sorted({(r["device"], r["d"]) for r in results["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (dev, d) in zip(axes[0], panels):
        for impl in sorted({r["impl"] for r in results["rows"]}):
            pts = sorted((r["N"], r["ms"]) for r in rows if (r["device"], r["d"], r["impl"]) == (dev, d, impl))
            color = "tab:green" if "symile" in impl else "tab:gray" if "reference" in impl else \
                "tab:orange" if "[cuda]" in impl else "tab:blue"
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, color=color, linestyle="--" if "symile" in impl else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        dtype = next((r["dtype"] for r in results["rows"] if (r["device"], r["d"]) == (dev, d)), "")
        ax.set_title(f"{dev}, d = {d} ({dtype})")
        ax.set_xlabel("N (batch)")
        ax.set_ylabel("forward+backward ms (log)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Symile n_squared loss, M = 3: {results['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    shapes = sorted({(r["B"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
    impls = sorted({(r["device"], r["op"] if r["op"].startswith("peer") else f"fusedlab[{r['backend']}]") for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(impls)
    for i, (dev, name) in enumerate(impls):
        ys = []
        for s in shapes:
            match = [r["ms"] for r in rows if r["device"] == dev and (r["B"], r["K"]) == s and
                     (r["op"] == name or f"fusedlab[{r['backend']}]" == name and not r["op"].startswith("peer"))]
            ys.append(match[0] if match else float("nan"))
        ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=f"{name} ({dev})")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], [f"{b}x{k}" for b, k in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_xlabel("B groups x K particles (state D = 16 float32)")
    ax.set_title(f"resample + gather: {results['machine']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusedlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    sub.add_parser("info", help="versions, backends and device")
    d = sub.add_parser("demo", help="every family on every backend: checked and timed against the peer")
    d.add_argument("--quick", action="store_true", help="one small shape, short timing (for smoke tests)")
    b = sub.add_parser("bench", help="one family's benchmark target points -> json, markdown (and a PNG for "
                                     "resample and symile)")
    b.add_argument("--out", default=None, help="results folder (default: bench/results; bench/results/tmp with --quick, "
                                              "so a smoke run never replaces the recorded results)")
    b.add_argument("--family", default="resample", choices=["resample", "newton_schulz", "cat", "symile"],
                   help="which family (default: resample; `make bench` runs every family)")
    b.add_argument("--quick", action="store_true", help="tiny shapes and short timing (for smoke tests)")
    b.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="where to run (default: every device here)")
    args = p.parse_args(argv)
    quick = getattr(args, "quick", False)
    if args.cmd == "bench":
        args.out = args.out or ("bench/results/tmp" if quick else "bench/results")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            p.error(f"--out {args.out!r} exists and is not a folder")
    if args.cmd == "info":
        print(info())
    elif args.cmd == "demo":
        demo(quick)
    else:
        bench(args.out, family=args.family, device=args.device, **(dict(min_run_time=0.01, shapes=((4, 8),)) if quick else {}))


if __name__ == "__main__":
    main()
