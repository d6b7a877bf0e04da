"""Newton-Schulz orthogonalization, Muon's inner loop: ``newton_schulz``.

Semantics: python/fusedlab/reference/newton_schulz.py. The C++ CPU kernel runs the whole iteration over a
batch of same-shaped matrices in one op, with the epilogues fused into baddbmm; the Triton kernels
(triton_kernels/newton_schulz.py: symmetric X X^T and b A + c A A, fused a X + B X) run it on GPUs.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from fusedlab import _backend
from fusedlab.reference import newton_schulz as ref

_FAMILY = "newton_schulz"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@torch.library.register_fake("fusedlab::newton_schulz")
def _fake_newton_schulz(G, coefficients, norm_scale, eps, dtype):
    return torch.empty(G.shape, dtype=dtype, device=G.device)


# the Triton backend, wrapped as a custom op so opcheck and torch.compile see it like the C++ op
@torch.library.custom_op("fusedlab::newton_schulz_triton", mutates_args=())
def _newton_schulz_triton(G: torch.Tensor, coefficients: list[float], norm_scale: float, eps: float,
                          dtype: torch.dtype) -> torch.Tensor:
    from fusedlab.triton_kernels import newton_schulz as tk

    return tk.newton_schulz(G, coefficients, norm_scale, eps, dtype)


@_newton_schulz_triton.register_fake
def _fake_newton_schulz_triton(G, coefficients, norm_scale, eps, dtype):
    return torch.empty(G.shape, dtype=dtype, device=G.device)


def _not_differentiable(ctx, grad):
    raise RuntimeError("fusedlab.newton_schulz is not differentiable (it computes optimizer updates); "
                       "detach its input, or use fusedlab.reference.newton_schulz for gradients")


def _setup_nothing(ctx, inputs, output):
    pass


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_matmul() -> bool:
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume no native bf16 matmul
        return False


def check_matrices(G) -> None:
    """G must be a floating tensor [..., m, n]: the one copy of these messages (the Triton module uses it)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must be [..., m, n] with at least 2 dims, got shape {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies bf16 natively (GPUs, AVX-512-BF16 or AMX CPUs), else float32."""
    if device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16_matmul()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                  dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """Approximate orthogonal factor of each matrix in ``G`` [..., m, n] by ``steps`` Newton-Schulz steps.

    Args:
        G: [..., m, n] floating tensor, a batch of same-shaped matrices.
        steps: number of iterations.
        coefficients: "keller" ((3.4445, -4.7750, 2.0315) every step, torch.optim.Muon's), "polar_express"
            (the 5-step set of modded-nanogpt and Dion, normalized by 1.02 ||G||), one (a, b, c) triple, or a
            sequence of per-step triples (the last repeats when there are fewer than ``steps``).
        eps: the Frobenius norm (accumulated in float64 on the CPU kernel, float32 with max-abs scaling
            elsewhere: no underflow either way) is clamped at eps, as torch does.
        dtype: computation and result dtype; default bfloat16 where the hardware has bf16 matrix units,
            else float32.
        backend: "auto" (CPU tensors: "cpu"; CUDA tensors: "triton", except a lone matrix that is at most
            1024 on its short side or 4x longer than wide, which plain torch products run faster), "triton",
            "cpu" or "reference".

    Example:
        >>> import torch, fusedlab
        >>> G = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0))
        >>> X = fusedlab.ops.newton_schulz(G, dtype=torch.float32)
        >>> X.shape, X.dtype
        (torch.Size([4, 32, 64]), torch.float32)
        >>> s = torch.linalg.svdvals(X)                      # singular values pushed into Keller's band
        >>> bool(s.min() > 0.6 and s.max() < 1.2)
        True
    """
    check_matrices(G)
    triples, scale = ref.resolve_coefficients(coefficients, steps)
    if not all(math.isfinite(v) for t in triples for v in t):
        raise ValueError(f"coefficients must be finite, got {triples}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    dtype = default_dtype(G.device) if dtype is None else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    which = _backend.resolve(backend, _FAMILY, G.device)
    if backend == "auto" and which == "triton" and _plain_products_faster(G):
        which = "reference"
    if which == "reference":
        return ref.newton_schulz(G, steps, coefficients, eps, dtype)
    flat = [float(v) for t in triples for v in t]
    if which == "triton":
        return torch.ops.fusedlab.newton_schulz_triton(G, flat, float(scale), float(eps), dtype)
    return torch.ops.fusedlab.newton_schulz(G, flat, float(scale), float(eps), dtype)


def _plain_products_faster(G: torch.Tensor) -> bool:
    """Where "auto" leaves a CUDA batch to plain torch products (cuBLAS): a lone matrix that is small or
    strongly rectangular. Measured on an H100 (bench/results/gpu/h100/; the H200 run agrees): the Triton kernels ran 0.65x torch at
    1024x1024 and 0.86x at 4096x16384, but 1.22x at 4096x4096 and 7.9x on a batch of 64 768x768."""
    m, n = sorted(G.shape[-2:])
    batch = G.numel() // (m * n) if m * n else 0
    return batch <= 1 and (m <= 1024 or n >= 4 * m)


# An explicit error instead of torch's silent autograd fallback, for the C++ op and the Triton custom op.
for _name in ("fusedlab::newton_schulz", "fusedlab::newton_schulz_triton"):
    torch.library.register_autograd(_name, _not_differentiable, setup_context=_setup_nothing)
