"""Muon: momentum, then Newton-Schulz orthogonalization of each matrix update (fusedlab.ops.newton_schulz).

A drop-in for torch.optim.Muon (same constructor, defaults and update), plus: weights with more than two
dims (conv filters, flattened to [out, -1]), coefficient sets by name, and parameters of one shape
orthogonalized together in one batched call.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.distributed as dist

from fusedlab import _backend
from fusedlab.ops.newton_schulz import _gram_faster, default_dtype, newton_schulz
from fusedlab.reference.newton_schulz import resolve_coefficients

_ADJUST = (None, "original", "match_rms_adamw")
_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_METHODS = ("auto", "standard", "gram")


def _finite_nonneg(name, value):
    v = float(value.item()) if isinstance(value, torch.Tensor) else value
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def adjusted_lr(lr: float, adjust_lr_fn, rows: int, cols: int) -> float:
    """torch.optim.Muon's rules: "original" sqrt(max(1, rows/cols)); "match_rms_adamw" 0.2 sqrt(max(rows, cols)).
    rows and cols are those of the matrix as orthogonalized ([out, -1] for a conv filter)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {_ADJUST}, got {adjust_lr_fn!r}")


def check_muon_group(group: dict) -> None:
    """Muon's hyperparameter checks, for the constructor's defaults and every param group as merged."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("lr: a tensor lr must have one element")
    for name in ("lr", "weight_decay", "momentum", "eps"):
        _finite_nonneg(name, group[name])
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not hasattr(steps, "__index__") or not 0 <= operator.index(steps) < 100:
        raise ValueError(f"ns_steps must be an int in [0, 100), got {steps!r}")
    if group["adjust_lr_fn"] not in _ADJUST:
        raise ValueError(f"adjust_lr_fn must be one of {_ADJUST}, got {group['adjust_lr_fn']!r}")
    try:  # validates names and shapes; the message names Muon's argument
        triples, _ = resolve_coefficients(group["ns_coefficients"], steps)
    except ValueError as e:
        raise ValueError(f"ns_{e}") from None
    if not all(math.isfinite(v) for t in triples for v in t):
        raise ValueError(f"ns_coefficients must be finite, got {group['ns_coefficients']!r}")
    if group["ns_dtype"] is not None and group["ns_dtype"] not in _NS_DTYPES:
        raise ValueError(f"ns_dtype must be None or one of {_NS_DTYPES}, got {group['ns_dtype']!r}")
    if group["backend"] not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {group['backend']!r}")
    if group["ns_method"] not in _METHODS:
        raise ValueError(f"ns_method must be one of {_METHODS}, got {group['ns_method']!r}")
    if group["ns_method"] == "gram" and group["backend"] not in ("auto", "reference"):
        raise ValueError(f"ns_method='gram' needs backend 'auto' or 'reference' (it has no {group['backend']!r} "
                         "kernel)")


def _check_matrices(params) -> None:
    for p in params:
        if p.ndim < 2:
            raise ValueError(f"Muon orthogonalizes matrices: got a {p.ndim}-D parameter of shape "
                             f"{tuple(p.shape)}; optimize gains, biases and embeddings with AdamW")


def _add_checked_group(opt, add, param_group, check) -> None:
    """Add a param group with ``add`` (the base class's), then check the group as merged with the defaults;
    a group that fails is removed again, so a caller who catches the error keeps a working optimizer."""
    add(param_group)
    try:
        check(opt.param_groups[-1])
    except Exception:
        opt.param_groups.pop()
        raise


class Muon(torch.optim.Optimizer):
    """Muon with torch.optim.Muon's constructor and update rule.

    Each step, per parameter p with gradient g: buf <- lerp(buf, g, 1 - momentum); update = lerp(g, buf,
    momentum) (Nesterov) or buf; O = newton_schulz(update viewed as [out, -1]); p <- p (1 - lr wd);
    p <- p - adjusted_lr O. Gradients are never modified.

    Extra keyword arguments: ``ns_dtype`` (the Newton-Schulz computation dtype; default bfloat16 where the
    hardware multiplies bf16 natively, as torch does everywhere), ``backend`` (as for every fusedlab op),
    ``ns_method`` ("auto", "standard" or "gram": the ``method`` of fusedlab.ops.newton_schulz; "auto" takes
    Gram Newton-Schulz for strongly rectangular float32 CUDA batches, where it measured faster) and ``process_group``: pass
    one (``torch.distributed.group.WORLD`` for all ranks) to shard the work when every rank holds the same
    parameters and gradients (data parallel, after DDP's all-reduce): each rank orthogonalizes its share of
    the matrices, the results are all-gathered, and every rank ends with the parameters one process would
    compute; a parameter without a gradient rides in the batch as zeros, so all ranks make the same collective
    calls, and is left untouched as in one process (data parallel: the same parameters lack a gradient on
    every rank). Without it the optimizer never communicates (as torch.optim.Muon), which is right for
    pipeline- or tensor-parallel jobs.

    The learning-rate adjustment (``adjust_lr_fn``) reads the shape of the matrix as orthogonalized, [out, -1]
    for a conv filter. Per-group hyperparameters get the constructor's checks. A torch.optim.Muon state dict
    loads (its groups take this optimizer's extra keys' defaults). Under torch.compile pass ``lr`` as a
    tensor (``torch.tensor(0.02)``) when a schedule changes it: a float rate is a constant of the compiled
    step, so each new value compiles it again.

    Example:
        >>> import torch, fusedlab
        >>> model = torch.nn.Linear(16, 32, bias=False)
        >>> opt = fusedlab.optim.Muon(model.parameters(), lr=0.02)
        >>> model(torch.randn(8, 16)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 ns_dtype=None, backend="auto", ns_method="auto", process_group=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, backend=backend, ns_method=ns_method)
        check_muon_group(defaults)
        super().__init__(params, defaults)
        self.process_group = process_group

    def add_param_group(self, param_group):
        def check(group):
            check_muon_group(group)
            _check_matrices(group["params"])

        _add_checked_group(self, super().add_param_group, param_group, check)

    def __setstate__(self, state):
        # torch's load_state_dict keeps the saved groups' keys: a torch.optim.Muon state dict lacks this
        # optimizer's extra ones (ns_dtype, backend, ns_method), which take their defaults
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        """One Muon update of a param group; also used by MuonWithAuxAdam (self is any Optimizer)."""
        lr = group["lr"]
        # a tensor rate stays a tensor under torch.compile (a schedule then changes a value, not the graph); in
        # eager mode it is read once (the C++ step takes numbers)
        if isinstance(lr, torch.Tensor) and not torch.compiler.is_compiling():
            lr = float(lr.item())
        momentum, wd = group["momentum"], group["weight_decay"]
        pg = getattr(self, "process_group", None)
        world = dist.get_world_size(pg) if pg is not None else 1
        # parameters grouped by (matrix shape, dtype, device): one batched Newton-Schulz call per group
        batches = defaultdict(list)
        for p in group["params"]:
            if p.grad is None and world == 1:
                continue
            if p.grad is None:
                # sharded: every rank stacks every matrix, so all make the same collective calls; a parameter
                # without a gradient rides along as zeros and, as in one process, is not touched
                batches[((p.shape[0], p.numel() // max(1, p.shape[0])), p.dtype, p.device)].append(
                    (p, torch.zeros_like(p), None))
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            shape = (p.shape[0], p.numel() // max(1, p.shape[0]))
            batches[(shape, g.dtype, g.device)].append((p, g, state["momentum_buffer"]))
        for (shape, _, _), items in batches.items():
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape[0], shape[1])
            fused_ok = world == 1 and not isinstance(lr, torch.Tensor)  # the C++ step takes numbers
            if fused_ok and _fused_cpu_step(group, items, shape, lr, step_lr, self):
                continue
            updates = []
            for _, g, buf in items:
                if buf is None:  # no gradient (sharded runs only): a zero matrix in the batch
                    updates.append(g.reshape(shape))
                    continue
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                updates.append(update.reshape(shape))
            stacked = torch.stack(updates) if len(updates) > 1 else updates[0].unsqueeze(0)
            ns = lambda x: newton_schulz(x, group["ns_steps"], group["ns_coefficients"], group["eps"],  # noqa: E731
                                         group["ns_dtype"], group["backend"], group["ns_method"])
            if world == 1:
                ortho = ns(stacked)
            else:
                out_dtype = group["ns_dtype"] or default_dtype(stacked.device)
                ortho = _sharded(ns, stacked, world, pg, out_dtype)
            for (p, _, buf), o in zip(items, ortho.unbind(0)):
                if buf is None:
                    continue
                p.mul_(1 - lr * wd)
                if isinstance(step_lr, torch.Tensor):  # compiled with a tensor rate
                    p.sub_(o.view(p.shape).to(p.dtype) * step_lr)
                else:
                    p.add_(o.view(p.shape), alpha=-step_lr)


def _workspace(opt) -> torch.Tensor:
    """The optimizer's scratch bytes for the C++ step's iteration buffers, kept between steps (not in its state
    dict): made fresh each step, their pages faulted and zeroed anew, about a tenth of a CPU step's time.
    Shared by its param groups and batches, which run one after another; it grows to the largest batch."""
    ws = getattr(opt, "_fusedlab_workspace", None)
    if ws is None:
        ws = torch.empty(0, dtype=torch.uint8)
        opt._fusedlab_workspace = ws
    return ws


def _fused_cpu_step(group, items, shape, lr, step_lr, opt=None) -> bool:
    """The whole step of a batch in one C++ call (torch.ops.fusedlab.muon_step_: momentum, scale and cast,
    the iteration, decay and update, with the elementwise work in three passes instead of about eight) where
    it computes exactly what the generic path would: contiguous float32 CPU tensors, the C++ kernel, and the
    standard iteration. Returns False (nothing done) elsewhere."""
    p0 = items[0][0]
    if p0.device.type != "cpu" or group["backend"] not in ("auto", "cpu"):
        return False
    if any(t.dtype != torch.float32 or not t.is_contiguous() for it in items for t in it):
        return False
    # a parameter listed twice (torch.optim only warns) would have its buffer updated concurrently there; and
    # eps below float32's normal range could overflow the kernel's float32 1 / max(norm, eps)
    if len({p.data_ptr() for p, _, _ in items}) < len(items) or group["eps"] < 1e-30:
        return False
    dtype = group["ns_dtype"] or default_dtype(p0.device)
    method = group["ns_method"]
    if dtype == torch.float64 or method == "gram" or (
            method == "auto" and _gram_faster((len(items), *shape), dtype, "cpu")):
        return False
    triples, scale = resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
    torch.ops.fusedlab.muon_step_([p for p, _, _ in items], [g for _, g, _ in items], [b for _, _, b in items],
                                  float(group["momentum"]), bool(group["nesterov"]),
                                  [float(v) for t in triples for v in t], float(scale), float(group["eps"]), dtype,
                                  float(lr), float(group["weight_decay"]), float(step_lr),
                                  None if opt is None else _workspace(opt))
    return True


def _sharded(ns, stacked, world, pg, out_dtype):
    """Orthogonalize this rank's contiguous share of the batch, then all-gather every share (the shares are
    padded to one size for the collective; the padding is never computed)."""
    n = stacked.shape[0]
    per = -(-n // world)
    rank = dist.get_rank(pg)
    lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
    buf = stacked.new_zeros((per, *stacked.shape[1:]), dtype=out_dtype)
    if hi > lo:
        buf[: hi - lo] = ns(stacked[lo:hi])
    shares = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(shares, buf, group=pg)
    return torch.cat(shares)[:n]


def _check_adam_group(group: dict) -> None:
    for name in ("lr", "eps", "weight_decay"):
        _finite_nonneg(name, group[name])
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and
            all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def split_muon_params(model: torch.nn.Module, embedding_types=(torch.nn.Embedding,), head_names=("lm_head", "head")):
    """Split a model's parameters into the two groups Muon is meant for.

    Muon: hidden weights with two or more dims. AdamW: embeddings (modules of ``embedding_types``), output
    heads (every parameter under a module whose attribute name is one of ``head_names``), and every 1-D
    parameter (gains, biases). Returns ``(muon_params, adam_params)``, each a list of parameters that require
    grad. A 2-D embedding held as a bare nn.Parameter (a learned position table) is not recognized: move it
    to the AdamW list by hand.
    """
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, embedding_types) or name.split(".")[-1] in head_names:
            skip.update(id(p) for p in module.parameters())  # a head built as a container: all of it
    muon, adam = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim >= 2 and id(p) not in skip else adam).append(p)
    return muon, adam


class MuonWithAuxAdam(torch.optim.Optimizer):
    """One optimizer over param groups flagged ``use_muon``: Muon for hidden matrices, AdamW for the rest.

    Muon groups take Muon's keys (defaults lr 0.02, momentum 0.95, weight_decay 0, as in the reference
    implementation); AdamW groups take lr (3e-4), betas ((0.9, 0.95)), eps (1e-10) and weight_decay (0).

    Example:
        >>> import torch, fusedlab
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> hidden, other = fusedlab.optim.split_muon_params(model)
        >>> opt = fusedlab.optim.MuonWithAuxAdam([dict(params=hidden, use_muon=True),
        ...                                       dict(params=other, use_muon=False)])
        >>> model(torch.tensor([[1, 2, 3]])).sum().backward()
        >>> opt.step()
    """

    MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True,
                         ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                         ns_dtype=None, backend="auto", ns_method="auto")
    ADAM_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

    def __init__(self, param_groups, process_group=None):
        self.process_group = process_group  # as in Muon: shard the Muon groups' work over these ranks
        super().__init__(list(param_groups), {})

    def add_param_group(self, param_group):
        if "use_muon" not in param_group:
            raise ValueError("every param group needs a 'use_muon' flag (True for hidden matrices)")
        defaults = self.MUON_DEFAULTS if param_group["use_muon"] else self.ADAM_DEFAULTS
        unknown = set(param_group) - set(defaults) - {"params", "use_muon"}
        if unknown:
            raise ValueError(f"a param group with use_muon={param_group['use_muon']} has unknown keys "
                             f"{sorted(unknown)}")

        def check(group):
            if group["use_muon"]:
                check_muon_group(group)
                _check_matrices(group["params"])
            else:
                _check_adam_group(group)

        _add_checked_group(self, super().add_param_group, {**defaults, **param_group}, check)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # keys a saved group lacks take their defaults (as in Muon)
            for key, value in (self.MUON_DEFAULTS if group.get("use_muon") else self.ADAM_DEFAULTS).items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                Muon._step_group(self, group)  # noqa: SLF001
            else:
                self._adam_group(group)
        return loss

    def _adam_group(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MuonWithAuxAdam's AdamW groups do not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # not the default dtype (bf16 stalls)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif not isinstance(state["step"], torch.Tensor):  # a state saved when the count was an int
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            # The count is a float32 tensor, as in torch.optim.AdamW: a changing Python int is a constant to
            # torch.compile, which recompiled the step for it (then again with the int made dynamic). Eager
            # mode reads it as a number, so the bias corrections are the same doubles as before; a compiled
            # step computes them as float32 tensors.
            state["step"] += 1
            step = state["step"] if torch.compiler.is_compiling() else state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1 = 1 - beta1 ** step
            bias2 = 1 - beta2 ** step
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"])
            rate = lr / bias1
            if isinstance(rate, torch.Tensor):  # addcdiv_ takes its factor as a number
                p.sub_(state["exp_avg"] * rate / denom)
            else:
                p.addcdiv_(state["exp_avg"], denom, value=-rate)
