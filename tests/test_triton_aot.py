"""Ahead-of-time compile of every Triton kernel in triton_kernels/ for sm_90, no GPU needed.

Each module lists the specializations it launches (``aot_configs()``, built by the same functions as the
launches); every one is compiled with triton.compile for a GPUTarget("cuda", 90, 32) and its PTX is run
through Triton's bundled ``ptxas -arch=sm_90a -v`` for register and spill counts. A compile error fails,
a jitted kernel missing from ``aot_configs()`` fails, a spill fails unless ALLOWED_SPILLS names the
kernel with a reason and a bound, and shared memory beyond an H100's per-block limit fails (Triton only
finds that out at launch). FUSEDLAB_AOT_FULL=1 compiles every block size instead of a sample.

The compile runs in a subprocess without TRITON_INTERPRET: the root conftest.py selects the interpreter
before triton is imported, and its patched kernels cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
#: Largest dynamic shared memory one block may use on sm_90 (227 KiB).
SM90_MAX_SHARED = 232448

# kernel name -> (most spill-store bytes per thread allowed, why)
ALLOWED_SPILLS = {
    "_resample_kernel": (
        64,
        "ptxas parks a few loop-invariant values (scratch addresses, predicates; 4-48 bytes per thread) in "
        "local memory: stored once before the loop over groups, reloaded at most once per chunk of 512 lanes "
        "from L1, next to the chunk's float64 exp, cumsum and log2(BLOCK_K)-step search",
    ),
    "_symile_bwd_outer_kernel": (
        64,
        "fp32, M = 4: ptxas parks a few loop-invariant values (20-44 bytes per thread) in local memory, stored "
        "before the tuple loops and reloaded once per u_2 tuple, outside the loops over u_3, the (i, j) tiles "
        "and d (checked in the SASS)",
    ),
    "_symile_bwd_kernel": (
        32,
        "fp32 at d = 64 (FUSEDLAB_AOT_FULL=1 only): 8-20 bytes per thread stored before the loops and reloaded "
        "once in the epilogue (checked in the SASS); the default d = 256/1024 set compiles spill-free",
    ),
}

_SCRIPT = r"""
import importlib, json, os, pkgutil, re, subprocess, sys, tempfile, time
import triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
import fusedlab.triton_kernels as pkg

ptxas, full = sys.argv[1], sys.argv[2] == "1"
target = GPUTarget("cuda", 90, 32)
for info in pkgutil.iter_modules(pkg.__path__):
    mod = importlib.import_module(pkg.__name__ + "." + info.name)
    jitted = {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction)}
    configs = list(mod.aot_configs(full=full)) if hasattr(mod, "aot_configs") else []
    # kernels launched, plus the helpers they call (inlined; they are never launched alone)
    reached = {c["kernel"].__name__ for c in configs}
    grew = True
    while grew:
        grew = False
        for name in list(reached):
            for other, fn in jitted.items():
                if other not in reached and re.search(r"\b%s\s*\(" % re.escape(other), jitted[name].src):
                    reached.add(other)
                    grew = True
    print(json.dumps({"module": info.name, "kernels": sorted(jitted), "unlisted": sorted(set(jitted) - reached)}))
    for c in configs:
        rec = {"module": info.name, "name": c["name"], "kernel": c["kernel"].__name__, "options": c["options"]}
        t0 = time.time()
        try:
            src = triton.compiler.ASTSource(fn=c["kernel"], signature=c["signature"], constexprs=c["constexprs"],
                                            attrs=c.get("attrs"))
            compiled = triton.compile(src, target=target, options=c["options"])
            ptx = compiled.asm["ptx"]
            rec["shared"] = compiled.metadata.shared
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "k.ptx")
                with open(path, "w") as f:
                    f.write(ptx)
                out = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.cubin")],
                                     capture_output=True, text=True)
            if out.returncode != 0:
                rec["error"] = "ptxas: " + out.stderr[-3000:]
            else:
                regs = re.search(r"Used (\d+) registers", out.stderr)
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
                stack = re.search(r"(\d+) bytes stack frame", out.stderr)
                rec.update(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                           spill_loads=int(spill.group(2)), stack=int(stack.group(1)))
        except Exception as e:
            rec["error"] = repr(e)[-3000:]
        rec["seconds"] = round(time.time() - t0, 2)
        print(json.dumps(rec), flush=True)
"""


@pytest.fixture(scope="module")
def aot():
    if not os.path.exists(PTXAS):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full = os.environ.get("FUSEDLAB_AOT_FULL") == "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, PTXAS, "1" if full else "0"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"AOT compile script failed:\n{proc.stderr[-6000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    modules = [r for r in lines if "unlisted" in r]
    records = [r for r in lines if "name" in r]
    print(f"\n{'kernel config':<62} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>7} {'s':>6}")
    for r in records:
        if "error" in r:
            print(f"{r['name']:<62} ERROR")
            continue
        print(f"{r['name']:<62} {r['options']['num_warps']:>5} {r['registers']:>5} "
              f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>12} {r['stack']:>6} {r['shared']:>7} "
              f"{r['seconds']:>6}")
    return modules, records


def test_every_kernel_is_listed(aot):
    modules, records = aot
    assert modules, "no module found under fusedlab.triton_kernels"
    for m in modules:
        assert not m["unlisted"], (f"triton_kernels/{m['module']}.py: jitted kernels {m['unlisted']} are neither in "
                                   "aot_configs() nor called by a kernel that is")
    assert {r["module"] for r in records} == {m["module"] for m in modules if m["kernels"]}


def test_every_config_compiles_for_sm90(aot):
    _, records = aot
    errors = [f"{r['name']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n\n".join(errors)


def test_no_unexpected_spills(aot):
    _, records = aot
    bad = []
    for r in records:
        if "error" in r or r["spill_stores"] == 0 and r["spill_loads"] == 0:
            continue
        bound, why = ALLOWED_SPILLS.get(r["kernel"], (0, ""))
        assert not bound or why, "an allowed spill needs a reason"
        if r["spill_stores"] > bound:
            bad.append(f"{r['name']}: {r['spill_stores']} bytes spill stores, {r['spill_loads']} loads "
                       f"(allowed {bound}), {r['registers']} registers")
    assert not bad, "register spills:\n" + "\n".join(bad)


def test_shared_memory_fits_sm90(aot):
    _, records = aot
    big = [f"{r['name']}: {r['shared']} bytes" for r in records if "error" not in r and r["shared"] > SM90_MAX_SHARED]
    assert not big, f"shared memory above sm_90's {SM90_MAX_SHARED} bytes per block:\n" + "\n".join(big)


def test_newton_schulz_configs_cover_every_kernel_and_class(aot):
    """Each size class of each dtype is compiled for all three kernels and both final-store layouts."""
    _, records = aot
    names = {r["name"] for r in records if r["module"] == "newton_schulz"}
    for dtype in ("bf16", "fp32", "fp64"):
        for kernel in ("xxt", "gram_update", "update_x"):
            assert any(n.startswith(f"{kernel}[{dtype} ") for n in names), (kernel, dtype)
        assert any(n.startswith(f"update_x[{dtype} ") and "transposed" in n for n in names), dtype
    assert any("bf16 large" in n for n in names) and any("bf16 small" in n for n in names)


def test_symile_configs_cover_every_kernel_and_path(aot):
    """The forward and both backward paths of every M in bf16 and fp32, at the d = 256/1024 configuration,
    and the mip kernel with one and three queries."""
    _, records = aot
    names = {r["name"] for r in records if r["module"] == "symile"}
    for dtype in ("bf16", "fp32"):
        for M in (2, 3, 4):
            tag = f"{dtype} d=256 M={M}"
            assert {f"symile_fwd[{tag}]", f"symile_bwd[{tag} atomic]", f"symile_bwd[{tag} deterministic]"} <= names
            assert (f"symile_bwd_outer[{tag}]" in names) == (M > 2), tag
        assert {f"mip[{dtype} NQ=1]", f"mip[{dtype} NQ=3]"} <= names


def test_cat_configs_cover_every_backward_kernel(aot):
    """bf16 and fp32 at d = 64 and 128: the dQ kernel (one specialization for both query streams), both
    dK/dV kernels, and the reduction of the slot kernel's row splits with a 32- and a 64-bit element count."""
    _, records = aot
    names = {r["name"] for r in records if r["module"] == "cat"}
    for dtype in ("bf16", "fp32"):
        for d in (64, 128):
            tag = f"{dtype} d={d}"
            assert {f"cat_fwd[{tag}]", f"cat_bwd_dq[{tag}]", f"cat_bwd_dkv_raw[{tag}]",
                    f"cat_bwd_dkv_slot[{tag} qc=True out={dtype}]"} <= names, tag
        assert {f"cat_split_sum[{dtype} N=i32]", f"cat_split_sum[{dtype} N=i64]"} <= names, dtype


def test_host_launch_helpers_match_triton():
    """The plain-Python cdiv and next_power_of_2 the launch planning uses (triton's own are constexpr
    functions, slow on the host) give triton's values."""
    import triton

    from fusedlab.triton_kernels._common import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in (1, 2, 3, 7, 16, 64, 128, 1024))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert next_power_of_2(2**40 + 1) == 2**41
