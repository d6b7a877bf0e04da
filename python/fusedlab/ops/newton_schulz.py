"""Newton-Schulz orthogonalization, Muon's inner loop: ``newton_schulz``.

Semantics: python/fusedlab/reference/newton_schulz.py. The C++ CPU kernel runs the whole iteration over a
batch of same-shaped matrices in one op, with the epilogues fused into baddbmm; the Triton kernels
(triton_kernels/newton_schulz.py: symmetric X X^T and b A + c A A, fused a X + B X) run it on GPUs, and so
does the CUDA kernel (csrc/cuda/newton_schulz.cu: the same op name, dispatched by device; cuBLAS products with
the epilogues in baddbmm, the normalization and the transposes in custom kernels; tested and timed on an H100
and an H200).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch

from fusedlab import _backend
from fusedlab.reference import newton_schulz as ref

_FAMILY = "newton_schulz"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_METHODS = ("auto", "standard", "gram")


@torch.library.register_fake("fusedlab::newton_schulz")
def _fake_newton_schulz(G, coefficients, norm_scale, eps, dtype):
    return torch.empty(G.shape, dtype=dtype, device=G.device)


@torch.library.register_fake("fusedlab::muon_step_")
def _fake_muon_step(params, grads, bufs, momentum, nesterov, coefficients, norm_scale, eps, dtype, lr, weight_decay,
                    step_lr, workspace=None):
    return None


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


# hardware probes, answered once per process into plain dicts (a functools cache is traced through by
# torch.compile, which cannot trace the probes themselves)
_BF16_MATMUL: dict = {}


def _cpu_has_bf16_matmul() -> bool:
    if "cpu" not in _BF16_MATMUL:
        cpu = torch.cpu
        try:
            _BF16_MATMUL["cpu"] = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except AttributeError:  # a torch without these probes: assume no native bf16 matmul
            _BF16_MATMUL["cpu"] = False
    return _BF16_MATMUL["cpu"]


def _cuda_has_bf16_matmul(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and later."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _BF16_MATMUL:
        _BF16_MATMUL[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _BF16_MATMUL[index]


def check_matrices(G) -> None:
    """G must be a floating tensor [..., m, n]: the one copy of these messages (the Triton module uses it)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must be [..., m, n] with at least 2 dims, got shape {tuple(G.shape)}")
    if G.dtype not in _DTYPES:
        raise TypeError(f"G must be float16, bfloat16, float32 or float64, got dtype {G.dtype}")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies bf16 natively (GPUs from Ampere on, AVX-512-BF16 or AMX CPUs),
    else float32."""
    if (device.type == "cuda" and _cuda_has_bf16_matmul(device)) or (device.type == "cpu" and _cpu_has_bf16_matmul()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                  dtype: Optional[torch.dtype] = None, backend: str = "auto", method: str = "auto") -> torch.Tensor:
    """Approximate orthogonal factor of each matrix in ``G`` [..., m, n] by ``steps`` Newton-Schulz steps.

    Args:
        G: [..., m, n] floating tensor, a batch of same-shaped matrices.
        steps: number of iterations.
        coefficients: "keller" ((3.4445, -4.7750, 2.0315) every step, torch.optim.Muon's), "polar_express"
            (the 5-step set of modded-nanogpt and Dion, normalized by 1.02 ||G||), one (a, b, c) triple, or a
            sequence of per-step triples (the last repeats when there are fewer than ``steps``).
        eps: the Frobenius norm (accumulated in float64 on the CPU and CUDA kernels, float32 with max-abs
            scaling elsewhere: no underflow either way) is clamped at eps, as torch does.
        dtype: computation and result dtype; default bfloat16 where the hardware has bf16 matrix units,
            else float32.
        backend: "auto" (CPU tensors: "cpu"; CUDA tensors: "triton" for a lone matrix over 1024 on its
            short side and under 4x longer than wide, else "cuda", as measured on an H100; without
            fusedlab._C_cuda, plain torch products for a lone small or flat matrix, else "triton"), "cuda"
            (CUDA tensors, when fusedlab._C_cuda is built), "triton", "cpu" or "reference". It names the
            kernel of the standard iteration.
        method: "standard" (iterate on X), "gram" (Gram Newton-Schulz: the same iterate carried on the small
            Gram matrix X X^T, in float16 when ``dtype`` is a half type, restarted from X every second step;
            torch's batched products on any device, or the plain reference with backend="reference"; fewer
            FLOPs on strongly rectangular matrices, none on square ones), or "auto": "gram" only with
            backend="auto" and where it is faster at the standard path's accuracy, else "standard". On CUDA
            tensors, float32 with long side > 2x short side > 256 (the published shape rule; measured faster
            in float32 on an H100 and an H200, not in bf16 against the CUDA kernel); never on CPU tensors
            (no faster than the C++ kernel's panel products, 0.88-1.12x in float32).

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
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    eps = float(eps)
    dtype = default_dtype(G.device) if dtype is None else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    which = _backend.resolve(backend, _FAMILY, G.device)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "gram" and backend not in ("auto", "reference"):
        raise ValueError(f"method='gram' runs on torch's batched products (backend='auto') or the plain reference "
                         f"(backend='reference'); it has no {backend!r} kernel, got backend={backend!r}")
    if method == "auto":  # an explicit backend asks for that kernel, which iterates on X
        method = "gram" if backend == "auto" and _gram_faster(G.shape, dtype, G.device.type) else "standard"
    if G.shape[-1] == 0 or G.shape[-2] == 0:  # empty matrices: nothing to normalize or multiply
        return torch.empty(G.shape, dtype=dtype, device=G.device)
    if method == "gram" and steps > 0 and G.numel() > 0:
        restarts = gram_restarts(steps)
        with _no_autocast(G):  # plain torch products: autocast would lower the requested dtype
            if which == "reference":
                return ref.gram_newton_schulz(G, steps, coefficients, eps, dtype, restarts)
            return _gram_newton_schulz(G, triples, scale, eps, dtype, restarts)
    if backend == "auto" and G.device.type == "cuda":
        which = auto_cuda_choice(G.shape, [b for b in ("cuda", "triton") if b in _backend.backends()])
    if which == "reference":
        with _no_autocast(G):
            return ref.newton_schulz(G, steps, coefficients, eps, dtype)
    flat = [float(v) for t in triples for v in t]
    if which == "triton":
        return torch.ops.fusedlab.newton_schulz_triton(G, flat, float(scale), float(eps), dtype)
    return torch.ops.fusedlab.newton_schulz(G, flat, float(scale), float(eps), dtype)


def _no_autocast(G):
    """Autocast off for the paths written as plain torch products (the kernels compute in ``dtype`` anyway)."""
    if torch.is_autocast_enabled(G.device.type):
        return torch.autocast(G.device.type, enabled=False)
    return contextlib.nullcontext()


def auto_cuda_choice(shape, kernels) -> str:
    """What "auto" runs for a CUDA batch of this shape, given the GPU kernels loaded (``kernels``, a subset of
    ("cuda", "triton")). Measured on an H100 (bench/results/gpu/h100-2/newton_schulz_gpu.json; bf16, 5 steps,
    against torch.optim.Muon's products): the CUDA kernel (cuBLAS batched products and fused epilogues) ran
    1.19x at 1024x1024, 1.02x at 4096x16384, 8.7x on 64 x 768x768 and 0.99x at 4096x4096; the Triton kernels
    0.67x, 0.87x, 8.2x and 1.18x. So: Triton for a lone large square-ish matrix, the CUDA kernel elsewhere;
    without it, plain torch products for a lone small or strongly rectangular matrix."""
    m, n = sorted(shape[-2:])
    batch = math.prod(shape[:-2]) if m * n else 0
    lone, small_or_flat = batch <= 1, m <= 1024 or n >= 4 * m
    if lone and not small_or_flat and "triton" in kernels:
        return "triton"
    if "cuda" in kernels:
        return "cuda"
    if "triton" in kernels and not (lone and small_or_flat):
        return "triton"
    return "reference"


# Restart the Gram iteration from X every second step. The published default restarts once, after step 2.
# Measured with this code (float64 oracle; 96x384 ... 384x768; Gaussian, log-spaced and 1/i^p spectra), one
# restart after step 2 keeps the float16 iteration within 0.8x torch's bf16 error at 5 steps, but errs up to
# 2.6e-4 in float32 (the standard float32 path: ~1e-5) and 53x torch's bf16 error at 8 steps (Polar Express);
# with no restart the float16 iteration blows up. Every second step: at most 0.26x, and 2.8e-5 in float32.
GRAM_RESTART_EVERY = 2


def gram_restarts(steps: int) -> tuple:
    """The step counts after which the op's Gram path restarts from X: every ``GRAM_RESTART_EVERY`` steps."""
    return tuple(range(GRAM_RESTART_EVERY, steps, GRAM_RESTART_EVERY))


def _gram_newton_schulz(G: torch.Tensor, triples, scale: float, eps: float, dtype: torch.dtype,
                        restarts) -> torch.Tensor:
    """Gram Newton-Schulz on a batch with torch's batched products (semantics: ref.gram_newton_schulz).

    The a Q and a R terms ride in baddbmm's beta, so each update is one GEMM with no extra pass."""
    cdt = ref.gram_compute_dtype(dtype)
    m, n = G.shape[-2:]
    X = ref.normalize(G.reshape(-1, m, n), scale, eps, cdt)
    tall = m > n
    if tall:
        X = X.mT  # a strided view: bmm reads it transposed, no copy
    eye = torch.eye(X.shape[-2], dtype=cdt, device=G.device)
    R = torch.bmm(X, X.mT)
    Q = None  # the identity, implicit: the first product after a (re)start is skipped
    for i, (a, b, c) in enumerate(triples):
        if Q is not None and i in restarts:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        Q = torch.add(Z, eye, alpha=a) if Q is None else torch.baddbmm(Q, Q, Z, beta=a)
        if i + 1 < len(triples) and i + 1 not in restarts:  # R is not needed after the last step or before a restart
            RZ = torch.baddbmm(R, R, Z, beta=a)
            R = torch.baddbmm(RZ, Z, RZ, beta=a)
    # (Q X)^T = X^T Q^T, so a tall input comes back in its own layout without a transpose copy
    out = torch.bmm(X.mT, Q.mT) if tall else torch.bmm(Q, X)
    return out.to(dtype).view(G.shape)


def _gram_faster(shape, dtype: torch.dtype, device_type: str) -> bool:
    """Where method="auto" takes the Gram path (decided from shape, dtype and device alone)."""
    m, n = sorted(shape[-2:])
    if m == 0 or dtype == torch.float64:  # float64 is the oracle's dtype: the plain iteration
        return False
    if device_type == "cuda":
        # Measured at 768x3072 (aspect 4) against the standard path "auto" takes: on the H200
        # (bench/results/gpu/h200-2/newton_schulz_gpu.json) float32 1.11x on one matrix and 1.24x on a batch
        # of 12 (the H100: 2.6x on the batch), but bf16 0.51x and 0.89x against the CUDA kernel (the H100:
        # 1.24x and 0.98x against the Triton kernels). So float32 only, with the published shape rule (aspect
        # ratio above 2, short side above 256).
        return dtype == torch.float32 and n > 2 * m and m > 256
    if device_type == "cpu":
        # Never on CPUs. On a 2-core Sapphire Rapids (AMX-BF16), against the C++ kernel before it computed the
        # symmetric products by panels: bf16 (whose Gram path multiplies in float16, ~8x slower there) 2.4-8x
        # slower at every shape; float32 1.17-1.46x faster at aspect ratio >= 3, short side >= 256, as its FLOP
        # count predicts. Against the panel kernel on a 2-core AVX-512-BF16 EPYC, float32: 0.88x at 12 x 768 x
        # 3072, 0.96-0.98x on one 768 x 3072 and 4 x 3072 x 768, 1.12x at 2 x 512 x 2048 (float16 products run
        # there ~300x slower than bf16 ones, so bf16 is out of the question). Gram products with bfloat16
        # operands err 1.6-2.4x the standard bf16 path at 5 steps, too close to the 2x allowed. A C++ variant
        # for bf16 (X products in bf16, the Gram iteration in float32 with no restart, the result bf16(Q) X) was
        # measured on the EPYC: 1.05-1.08x the panel kernel on 12 x 768 x 3072 and 12 x 3072 x 768 (0.90x at
        # aspect 3), 8% off the GPT-2-small Muon step, and its error against float64 0.3-1.0x torch's bf16
        # (Gaussian, decaying, low-rank spectra; a Gram matrix rounded to bf16 diverged). Not adopted: Q's
        # eigenvalues reach a^5 (~485) in the small directions against ~1 / sigma_max in the large ones, so its
        # bf16 rounding, carried into the large directions by X, mixes the singular vectors twice as much as
        # torch does (2.2% against 1.1% on a spectrum spanning 100); a float32 final product (0.43%) or a split
        # Q costs all of the saving.
        return False
    return False


# An explicit error instead of torch's silent autograd fallback, for the C++ op and the Triton custom op.
for _name in ("fusedlab::newton_schulz", "fusedlab::newton_schulz_triton"):
    torch.library.register_autograd(_name, _not_differentiable, setup_context=_setup_nothing)
