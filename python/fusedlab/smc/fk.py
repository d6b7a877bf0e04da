"""Feynman-Kac steering of stochastic diffusion samplers with a reward, for B prompts x K particles at once.

The sampler is any step function ``step_fn(x, i) -> (x_next, x0_pred)`` over latents [B*K, ...] (particle k
of prompt b in row b*K + k). At scheduled steps the reward of the x0 prediction defines a potential
G_i, the particles are reweighted by it (in log space) and resampled with fusedlab.smc.resample, and every
per-particle tensor moves with fusedlab.smc.gather. With the final-step correction the target is
proportional to p(x0) exp(lambda r(x0)) for every potential:

* "diff": log G_i = lambda (r_i - r_{i-1}) (telescopes; r before the first step is 0);
* "max":  log G_i = lambda max(r_1..r_i);  "add": log G_i = lambda (r_1 + ... + r_i);  "rt": log G_i = lambda r_i;
  at the last step these subtract the log-potentials applied so far and add lambda r(x0).

NaN and -inf rewards kill a particle (log G = -inf); a prompt whose particles all die raises a ValueError
naming it (or is resampled uniformly with on_degenerate="uniform", and then starts over: no potential
applied, no reward history). Weights are carried in log space when
an ESS-adaptive step does not resample, never reset.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from sys import getrefcount
from typing import Callable, Optional
from weakref import getweakrefcount

import torch

from fusedlab import _C
from fusedlab.ops.resample import METHODS, gather, resample


def _one_name_refcount() -> int:
    """What sys.getrefcount reports for an object that a single local name holds (2 on CPython through 3.13:
    the name and the call's argument; an interpreter that borrows the argument reports 1)."""
    obj = object()
    return getrefcount(obj)


def _calibrated_one_name_refs() -> int:
    """The baseline, at most 2: a tracer or debugger reading the frame's locals during the calibration holds one
    more reference, and a baseline too high would take a tensor that someone else holds for the loop's own."""
    return min(_one_name_refcount(), 2)


_ONE_NAME_REFS = _calibrated_one_name_refs()

POTENTIALS = ("diff", "max", "add", "rt")


class FKTrace(Sequence):
    """The per-step record of a run: item j is (step, ess [B], resampled [B]) of the j-th scheduled step.

    ``steps`` (a list), ``ess`` [S, B] float64 and ``resampled`` [S, B] bool hold the whole record at once
    (for plotting); the per-step row views are made on first access, not during the run, where each extra
    call costs tens of microseconds right after the model's forward."""

    def __init__(self, steps: list, ess: torch.Tensor, resampled: torch.Tensor):
        self.steps, self.ess, self.resampled = list(steps), ess, resampled
        self._rows = None

    def _items(self) -> list:
        if self._rows is None:
            self._rows = list(zip(self.steps, self.ess.unbind(0), self.resampled.unbind(0)))
        return self._rows

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        return self._items()[i]

    def __repr__(self) -> str:
        return f"FKTrace(steps={self.steps}, ess={self.ess!r}, resampled={self.resampled!r})"


@dataclass
class FKResult:
    samples: torch.Tensor  #: [B*K, ...] final latents
    rewards: torch.Tensor  #: [B*K] reward of the final samples
    log_weights: torch.Tensor  #: [B, K] final log-weights (0 after a final resample)
    log_norm: torch.Tensor  #: [B] sum of the per-step log mean weights (exp of it is an unbiased estimate)
    trace: FKTrace  #: per resampling step: (step, ess [B], resampled [B]); .ess and .resampled are [S, B]

    def best(self) -> torch.Tensor:
        """Per prompt, the particle with the highest final reward: [B, ...]."""
        B, K = self.log_weights.shape
        idx = self.rewards.view(B, K).nan_to_num(nan=-math.inf).argmax(-1)
        return self.samples.view(B, K, *self.samples.shape[1:])[torch.arange(B), idx]


def schedule(num_steps: int, start: int = 0, end: Optional[int] = None, every: int = 1) -> list[int]:
    """Steps that reweight and resample: start, start + every, ... up to end (inclusive), plus the last."""
    end = num_steps - 1 if end is None else min(end, num_steps - 1)
    steps = set(range(start, end + 1, every)) if every > 0 else set()
    steps.add(num_steps - 1)
    return sorted(s for s in steps if 0 <= s < num_steps)


def _restart_dead_groups(dead, r_state, applied, potential, K):
    """Groups whose particles all died and were resampled uniformly (on_degenerate="uniform") start over: no
    potential applied yet and no reward history (their -inf ones would otherwise cancel the final correction)."""
    rows = dead.repeat_interleave(K)
    fresh = -math.inf if potential == "max" else 0.0  # "max" starts from the next reward itself
    return (torch.where(rows, torch.full_like(r_state, fresh), r_state),
            torch.where(rows, torch.zeros_like(applied), applied))


class FKSteering:
    """Steer a stochastic diffusion sampler toward high reward with B x K particles.

    Args:
        reward_fn: maps a batch of x0 predictions [B*K, ...] to rewards [B*K] (higher is better).
        lmbda: the inverse temperature of the tilt exp(lambda r).
        potential: "diff", "max", "add" or "rt".
        num_particles: K per prompt.
        start, end, every: the resampling schedule in step indices (the last step is always included).
        method, ess_threshold: passed to fusedlab.smc.resample (ess_threshold=1 resamples at every scheduled
            step; 0.5 only when the ESS falls below K/2, carrying the weights otherwise).
        on_degenerate: "raise" or "uniform", as in fusedlab.smc.resample.
        generator: a torch.Generator for the resampling draws (the sampler's own noise is the step function's).
        backend: resample/gather backend.
        progress: show a tqdm progress bar.

    Example (a 1-D Gaussian base steered toward larger x; see tests/test_fk.py for the exact sampler):
        >>> import torch, fusedlab
        >>> g = torch.Generator().manual_seed(0)
        >>> def step(x, i):                                   # a toy stochastic sampler: x0 = 0 + noise
        ...     x = 0.5 * x + 0.5 * torch.randn(x.shape, generator=g)
        ...     return x, x
        >>> fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=4.0, num_particles=64, generator=g,
        ...                              progress=False)
        >>> out = fk.run(step, torch.randn(2 * 64, 1, generator=g), num_steps=10)
        >>> out.samples.shape, bool(out.samples.mean() > 0.2)
        (torch.Size([128, 1]), True)
    """

    def __init__(self, reward_fn: Callable[[torch.Tensor], torch.Tensor], lmbda: float = 10.0,
                 potential: str = "diff", num_particles: int = 4, start: int = 0, end: Optional[int] = None,
                 every: int = 1, method: str = "systematic", ess_threshold: float = 1.0,
                 on_degenerate: str = "raise", generator: Optional[torch.Generator] = None, backend: str = "auto",
                 progress: bool = True):
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        if not isinstance(lmbda, (int, float)) or not math.isfinite(lmbda):
            raise ValueError(f"lmbda must be a finite number, got {lmbda!r}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
        if not isinstance(every, int) or every < 0 or not isinstance(start, int) or start < 0:
            raise ValueError(f"start and every must be ints >= 0, got start={start!r}, every={every!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(ess_threshold, (int, float)) or not math.isfinite(ess_threshold) or ess_threshold < 0:
            raise ValueError(f"ess_threshold must be a finite number >= 0, got {ess_threshold!r}")
        if on_degenerate not in ("raise", "uniform"):
            raise ValueError(f"on_degenerate must be 'raise' or 'uniform', got {on_degenerate!r}")
        self.reward_fn, self.lmbda, self.potential, self.K = reward_fn, float(lmbda), potential, num_particles
        self.start, self.end, self.every = start, end, every
        self.method, self.ess_threshold, self.on_degenerate = method, ess_threshold, on_degenerate
        self.generator, self.backend, self.progress = generator, backend, progress

    def _rewards(self, x0: torch.Tensor) -> torch.Tensor:
        """The reward of each particle, float64 on the latents' device, with NaN read as -inf."""
        r = self._check_rewards(self.reward_fn(x0), x0.shape[0]).to(x0.device, torch.float64)
        return r.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN: dead

    @staticmethod
    def _check_rewards(r, n: int) -> torch.Tensor:
        if not isinstance(r, torch.Tensor) or r.shape != (n,):
            raise ValueError(f"reward_fn must return a tensor of shape [{n}] (one reward per particle), "
                             f"got {getattr(r, 'shape', type(r).__name__)}")
        return r.detach() if r.requires_grad else r

    def run(self, step_fn: Callable[[torch.Tensor, int], tuple], x: torch.Tensor, num_steps: int,
            states: Optional[dict] = None) -> FKResult:
        """Run ``num_steps`` sampler steps from latents ``x`` [B*K, ...]; ``states`` holds other per-particle
        tensors [B*K, ...], moved with the particles in that dict itself (so a step function that reads it sees
        each particle's own state; ``result.states`` is the same dict)."""
        K = self.K
        if x.shape[0] % K:
            raise ValueError(f"x must have B*K rows with K = num_particles = {K}, got {x.shape[0]} rows")
        B = x.shape[0] // K
        dev = x.device
        book = dict(lw=torch.zeros(B, K, dtype=torch.float64, device=dev),
                    log_norm=torch.zeros(B, dtype=torch.float64, device=dev),
                    # previous r, running max or running sum; and the sum of log-potentials applied so far
                    r_state=torch.zeros(B * K, dtype=torch.float64, device=dev),
                    applied=torch.zeros(B * K, dtype=torch.float64, device=dev))
        # the caller's dict itself: a step function that reads its per-particle states finds them moved
        states = {} if states is None else states
        steps = set(schedule(num_steps, self.start, self.end, self.every))
        it = range(num_steps)
        if self.progress:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional (an extra): no bar without it
                tqdm = None
            if tqdm is not None:
                it = tqdm(it, desc="FK steering", leave=False)
        # CPU tensors take the fused C++ step (torch.ops.fusedlab.fk_step): the potential, the weights, the
        # resampling and the moves of the latents and of the reward bookkeeping in one call per step
        loop = self._loop_fused if dev.type == "cpu" and self.backend in ("auto", "cpu") else self._loop
        x, rewards, lw, log_norm, trace = loop(step_fn, x, num_steps, steps, states, it, B, **book)
        if rewards is None:
            rewards = self._rewards(x)
        result = FKResult(x, rewards, lw, log_norm, trace)
        result.states = states
        return result

    def _loop_fused(self, step_fn, x, num_steps, steps, states, it, B, lw, log_norm, r_state, applied):
        """The run on CPU tensors: one call of torch.ops.fusedlab.fk_step's kernel per scheduled step, in place on
        the run's lw, log_norm, r_state and applied, with the uniforms drawn inside from the generator, the
        latents taken in their [B*K, ...] layout and float32 rewards as they come. Right after the model's
        forward every call starts from cold caches and costs tens of microseconds whatever it does, so the
        loop makes as few as it can: the same arithmetic and draws as :meth:`_loop`, in one call.

        The trace's ESS and resampled flags go into two buffers made before the first step, one row per
        scheduled step: small tensors kept alive from inside the loop changed the heap's layout enough to
        slow the model's own steps by more than the whole of FK's bookkeeping; the result's FKTrace makes the
        rows' views when it is first read (two more cold calls per run otherwise)."""
        # the op's kernel bound directly (fusedlab._C.fk_step: the same function, without the dispatcher's boxed
        # call from Python, which costs 50-160 us more per step right after the model's forward)
        op = _C.fk_step
        K, n, reward_fn, gen, pot, lam = self.K, x.shape[0], self.reward_fn, self.generator, self.potential, self.lmbda
        method, thr, raise_dead = self.method, float(self.ess_threshold), self.on_degenerate == "raise"
        ess_history = torch.empty(len(steps), B, dtype=torch.float64)
        resampled_history = torch.empty(len(steps), B, dtype=torch.bool)
        rewards, first, last_step, row = None, True, num_steps - 1, 0
        for i in it:
            x, x0 = step_fn(x, i)
            if i not in steps:
                continue
            last = i == last_step
            r = reward_fn(x if last else x0)
            # the latents may move in place, with no new buffer, when this loop holds the only reference to the
            # step's output (a step or reward function that kept it, or returned it as x0, adds one); the kernel
            # also checks that no other tensor shares its storage and that torch allocated it
            # (a weak reference, e.g. a cache keyed by the tensor, would see its contents change)
            owned = getrefcount(x) == _ONE_NAME_REFS and not getweakrefcount(x)
            try:  # the op reads float32 and float64 CPU rewards, NaN as -inf
                anc, x, moved_r = op(lw, r, r_state, applied, log_norm, ess_history, resampled_history, row, x, None,
                                     gen, pot, lam, first, last, method, thr, raise_dead, owned)
            except (RuntimeError, TypeError):
                # the op checks its arguments before it touches the bookkeeping or draws: rewards of the wrong
                # type, shape or device are reported here and other dtypes converted, off the per-step path. Any
                # other error (raised later, perhaps after the potential was applied) is not retried.
                if (isinstance(r, torch.Tensor) and r.dtype in (torch.float32, torch.float64) and r.shape == (n,)
                        and r.device.type == "cpu"):
                    raise
                r = self._check_rewards(r, n).to(device="cpu", dtype=torch.float64)
                anc, x, moved_r = op(lw, r, r_state, applied, log_norm, ess_history, resampled_history, row, x, None,
                                     gen, pot, lam, first, last, method, thr, raise_dead, False)
            first, row = False, row + 1
            if last:
                rewards = r_state if pot == "diff" else moved_r
            for k, v in states.items():
                states[k] = gather(v.reshape(B, K, *v.shape[1:]), anc, backend=self.backend).view(v.shape)
        return x, rewards, lw, log_norm, FKTrace(sorted(steps), ess_history, resampled_history)

    def _loop(self, step_fn, x, num_steps, steps, states, it, B, lw, log_norm, r_state, applied):
        """The run op by op (any device and backend): potential, weights, one fused resample call that also
        moves the latents, then the per-particle scalars gathered by the same ancestors."""
        K, lam = self.K, self.lmbda
        ess_rows, resampled_rows, rewards, first = [], [], None, True
        for i in it:
            x, x0 = step_fn(x, i)
            if i not in steps:
                continue
            last = i == num_steps - 1
            r = self._rewards(x if last else x0)
            if self.potential == "diff":
                log_g = lam * (r - r_state)
                r_state = r
            elif self.potential == "max":
                r_state = r if first else torch.maximum(r_state, r)
                log_g = lam * r_state
            elif self.potential == "add":
                r_state = r_state + r
                log_g = lam * r_state
            else:
                log_g = lam * r
            if last and self.potential != "diff":
                log_g = lam * r - applied  # the product of all potentials becomes exp(lambda r(x0))
            first = False
            # a dead reward (NaN or -inf) kills the particle whatever the potential and the sign of lambda, as
            # does a -inf potential (lambda < 0 with r = +inf); +inf becomes the largest finite value (as the
            # fused CPU step does)
            log_g = torch.where(torch.isneginf(r), torch.full_like(log_g, -math.inf),
                                log_g.nan_to_num(nan=-math.inf, neginf=-math.inf))
            applied = applied + log_g
            lw = lw + log_g.view(B, K)
            # one fused call: weights, ESS, decision, ancestors, and the latents moved by them
            res = resample(lw, self.method, self.ess_threshold, generator=self.generator,
                           on_degenerate=self.on_degenerate, state=x.reshape(B, K, *x.shape[1:]),
                           backend=self.backend)
            log_norm = log_norm + res.log_norm
            lw = res.log_weights
            x = res.state.view(x.shape)
            ess_rows.append(res.ess)
            resampled_rows.append(res.resampled)
            anc = res.ancestors  # the identity for groups that were not resampled
            # move only the per-particle scalars this potential still needs (one small gather each)
            move = lambda v: torch.gather(v.view(B, K), 1, anc).view(B * K)  # noqa: E731
            r_state = move(r_state) if self.potential != "rt" else r_state
            applied = move(applied) if self.potential != "diff" else applied
            if not last and self.on_degenerate == "uniform":  # (with "raise" a dead group never gets here)
                r_state, applied = _restart_dead_groups(res.degenerate, r_state, applied, self.potential, K)
            if last:
                rewards = r_state if self.potential == "diff" else move(r)
            for k, v in states.items():
                states[k] = gather(v.reshape(B, K, *v.shape[1:]), anc, backend=self.backend).view(v.shape)
        if not ess_rows:  # no scheduled step (num_steps 0)
            return x, rewards, lw, log_norm, FKTrace([], lw.new_empty(0, B), torch.empty(0, B, dtype=torch.bool))
        return x, rewards, lw, log_norm, FKTrace(sorted(steps), torch.stack(ess_rows), torch.stack(resampled_rows))
