"""Compile checks of the CUDA sources, no GPU needed (nvcc only; skipped when nvcc is not found).

(a) The torch-free kernel header, with every kernel template instantiated by tests/cuda/resample_kernels.cu,
    for sm_80 and sm_90a with ``ptxas -v``: no kernel may spill (seconds).
(b) Every csrc/cuda/*.cu glue file compiled to an object against the torch headers, for sm_80 and sm_90a in
    one nvcc call (30-60 s on 2 cores: ATen's headers dominate); its kernels may not spill either.
Register counts are printed (pytest -s shows them).
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "csrc", "include")
HEADER_DRIVERS = sorted(glob.glob(os.path.join(ROOT, "tests", "cuda", "*.cu")))
GLUE_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}


def find_nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log):
    """{(kernel, arch): dict(registers, spill_stores, spill_loads)} from nvcc -Xptxas -v output."""
    out, current = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            out[current] = {}
        elif current and (m := _SPILL.search(line)):
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _REGS.search(line)):
            out[current]["registers"] = int(m.group(1))
    return out


def run(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    return r.stdout + r.stderr


def test_sources_exist():
    assert HEADER_DRIVERS, "no tests/cuda/*.cu header driver"
    assert GLUE_FILES, "no csrc/cuda/*.cu glue file"


@needs_nvcc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("driver", HEADER_DRIVERS, ids=os.path.basename)
def test_kernel_header_compiles_without_spills(driver, arch, tmp_path):
    log = run([NVCC, "-c", driver, "-o", str(tmp_path / "k.o"), f"-I{INCLUDE}", "-std=c++17",
               "--expt-relaxed-constexpr", "-O3", "-gencode", ARCHS[arch], "-Xptxas", "-v"], timeout=200)
    info = parse_ptxas(log)
    assert info, f"no ptxas report in\n{log[-4000:]}"
    for (name, a), v in sorted(info.items()):
        print(f"{a} {v.get('registers', '?'):>3} regs  {v.get('spill_stores')}/{v.get('spill_loads')} spill  {name}")
    spilled = {k: v for k, v in info.items() if v.get("spill_stores", 1) or v.get("spill_loads", 1)}
    assert not spilled, f"kernels that spill (or report no spill line): {spilled}"


def _torch_flags():
    inc = cpp_extension.include_paths()  # the CPU wheel's list; nvcc adds its own CUDA include dir
    flags = [f"-I{p}" for p in inc] + [f"-I{INCLUDE}", f"-I{sysconfig.get_paths()['include']}"]
    flags += ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-std=c++20", "--expt-relaxed-constexpr", "-O3",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]  # the extension build's defines
    return flags


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("source", GLUE_FILES, ids=os.path.basename)
def test_glue_compiles(source, tmp_path):
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "glue.o"), *_torch_flags(), "-Xptxas", "-v",
           "--threads", "2"]  # the two architectures' device passes in parallel
    for gencode in ARCHS.values():
        cmd += ["-gencode", gencode]
    log = run(cmd, timeout=540)
    info = parse_ptxas(log)
    assert info and {a for _, a in info} == set(ARCHS), f"no ptxas report for every arch in\n{log[-4000:]}"
    assert (tmp_path / "glue.o").stat().st_size > 0
    spilled = {k: v for k, v in info.items() if v.get("spill_stores", 1) or v.get("spill_loads", 1)}
    assert not spilled, f"kernels that spill as built by the extension (torch's CUDA_KERNEL_ASSERT): {spilled}"
