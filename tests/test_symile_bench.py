"""The symile benchmark path (python -m fusedlab bench --family symile) at tiny sizes on the CPU: rows and
their keys, the skips by memory estimate and by time cap, the fresh-process memory helper, the largest-N
search's stopping rules, and the command line's files."""
import json
import subprocess
import sys

import pytest
import torch

from fusedlab.perf import symile as ps

ROW_KEYS = {"family", "op", "device", "impl", "backend", "M", "N", "d", "dtype", "ms", "q20_ms", "q80_ms", "runs", "peer_ms",
            "speedup", "tflops", "loss", "loss_diff", "status", "note"}
HAVE_PACKAGE = ps.package_available()


@pytest.mark.timeout(60)
def test_rows_tiny_grid():
    rows = ps.rows("cpu", ["cpu", "reference"], grid=[(8, 16)], min_run_time=0.01)
    assert [r["impl"] for r in rows] == ["fusedlab[cpu]", "fusedlab[reference]", "symile 0.1.0"]
    for r in rows:
        assert set(r) == ROW_KEYS, set(r) ^ ROW_KEYS
        assert (r["M"], r["N"], r["d"], r["dtype"], r["device"]) == (3, 8, 16, "float32", "cpu")
    for r in rows[:2]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, r
    if HAVE_PACKAGE:
        assert rows[2]["status"] == "ok" and rows[2]["ms"] > 0
        for r in rows[:2]:  # the same loss as the package's, in float32
            assert r["speedup"] == pytest.approx(rows[2]["ms"] / r["ms"]) and r["loss_diff"] < 1e-4, r
    else:
        assert rows[2]["status"] == "skipped" and "not installed" in rows[2]["note"]


@pytest.mark.timeout(60)
def test_rows_skip_by_memory_estimate_and_time_cap(monkeypatch):
    monkeypatch.setattr(ps, "free_bytes", lambda device: 1000)  # nothing fits the materializing sides
    rows = ps.rows("cpu", ["cpu", "reference"], grid=[(8, 16), (16, 16)], min_run_time=0.01, time_cap_s=1e-9)
    by = {(r["N"], r["backend"]): r for r in rows}
    for be in ("reference", "package"):
        assert by[(8, be)]["status"] == "skipped" and by[(8, be)]["ms"] is None
        if be == "reference" or HAVE_PACKAGE:
            assert "GiB (estimate)" in by[(8, be)]["note"], by[(8, be)]
    # the first point runs once (over the cap); the next is extrapolated past the cap and skipped
    assert by[(8, "cpu")]["status"] == "ok" and by[(8, "cpu")]["runs"] == 1 and "cap" in by[(8, "cpu")]["note"]
    assert by[(16, "cpu")]["status"] == "skipped" and "extrapolated" in by[(16, "cpu")]["note"]
    assert by[(16, "cpu")]["speedup"] is None


def test_package_estimate_matches_the_notes():
    """About 1.2 GB for the package at the CPU target point N = d = 256, float32 (notes §1.11)."""
    assert 1.0e9 < ps.estimated_bytes("package", 256, 256, 3, 4) < 1.3e9
    assert ps.estimated_bytes("cpu", 1024, 1024, 3, 4) == 0
    assert ps.useful_flops(256, 256) == 10 * 256 ** 4


@pytest.mark.timeout(60)
def test_fresh_process_peak_returns_a_number():
    r = ps.fresh_process_peak("cpu", 8, 16, "cpu")
    assert r["status"] == "ok", r
    assert isinstance(r["peak_bytes"], int) and 0 <= r["peak_bytes"] < 2**30, r
    assert r["seconds"] > 0 and (r["N"], r["d"], r["dtype"]) == (8, 16, "float32")


def test_fresh_process_peak_sees_the_reference_build_its_tensor():
    """The measured growth is real: the reference materializes the N^3 logits (8 MiB at N = 128 in float32,
    several times over with its autograd copies), while the C++ kernel's growth is its few fixed-size tiles."""
    ours = ps.fresh_process_peak("cpu", 128, 32, "cpu")
    ref = ps.fresh_process_peak("reference", 128, 32, "cpu")
    assert ours["status"] == ref["status"] == "ok", (ours, ref)
    assert ref["peak_bytes"] > max(32 * 2**20, 2 * ours["peak_bytes"]), (ours, ref)


def test_largest_n_stopping_rules(monkeypatch):
    calls = []

    def fake(impl, N, d, device="cpu", dtype=None, M=3, timeout_s=600.0):
        calls.append(N)
        if impl == "package" and N >= 64:
            return dict(status="oom", seconds=None, peak_bytes=None, note="out of memory")
        return dict(status="ok", seconds=1e-3 * (N / 8) ** 3, peak_bytes=N, note="")

    monkeypatch.setattr(ps, "fresh_process_peak", fake)
    kw = dict(device="cpu", d=16, dtype=torch.float32, start=8)
    r = ps.largest_n("package", max_n=1024, **kw)
    assert (r["largest_n"], calls) == (32, [8, 16, 32, 64]) and "oom" in r["stopped"]
    calls.clear()
    r = ps.largest_n("cpu", max_n=1024, time_cap_s=0.5, **kw)  # 1 ms at 8, 512 ms extrapolated at 64
    assert (r["largest_n"], calls) == (32, [8, 16, 32]) and "not tried" in r["stopped"]
    assert r["kind"] == "largest_n" and [t["N"] for t in r["tries"]] == [8, 16, 32]
    calls.clear()
    cache = {}
    ps.memory_rows("cpu", ["cpu"], (8, 16), dtype=torch.float32, cache=cache)
    r = ps.largest_n("cpu", max_n=16, cache=cache, **kw)  # the memory row's run is reused
    assert (r["largest_n"], calls) == (16, [8, 16]) and r["stopped"] == "reached N > 16"


@pytest.mark.timeout(120)
def test_bench_cli_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedlab", "bench", "--quick", "--family", "symile", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("symile_cpu.json", "symile_cpu.md", "symile_cpu.png", "symile_memory_cpu.json"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "symile_cpu.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"fusedlab[cpu]", "fusedlab[reference]"}
    assert all(set(r) >= ROW_KEYS for r in rows)
    mem = json.loads((tmp_path / "symile_memory_cpu.json").read_text())["rows"]
    ours = next(r for r in mem if r["backend"] == "cpu")
    assert ours["kind"] == "memory" and ours["status"] == "ok" and isinstance(ours["peak_bytes"], int)
    if HAVE_PACKAGE:
        assert any(r["backend"] == "package" and isinstance(r["peak_bytes"], int) for r in mem)
