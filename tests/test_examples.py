"""Every example runs in its --smoke mode (20 s or less), and the command-line entry points work."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


# A --smoke run takes 20 s or less on a quiet 2-core machine (pytest's --durations lists them); the timeout
# only catches a runaway one, since a wall-clock bound would fail whenever the machine is busy.
@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_smoke(path, tmp_path):
    out = subprocess.run([sys.executable, path, "--smoke"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not os.listdir(tmp_path), f"a --smoke run writes no files: {os.listdir(tmp_path)}"


def test_particle_filter_estimates_the_likelihood():
    """The batched PF's log-likelihood estimates are centred near the Kalman value: with B = 32 replicates
    of K = 64 particles the estimate's sd is about 0.7, so |mean error| < 1 fails by chance < 1e-6."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import particle_filter as pf
    finally:
        sys.path.pop(0)
    rows = pf.main(["--smoke"])
    for r in rows:
        if r["K"] == 64:
            assert abs(r["bias"]) < 1.0 and r["sd"] < 1.5, r


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cmd", [["info"], ["demo", "--quick"]])
def test_cli(cmd):
    out = subprocess.run([sys.executable, "-m", "fusedlab", *cmd], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backends" in out.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family, exts", [("resample", ("json", "md", "png")), ("newton_schulz", ("json", "md"))])
def test_bench_quick(family, exts, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedlab", "bench", "--quick", "--family", family, "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for ext in exts:
        assert (tmp_path / f"{family}_cpu.{ext}").stat().st_size > 0


def test_cat_graph_rows_harness(monkeypatch):
    """The captured-graph CAT comparison (run on GPUs with mode="reduce-overhead") on the CPU's compile, with
    the manual CUDA-graph capture replaced by a plain re-call (no GPU here): every side times, the ratios are
    theirs."""
    import torch
    from fusedlab.perf import cat as perf_cat

    class Replay:
        def __init__(self, fn):
            self.replay = fn

    monkeypatch.setattr(perf_cat, "capture", Replay)
    r, = perf_cat.graph_rows("cpu", [(32, 8)], B=1, H=2, d=16, dtype=torch.float32, min_run_time=0.01,
                             mode="default", manual_capture=True)
    assert all(r[k] > 0 for k in ("ours_compiled_ms", "ours_eager_ms", "sdpa_compiled_ms", "sdpa_eager_ms",
                                  "ours_captured_ms", "sdpa_captured_ms"))
    assert r["vs_sdpa_compiled"] == r["sdpa_compiled_ms"] / r["ours_compiled_ms"]
    assert r["vs_sdpa_captured"] == r["sdpa_captured_ms"] / r["ours_captured_ms"]


def test_cat_host_breakdown_harness():
    """The host-time breakdown the GPU check prints for CAT (on the CPU backend here): every piece timed, the
    forward+backward's cProfile ranking holds the backward op it ran."""
    import torch
    from fusedlab.perf import cat as perf_cat

    r = perf_cat.host_breakdown("cpu", B=1, H=2, L=64, l=8, d=16, dtype=torch.float32, calls=3, top=40)
    assert set(r["pieces"]) == {"forward (no graph)", "forward (autograd graph)", "forward+backward",
                                "dense SDPA forward+backward", "forward+backward (backward on the calling thread)",
                                "one small op (in-place add on 1 element)", "one allocation (torch.empty like q)"}
    assert all(0 < t["issue_us"] <= t["wall_us"] for t in r["pieces"].values())
    funcs = r["by_own_time"]["forward+backward"]
    assert any("cat_attention_backward" in f["name"] for f in funcs), [f["name"] for f in funcs]
    assert all(f["cum_us"] >= f["own_us"] >= 0 for f in funcs)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
def test_config_sweep_harness(monkeypatch):
    """The GPU config sweep (python -m fusedlab.perf.sweep) on tiny shapes under the interpreter, a fixed
    stand-in for the profiler's time: a candidate that does not compile is reported and never chosen, the
    others agree with the default config, and the defaults are restored afterwards."""
    import torch
    from fusedlab.perf import sweep
    from fusedlab.triton_kernels import cat as tk

    before = dict(tk.CONFIGS)
    monkeypatch.setattr(sweep, "CAT_CANDIDATES", {"fwd": [(16, 16, 4, 1), (24, 16, 4, 1)], "dq": [(32, 16, 4, 1)],
                                                  "dkv": [(16, 32, 4, 1)]})
    rows = sweep.cat_sweep("cpu", B=1, H=2, L=40, l=8, d=16, dtype=torch.float32,
                           device_time=lambda fn, names: 3.0 if names == ("_cat_fwd_kernel",) else 1.0)
    assert tk.CONFIGS == before
    bad = [r for r in rows if not r["ok"]]
    assert [r["config"] for r in bad] == [[24, 16, 4, 1]] and "power of 2" in bad[0]["note"]
    assert all(r["max_rel_vs_default"] < 1e-5 for r in rows if r["ok"])
    assert sweep.best(rows) == {"fwd": dict(config=[16, 16, 4, 1], us=3.0), "dq": dict(config=[32, 16, 4, 1], us=1.0),
                                "dkv": dict(config=[16, 32, 4, 1], us=1.0)}


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
def test_newton_schulz_sweep_harness(monkeypatch):
    """The Newton-Schulz sweep on the CPU interpreter with a stand-in timer: a lone "large" matrix also gets
    the row of a X + B X by torch's GEMM (UPDATE_X = "matmul"), checked against the default, and the module's
    configs and UPDATE_X are restored."""
    import torch
    from fusedlab.perf import sweep
    from fusedlab.triton_kernels import newton_schulz as tk

    before = dict(tk.CONFIGS)
    monkeypatch.setattr(sweep, "NS_CANDIDATES", {"large": [(16, 16, 1, 1), (32, 16, 1, 1)]})
    monkeypatch.setattr(tk, "CONFIGS", {k: (16, 16, 1, 1) for k in tk.CONFIGS})
    rows = sweep.ns_sweep("cpu", dtype=torch.float32, shapes=[("large", (1, 32, 48))],
                          device_time=lambda fn, names: 2.0 if "gemm" in names else 1.0)
    assert tk.CONFIGS == {k: (16, 16, 1, 1) for k in before} and tk.UPDATE_X == "auto"
    assert [r["config"] for r in rows] == [[16, 16, 1, 1], [32, 16, 1, 1], [16, 16, 1, 1]]
    assert all(r["ok"] and r["max_rel_vs_default"] < 1e-5 for r in rows)
    assert rows[-1]["update_x"] == "matmul" and rows[-1]["us"] == 2.0 and rows[-1]["us_triton_update"] == 2.0
    assert set(sweep.best(rows)) == {"large@1x32x48", "large, aX+BX by cuBLAS@1x32x48"}


def test_resample_graph_rows_harness(monkeypatch):
    """The CUDA-graph resample comparison with the capture replaced by a plain re-call (no GPU here): one row
    per implementation, ratios from the same run, and a path that fails to capture reported, not fatal."""
    from fusedlab.perf import resample as perf_resample

    class Replay:
        def __init__(self, fn):
            self.replay = fn

    def fake_capture(fn):
        if fn.__defaults__ and fn.__defaults__[0] is perf_resample.peer_naive:
            raise RuntimeError("operation not permitted when stream is capturing")
        return Replay(fn)

    monkeypatch.setattr(perf_resample, "capture", fake_capture)
    rows = perf_resample.graph_rows(["cpu"], [(8, 16)], min_run_time=0.01, device="cpu")
    by = {r["op"]: r for r in rows}
    assert set(by) == {"resample+gather in a CUDA graph", "peer: naive, in a CUDA graph",
                       "peer: plain_systematic, in a CUDA graph", "peer: clone, in a CUDA graph"}
    ours = by["resample+gather in a CUDA graph"]
    clone = by["peer: clone, in a CUDA graph"]
    assert ours["ms"] > 0 and ours["over_clone"] == ours["ms"] / clone["ms"]
    naive = by["peer: naive, in a CUDA graph"]
    assert naive["ms"] is None and "capturing" in naive["note"]
