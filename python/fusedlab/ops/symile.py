"""The Symile contrastive loss and MIP scoring: ``symile_loss``, ``mip``.

Semantics: python/fusedlab/reference/symile.py (the loss exactly as the ``symile`` 0.1.0 package defines it).
"n_squared" implementations (the two kernels stream tiles of the one logit tensor every anchor shares, with
an online log-sum-exp per anchor, save only the [M, N] statistics and recompute the tiles in the backward):

* "triton" (triton_kernels/symile.py, M = 2..4, fp32/fp16/bf16): a fused forward and backward that never
  form the logits or the N^(M-1) x d products, wrapped as the custom ops
  ``fusedlab::symile_n_squared_triton`` and ``fusedlab::symile_n_squared_triton_backward``. The backward
  adds partial sums with atomics; under torch.use_deterministic_algorithms it stores per-program partial
  sums that torch adds in a fixed order (one more pass over the tiles for M >= 3).
* "cpu" (csrc/cpu/symile.cpp, ``torch.ops.fusedlab.symile_n_squared`` and its backward op).
* "cuda" (csrc/include/fusedlab/symile_cuda.cuh, the same C++ ops on CUDA tensors, M = 2..8): fused
  kernels that form [32 x 32] tiles of the logits in fp32 on CUDA cores (no tensor cores yet) and keep
  every anchor's online log-sum-exp as per-block partial pairs; the backward adds its gradient sums with
  fp32 atomics (refused under torch.use_deterministic_algorithms). Memory: the partials and M fp32
  [N, d] sums. Correct on an H200 but about 10 TFLOP/s (136 ms at N = 512, d = 1024 against the GEMM chunks'
  15 ms), so "auto" does not take it.
* the GEMM chunks (ops/symile_gemm.py, the custom ops ``fusedlab::symile_n_squared_gemm`` and its backward),
  which "auto" takes on CUDA tensors where they measured faster (below): the same tiles as library GEMMs,
  one chunk of tuples at a time (fp32 logits from tensor-core products), with the log-sum-exps and
  gradient weights as ATen element-wise ops; one chunk of 2^25 logits and a few buffers of its size are
  held at a time, and the products run at the vendor GEMM's speed.
* "reference": builds the N^M tensor (the oracle).

"n" is a CLIP-sized computation (M GEMMs of N x N x d) and runs as ATen ops on every backend.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence

import torch

from fusedlab import _backend
from fusedlab.reference import symile as ref

_FAMILY = "symile"
STRATEGIES = ref.STRATEGIES
#: "auto" on CUDA tensors takes the GEMM chunks from these sizes on and the Triton kernels
#: below them: on an H100 (bf16, M = 3) the GEMM chunks ran 1.7x (N = 256), 2.5x (512) and 2.9x (1024) faster
#: than the Triton kernels at d = 1024, and 0.6-0.9x at d = 256 (bench/results/gpu/h100-2/symile_gpu.json).
#: float32 always takes the chunks: the Triton kernels' float32 gradients erred 7-10x torch's at logits in
#: the thousands on the H100 (tests/test_symile_triton.py, large logits)
GEMM_MIN_N, GEMM_MIN_D = 256, 512
_CUDA_MAX_M = 8  # modalities the CUDA kernels take (fusedlab/symile_cuda.cuh, kMaxModalities)
_TRITON_MIP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPP_MIP_DTYPES = {"cpu": _TRITON_MIP_DTYPES + (torch.float64,), "cuda": _TRITON_MIP_DTYPES}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedlab::symile_n_squared")
def _fake_symile_n_squared(reps, logit_scale, chunk):
    r0 = reps[0]
    return r0.new_empty((), dtype=r0.dtype), r0.new_empty((len(reps), r0.shape[0]), dtype=_acc_dtype(r0.dtype))


@torch.library.register_fake("fusedlab::symile_n_squared_backward")
def _fake_symile_n_squared_backward(grad, reps, logit_scale, lse, chunk):
    return [r.new_empty(r.shape) for r in reps], logit_scale.new_empty(logit_scale.shape)


def _setup_n_squared(ctx, inputs, output):
    reps, logit_scale, chunk = inputs
    ctx.save_for_backward(logit_scale, output[1], *reps)
    ctx.chunk = chunk
    ctx.mark_non_differentiable(output[1])


def _backward_n_squared(ctx, grad_loss, grad_lse):
    logit_scale, lse, *reps = ctx.saved_tensors
    grad_reps, grad_scale = torch.ops.fusedlab.symile_n_squared_backward(grad_loss, reps, logit_scale, lse, ctx.chunk)
    return list(grad_reps), grad_scale, None


torch.library.register_autograd("fusedlab::symile_n_squared", _backward_n_squared, setup_context=_setup_n_squared)


# the Triton backend, wrapped as custom ops so opcheck and torch.compile see it like the C++ ops
@torch.library.custom_op("fusedlab::symile_n_squared_triton", mutates_args=())
def _symile_triton(reps: list[torch.Tensor], logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedlab.triton_kernels import symile as tk

    return tk.forward(reps, logit_scale)


@_symile_triton.register_fake
def _fake_symile_triton(reps, logit_scale):
    r0 = reps[0]
    return r0.new_empty((), dtype=r0.dtype), r0.new_empty((len(reps), r0.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fusedlab::symile_n_squared_triton_backward", mutates_args=())
def _symile_triton_backward(grad: torch.Tensor, reps: list[torch.Tensor], logit_scale: torch.Tensor,
                            lse: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    from fusedlab.triton_kernels import symile as tk

    # checked when the backward runs: the default path adds fp32 partial sums with atomics
    grads, grad_scale = tk.backward(grad, reps, logit_scale, lse,
                                    deterministic=torch.are_deterministic_algorithms_enabled())
    return grads, grad_scale


@_symile_triton_backward.register_fake
def _fake_symile_triton_backward(grad, reps, logit_scale, lse):
    return [r.new_empty(r.shape) for r in reps], logit_scale.new_empty(logit_scale.shape)


def _setup_n_squared_triton(ctx, inputs, output):
    reps, logit_scale = inputs
    ctx.save_for_backward(logit_scale, output[1], *reps)
    ctx.mark_non_differentiable(output[1])


def _backward_n_squared_triton(ctx, grad_loss, grad_lse):
    logit_scale, lse, *reps = ctx.saved_tensors
    grad_reps, grad_scale = torch.ops.fusedlab.symile_n_squared_triton_backward(grad_loss, reps, logit_scale, lse)
    return list(grad_reps), grad_scale


torch.library.register_autograd("fusedlab::symile_n_squared_triton", _backward_n_squared_triton,
                                setup_context=_setup_n_squared_triton)


# the GEMM chunks "auto" takes on CUDA tensors (ops/symile_gemm.py), as custom ops like the kernels
@torch.library.custom_op("fusedlab::symile_n_squared_gemm", mutates_args=())
def _symile_gemm(reps: list[torch.Tensor], logit_scale: torch.Tensor,
                 tile_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedlab.ops import symile_gemm

    # autocast off in both passes: the backward recomputes the forward's logits and needs the same ones
    with torch.autocast(reps[0].device.type, enabled=False):
        return symile_gemm.forward(reps, logit_scale, tile_elems)


@_symile_gemm.register_fake
def _fake_symile_gemm(reps, logit_scale, tile_elems):
    r0 = reps[0]
    return r0.new_empty((), dtype=r0.dtype), r0.new_empty((len(reps), r0.shape[0]), dtype=_acc_dtype(r0.dtype))


@torch.library.custom_op("fusedlab::symile_n_squared_gemm_backward", mutates_args=())
def _symile_gemm_backward(grad: torch.Tensor, reps: list[torch.Tensor], logit_scale: torch.Tensor, lse: torch.Tensor,
                          tile_elems: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    from fusedlab.ops import symile_gemm

    with torch.autocast(reps[0].device.type, enabled=False):
        return symile_gemm.backward(grad, reps, logit_scale, lse, tile_elems)


@_symile_gemm_backward.register_fake
def _fake_symile_gemm_backward(grad, reps, logit_scale, lse, tile_elems):
    return [r.new_empty(r.shape) for r in reps], logit_scale.new_empty(logit_scale.shape)


def _backward_n_squared_gemm(ctx, grad_loss, grad_lse):
    logit_scale, lse, *reps = ctx.saved_tensors
    grad_reps, grad_scale = torch.ops.fusedlab.symile_n_squared_gemm_backward(grad_loss, reps, logit_scale, lse,
                                                                              ctx.chunk)
    return list(grad_reps), grad_scale, None


torch.library.register_autograd("fusedlab::symile_n_squared_gemm", _backward_n_squared_gemm,
                                setup_context=_setup_n_squared)


# mip on the Triton kernel, as a custom op; its backward is the reference's (recomputed with autograd)
@torch.library.custom_op("fusedlab::mip_triton", mutates_args=())
def _mip_triton(candidates: torch.Tensor, queries: list[torch.Tensor]) -> torch.Tensor:
    from fusedlab.triton_kernels import symile as tk

    return tk.mip(candidates, queries)


@_mip_triton.register_fake
def _fake_mip_triton(candidates, queries):
    B = max([q.shape[0] for q in queries if q.dim() == 2], default=1)
    return candidates.new_empty((B, candidates.shape[0]))


def _setup_mip(ctx, inputs, output):
    candidates, queries = inputs
    ctx.save_for_backward(candidates, *queries)


def _backward_mip(ctx, grad):
    candidates, *queries = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (candidates, *queries)]
        out = ref.mip(inputs[0], inputs[1:])
        grads = torch.autograd.grad(out, inputs, grad)
    return grads[0], list(grads[1:])


torch.library.register_autograd("fusedlab::mip_triton", _backward_mip, setup_context=_setup_mip)


# the C++ op (csrc/fusedlab.cpp; CPU kernel in csrc/cpu/symile.cpp, CUDA kernel in csrc/cuda/symile.cu)
@torch.library.register_fake("fusedlab::mip")
def _fake_mip(candidates, queries):
    return _fake_mip_triton(candidates, queries)


torch.library.register_autograd("fusedlab::mip", _backward_mip, setup_context=_setup_mip)


def _check_reps(reps, name: str = "reps") -> list[torch.Tensor]:
    if isinstance(reps, torch.Tensor) or not isinstance(reps, Sequence):
        raise TypeError(f"{name} must be a list of M tensors [N, d], got {type(reps).__name__}")
    reps = list(reps)
    if len(reps) < 2:
        raise ValueError(f"{name} must hold at least 2 modalities (M >= 2), got {len(reps)}")
    for m, r in enumerate(reps):
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"{name}[{m}] must be a torch.Tensor, got {type(r).__name__}")
        if r.dim() != 2:
            raise ValueError(f"{name}[{m}] must be 2-D [N, d], got shape {tuple(r.shape)}")
        if not r.dtype.is_floating_point:
            raise TypeError(f"{name}[{m}] must be a floating-point tensor, got dtype {r.dtype}")
        if r.device != reps[0].device:
            raise ValueError(f"{name}[{m}] must be on {reps[0].device} like {name}[0], got {r.device}")
        if r.shape[0] != reps[0].shape[0]:
            raise ValueError(f"{name}[{m}] must have N = {reps[0].shape[0]} rows like {name}[0] (one row per "
                             f"sample), got {r.shape[0]}")
        if r.shape[1] != reps[0].shape[1]:
            raise ValueError(f"{name}[{m}] must have d = {reps[0].shape[1]} columns like {name}[0], got {r.shape[1]}")
    if reps[0].shape[0] < 1:
        raise ValueError(f"{name} must have N >= 1 rows, got shape {tuple(reps[0].shape)}")
    dtype = functools.reduce(torch.promote_types, [r.dtype for r in reps])
    return [r.to(dtype) for r in reps]


def _check_logit_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar (a float or a one-element tensor), got shape "
                             f"{tuple(logit_scale.shape)}")
        if not logit_scale.dtype.is_floating_point:
            return logit_scale.to(device=like.device, dtype=like.dtype)
        return logit_scale.to(like.device)
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):  # numpy scalars too
        return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)
    raise TypeError(f"logit_scale must be a scalar (a float or a one-element tensor), got "
                    f"{type(logit_scale).__name__}")


def _check_permutations(permutations, M: int, N: int, device: torch.device) -> torch.Tensor:
    perms = permutations if isinstance(permutations, torch.Tensor) else torch.as_tensor(permutations)
    if perms.shape != (M, M - 1, N):
        raise ValueError(f"permutations must have shape [M, M-1, N] = [{M}, {M - 1}, {N}] (one permutation of "
                         f"the N rows per anchor and other modality), got {tuple(perms.shape)}")
    if perms.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"permutations must be an int64 tensor, got dtype {perms.dtype}")
    perms = perms.to(device=device, dtype=torch.int64)
    if not torch.compiler.is_compiling():  # a data-dependent check: skipped while tracing
        want = torch.arange(N, device=device).expand(M, M - 1, N)
        if not torch.equal(perms.sort(dim=-1).values, want):
            raise ValueError("permutations: every [a, b] row must be a permutation of 0..N-1")
    return perms


def symile_loss(reps: Sequence[torch.Tensor], logit_scale, negative_sampling: str = "n",
                permutations: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                backend: str = "auto", process_group=None) -> torch.Tensor:
    """The Symile loss of M modalities, averaged over anchors exactly as ``symile.Symile`` 0.1.0 defines it.

    Args:
        reps: list of M >= 2 tensors [N, d] (row n of every modality is one positive tuple).
        logit_scale: the scale applied to the logits, already exponentiated (as the package takes it), a
            float or a one-element tensor; its gradient is returned when it requires grad.
        negative_sampling: "n" (N - 1 shuffled negatives per row, the package's default) or "n_squared"
            (every combination of the other modalities' rows: N^(M-1) - 1 negatives per row).
        permutations: "n" only: [M, M-1, N] int64, the permutation applied to each anchor's other
            modalities in list order. Default: drawn with torch.randperm(N) in the package's order from
            ``generator``, or from the global RNG (then seeding torch as for the package replays its draws).
        generator: "n" only: the torch.Generator the permutations are drawn from.
        backend: "auto" (CPU tensors: "cpu"; CUDA tensors: "triton" for float16/bfloat16 below N = 256
            or d = 512, else chunks of library GEMMs, any M and dtype), "cuda" (CUDA tensors: the fused
            CUDA kernels, M = 2..8 in float32/float16/bfloat16, fp32 on CUDA cores), "triton" ("n_squared"
            with M = 2..4 in float32/float16/bfloat16), "cpu" or "reference" ("n_squared" there builds the
            N^M tensor); "n" runs as ATen ops on every backend.
        process_group: a torch.distributed group: each rank passes its own rows, the negatives come from
            every rank's rows (all-gathered with gradient, rank order), and every rank returns the loss of
            the global batch. The backward gives each rank's rows the gradient summed over the ranks'
            losses, i.e. world size times the global loss's gradient, which DDP's averaging of parameter
            gradients turns into exactly the global-batch gradient (open_clip's gather-with-grad
            convention); logit_scale gets the global loss's gradient. "n" permutations cover the global
            batch and must be the same on every rank (pass them, or seed the generator alike).

    "n_squared" on the C++ kernel never forms the N^(M-1) x d products: its extra memory is a few tiles of
    about 2^19 elements each, and N^(M-2) floats for M >= 4. float16/bfloat16 inputs are computed in float32.
    The Triton kernels keep tiles on chip: their extra memory is partial log-sum-exps (O(N) per program,
    N^(M-2) per block pair for M >= 3) and the fp32 gradient sums; fp16/bf16 products run on tensor cores
    with fp32 accumulation.

    Example:
        >>> import torch, fusedlab
        >>> g = torch.Generator().manual_seed(0)
        >>> reps = [torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1) for _ in range(3)]
        >>> loss = fusedlab.ops.symile_loss(reps, torch.tensor(10.0), "n_squared")
        >>> exact = fusedlab.reference.symile.symile_loss_n_squared([r.double() for r in reps], 10.0)
        >>> abs(loss.item() - exact.item()) < 1e-5
        True
    """
    reps = _check_reps(reps)
    if process_group is not None:
        reps = _gather_with_grad(reps, process_group)
    M, N = len(reps), reps[0].shape[0]
    scale = _check_logit_scale(logit_scale, reps[0])
    if not isinstance(negative_sampling, str) or negative_sampling not in STRATEGIES:
        raise ValueError(f"negative_sampling must be one of {STRATEGIES}, got {negative_sampling!r}")
    which = _backend.resolve(backend, _FAMILY, reps[0].device)
    if negative_sampling == "n_squared":
        if permutations is not None or generator is not None:
            raise ValueError("permutations and generator apply to negative_sampling='n' only")
        if which == "triton" and (reps[0].dtype == torch.float64 or M > 4):
            if backend != "auto":
                raise ValueError(f"backend='triton' runs 'n_squared' for M = 2..4 in float32, float16 or bfloat16, "
                                 f"got M = {M} and {reps[0].dtype}; use backend='auto' (the GEMM chunks) or "
                                 "'reference' (or 'cpu' for CPU tensors)")
            which = "gemm"  # what the Triton kernels do not cover: the GEMM chunks (any M and dtype)
        elif which == "triton" and backend == "auto" and (
                reps[0].dtype == torch.float32 or (N >= GEMM_MIN_N and reps[0].shape[1] >= GEMM_MIN_D)):
            which = "gemm"
        elif which == "reference" and backend == "auto" and reps[0].is_cuda:
            which = "gemm"  # CUDA without Triton: the GEMM chunks are plain ATen, not the N^M oracle
        if which == "reference":
            return ref.symile_loss_n_squared(reps, scale.reshape(()))
        if which == "cuda" and (reps[0].dtype == torch.float64 or M > _CUDA_MAX_M):
            raise ValueError(f"backend='cuda' runs 'n_squared' for M = 2..{_CUDA_MAX_M} in float32, float16 or "
                             f"bfloat16, got M = {M} and {reps[0].dtype}; use backend='auto' (the GEMM chunks) or "
                             "'reference'")
        if which == "gemm":
            from fusedlab.ops.symile_gemm import TILE_ELEMS

            loss, _ = torch.ops.fusedlab.symile_n_squared_gemm(reps, scale, TILE_ELEMS)
            return loss
        if which == "triton":
            loss, _ = torch.ops.fusedlab.symile_n_squared_triton(reps, scale)
            return loss
        loss, _ = torch.ops.fusedlab.symile_n_squared(reps, scale, 0)  # the CPU or the CUDA kernel
        return loss
    if permutations is not None and generator is not None:
        raise ValueError("pass permutations or generator, not both")
    if permutations is None:
        permutations = ref.draw_permutations(M, N, generator)
    perms = _check_permutations(permutations, M, N, reps[0].device)
    return ref.symile_loss_n(reps, scale.reshape(()), perms)


def _gather_with_grad(reps, group):
    """Every rank's rows of each modality, concatenated in rank order; differentiable (the backward sums
    the gradients that all ranks' losses send to each rank's rows)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, [tuple(r.shape) for r in reps], group=group)
    if any(s != sizes[0] for s in sizes):
        raise ValueError(f"every rank must pass reps of the same shapes, got {sizes}")
    return [torch.cat(all_gather(r, group=group)) for r in reps]


def mip(candidates: torch.Tensor, query_reps: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """Multilinear inner products of each query tuple with every candidate, for zero-shot retrieval.

    ``candidates`` [C, d]; ``query_reps`` a list of [B, d] or [d] tensors (argument order as the package's
    MIPSimilarity). Returns [B, C] (B = 1 for 1-D queries): row b holds sum_t q_1[b, t] ... q_k[b, t] c[t]
    for every candidate c. The logit scale is not applied (multiply by it for logits).

    ``backend``: "auto" (always "reference", measured fastest below), "triton" (one fused pass that forms
    the query product per tile and never stores it), "cuda" (a fused pass like the Triton kernel's, fp32 on
    CUDA cores), "cpu" (the C++ op: the query product in fp32, float64 for float64, then one BLAS GEMM) or
    "reference" (the ATen product and one GEMM in the inputs' dtypes, as the package computes it). The
    [B, d] query product the fused passes avoid storing is small next to the [B, C] scores, and the library
    GEMM is the faster product: on an H200 at B = 4096, C = 8192, d = 1024 in bfloat16 the package's
    MIPSimilarity (the same product and GEMM) took 0.125 ms, the Triton pass 0.208 ms and the CUDA pass
    7.8 ms; on a 2-core CPU "reference" against "cpu" 0.44 against 0.47 ms at B = 256, C = 1024, d = 256 in
    float32 and 0.11 against 0.16 ms in bfloat16. Differentiable on every backend.

    Example:
        >>> import torch, fusedlab
        >>> c = torch.eye(3)
        >>> fusedlab.ops.mip(c, [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2.0, 0.5, 1.0])])
        tensor([[2., 1., 3.]])
    """
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2:
        got = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
        raise ValueError(f"candidates must be a 2-D tensor [C, d], got {got}")
    if isinstance(query_reps, torch.Tensor) or not isinstance(query_reps, Sequence) or len(query_reps) == 0:
        raise ValueError("query_reps must be a non-empty list of [B, d] or [d] tensors")
    d = candidates.shape[1]
    batch = None
    for m, q in enumerate(query_reps):
        if not isinstance(q, torch.Tensor) or q.dim() not in (1, 2):
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"query_reps[{m}] must be a [B, d] or [d] tensor, got {got}")
        if q.shape[-1] != d:
            raise ValueError(f"query_reps[{m}] must have d = {d} features like candidates [C, d], got {q.shape[-1]}")
        if q.dim() == 2 and q.shape[0] != 1:  # one row broadcasts, as in the package's product
            if batch is not None and q.shape[0] != batch:
                raise ValueError(f"query_reps[{m}] must have B = {batch} rows like the other 2-D queries (or 1), "
                                 f"got {q.shape[0]}")
            batch = q.shape[0]
    queries = list(query_reps)
    if batch is not None and backend != "auto":  # the kernels take whole batches: broadcast rows expanded
        queries = [q.expand(batch, d) if q.dim() == 2 and q.shape[0] == 1 else q for q in queries]
    # "auto" runs the reference, measured fastest on CPU and CUDA tensors (docstring)
    which = "reference" if backend == "auto" else _backend.resolve(backend, _FAMILY, candidates.device)
    same = all(q.dtype == candidates.dtype and q.device == candidates.device for q in queries)
    if which == "triton" and not (same and candidates.dtype in _TRITON_MIP_DTYPES):
        raise ValueError("backend='triton' scores float16, bfloat16 or float32 candidates and queries of one "
                         f"dtype and device, got {candidates.dtype} and {[q.dtype for q in queries]}")
    if which in ("cpu", "cuda") and not (same and candidates.dtype in _CPP_MIP_DTYPES[which]):
        raise ValueError(f"backend={which!r} scores candidates and queries of one dtype and device among "
                         f"{_CPP_MIP_DTYPES[which]}, got {candidates.dtype} and {[q.dtype for q in queries]}")
    if which == "triton":
        if len(queries) > 3:  # the kernel takes three queries: fold the first ones, in the reference's order
            head = queries[0]
            for q in queries[1:-2]:
                head = head * q
            queries = [head] + queries[-2:]
        return torch.ops.fusedlab.mip_triton(candidates, queries)
    if which in ("cpu", "cuda"):
        return torch.ops.fusedlab.mip(candidates, queries)
    return ref.mip(candidates, queries)
