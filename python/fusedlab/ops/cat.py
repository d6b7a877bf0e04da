"""CAT's compress-attend attention: ``cat_attention``.

Semantics: python/fusedlab/reference/cat.py (a dense boolean-mask oracle). Implementations:

* "triton" (triton_kernels/cat.py): fused forward and a flash-style backward that recomputes from the saved
  log-sum-exp, wrapped as the custom ops ``fusedlab::cat_attention_triton`` and
  ``fusedlab::cat_attention_triton_backward`` so opcheck and torch.compile see them like any op (eager
  calls skip the custom-op layer).
* "cpu" (csrc/cpu/cat.cpp, ``torch.ops.fusedlab.cat_attention`` and ``cat_attention_backward``): blocks of
  whole chunks, each one [rows x slots] product and one batch of [l x l] chunk products, never an L x L or
  L x Nc score matrix; the same saved log-sum-exp and recomputing backward.
* "cuda" (csrc/include/fusedlab/cat_attention.cuh, the same C++ ops on CUDA tensors): flash-style tiles of
  each stream's queries over exactly the keys they see, fp32 on CUDA cores; the backward is a dq launch
  and a dk/dv launch, no atomics.
* "reference": the dense oracle, any device, float64.

``cat_decode`` (generation: one new query per sequence against a compressed cache) has a Triton kernel
(``fusedlab::cat_decode_triton``), a split-K CUDA kernel (csrc/include/fusedlab/cat_decode.cuh, the op
``fusedlab::cat_decode`` on CUDA tensors) and a C++ CPU loop (the same op on CPU tensors); none is
differentiable.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from fusedlab import _backend
from fusedlab.reference import cat as ref

_FAMILY = "cat"
_CUDA_DIMS = (64, 128)  # head dims the CUDA kernels are instantiated for
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# the Triton backend as custom ops


@torch.library.custom_op("fusedlab::cat_attention_triton", mutates_args=())
def _cat_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                qc: Optional[torch.Tensor], chunk_size: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlab.triton_kernels import cat as tk

    return tk.forward(q, k, v, kc, vc, qc, chunk_size, scale)


@torch.library.register_fake("fusedlab::cat_attention_triton")
def _fake_cat_triton(q, k, v, kc, vc, qc, chunk_size, scale):
    B, H, L, d = q.shape
    Nc = 0 if qc is None else qc.shape[2]
    return (q.new_empty(q.shape), q.new_empty((B, H, L), dtype=torch.float32), q.new_empty((B, H, Nc, d)),
            q.new_empty((B, H, Nc), dtype=torch.float32))


@torch.library.custom_op("fusedlab::cat_attention_triton_backward", mutates_args=())
def _cat_triton_backward(do: torch.Tensor, doc: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qc: Optional[torch.Tensor],
                         o: torch.Tensor, lse: torch.Tensor, oc: torch.Tensor, lse_c: torch.Tensor,
                         chunk_size: int, scale: float) -> list[torch.Tensor]:
    grads = _cat_triton_backward_eager(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, chunk_size, scale)
    return [g for g in grads if g is not None]


@torch.library.register_fake("fusedlab::cat_attention_triton_backward")
def _fake_cat_triton_backward(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, chunk_size, scale):
    return [t.new_empty(t.shape) for t in (q, k, v, kc, vc) + ((qc,) if qc is not None else ())]


def _setup_cat(ctx, inputs, output):
    q, k, v, kc, vc, qc, chunk_size, scale = inputs
    o, lse, oc, lse_c = output
    ctx.has_qc = qc is not None
    ctx.chunk_size, ctx.scale = chunk_size, scale
    ctx.save_for_backward(q, k, v, kc, vc, qc if qc is not None else q, o, lse, oc, lse_c)
    ctx.mark_non_differentiable(lse, lse_c)


def _backward_cat(ctx, do, dlse, doc, dlse_c, run_backward=None):
    q, k, v, kc, vc, qc, o, lse, oc, lse_c = ctx.saved_tensors
    if not ctx.has_qc:
        qc, doc = None, None
    elif doc is None:
        doc = torch.zeros_like(oc)
    if do is None:
        do = torch.zeros_like(o)
    run_backward = run_backward or torch.ops.fusedlab.cat_attention_triton_backward
    grads = run_backward(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, ctx.chunk_size, ctx.scale)
    dqc = grads[5] if ctx.has_qc else None
    return grads[0], grads[1], grads[2], grads[3], grads[4], dqc, None, None


torch.library.register_autograd("fusedlab::cat_attention_triton", _backward_cat,
                                setup_context=_setup_cat)


class _EagerCATTriton(torch.autograd.Function):
    """The same forward and backward as the custom ops, called directly: in eager mode this skips the
    custom-op dispatch layers, which cost about as much as a small problem's kernels. torch.compile
    traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, qc, chunk_size, scale):
        from fusedlab.triton_kernels import cat as tk

        out = tk.forward(q, k, v, kc, vc, qc, chunk_size, scale)
        _setup_cat(ctx, (q, k, v, kc, vc, qc, chunk_size, scale), out)
        # outputs without a gradient (the log-sum-exps, an unused oc) arrive as None instead of zero-filled
        # tensors: on a GPU each fill is a launch the host pays for
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, do, dlse, doc, dlse_c):
        return _backward_cat(ctx, do, dlse, doc, dlse_c, run_backward=_cat_triton_backward_eager)


def _cat_triton_backward_eager(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, chunk_size, scale):
    from fusedlab.triton_kernels import cat as tk

    # the dq kernel reads o and do (for delta) with q's row layout; contiguous() is free when they already are
    return tk.backward(do.contiguous(), None if doc is None else doc.contiguous(), q, k, v, kc, vc, qc,
                       o.contiguous(), lse, oc.contiguous(), lse_c, chunk_size, scale)


# ----------------------------------------------------------------------------------------------------------
# the C++ op (schemas in csrc/fusedlab.cpp, kernels in csrc/cpu/cat.cpp and csrc/cuda/cat.cu): fakes and the
# same autograd


@torch.library.register_fake("fusedlab::cat_attention")
def _fake_cat_cpu(q, k, v, kc, vc, qc, chunk_size, scale):
    B, H, L, d = q.shape
    Nc = 0 if qc is None else qc.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape), q.new_empty((B, H, L), dtype=acc), q.new_empty((B, H, Nc, d)),
            q.new_empty((B, H, Nc), dtype=acc))


@torch.library.register_fake("fusedlab::cat_attention_backward")
def _fake_cat_cpu_backward(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, chunk_size, scale):
    return [t.new_empty(t.shape) for t in (q, k, v, kc, vc) + ((qc,) if qc is not None else ())]


torch.library.register_autograd(
    "fusedlab::cat_attention",
    lambda ctx, *grads: _backward_cat(ctx, *grads, run_backward=torch.ops.fusedlab.cat_attention_backward),
    setup_context=_setup_cat)


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _chunk_int(chunk_size) -> int:
    """chunk_size as a Python int >= 1 (numpy and torch integer scalars too; bools are not sizes)."""
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        value = operator.index(chunk_size)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return value


def _check_inputs(q, k, v, kc, vc, qc, chunk_size, scale):
    named = [("q", q), ("k", k), ("v", v), ("kc", kc), ("vc", vc)] + ([("qc", qc)] if qc is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, length, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device}")
    chunk_size = _chunk_int(chunk_size)
    B, H, L, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != d:
        raise ValueError(f"k must be [B, Hkv, L, d] = [{B}, Hkv, {L}, {d}] to match q, got {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q's {H} heads must be a multiple of k's {Hkv} heads (grouped-query attention)")
    if kc.shape != vc.shape:
        raise ValueError(f"kc and vc must have one shape, got {tuple(kc.shape)} and {tuple(vc.shape)}")
    Nc = kc.shape[2]
    if kc.shape[0] != B or kc.shape[1] != Hkv or kc.shape[3] != d:
        raise ValueError(f"kc must be [B, Hkv, Nc, d] = [{B}, {Hkv}, Nc, {d}], got {tuple(kc.shape)}")
    need = -(-L // chunk_size)
    if Nc < need:
        raise ValueError(f"kc must have Nc >= ceil(L / chunk_size) = {need} slots (slot c is seen from chunk c "
                         f"on), got Nc = {Nc}")
    if qc is not None and tuple(qc.shape) != (B, H, Nc, d):
        raise ValueError(f"qc must be [B, H, Nc, d] = {[B, H, Nc, d]}, got {tuple(qc.shape)}")
    if scale is None:
        return chunk_size, (1.0 / math.sqrt(d) if d else 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return chunk_size, float(scale)


def _autocast_dtype(q) -> Optional[torch.dtype]:
    """The dtype inputs are cast to under torch.autocast (as scaled_dot_product_attention), else None."""
    kind = q.device.type if isinstance(q, torch.Tensor) else ""
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


# ----------------------------------------------------------------------------------------------------------
# public wrapper


def cat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  chunk_size: int, qc: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  return_lse: bool = False, backend: str = "auto"):
    """CAT attention over a raw and a compressed key stream, in one softmax per query.

    Raw token t in chunk b = t // chunk_size attends to the compressed slots kc[0..b] and to the raw keys
    k[b * chunk_size .. t]; compressed query c (``qc``, optional) attends to kc[0..c].

    Args:
        q: [B, H, L, d] raw queries.
        k, v: [B, Hkv, L, d] raw keys and values; H must be a multiple of Hkv (grouped-query attention).
        kc, vc: [B, Hkv, Nc, d] compressed slots, Nc >= ceil(L / chunk_size): slot 0 the learned start slot,
            slot c >= 1 the compression of chunk c - 1.
        chunk_size: l >= 1; L need not be a multiple of it.
        qc: optional [B, H, Nc, d] compressed queries.
        scale: score scale, default 1 / sqrt(d).
        return_lse: also return the log-sum-exp of each query's scaled scores (float32; float64 for float64),
            without a gradient on every backend (as FlashAttention's): a loss that uses it gets no gradient
            through it.
        backend: "auto" (CUDA tensors: "triton"; CPU tensors: "cpu"), "cuda" (head dims 64 and 128; fp32
            arithmetic on CUDA cores, no tensor cores yet), "triton", "cpu" or "reference".

    All inputs share one dtype (float16, bfloat16, float32; float64 on "cpu" and "reference") and device; under
    torch.autocast they are cast to the autocast dtype first. o and oc are differentiable in every input.

    Returns:
        o [B, H, L, d]; with ``qc``, (o, oc); with ``return_lse``, the log-sum-exps follow:
        (o, lse) or (o, oc, lse, lse_c).

    Example:
        >>> import torch, fusedlab
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
        >>> kc, vc = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(2))   # ceil(10 / 4) + 1 slots
        >>> o = fusedlab.ops.cat_attention(q, k, v, kc, vc, chunk_size=4)
        >>> o.shape
        torch.Size([1, 2, 10, 8])
        >>> # token 5 (chunk 1) sees slots 0..1 and raw keys 4..5: a dense softmax over exactly those
        >>> keys, vals = torch.cat([kc[..., :2, :], k[..., 4:6, :]], 2), torch.cat([vc[..., :2, :], v[..., 4:6, :]], 2)
        >>> w = torch.softmax(q[..., 5:6, :] @ keys.transpose(-1, -2) / 8 ** 0.5, -1)
        >>> torch.allclose(o[..., 5:6, :], w @ vals, atol=1e-6)
        True
    """
    cast = _autocast_dtype(q)
    if cast is not None:  # cast once, then compute exactly as outside autocast
        q, k, v, kc, vc, qc = [t.to(cast) if isinstance(t, torch.Tensor) else t for t in (q, k, v, kc, vc, qc)]
        with torch.autocast(q.device.type, enabled=False):
            return cat_attention(q, k, v, kc, vc, chunk_size, qc, scale, return_lse, backend)
    chunk_size, scale = _check_inputs(q, k, v, kc, vc, qc, chunk_size, scale)
    which = _backend.resolve(backend, _FAMILY, q.device)
    if which == "cuda" and (q.dtype == torch.float64 or q.shape[-1] not in _CUDA_DIMS):
        raise ValueError(f"backend='cuda' computes float16, bfloat16 or float32 with head dims {_CUDA_DIMS}, got "
                         f"{q.dtype} with head dim {q.shape[-1]}; use backend='triton' (head dims up to 128) "
                         "or 'reference'")
    if which == "triton":
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' computes in float16, bfloat16 or float32; float64 runs on "
                            "backend='reference'")
        if q.shape[-1] > 128:
            raise ValueError(f"backend='triton' takes head dims up to 128, got {q.shape[-1]}; larger ones run on "
                             "backend='reference'")
        args = [t.contiguous() for t in (q, k, v, kc, vc)] + [None if qc is None else qc.contiguous()]
        if torch.compiler.is_compiling():
            o, lse, oc, lse_c = torch.ops.fusedlab.cat_attention_triton(*args, chunk_size, scale)
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            o, lse, oc, lse_c = _EagerCATTriton.apply(*args, chunk_size, scale)
        else:  # no graph to record (inference, prefill): the kernels without the autograd.Function's cost
            from fusedlab.triton_kernels import cat as tk

            o, lse, oc, lse_c = tk.forward(*args, chunk_size, scale)
    elif which in ("cpu", "cuda"):  # one C++ op, a kernel per device
        o, lse, oc, lse_c = torch.ops.fusedlab.cat_attention(q, k, v, kc, vc, qc, chunk_size, scale)
    else:
        out = ref.cat_attention(q, k, v, kc, vc, chunk_size, qc, scale)
        # the log-sum-exps carry no gradient on any backend (as FlashAttention's): the kernels' backward
        # reads them, it does not differentiate them
        o, lse = out[0], out[1].detach()
        oc, lse_c = (out[2], out[3].detach()) if qc is not None else (None, None)
    if qc is None:
        return (o, lse) if return_lse else o
    return (o, oc, lse, lse_c) if return_lse else (o, oc)


@torch.library.custom_op("fusedlab::cat_decode_triton", mutates_args=())
def _cat_decode_triton(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_slots: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, n_raw: torch.Tensor, scale: float) -> torch.Tensor:
    from fusedlab.triton_kernels import cat as tk

    return tk.decode(q, kc, vc, n_slots, k, v, n_raw, scale)


@torch.library.register_fake("fusedlab::cat_decode_triton")
def _fake_cat_decode_triton(q, kc, vc, n_slots, k, v, n_raw, scale):
    return q.new_empty(q.shape)


# the C++ op (schema in csrc/fusedlab.cpp; CPU kernel in csrc/cpu/cat.cpp, CUDA kernel in csrc/cuda/cat.cu)


@torch.library.register_fake("fusedlab::cat_decode")
def _fake_cat_decode(q, kc, vc, n_slots, k, v, n_raw, scale):
    return q.new_empty(q.shape)


def _cat_decode_no_backward(ctx, grad):
    raise RuntimeError("fusedlab::cat_decode has no backward (generation is inference only); for gradients call "
                       "fusedlab.ops.cat_decode with backend='reference', or cat_attention")


# registered so a backward through the op is a clear error rather than torch's silent fallback
torch.library.register_autograd("fusedlab::cat_decode", _cat_decode_no_backward,
                                setup_context=lambda ctx, inputs, output: None)


def cat_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, n_raw: torch.Tensor, scale: Optional[float] = None,
               backend: str = "auto") -> torch.Tensor:
    """CAT attention for generation: one new query per sequence against a compressed cache.

    Args:
        q: [B, H, d], the new query of each sequence.
        kc, vc: [B, Hkv, S, d] compressed-slot cache; sequence b has its first ``n_slots[b]`` filled.
        n_slots: [B] integer tensor, 1 <= n_slots[b] <= S.
        k, v: [B, Hkv, R, d] the current chunk's raw keys; the first ``n_raw[b]`` filled (0 allowed).
        n_raw: [B] integer tensor, 0 <= n_raw[b] <= R. Fills on the CPU are checked (a ValueError); fills
            on the GPU are not checked on the host, which would synchronize every step: the Triton kernel
            clamps them to the cache, the CUDA kernel raises a device-side assertion.
        scale: default 1 / sqrt(d).

        backend: "auto" (CUDA tensors: "triton"; CPU tensors: "cpu", or "reference" when a gradient is
            needed), "triton" (one program per sequence and kv head carrying its query heads through one online
            softmax), "cuda" (split-K: each sequence's keys cut into shares spread over the GPU, partial softmax
            states combined by a second kernel; float16, bfloat16, float32 with head dims 64 and 128), "cpu"
            (a C++ loop per sequence and head, any float dtype, float64 exact) or "reference" (a masked softmax
            over all S + R keys per query).

    Returns [B, H, d]: one softmax over the filled slots and raw keys, accumulated in float32 (float64 for
    float64). Under torch.autocast the inputs are cast to the autocast dtype first, as in cat_attention. Inference only on "triton", "cuda" and "cpu" (a backward through them is an error); "reference"
    is differentiable.

    Example:
        >>> import torch, fusedlab
        >>> q = torch.randn(2, 4, 8); kc, vc = torch.randn(2, 2, 2, 5, 8); k, v = torch.randn(2, 2, 2, 3, 8)
        >>> o = fusedlab.ops.cat_decode(q, kc, vc, torch.tensor([5, 2]), k, v, torch.tensor([1, 0]))
        >>> o.shape
        torch.Size([2, 4, 8])
    """
    for name, t in (("q", q), ("kc", kc), ("vc", vc), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor")
    cast = _autocast_dtype(q)
    if cast is not None:  # as cat_attention: cast once, then compute exactly as outside autocast
        q, kc, vc, k, v = (t.to(cast) for t in (q, kc, vc, k, v))
        with torch.autocast(q.device.type, enabled=False):
            return cat_decode(q, kc, vc, n_slots, k, v, n_raw, scale, backend)
    if q.dim() != 3 or kc.dim() != 4 or k.dim() != 4 or kc.shape != vc.shape or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, d], kc = vc [B, Hkv, S, d], k = v [B, Hkv, R, d]; got q "
                         f"{tuple(q.shape)}, kc {tuple(kc.shape)}, vc {tuple(vc.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == kc.dtype == vc.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, kc, vc, k, v must share one dtype, got {q.dtype}, {kc.dtype}, {vc.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    B, H, d = q.shape
    if kc.shape[0] != B or k.shape[0] != B or kc.shape[3] != d or k.shape[3] != d or kc.shape[1] != k.shape[1]:
        raise ValueError("kc, vc, k, v must share q's batch and head dim and one kv head count")
    if kc.shape[1] < 1 or H % kc.shape[1]:
        raise ValueError(f"q's {H} heads must be a multiple of the cache's {kc.shape[1]} kv heads")
    for name, n, size, low in (("n_slots", n_slots, kc.shape[2], 1), ("n_raw", n_raw, k.shape[2], 0)):
        if not isinstance(n, torch.Tensor) or n.shape != (B,) or n.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor of shape [{B}]")
        # checked on the host for CPU tensors only: for device tensors it would synchronize every decode step
        # (per layer, per token); the GPU kernels keep the fills inside the cache instead
        if n.device.type == "cpu" and not torch.compiler.is_compiling() and n.numel() and (
                int(n.min()) < low or int(n.max()) > size):
            raise ValueError(f"{name} must lie in [{low}, {size}], got {n.tolist()}")
    which = _backend.resolve(backend, _FAMILY, q.device)
    if backend == "auto" and which == "cpu" and torch.is_grad_enabled() and \
            any(t.requires_grad for t in (q, kc, vc, k, v)):
        which = "reference"  # the C++ loop has no backward; the reference does
    if backend == "auto" and which == "triton" and "cuda" in _backend.backends() and d in _CUDA_DIMS \
            and q.dtype != torch.float64:
        which = "cuda"  # the split-K kernel: 0.066 against 0.076 ms (H100, B = 256, L = 4096, l = 16, bf16)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if which == "triton":
        if q.dtype == torch.float64 or q.shape[-1] > 128:
            raise ValueError("backend='triton' decodes float16, bfloat16 or float32 with head dims up to 128")
        args = [t.contiguous() for t in (q, kc, vc)] + [n_slots.to(q.device, torch.int64).contiguous()] + \
            [t.contiguous() for t in (k, v)] + [n_raw.to(q.device, torch.int64).contiguous()]
        return torch.ops.fusedlab.cat_decode_triton(*args, scale)
    if which == "cuda":
        if q.dtype == torch.float64 or d not in _CUDA_DIMS:
            raise ValueError(f"backend='cuda' decodes float16, bfloat16 or float32 with head dims "
                             f"{' or '.join(map(str, _CUDA_DIMS))}, got {q.dtype} with head dim {d}; "
                             "backend='triton' or 'reference' cover the rest")
        return torch.ops.fusedlab.cat_decode(q, kc, vc, n_slots.to(q.device, torch.int64), k, v,
                                             n_raw.to(q.device, torch.int64), scale)
    if which == "cpu":
        return torch.ops.fusedlab.cat_decode(q, kc, vc, n_slots, k, v, n_raw, scale)
    return ref.cat_decode(q, kc, vc, n_slots.to(q.device), k, v, n_raw.to(q.device), scale)
