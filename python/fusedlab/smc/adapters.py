"""Step functions for FKSteering: a diffusers scheduler with a noise-prediction model, and the baselines.

The step-function protocol is ``step_fn(x, i) -> (x_next, x0_pred)`` for step i of ``num_steps``; anything
that follows it can be steered. ``DiffusersSampler`` builds one from a diffusers scheduler (DDPM, or DDIM
with eta > 0: FK needs a stochastic sampler, or resampled copies stay identical) and a model predicting
the noise, without importing diffusers itself.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Optional

import torch

from fusedlab.ops.resample import resample
from fusedlab.smc.fk import FKResult, FKTrace

#: diffusers schedulers whose step is deterministic (an ODE solver): resampled copies would stay identical
DETERMINISTIC_SCHEDULERS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                            "PNDMScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                            "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler")


class DiffusersSampler:
    """``step_fn`` over a diffusers scheduler: step i denoises with ``scheduler.timesteps[i]``.

    Args:
        scheduler: a diffusers scheduler (``set_timesteps``, ``step``, ``timesteps``, ``init_noise_sigma``).
        model: ``model(x, t, **model_kwargs)`` -> predicted noise, same shape as x.
        num_inference_steps: passed to ``scheduler.set_timesteps``.
        eta: DDIM's stochasticity (must be > 0 for a DDIM scheduler); ignored by schedulers without it.
        generator: the sampler's noise generator.

    The sampler works on its own copy of the scheduler, whose timesteps (and step counter) are set again at
    the start of every run, so runs repeat and another user of the same scheduler cannot change them.

    Use: ``sampler = DiffusersSampler(...); fk.run(sampler, sampler.initial_latents(shape), sampler.num_steps)``.
    """

    def __init__(self, scheduler, model: Callable, num_inference_steps: int, eta: float = 1.0,
                 generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict] = None):
        name = type(scheduler).__name__
        config = getattr(scheduler, "config", {})
        if name in DETERMINISTIC_SCHEDULERS or (name == "DPMSolverMultistepScheduler" and
                                                 "sde" not in str(config.get("algorithm_type", ""))):
            raise ValueError(f"{name} steps deterministically: FK steering needs a stochastic sampler (resampled "
                             "copies would stay identical); use DDPM, DDIM with eta > 0, or an ancestral / SDE "
                             "scheduler")
        scheduler = copy.deepcopy(scheduler)
        self.num_inference_steps = num_inference_steps
        scheduler.set_timesteps(num_inference_steps)
        params = inspect.signature(scheduler.step).parameters
        self.step_kwargs = {}
        if "eta" in params:
            if not eta > 0:
                raise ValueError(f"eta must be > 0 for {type(scheduler).__name__}: FK steering needs a stochastic "
                                 f"sampler (with eta = 0 resampled copies stay identical), got eta={eta!r}")
            self.step_kwargs["eta"] = float(eta)
        if "generator" in params:
            self.step_kwargs["generator"] = generator
        self.scheduler, self.model, self.generator = scheduler, model, generator
        self.model_kwargs = dict(model_kwargs or {})
        self.timesteps = scheduler.timesteps

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def initial_latents(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        x = torch.randn(shape, generator=self.generator, dtype=dtype, device=device)
        return x * self.scheduler.init_noise_sigma

    def __call__(self, x: torch.Tensor, i: int):
        if i == 0:  # a new run: the schedule again, and stateful schedulers' step counters reset
            self.scheduler.set_timesteps(self.num_inference_steps)
            self.timesteps = self.scheduler.timesteps
        t = self.timesteps[i]
        scaled = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
        eps = self.model(scaled, t, **self.model_kwargs)
        out = self.scheduler.step(eps, t, x, **self.step_kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            raise ValueError(f"{type(self.scheduler).__name__}.step returns no pred_original_sample (the x0 "
                             "prediction FK steering rewards); use DDPM, DDIM or an ancestral scheduler")
        return out.prev_sample, x0


def sample(step_fn: Callable, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The base sampler: ``num_steps`` steps of ``step_fn`` from ``x``, no steering."""
    for i in range(num_steps):
        x, _ = step_fn(x, i)
    return x


def best_of_n(step_fn: Callable, reward_fn: Callable, x: torch.Tensor, num_steps: int, num_particles: int) -> FKResult:
    """Baseline: draw K base samples per prompt; ``result.best()`` is the highest-reward one (the weights and
    log_norm of the result are zeros: best-of-N has no importance weights)."""
    if x.shape[0] % num_particles:
        raise ValueError(f"x must have B*K rows with K = num_particles = {num_particles}, got {x.shape[0]} rows")
    x = sample(step_fn, x, num_steps)
    r = reward_fn(x).detach().to(torch.float64)
    B = x.shape[0] // num_particles
    zeros = torch.zeros(B, num_particles, dtype=torch.float64, device=x.device)
    trace = FKTrace([], zeros.new_empty(0, B), torch.empty(0, B, dtype=torch.bool, device=x.device))
    return FKResult(x, r, zeros, torch.zeros(B, dtype=torch.float64, device=x.device), trace)


def importance_resample(step_fn: Callable, reward_fn: Callable, x: torch.Tensor, num_steps: int,
                        num_particles: int, lmbda: float, generator: Optional[torch.Generator] = None,
                        method: str = "systematic") -> FKResult:
    """Baseline: K base samples per prompt, resampled once at the end with weights exp(lambda r)."""
    if x.shape[0] % num_particles:
        raise ValueError(f"x must have B*K rows with K = num_particles = {num_particles}, got {x.shape[0]} rows")
    x = sample(step_fn, x, num_steps)
    r = reward_fn(x).detach().to(torch.float64)
    dead = torch.isnan(r) | torch.isneginf(r)
    B, K = x.shape[0] // num_particles, num_particles
    res = resample(torch.where(dead, torch.full_like(r, -math.inf), lmbda * r).view(B, K), method, 1.0, generator=generator, state=x.view(B, K, *x.shape[1:]))
    r = torch.gather(r.view(B, K), 1, res.ancestors).view(-1)
    trace = FKTrace([num_steps - 1], res.ess[None], res.resampled[None])
    return FKResult(res.state.view_as(x), r, res.log_weights, res.log_norm, trace)
