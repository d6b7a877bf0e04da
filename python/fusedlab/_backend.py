"""Which backends exist here, and how `backend=` is resolved for an op call."""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

# For CUDA tensors, "auto" takes the GPU backend measured faster for each op family on an H100/H200
# (bench/results/gpu/): resample's CUDA kernel ran 1.3-4.5x faster than its Triton kernel at every benchmark
# point on both cards. newton_schulz and symile refine this per shape in their wrappers (ops/newton_schulz.py
# auto_cuda_choice; ops/symile.py GEMM_MIN_N/D; ops/cat.py cat_decode, whose CUDA kernel ran 1.15x the
# Triton one). cat_attention's CUDA kernel runs on CUDA cores (no tensor cores): on an H200 it took 2.0 ms at
# L = 4096, l = 16 against the Triton kernels' 0.86 ms, so the family's preference stays Triton.
AUTO_GPU_PREFERENCE = {"resample": ("cuda", "triton"), "newton_schulz": ("cuda", "triton"), "cat": ("triton",),
                       "symile": ("triton",)}

# The implementations each family has so far ("reference" runs on any device).
FAMILY_BACKENDS = {
    "resample": ("cuda", "triton", "cpu", "reference"),
    "newton_schulz": ("cuda", "triton", "cpu", "reference"),
    "symile": ("cuda", "triton", "cpu", "reference"),
    "cat": ("cuda", "triton", "cpu", "reference"),
}


# Answers are computed once and kept in plain module globals rather than functools caches: under
# torch.compile, Dynamo then reads a constant instead of tracing the import machinery (which it cannot).
_CACHED: dict[str, bool] = {}


def cuda_kernels_loaded() -> bool:
    """True when the CUDA extension fusedlab._C_cuda was built and loaded (needs a CUDA build of torch)."""
    if "cuda" not in _CACHED:
        _CACHED["cuda"] = _load_cuda_kernels()
    return _CACHED["cuda"]


def _load_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("fusedlab._C_cuda")
        return True
    except ImportError as err:  # built without CUDA, or for another torch: say so once, keep working
        warnings.warn(f"fusedlab: CUDA kernels not loaded ({err}); the 'cuda' backend is unavailable")
        return False


def triton_available() -> bool:
    """Triton runs on a CUDA device, or anywhere under TRITON_INTERPRET=1 (the CPU interpreter, for tests)."""
    if "triton" not in _CACHED:
        try:
            import triton  # noqa: F401

            _CACHED["triton"] = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        except ImportError:
            _CACHED["triton"] = False
    return _CACHED["triton"]


def backends() -> list[str]:
    """The backends available in this process, e.g. ["auto", "cpu", "reference"] on a CPU-only machine."""
    out = ["auto"]
    if cuda_kernels_loaded():
        out.append("cuda")
    if triton_available():
        out.append("triton")
    out += ["cpu", "reference"]
    return out


def resolve(backend: str, family: str, device: torch.device) -> str:
    """Map a user's `backend=` to the implementation that will run, with an error naming what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has = FAMILY_BACKENDS[family]
    if backend == "auto":
        if device.type == "cpu" and "cpu" in has:
            return "cpu"
        if device.type == "cuda":
            for cand in AUTO_GPU_PREFERENCE.get(family, ("cuda", "triton")):  # GPU backends only
                if cand in has and (cuda_kernels_loaded() if cand == "cuda" else triton_available()):
                    return cand
        return "reference"
    if backend not in has:
        raise ValueError(f"backend={backend!r}: the {family} family has no such kernel yet (it has {has})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_kernels_loaded():
            raise RuntimeError("backend='cuda' is not available: fusedlab._C_cuda was not built or did not load")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' is not available: triton is not installed or there is no GPU "
                               "(set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_modes = getattr(torch._C, "_len_torch_function_stack", None)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def plain_eager(*tensors) -> bool:
    """Whether a C++ binding that calls an op below autograd (or a kernel itself) does exactly what the op
    called through torch.ops would: every tensor a plain torch.Tensor (no subclass, so no FakeTensor,
    FunctionalTensor or DTensor; None is skipped), no TorchDispatchMode or TorchFunctionMode active (a call
    from C++ never reaches the latter) and no functorch transform (vmap, grad) around the call. The caller
    also rules out torch.compile tracing and calls that need an autograd graph."""
    if _dispatch_modes is None or _function_modes is None or _functorch_level is None:
        return False  # a torch without these checks: always through the dispatcher
    if _dispatch_modes() or _function_modes() or _functorch_level() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True
