"""Builds a host-simulation driver of CUDA kernels (tests/cuda/<name>.cpp against tests/cuda/host_sim.h: a
std::thread per CUDA thread, a barrier per __syncthreads), with ThreadSanitizer where the compiler and the
machine support it, without it (and a warning) elsewhere."""
import os
import shutil
import subprocess
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(tmp_dir, name, probe, extra_flags=()):
    """Compile tests/cuda/<name>.cpp into tmp_dir and return the binary's path. ``probe(binary)`` runs the
    sanitized build once and says whether it works; when it does not (or the sanitized build fails to
    compile), the driver is rebuilt without ThreadSanitizer. Skips the test without g++."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the host simulation of the CUDA kernels needs a C++20 compiler")
    out = os.path.join(str(tmp_dir), name)

    def compile_(flags):
        cmd = ["g++", "-std=c++20", "-O1", "-g", "-pthread", *extra_flags, *flags, f"-I{ROOT}/csrc/include",
               f"-I{ROOT}/tests/cuda", os.path.join(ROOT, "tests", "cuda", f"{name}.cpp"), "-o", out]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240)

    r = compile_(["-fsanitize=thread"])
    if r.returncode != 0 or not probe(out):
        warnings.warn("ThreadSanitizer is unavailable: the CUDA kernels' logic runs without the race check")
        r = compile_([])
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def build_strict(tmp_path_factory, name):
    """Builds tests/cuda/<name>.cpp with -Wall -Wextra and no warning allowed; the probe runs it without
    arguments, which a working build answers with its usage error (exit status 2)."""
    probe = lambda out: subprocess.run([out], capture_output=True).returncode == 2  # noqa: E731
    out, stderr = build(tmp_path_factory.mktemp("sim"), name, probe, ("-Wall", "-Wextra"))
    assert "warning" not in stderr, stderr
    return out


def write_raw(folder, name, t):
    """``t``'s bytes as a driver reads them, into folder/name.bin: float32 as is, bfloat16 as its 16-bit
    pattern (the drivers' stand-in type)."""
    import torch

    t = t.contiguous()
    (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tofile(os.path.join(str(folder), f"{name}.bin"))
