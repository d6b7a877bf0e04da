"""Batched particle resampling: ``resample``, ``gather`` and ``gather_``.

One fused pass per group of K particles computes the effective sample size, the log mean weight, decides
whether to resample and draws the ancestors; see python/fusedlab/reference/resample.py for the exact
semantics every backend follows, and docs/api.md for the user-facing description.
"""
from __future__ import annotations

import difflib
import math
from typing import NamedTuple, Optional

import torch

from fusedlab import _C, _backend
from fusedlab.reference import resample as ref

_FAMILY = "resample"
METHODS = ref.METHODS
_ON_DEGENERATE = ("raise", "uniform")


class ResampleResult(NamedTuple):
    """What :func:`resample` returns; every field is per group [B] or per particle [B, K]."""

    ancestors: torch.Tensor  #: [B, K] int64, local indices into each group
    log_weights: torch.Tensor  #: [B, K] after the step: 0 where resampled, normalized to mean 1 where carried
    ess: torch.Tensor  #: [B] float64 effective sample size before the step (0 for a degenerate group)
    log_norm: torch.Tensor  #: [B] float64 log mean weight, logsumexp(lw) - log K (-inf when degenerate)
    resampled: torch.Tensor  #: [B] bool (a strided view: both flags come from one [B, 2] buffer)
    degenerate: torch.Tensor  #: [B] bool, groups with no finite log-weight (resampled uniformly)
    state: Optional[torch.Tensor] = None  #: the ``state=`` argument reordered by the ancestors, when given


# ----------------------------------------------------------------------------------------------------------
# fake kernels and autograd of the C++ ops (schemas in csrc/fusedlab.cpp)


def _fake_resample(log_weights, uniforms, method, ess_threshold, generator=None, raise_degenerate=False):
    B, K = log_weights.shape
    f64 = dict(dtype=torch.float64, device=log_weights.device)
    return (
        torch.empty_like(log_weights, memory_format=torch.contiguous_format),
        log_weights.new_empty((B, K), dtype=torch.int64),
        torch.empty((B,), **f64),
        torch.empty((B,), **f64),
        log_weights.new_empty((B, 2), dtype=torch.uint8),
    )


def _fake_resample_gather(log_weights, uniforms, method, ess_threshold, state, generator=None,
                          raise_degenerate=False):
    return _fake_resample(log_weights, uniforms, method, ess_threshold) + (
        torch.empty_like(state, memory_format=torch.contiguous_format),
    )


def _fake_gather(state, ancestors):
    return torch.empty_like(state, memory_format=torch.contiguous_format)


def _fake_gather_(state, ancestors):
    return None


def _grad_log_weights(log_weights, status, g_lw, g_ess, g_norm):
    """Gradient of (log_weights_out, ess, log_norm) with respect to the input log-weights.

    Carried groups: lw_out = x - logsumexp(x) + log K; log_norm = logsumexp(x) - log K; ess = 1 / sum p^2
    with p = softmax(x). Resampled groups have lw_out = 0. NaN and -inf inputs get zero gradient.
    """
    x = torch.nan_to_num(log_weights.detach().double(), nan=-math.inf)
    alive = (status[:, ref.FLAG_DEGENERATE] == 0).unsqueeze(-1)  # degenerate groups: constant outputs
    p = torch.where(alive, torch.softmax(torch.where(alive, x, torch.zeros_like(x)), -1), torch.zeros_like(x))
    p = torch.where(torch.isfinite(x), p, torch.zeros_like(p))
    grad = torch.zeros_like(x)
    if g_lw is not None:
        carried = (status[:, ref.FLAG_RESAMPLED] == 0).unsqueeze(-1)
        g = g_lw.double()
        grad = grad + torch.where(carried & torch.isfinite(x), g - p * g.sum(-1, keepdim=True), torch.zeros_like(g))
    if g_norm is not None:
        grad = grad + p * g_norm.double().unsqueeze(-1)
    if g_ess is not None:
        q = (p * p).sum(-1, keepdim=True)
        e = torch.where(q > 0, 1.0 / q, torch.zeros_like(q))
        grad = grad + g_ess.double().unsqueeze(-1) * (-2.0) * e * e * (p * p - p * q)
    return grad.to(log_weights.dtype)


def _gather_backward(grad_out, ancestors, state_shape):
    # children's gradients summed into their ancestor, in float32 at least (half types would lose them)
    B, K = ancestors.shape
    idx = ancestors.reshape(B, K, *([1] * (len(state_shape) - 2))).expand(grad_out.shape)
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    out = torch.zeros(state_shape, dtype=acc, device=grad_out.device).scatter_add_(1, idx, grad_out.to(acc))
    return out.to(grad_out.dtype)


def _setup_resample(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[4], output[1])
    # inputs: (log_weights, uniforms, method, ess_threshold[, state][, generator, raise_degenerate]) for the
    # C++ ops, without the last two for the Triton ones
    has_state = len(inputs) > 4 and isinstance(inputs[4], torch.Tensor)
    ctx.state_shape = tuple(inputs[4].shape) if has_state else None
    ctx.n_inputs = len(inputs)


def _backward_resample(ctx, g_lw, g_anc, g_ess, g_norm, g_status, g_state=None):
    log_weights, status, ancestors = ctx.saved_tensors
    grads = [_grad_log_weights(log_weights, status, g_lw, g_ess, g_norm), None, None, None]
    if ctx.state_shape is not None:
        grads.append(None if g_state is None else _gather_backward(g_state, ancestors, ctx.state_shape))
    return tuple(grads) + (None,) * (ctx.n_inputs - len(grads))  # the generator and the raise flag


def _setup_gather(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.state_shape = tuple(inputs[0].shape)


def _backward_gather(ctx, grad):
    (ancestors,) = ctx.saved_tensors
    return _gather_backward(grad, ancestors, ctx.state_shape), None


for _name, _fake in (("resample", _fake_resample), ("resample_gather", _fake_resample_gather),
                     ("gather", _fake_gather), ("gather_", _fake_gather_)):
    torch.library.register_fake(f"fusedlab::{_name}")(_fake)
torch.library.register_autograd("fusedlab::resample", _backward_resample, setup_context=_setup_resample)
torch.library.register_autograd("fusedlab::resample_gather", _backward_resample, setup_context=_setup_resample)
torch.library.register_autograd("fusedlab::gather", _backward_gather, setup_context=_setup_gather)


class _ReferenceResample(torch.autograd.Function):
    """The reference, with the kernels' gradient formula, so backend="reference" differentiates the same way."""

    @staticmethod
    def forward(ctx, log_weights, uniforms, method, ess_threshold):
        out = ref.resample(log_weights, uniforms, method, ess_threshold)
        ctx.save_for_backward(log_weights, out[4])
        ctx.mark_non_differentiable(out[1], out[4])
        return out

    @staticmethod
    def backward(ctx, g_lw, g_anc, g_ess, g_norm, g_status):
        log_weights, status = ctx.saved_tensors
        return _grad_log_weights(log_weights, status, g_lw, g_ess, g_norm), None, None, None


@torch.library.register_fake("fusedlab::fk_step")
def _fake_fk_step(log_weights, rewards, r_state, applied, log_norm, ess_history, resampled_history, row, state,
                  uniforms, generator, potential, lam, first, last, method, ess_threshold, raise_degenerate):
    anc = log_weights.new_empty(log_weights.shape, dtype=torch.int64)
    state_out = torch.empty_like(state, memory_format=torch.contiguous_format)
    return anc, state_out, r_state.new_empty((r_state.numel() if last else 0,))


# ----------------------------------------------------------------------------------------------------------
# the Triton backend, wrapped as custom ops so opcheck and torch.compile see it like the C++ ops


@torch.library.custom_op("fusedlab::resample_triton", mutates_args=())
def _resample_triton(log_weights: torch.Tensor, uniforms: torch.Tensor, method: str,
                     ess_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlab.triton_kernels import resample as tk

    anc, lw_out, ess, log_norm, status, _ = tk.resample(log_weights, uniforms, method, ess_threshold, None)
    return lw_out, anc, ess, log_norm, status


@torch.library.custom_op("fusedlab::resample_gather_triton", mutates_args=())
def _resample_gather_triton(log_weights: torch.Tensor, uniforms: torch.Tensor, method: str, ess_threshold: float,
                            state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    from fusedlab.triton_kernels import resample as tk

    anc, lw_out, ess, log_norm, status, state_out = tk.resample(log_weights, uniforms, method, ess_threshold, state)
    return lw_out, anc, ess, log_norm, status, state_out


@torch.library.custom_op("fusedlab::gather_triton", mutates_args=())
def _gather_triton(state: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    from fusedlab.triton_kernels import resample as tk

    return tk.gather(state, ancestors)


for _name, _fake in (("resample_triton", _fake_resample), ("resample_gather_triton", _fake_resample_gather),
                     ("gather_triton", _fake_gather)):
    torch.library.register_fake(f"fusedlab::{_name}")(_fake)
torch.library.register_autograd("fusedlab::resample_triton", _backward_resample, setup_context=_setup_resample)
torch.library.register_autograd("fusedlab::resample_gather_triton", _backward_resample,
                                setup_context=_setup_resample)
torch.library.register_autograd("fusedlab::gather_triton", _backward_gather, setup_context=_setup_gather)


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _check_method(method):
    if not isinstance(method, str) or method not in METHODS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"method must be one of {METHODS}, got {method!r}{extra}")


def _check_log_weights(log_weights):
    if not isinstance(log_weights, torch.Tensor):
        raise TypeError(f"log_weights must be a torch.Tensor, got {type(log_weights).__name__}")
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be 2-D [B groups, K particles], got shape {tuple(log_weights.shape)}")
    if log_weights.shape[1] == 0:
        raise ValueError(f"log_weights must have K >= 1 particles per group, got shape {tuple(log_weights.shape)}")
    if not log_weights.dtype.is_floating_point:
        raise TypeError(f"log_weights must be a floating-point tensor, got dtype {log_weights.dtype}")
    if log_weights.dtype not in (torch.float32, torch.float64):  # half types: computed in float32
        log_weights = log_weights.float()
    return log_weights


def _uniforms(log_weights, method, uniforms, generator):
    B, K = log_weights.shape
    shape = (B,) if method == "systematic" else (B, K)
    if uniforms is None:  # drawn in the op's layout (the same stream as shape [B]): no reshape per call
        return torch.rand((B, 1) if method == "systematic" else shape, dtype=torch.float64,
                          device=log_weights.device, generator=generator)
    if generator is not None:
        raise ValueError("pass either uniforms or generator, not both")
    if not isinstance(uniforms, torch.Tensor):
        raise TypeError(f"uniforms must be a torch.Tensor, got {type(uniforms).__name__}")
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must have shape {list(shape)} for method {method!r} (B={B}, K={K}), "
                         f"got {list(uniforms.shape)}")
    if uniforms.device != log_weights.device:
        raise ValueError(f"uniforms must be on {log_weights.device} like log_weights, got {uniforms.device}")
    if not uniforms.dtype.is_floating_point:
        raise TypeError(f"uniforms must be a floating-point tensor in [0, 1), got dtype {uniforms.dtype}")
    u = uniforms.to(torch.float64)
    in_range = ((u >= 0) & (u < 1)).all()
    if u.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(in_range):
            raise ValueError("uniforms must lie in [0, 1) (NaN is not allowed)")
    else:  # no host sync on a GPU or inside a compiled graph: a device-side assertion
        torch._assert_async(in_range, "fusedlab.resample: uniforms must lie in [0, 1)")
    return u.reshape(B, 1) if method == "systematic" else u


def check_state(state, B, K, device, name="state"):
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(state).__name__}")
    if state.dim() < 2 or state.shape[0] != B or state.shape[1] != K:
        raise ValueError(f"{name} must have shape [B, K, ...] = [{B}, {K}, ...], got {list(state.shape)}")
    if state.device != device:
        raise ValueError(f"{name} must be on {device} like the other tensors, got {state.device}")


def _check_ancestors(ancestors, state):
    if not isinstance(ancestors, torch.Tensor):
        raise TypeError(f"ancestors must be a torch.Tensor, got {type(ancestors).__name__}")
    if ancestors.dim() != 2:
        raise ValueError(f"ancestors must be 2-D [B, K], got shape {list(ancestors.shape)}")
    if ancestors.dtype.is_floating_point or ancestors.dtype == torch.bool or ancestors.dtype.is_complex:
        raise TypeError(f"ancestors must be an integer tensor, got dtype {ancestors.dtype}")
    check_state(state, ancestors.shape[0], ancestors.shape[1], ancestors.device)
    return ancestors.to(torch.int64)


# ----------------------------------------------------------------------------------------------------------
# public wrappers


def resample(log_weights: torch.Tensor, method: str = "systematic", ess_threshold: float = 1.0,
             uniforms: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
             on_degenerate: str = "raise", state: Optional[torch.Tensor] = None,
             backend: str = "auto") -> ResampleResult:
    """Resample B independent groups of K particles in one fused pass.

    Args:
        log_weights: [B, K] unnormalized log-weights, float32 or float64 (half types are computed in
            float32). NaN counts as -inf. Non-contiguous input is accepted.
        method: "systematic" (default), "stratified", "multinomial" or "residual".
        ess_threshold: resample a group when its ESS < ess_threshold * K; >= 1 always resamples, 0 never.
        uniforms: optional explicit randomness in [0, 1): shape [B] for systematic, [B, K] otherwise.
            Given the same uniforms every backend returns the same ancestors.
        generator: a torch.Generator for the uniforms when ``uniforms`` is None (eager only). The "cpu"
            kernel draws the values torch.rand would; the "cuda" kernel draws its own from the generator's
            Philox seed and offset inside the launch (the stream of
            ``fusedlab.reference.resample.philox_uniforms``), so one seed gives different ancestors there
            than on "triton" (which draws with torch.rand). Seeded runs are reproducible on each.
        on_degenerate: "raise" (ValueError naming the groups with no finite weight; on a GPU this check
            synchronizes with the host; inside torch.compile or a CUDA graph capture it is a device-side
            assertion instead) or "uniform" (resample those groups uniformly and flag them in
            ``degenerate``; no synchronization).
        state: optional per-particle tensor [B, K, ...], reordered by the ancestors in the same pass.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        :class:`ResampleResult` (ancestors, log_weights, ess, log_norm, resampled, degenerate, state).

    Example:
        >>> import torch, fusedlab
        >>> lw = torch.tensor([[0.0, 0.0, -1e9, 0.0], [0.0, -0.1, -0.2, -0.3]])
        >>> r = fusedlab.smc.resample(lw, ess_threshold=0.9, uniforms=torch.tensor([0.5, 0.5]))
        >>> r.ancestors.tolist()
        [[0, 1, 1, 3], [0, 1, 2, 3]]
        >>> r.resampled.tolist(), [round(e, 3) for e in r.ess.tolist()]
        ([True, False], [3.0, 3.951])
    """
    log_weights = _check_log_weights(log_weights)
    if method not in METHODS:
        _check_method(method)
    if not isinstance(ess_threshold, (int, float)) or not math.isfinite(ess_threshold) or ess_threshold < 0:
        raise ValueError(f"ess_threshold must be a finite number >= 0, got {ess_threshold!r}")
    if on_degenerate not in _ON_DEGENERATE:
        raise ValueError(f"on_degenerate must be one of {_ON_DEGENERATE}, got {on_degenerate!r}")
    B, K = log_weights.shape
    if state is not None:
        check_state(state, B, K, log_weights.device)
    which = _backend.resolve(backend, _FAMILY, log_weights.device)
    compiling = torch.compiler.is_compiling()
    # The C++ ops draw their own uniforms (no torch.rand call; on CUDA inside the kernel, so the call is one
    # launch) and check for degenerate groups themselves (no further tensor ops here); a compiled graph keeps
    # the explicit torch.rand, which Inductor traces, and the device-side assertion below.
    native = which in ("cpu", "cuda") and not compiling
    draws_own = native and uniforms is None
    u = None if draws_own else _uniforms(log_weights, method, uniforms, generator)
    thr = float(ess_threshold)
    # (inside CUDA graph capture the op must not synchronize: a device-side assertion instead)
    raise_in_op = native and on_degenerate == "raise" and not (which == "cuda" and _capturing())
    state_out = None
    records = torch.is_grad_enabled() and (log_weights.requires_grad or (state is not None and state.requires_grad))
    if which == "reference":
        lw_out, anc, ess, log_norm, status = _ReferenceResample.apply(log_weights, u, method, thr)
        if state is not None:
            state_out = ref.gather(state, anc)
    elif native and not records and _backend.plain_eager(log_weights, state, u):
        # nothing to record: the op without the boxed call from Python, the autograd layer or Python view ops on
        # the flags (fusedlab._C.resample); a [1, 1024] CPU call 17 to 13 us
        result = ResampleResult(*_C.resample(log_weights, u, method, thr, state, generator if draws_own else None,
                                             raise_in_op))
        if on_degenerate == "raise" and not raise_in_op:  # CUDA graph capture: the device-side assertion
            _raise_if_degenerate(result.degenerate)
        return result
    else:
        if which == "triton":
            op = torch.ops.fusedlab.resample_triton if state is None else torch.ops.fusedlab.resample_gather_triton
            args = (log_weights, u, method, thr) + (() if state is None else (state,))
        else:
            op = torch.ops.fusedlab.resample.default if state is None else torch.ops.fusedlab.resample_gather.default
            args = (log_weights, u, method, thr) + (() if state is None else (state,)) + (
                generator if draws_own else None, raise_in_op)
        # below the autograd layer (Python, about as costly as a small group's kernel) when no graph is recorded
        if not compiling and not records:
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
        else:
            out = op(*args)
        lw_out, anc, ess, log_norm, status = out[:5]
        state_out = out[5] if state is not None else None
    # status holds the two flags as 0/1 bytes [B, 2]: viewed as bool, both are views (no further kernels);
    # Inductor cannot lower a view as bool, and fuses the comparison into what reads it anyway
    flags = (status != 0 if torch.compiler.is_compiling() else status.view(torch.bool)).unbind(1)
    resampled, degenerate = flags[ref.FLAG_RESAMPLED], flags[ref.FLAG_DEGENERATE]
    if on_degenerate == "raise" and not raise_in_op:
        _raise_if_degenerate(degenerate)
    return ResampleResult(anc, lw_out, ess, log_norm, resampled, degenerate, state_out)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _raise_if_degenerate(degenerate):
    # no host sync inside a compiled graph or a CUDA graph capture: a device-side assertion
    if torch.compiler.is_compiling() or (degenerate.is_cuda and _capturing()):
        torch._assert_async(~degenerate.any(), "fusedlab.resample: a group has no finite log-weight")
        return
    if bool(degenerate.any()):
        groups = torch.nonzero(degenerate).flatten().tolist()
        shown = ", ".join(map(str, groups[:10])) + (", ..." if len(groups) > 10 else "")
        raise ValueError(f"log_weights: group(s) {shown} have no finite log-weight (all -inf or NaN, or +inf); "
                         "pass on_degenerate='uniform' to resample them uniformly instead")


def gather(state: torch.Tensor, ancestors: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Reorder a per-particle tensor: out[b, i, ...] = state[b, ancestors[b, i], ...], in one fused pass.

    Any trailing shape and dtype; differentiable in ``state``.

    Example:
        >>> import torch, fusedlab
        >>> x = torch.arange(6.0).reshape(1, 3, 2)
        >>> fusedlab.smc.gather(x, torch.tensor([[2, 2, 0]])).tolist()
        [[[4.0, 5.0], [4.0, 5.0], [0.0, 1.0]]]
    """
    ancestors = _check_ancestors(ancestors, state)
    which = _backend.resolve(backend, _FAMILY, state.device)
    if which == "reference":
        return ref.gather(state, ancestors)
    op = torch.ops.fusedlab.gather_triton.default if which == "triton" else torch.ops.fusedlab.gather.default
    if not torch.compiler.is_compiling() and (not torch.is_grad_enabled() or not state.requires_grad):
        with torch._C._AutoDispatchBelowAutograd():  # no graph to record: skip the (Python) autograd layer
            return op(state, ancestors)
    return op(state, ancestors)


def gather_(state: torch.Tensor, ancestors: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """In-place :func:`gather`: state[b, i, ...] <- state[b, ancestors[b, i], ...]; returns ``state``.

    ``state`` must be contiguous. Extra memory: one group's worth per thread on the CPU; none on CUDA for
    groups of at most 32 KiB (staged in shared memory), a full-size temporary for larger groups and on the
    Triton backend. Out-of-range ancestors raise on the CPU; on CUDA they are a device-side assertion, as in
    torch's own index kernels. A state that requires grad (with grad enabled) is moved as
    ``state.copy_(gather(state.clone(), ancestors))``, so autograd records it (or refuses it on a leaf, as for any
    in-place op); otherwise the move bumps the tensor's version, so autograd sees that a tensor it saved
    changed.
    """
    ancestors = _check_ancestors(ancestors, state)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous for the in-place gather_ (use gather for strided input)")
    which = _backend.resolve(backend, _FAMILY, state.device)
    if which in ("cpu", "cuda") and not (torch.is_grad_enabled() and state.requires_grad):
        torch.ops.fusedlab.gather_(state, ancestors)
        if not torch.compiler.is_compiling() and not state.is_inference():
            torch.autograd.graph.increment_version(state)  # the C++ op does not (no ADInplaceOrView kernel)
    else:  # gathered from a copy: the gather's autograd node must not see the overwritten values
        state.copy_(gather(state.clone(), ancestors, backend="reference" if which in ("cpu", "cuda") else which))
    return state
