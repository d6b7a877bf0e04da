"""FK steering on a Gaussian base with an exact sampler: the steered samples follow the tilted Gaussian.

Data x0 ~ N(MU, S^2) under a variance-preserving diffusion: every reverse step q(x_{t-1} | x_t) and the x0
prediction E[x0 | x_t] are exact Gaussians, so the unsteered sampler draws exactly from the base and the
only error left is FK's own (Monte Carlo, and a bias of order 1/K). With the reward r(x) = x the target
p(x) exp(lambda r(x)) is N(MU + lambda S^2, S^2).
"""
import math

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

import fusedlab

MU, S, T = 0.5, 0.7, 25
ABAR = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.98, 0.02, T, dtype=torch.float64)])  # abar_0..T


def x0_mean(x, t):
    a = ABAR[t]
    return MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)


def exact_sampler(gen):
    def step(x, i):
        t = T - i  # step i takes x_t to x_{t-1}
        alpha = ABAR[t] / ABAR[t - 1]
        a_prev = ABAR[t - 1].sqrt()
        P = ABAR[t - 1] * S**2 + 1 - ABAR[t - 1]
        k = P * alpha.sqrt() / (alpha * P + 1 - alpha)
        mean = a_prev * MU + k * (x - alpha.sqrt() * a_prev * MU)
        var = P - k * alpha.sqrt() * P
        x = mean + var.clamp_min(0).sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return x, x0_mean(x, t - 1)
    return step


def start(B, K, gen):
    a = ABAR[T]
    return a.sqrt() * MU + (a * S**2 + 1 - a).sqrt() * torch.randn(B * K, 1, generator=gen, dtype=torch.float64)


def group_stats(samples, B, K):
    x = samples.view(B, K)
    return x.mean(-1), x.var(-1)


def check(means, variances, mu, var, B):
    # Per-group means and variances of B independent runs: their averages are tested within 4.5 standard
    # errors (plus a 0.02 allowance for FK's O(1/K) bias at K = 64), a false failure below 1e-5 per check,
    # below 1e-4 over every check in this file. Fixed seeds make each run repeatable.
    se_m = means.std() / math.sqrt(B)
    se_v = variances.std() / math.sqrt(B)
    assert abs(means.mean() - mu) < 4.5 * se_m + 0.02, (means.mean().item(), mu, se_m.item())
    assert abs(variances.mean() - var) < 4.5 * se_v + 0.02 + var / 64, (variances.mean().item(), var)


# "diff" telescopes, so every intermediate target is the tilt of the current x0 prediction: it is tested
# resampling at every step with K = 64. "max", "add" and "rt" make the intermediate targets far sharper than
# the final one (their potentials compound) and rely on the final correction, so with every-step resampling
# they collapse at small K; they are tested on a sparser schedule (steps 5, 13, 21 and the last) with K = 256.
@pytest.mark.parametrize("potential, K, every", [("diff", 64, 1), ("max", 256, 8), ("add", 256, 8), ("rt", 256, 8)])
def test_steered_matches_tilted_gaussian(potential, K, every):
    gen = torch.Generator().manual_seed(11)
    B, lam = 100 if K > 64 else 200, 1.0
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=lam, potential=potential, num_particles=K,
                                 start=0 if every == 1 else 5, every=every, generator=gen, progress=False)
    out = fk.run(exact_sampler(gen), start(B, K, gen), T)
    m, v = group_stats(out.samples, B, K)
    check(m, v, MU + lam * S**2, S**2, B)
    assert len(out.trace) == len(fusedlab.smc.schedule(T, fk.start, None, every))
    assert all(bool(r.all()) for _, _, r in out.trace)


def test_unsteered_and_lambda_zero_match_base():
    gen = torch.Generator().manual_seed(12)
    B, K = 200, 64
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=0.0, num_particles=K, generator=gen, progress=False)
    x = start(B, K, gen)
    out = fk.run(exact_sampler(gen), x, T)
    m, v = group_stats(out.samples, B, K)
    check(m, v, MU, S**2, B)
    # lambda = 0: systematic resampling of equal weights keeps every particle in place, so the run is the
    # base sampler itself, draw for draw
    base_gen = torch.Generator().manual_seed(13)
    fk_gen = torch.Generator().manual_seed(13)
    plain = x.clone()
    step = exact_sampler(base_gen)
    for i in range(T):
        plain, _ = step(plain, i)
    out = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=0.0, num_particles=K, progress=False).run(
        exact_sampler(fk_gen), x.clone(), T)
    assert torch.equal(out.samples, plain)


def test_adaptive_resampling_carries_weights():
    """With ess_threshold = 0.5 most steps carry the weights; the final weighted estimate still matches."""
    gen = torch.Generator().manual_seed(14)
    B, K, lam = 200, 64, 1.0
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=lam, num_particles=K, ess_threshold=0.5,
                                 generator=gen, progress=False)
    out = fk.run(exact_sampler(gen), start(B, K, gen), T)
    carried = sum(int((~r).sum()) for _, _, r in out.trace)
    assert carried > 0  # some steps did not resample: their weights were carried, not dropped
    w = torch.softmax(out.log_weights, -1)
    x = out.samples.view(B, K)
    means = (w * x).sum(-1)
    se = means.std() / math.sqrt(B)
    assert abs(means.mean() - (MU + lam * S**2)) < 4.5 * se + 0.02


@pytest.mark.parametrize("potential", fusedlab.smc.POTENTIALS)
@pytest.mark.parametrize("lam", [1.0, -1.0, 0.0])
def test_dead_particles_and_dead_groups(potential, lam):
    """Particles whose reward is NaN or -inf die at an intermediate step (after the first), whatever the
    potential and the sign of lambda; no descendant of theirs survives. A group that dies entirely raises."""
    gen = torch.Generator().manual_seed(15)
    B, K, steps = 3, 8, 4
    calls = [0]

    def reward(x0):  # from the second call on, particle 0 of each group scores NaN and particle 1 -inf
        calls[0] += 1
        r = x0[:, 0].clone()
        if calls[0] >= 2:
            r.view(B, K)[:, 0] = math.nan
            r.view(B, K)[:, 1] = -math.inf
        return r

    fk = fusedlab.smc.FKSteering(reward, lmbda=lam, potential=potential, num_particles=K, generator=gen,
                                 progress=False)
    tag = torch.arange(B * K, dtype=torch.float64).view(B * K, 1)
    out = fk.run(exact_sampler(gen), start(B, K, gen), steps, states={"tag": tag})
    origin = out.states["tag"].view(B, K).long() % K
    assert (origin >= 2).all(), origin

    def all_dead(x0):
        r = x0[:, 0].clone()
        r.view(B, K)[1] = -math.inf
        return r

    fk = fusedlab.smc.FKSteering(all_dead, lmbda=lam, potential=potential, num_particles=K, generator=gen,
                                 progress=False)
    with pytest.raises(ValueError, match=r"group\(s\) 1"):
        fk.run(exact_sampler(gen), start(B, K, gen), 3)


@pytest.mark.parametrize("potential, K, every", [("diff", 64, 1), ("max", 256, 8), ("rt", 256, 8)])
@pytest.mark.parametrize("thr", [1.0, 0.5])
def test_log_normalizer_is_unbiased(potential, K, every, thr):
    """exp(log_norm) estimates E_p[exp(lambda r(x0))] = exp(lambda MU + lambda^2 S^2 / 2) without bias, also
    when weights are carried (thr = 0.5). Over B = 100 groups the mean is tested within 4.5 standard errors
    plus 2% for the O(1/K) bias of the finite-K estimate of the sharper potentials (fixed seeds)."""
    gen = torch.Generator().manual_seed(16)
    B, lam = 100, 1.0
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=lam, potential=potential, num_particles=K,
                                 start=0 if every == 1 else 5, every=every, ess_threshold=thr, generator=gen,
                                 progress=False)
    out = fk.run(exact_sampler(gen), start(B, K, gen), T)
    z = out.log_norm.exp()
    exact = math.exp(lam * MU + lam**2 * S**2 / 2)
    assert abs(z.mean().item() - exact) < 4.5 * z.std().item() / math.sqrt(B) + 0.02 * exact, (z.mean(), exact)


def test_schedule_and_errors():
    assert fusedlab.smc.schedule(10, start=2, end=6, every=2) == [2, 4, 6, 9]
    assert fusedlab.smc.schedule(5, every=0) == [4]
    with pytest.raises(ValueError, match="potential"):
        fusedlab.smc.FKSteering(lambda x: x, potential="sum")
    with pytest.raises(ValueError, match="num_particles"):
        fusedlab.smc.FKSteering(lambda x: x, num_particles=0)
    fk = fusedlab.smc.FKSteering(lambda x0: x0.sum(), num_particles=4, progress=False)
    with pytest.raises(ValueError, match="one reward per particle"):
        fk.run(lambda x, i: (x, x), torch.zeros(8, 2), 2)
    with pytest.raises(ValueError, match="B\\*K rows"):
        fk.run(lambda x, i: (x, x), torch.zeros(7, 2), 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_cpu_loop_converts_other_reward_dtypes(dtype):
    """The CPU loop hands float32 and float64 rewards to fk_step as they come; other dtypes, and rewards that
    require grad, take the checked path (converted, detached) with the result of float64 rewards of equal
    value."""
    def run(cast, grad=False):
        g, noise = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)

        def step(x, i):
            x = 0.7 * x + 0.4 * torch.randn(x.shape, generator=noise)
            return x, x

        def reward(x0):
            r = x0[:, 0].to(dtype)
            r = r.to(torch.float64) if cast else r  # the same values either way
            return r.requires_grad_() if grad else r

        fk = fusedlab.smc.FKSteering(reward, lmbda=3.0, num_particles=8, every=2, generator=g, progress=False)
        return fk.run(step, torch.randn(5 * 8, 2, generator=noise), 7)

    a, b, c = run(cast=False), run(cast=True), run(cast=True, grad=True)
    for other in (a, c):
        assert torch.equal(other.samples, b.samples) and torch.equal(other.log_weights, b.log_weights)
        assert torch.equal(other.rewards, b.rewards) and not other.rewards.requires_grad


# ------------------------------------------------------------------------------------------------ diffusers
diffusers = pytest.importorskip("diffusers")


def gaussian_eps_model(scheduler):
    """The exact noise prediction for x0 ~ N(MU, S^2) under the scheduler's alphas_cumprod."""
    abar_all = scheduler.alphas_cumprod.to(torch.float64)

    def model(x, t):
        a = abar_all[int(t)]
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x.double() - a.sqrt() * MU)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)
    return model


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_diffusers_scheduler_steered(kind):
    """DDPM and DDIM (eta = 1) with the exact noise model: the base run matches N(MU, S^2) and FK steering
    with r(x) = x the tilted mean, within 4.5 standard errors plus 0.05 for the samplers' own
    discretization error at 50 steps (fixed seeds)."""
    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    sched = cls(num_train_timesteps=1000, clip_sample=False)  # clipping x0 to [-1, 1] would bias the test
    gen = torch.Generator().manual_seed(21)
    sampler = fusedlab.smc.DiffusersSampler(sched, gaussian_eps_model(sched), 50, eta=1.0, generator=gen)
    B, K, lam = 100, 64, 1.0
    base = fusedlab.smc.sample(sampler, sampler.initial_latents((B * K, 1), torch.float64), sampler.num_steps)
    means = base.view(B, K).mean(-1)
    assert abs(means.mean() - MU) < 4.5 * means.std() / math.sqrt(B) + 0.05
    fk = fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=lam, num_particles=K, generator=gen, progress=False)
    out = fk.run(sampler, sampler.initial_latents((B * K, 1), torch.float64), sampler.num_steps)
    means = out.samples.view(B, K).mean(-1)
    assert abs(means.mean() - (MU + lam * S**2)) < 4.5 * means.std() / math.sqrt(B) + 0.05


def test_diffusers_deterministic_ddim_refused():
    sched = diffusers.DDIMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="eta must be > 0"):
        fusedlab.smc.DiffusersSampler(sched, lambda x, t: x, 10, eta=0.0)
    with pytest.raises(ValueError, match="steps deterministically"):
        fusedlab.smc.DiffusersSampler(diffusers.EulerDiscreteScheduler(num_train_timesteps=100), lambda x, t: x, 10)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler"])
def test_diffusers_sampler_owns_its_schedule(cls):
    """Another sampler (or pipeline) setting the same scheduler's timesteps does not change this one's runs,
    and a second run repeats the first."""
    def run(sampler):
        g = torch.Generator().manual_seed(5)
        sampler.generator = g
        sampler.step_kwargs.update(generator=g) if "generator" in sampler.step_kwargs else None
        return fusedlab.smc.sample(sampler, torch.randn(4, 2, generator=torch.Generator().manual_seed(6)), 10)

    sched = getattr(diffusers, cls)(num_train_timesteps=100)
    model = lambda x, t: 0.1 * x  # noqa: E731
    a = fusedlab.smc.DiffusersSampler(sched, model, 10)
    want = run(a)
    fusedlab.smc.DiffusersSampler(sched, model, 5)
    sched.set_timesteps(7)
    assert torch.equal(run(a), want)


def test_baselines():
    gen = torch.Generator().manual_seed(22)
    B, K, lam = 100, 64, 1.0
    out = fusedlab.smc.importance_resample(exact_sampler(gen), lambda x: x[:, 0], start(B, K, gen), T, K, lam,
                                           generator=gen)
    means = out.samples.view(B, K).mean(-1)
    assert abs(means.mean() - (MU + lam * S**2)) < 4.5 * means.std() / math.sqrt(B) + 0.02
    bon = fusedlab.smc.best_of_n(exact_sampler(gen), lambda x: x[:, 0], start(B, K, gen), T, K)
    best = bon.best()
    assert best.shape == (B, 1)
    assert torch.equal(best[:, 0], bon.samples.view(B, K).max(-1).values)
    # both carry an FKTrace, as FK's result does
    assert bon.trace.ess.shape == (0, B) and len(bon.trace) == 0
    assert out.trace.ess.shape == (1, B) and out.trace[0][0] == T - 1
    with pytest.raises(ValueError, match="B\\*K rows"):
        fusedlab.smc.importance_resample(exact_sampler(gen), lambda x: x[:, 0], torch.zeros(10, 1), T, 4, lam)


@pytest.mark.parametrize("potential", fusedlab.smc.POTENTIALS)
def test_a_revived_group_starts_over(potential):
    """on_degenerate="uniform": a prompt whose particles all die is resampled uniformly and then steered
    afresh, so its final weights still carry the final-step correction (not uniform); both loops agree."""
    K = 32

    def reward_fn():
        calls = {"n": 0}

        def reward(x0):
            r = x0[:, 0].clone()
            if calls["n"] == 1:
                r[:K] = float("nan")  # prompt 0 dies at the second scheduled step
            calls["n"] += 1
            return r
        return reward

    outs = []
    for backend in ("auto", "reference"):
        gen = torch.Generator().manual_seed(8)
        fk = fusedlab.smc.FKSteering(reward_fn(), lmbda=1.0, potential=potential, num_particles=K, start=5, every=8,
                                     on_degenerate="uniform", generator=gen, backend=backend, progress=False)
        outs.append(fk.run(exact_sampler(gen), start(2, K, gen), T))
    assert outs[0].trace.resampled[1].all()
    assert 1.0 < outs[0].trace.ess[-1, 0] < K - 1  # the final correction weighs prompt 0's particles
    torch.testing.assert_close(outs[0].samples, outs[1].samples, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0].trace.ess, outs[1].trace.ess, rtol=1e-9, atol=1e-9)


def test_step_functions_see_their_moved_states_and_infinite_rewards():
    """The caller's states dict is moved in place, so a step function reading it sees each particle's own
    state; a -inf log-potential (lambda < 0, r = +inf) kills a particle on both loops; no tqdm, no bar."""
    import sys

    gs = torch.Generator().manual_seed(4)
    states = {"h": torch.zeros(8, 1, dtype=torch.float64)}

    def step(x, i):
        assert torch.equal(states["h"], x), i
        x = x + torch.randn(x.shape, generator=gs, dtype=x.dtype)
        states["h"] = x.clone()
        return x, x

    for backend in ("auto", "reference"):
        states["h"] = torch.zeros(8, 1, dtype=torch.float64)
        fusedlab.smc.FKSteering(lambda x0: x0[:, 0], lmbda=3.0, num_particles=4, backend=backend,
                                progress=False).run(step, torch.zeros(8, 1, dtype=torch.float64), 5, states=states)
    lws = []
    for backend in ("auto", "reference"):
        reward = lambda x0: torch.tensor([0.3, math.inf, 0.1, 0.2], dtype=torch.float64)  # noqa: E731
        fk = fusedlab.smc.FKSteering(reward, lmbda=-1.0, potential="rt", num_particles=4, ess_threshold=0.0,
                                     backend=backend, progress=False)
        lws.append(fk.run(lambda x, i: (x, x), torch.zeros(4, 1, dtype=torch.float64), 2).log_weights)
    assert lws[0][0, 1] == -math.inf and lws[1][0, 1] == -math.inf
    torch.testing.assert_close(lws[0], lws[1])
    saved = sys.modules.get("tqdm")
    sys.modules["tqdm"] = None  # import fails
    try:
        fusedlab.smc.FKSteering(lambda x0: x0[:, 0], num_particles=2).run(lambda x, i: (x, x), torch.zeros(4, 1), 2)
    finally:
        if saved is None:
            del sys.modules["tqdm"]
        else:
            sys.modules["tqdm"] = saved


@pytest.mark.parametrize("potential", fusedlab.smc.POTENTIALS)
@pytest.mark.parametrize("ess_threshold, every, reward_dtype", [(1.0, 1, torch.float64), (0.5, 2, torch.float64),
                                                                (0.5, 1, torch.float32)])
def test_fused_cpu_step_equals_the_generic_loop(potential, ess_threshold, every, reward_dtype):
    """CPU runs take torch.ops.fusedlab.fk_step; backend="reference" runs the step op by op. With the same
    seeds both draw the same uniforms, so ancestors agree exactly and everything else to float64 rounding,
    dead particles (NaN rewards) and carried weights included."""
    def run(backend):
        g = torch.Generator().manual_seed(7)
        noise = torch.Generator().manual_seed(8)

        def step(x, i):
            x = 0.8 * x + 0.3 * torch.randn(x.shape, generator=noise, dtype=torch.float64)
            return x, x

        def reward(x0):
            # a strided column, as a classifier's log-probability of one class is (the op reads the stride)
            r = torch.stack([x0[:, 0], -x0[:, 0]], 1).to(reward_dtype)[:, 0]
            r[::13] = float("nan")  # a few dead particles every step
            return r

        fk = fusedlab.smc.FKSteering(reward, lmbda=2.0, potential=potential, num_particles=8, every=every,
                                     ess_threshold=ess_threshold, generator=g, backend=backend, progress=False)
        extra = torch.arange(6 * 8, dtype=torch.float64)
        return fk.run(step, torch.randn(6 * 8, 2, generator=noise, dtype=torch.float64), 9, states={"id": extra})

    a, b = run("auto"), run("reference")
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.log_weights, b.log_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.log_norm, b.log_norm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(a.states["id"], b.states["id"])
    assert [s for s, _, _ in a.trace] == [s for s, _, _ in b.trace]
    for (_, ea, ra), (_, eb, rb) in zip(a.trace, b.trace):
        torch.testing.assert_close(ea, eb)
        assert torch.equal(ra, rb)
    for out in (a, b):  # the whole record at once equals its rows
        assert out.trace.steps == fusedlab.smc.schedule(9, 0, None, every) and len(list(out.trace)) == len(out.trace)
        assert torch.equal(out.trace.ess, torch.stack([e for _, e, _ in out.trace]))
        assert torch.equal(out.trace.resampled, torch.stack([r for _, _, r in out.trace]))
        assert out.trace[-1][0] == 8 and len(out.trace[1:]) == len(out.trace) - 1


@pytest.mark.parametrize("method", fusedlab.smc.METHODS)
def test_latents_move_in_place_only_when_nothing_else_sees_them(method):
    """The CPU loop moves the latents inside the tensor the step returned when it holds the only reference and
    no other tensor shares its storage; a step that keeps its outputs, or returns x0 as a view of x, sees them
    untouched. Every way gives the generic loop's result (residual's ancestors are not sorted: through a
    scratch copy)."""
    def run(backend, keep=None, x0_view=False, numpy=None, weak=None):
        g, noise = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
        ptrs = []  # (input, output) storage addresses per step

        def step(x, i):
            if weak is not None:  # a cache keyed by the tensor (weakly): a hit must hold x's current values
                cache, stale = weak
                if x in cache and not torch.equal(cache[x], x):
                    stale.append(i)
            nxt = 0.7 * x + 0.5 * torch.randn(x.shape, generator=noise, dtype=torch.float64)
            if weak is not None:
                weak[0][nxt] = nxt.clone()
            if numpy is not None:  # memory numpy owns (and the caller keeps)
                numpy.append((nxt.numpy().copy(), nxt.numpy().copy()))
                nxt = torch.from_numpy(numpy[-1][0])
            ptrs.append((x.data_ptr(), nxt.data_ptr()))
            if keep is not None:
                keep.append((nxt, nxt.clone()))
            return nxt, (nxt.view(nxt.shape) if x0_view else nxt * 1.0)

        def reward(x0):
            r = x0[:, 0] - 0.3 * x0[:, 1]
            r[::11] = float("nan")
            return r

        fk = fusedlab.smc.FKSteering(reward, lmbda=3.0, potential="diff", num_particles=8, every=2, method=method,
                                     generator=g, backend=backend, progress=False)
        out = fk.run(step, torch.randn(5 * 8, 2, generator=noise, dtype=torch.float64), 7)
        return out, ptrs

    want, _ = run("reference")
    got, ptrs = run("auto")
    torch.testing.assert_close(got.samples, want.samples, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.log_weights, want.log_weights, rtol=1e-12, atol=1e-12)
    # resampling steps 0, 2, 4 (not the last, 6): the next step received the previous step's own buffer
    assert all(ptrs[i + 1][0] == ptrs[i][1] for i in (0, 2, 4)), ptrs
    for kw in (dict(keep=[]), dict(x0_view=True), dict(numpy=[]), dict(weak=(WeakIdKeyDictionary(), []))):
        got, ptrs = run("auto", **kw)
        torch.testing.assert_close(got.samples, want.samples, rtol=1e-12, atol=1e-12)
        assert all(ptrs[i + 1][0] != ptrs[i][1] for i in (0, 2, 4)), (kw, ptrs)
        for kept, copy in kw.get("keep", []) + kw.get("numpy", []):
            assert (kept == copy).all()
        assert not kw.get("weak", (None, []))[1], kw  # no stale cache hit


def test_one_name_refcount_calibration_is_capped():
    """A tracer that reads frame locals during the calibration holds one more reference to the probe object;
    the baseline stays at most 2, so such a run can never take a tensor held elsewhere for the loop's own."""
    import sys

    from fusedlab.smc import fk

    def tracer(frame, event, arg):
        frame.f_locals  # noqa: B018 (the locals snapshot keeps a reference)
        return tracer

    sys.settrace(tracer)
    try:
        traced = fk._one_name_refcount()
        capped = fk._calibrated_one_name_refs()
    finally:
        sys.settrace(None)
    assert traced >= capped and capped <= 2 and fk._ONE_NAME_REFS <= 2


def test_fk_step_direct_binding_guards(gen):
    """The direct binding skips the dispatcher's checks: other devices and layouts are refused; a lazily negated
    state is moved by value; an in-place move bumps the tensor's version (autograd refuses a stale saved
    tensor), and works on inference tensors (which have no version)."""
    B, K = 3, 4
    r = torch.randn(B * K, generator=gen, dtype=torch.float64)

    def book(rewards=r):
        return [torch.zeros(B, K, dtype=torch.float64), rewards, torch.zeros(B * K, dtype=torch.float64),
                torch.zeros(B * K, dtype=torch.float64), torch.zeros(B, dtype=torch.float64),
                torch.zeros(1, B, dtype=torch.float64), torch.zeros(1, B, dtype=torch.bool), 0]

    def call(state, owned, rewards=r):
        return fusedlab._C.fk_step(*book(rewards), state, None, torch.Generator().manual_seed(1), "diff", 4.0, True,
                                   False, "systematic", 1.0, True, owned)

    x = torch.randn(B * K, 2, generator=gen)
    want = call(x.clone(), False)
    assert not torch.equal(want[0], torch.arange(K).expand(B, K))  # some particle moved
    # a negative view: its values move, not its raw bytes, through the op and the binding
    neg = torch._neg_view(-x)
    assert neg.is_neg() and torch.equal(call(neg, True)[1], want[1])
    assert torch.equal(torch.ops.fusedlab.fk_step(*book(), neg, None, torch.Generator().manual_seed(1), "diff", 4.0, True,
                                                  False, "systematic", 1.0, True)[1], want[1])
    # in place on a tensor autograd saved: its version moves on, so the stale backward raises
    mine, w = x.clone(), torch.ones(2, requires_grad=True)
    y = (mine * w).sum()
    got = call(mine, True)
    assert got[1] is mine and torch.equal(mine, want[1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        inf = x.clone()
    got = call(inf, True)
    assert got[1] is inf and torch.equal(inf, want[1])
    for state, rewards in ((x.to("meta"), r), (x, r.to("meta")), (x.to_sparse(), r)):
        with pytest.raises(RuntimeError, match="dense CPU tensor"):
            call(state, False, rewards)


def test_fk_step_direct_binding_equals_the_op(gen):
    """fusedlab._C.fk_step (the FK loop's per-step call on CPU) runs the op's kernel without the dispatcher:
    the same outputs, the same in-place updates, the same draws, and the op's exception types."""
    B, K = 4, 6
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64)
    r, rs, ap = (torch.randn(B * K, generator=gen, dtype=torch.float64) for _ in range(3))
    ln = torch.randn(B, generator=gen, dtype=torch.float64)
    x = torch.randn(B * K, 3, generator=gen)

    def book(rewards):
        return [lw.clone(), rewards, rs.clone(), ap.clone(), ln.clone(), torch.zeros(2, B, dtype=torch.float64),
                torch.zeros(2, B, dtype=torch.bool), 1]

    for pot in fusedlab.smc.POTENTIALS:
        for rewards, first, last, thr in ((r, True, False, 1.0), (r.float()[::1], False, True, 0.6),
                                          (torch.stack([r, -r], 1)[:, 0], False, False, 0.0)):
            a_book, b_book = book(rewards), book(rewards)
            rest = (pot, 1.5, first, last, "multinomial", thr, True)
            a = torch.ops.fusedlab.fk_step(*a_book, x, None, torch.Generator().manual_seed(5), *rest)
            b = fusedlab._C.fk_step(*b_book, x, None, torch.Generator().manual_seed(5), *rest)
            for t, u in zip(list(a) + a_book[:7], list(b) + b_book[:7]):
                assert t.dtype == u.dtype and torch.equal(t, u)
            # state_owned: the latents moved in place and returned as the state itself, the same values;
            # a non-contiguous state through the op: moved within the op's own contiguous copy
            mine, strided = x.clone(), x.t().contiguous().t()
            c = fusedlab._C.fk_step(*book(rewards), mine, None, torch.Generator().manual_seed(5), *rest, True)
            d = torch.ops.fusedlab.fk_step(*book(rewards), strided, None, torch.Generator().manual_seed(5), *rest)
            assert c[1] is mine and torch.equal(c[1], a[1]) and torch.equal(c[0], a[0])
            assert torch.equal(d[1], a[1]) and torch.equal(strided, x) and not strided.is_contiguous()
    dead = r.clone()
    dead[K:2 * K] = -math.inf  # group 1 dies
    for call in (torch.ops.fusedlab.fk_step, fusedlab._C.fk_step):
        with pytest.raises(ValueError, match="group\\(s\\) 1 have no finite log-weight"):
            call(*book(dead), x, None, None, "diff", 1.0, False, False, "systematic", 1.0, True)
        with pytest.raises(RuntimeError, match="potential must be one of"):
            call(*book(r), x, None, None, "sum", 1.0, False, False, "systematic", 1.0, True)
    with pytest.raises(TypeError):
        fusedlab._C.fk_step(*book(r.tolist()), x, None, None, "diff", 1.0, False, False, "systematic", 1.0, True)


@pytest.mark.parametrize("K", [16, 64])
def test_fk_step_boundary_counts_with_weights_carried_in_place(K):
    """fk_step resamples its log-weights in place (the weights buffer is also the output). Dyadic weights with
    u = 0 put grid points on the CDF, which sends a group from the AVX-512 register path (K = 8 .. 64) back to
    the generic passes: that hand-back must come before anything is written over the weights, or the generic
    passes would read the output instead. Ancestors, moved state and weights equal the resample op's."""
    B = 3
    dyadic = torch.tensor([float(2 ** (j % 5)) for j in range(K)], dtype=torch.float64).log()
    lw = torch.stack([dyadic, dyadic.flip(0), dyadic.roll(3)])
    zeros = torch.zeros(B * K, dtype=torch.float64)
    x = torch.arange(B * K, dtype=torch.float32)[:, None]
    u = torch.zeros(B, 1, dtype=torch.float64)
    book = [lw.clone(), zeros, zeros.clone(), zeros.clone(), torch.zeros(B, dtype=torch.float64),
            torch.zeros(1, B, dtype=torch.float64), torch.zeros(1, B, dtype=torch.bool), 0]
    anc, moved, _ = torch.ops.fusedlab.fk_step(*book, x, u, None, "diff", 0.0, False, False, "systematic", 1.0, True)
    want = fusedlab.smc.resample(lw, "systematic", 1.0, uniforms=u[:, 0], state=x.view(B, K, 1), backend="cpu")
    assert torch.equal(want.ancestors, fusedlab.smc.resample(lw, "systematic", 1.0, uniforms=u[:, 0],
                                                             backend="reference").ancestors)
    assert not torch.equal(want.ancestors, torch.arange(K).expand(B, K))  # the weights matter here
    assert torch.equal(anc.view(B, K), want.ancestors) and torch.equal(moved.view(B, K, 1), want.state)
    assert torch.equal(book[0], want.log_weights)


def test_fk_step_opcheck(gen):
    B, K = 3, 5
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64)
    r, rs, ap = (torch.randn(B * K, generator=gen, dtype=torch.float64) for _ in range(3))
    ln = torch.randn(B, generator=gen, dtype=torch.float64)
    x = torch.randn(B * K, 2, generator=gen)
    u = torch.rand(B, 1, generator=gen, dtype=torch.float64)

    def bookkeeping(rewards=r):  # fresh copies: the op updates log_weights, r_state, applied, log_norm in place
        return (lw.clone(), rewards, rs.clone(), ap.clone(), ln.clone(), torch.zeros(2, B, dtype=torch.float64),
                torch.zeros(2, B, dtype=torch.bool), 1)

    for pot in fusedlab.smc.POTENTIALS:
        for rewards in (r, r.float()):
            torch.library.opcheck(torch.ops.fusedlab.fk_step.default,
                                  (*bookkeeping(rewards), x, u, None, pot, 1.5, False, True, "systematic", 0.7, True),
                                  test_utils=("test_schema", "test_faketensor"))
    # no uniforms: drawn inside from the generator, the stream torch.rand gives
    rest = ("diff", 1.5, False, True, "systematic", 1.0, True)
    torch.library.opcheck(torch.ops.fusedlab.fk_step.default,
                          (*bookkeeping(), x, None, torch.Generator().manual_seed(3), *rest),
                          test_utils=("test_schema", "test_faketensor"))
    a_book, b_book = bookkeeping(), bookkeeping()
    drawn = torch.ops.fusedlab.fk_step(*a_book, x, None, torch.Generator().manual_seed(3), *rest)
    given = torch.ops.fusedlab.fk_step(*b_book, x, torch.rand(B, 1, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(3)), None, *rest)
    for a, b in zip(list(drawn) + list(a_book[:7]), list(given) + list(b_book[:7])):
        assert torch.equal(a, b)
    assert not torch.equal(a_book[0], lw) and not torch.equal(a_book[4], ln)  # updated in place
    # the step's ESS and flags land in row 1 of the histories, row 0 untouched
    ess_hist, res_hist = a_book[5], a_book[6]
    assert torch.equal(ess_hist[0], torch.zeros(B, dtype=torch.float64)) and not res_hist[0].any()
    assert ((ess_hist[1] >= 1) & (ess_hist[1] <= K)).all() and res_hist[1].all()  # threshold 1: all resampled
    assert drawn[2].shape == (B * K,)  # the moved rewards come at the last step only
    assert torch.ops.fusedlab.fk_step(*bookkeeping(), x, u, None, "diff", 1.0, False, False, "systematic", 1.0,
                                      True)[2].shape == (0,)
    with pytest.raises(RuntimeError, match="potential must be one of"):
        torch.ops.fusedlab.fk_step(*bookkeeping(), x, u, None, "sum", 1.0, False, False, "systematic", 1.0, True)
    with pytest.raises(RuntimeError, match="state must have B \\* K = 15 rows"):
        torch.ops.fusedlab.fk_step(*bookkeeping(), x[:4], u, None, "diff", 1.0, False, False, "systematic", 1.0,
                                   True)
    book = bookkeeping()
    with pytest.raises(RuntimeError, match="log_norm must be contiguous float64 of B = 3"):
        torch.ops.fusedlab.fk_step(*book[:4], ln[:2].clone(), *book[5:], x, u, None, "diff", 1.0,
                                   False, False, "systematic", 1.0, True)
    with pytest.raises(RuntimeError, match="row must lie in \\[0, 2\\), got 2"):
        torch.ops.fusedlab.fk_step(*book[:7], 2, x, u, None, "diff", 1.0, False, False, "systematic", 1.0, True)
    with pytest.raises(RuntimeError, match="ess_history and resampled_history must be contiguous"):
        torch.ops.fusedlab.fk_step(*book[:5], book[5].float(), *book[6:], x, u, None, "diff", 1.0, False, False,
                                   "systematic", 1.0, True)
    # a failed check leaves the bookkeeping as it was: the wrapper relies on that to convert and retry
    before = [t.clone() for t in book[:7]]
    with pytest.raises(RuntimeError, match="rewards must be float32 or float64"):
        torch.ops.fusedlab.fk_step(book[0], r.half(), *book[2:], x, None, torch.Generator().manual_seed(0), *rest)
    with pytest.raises(RuntimeError, match="uniforms must have shape"):
        torch.ops.fusedlab.fk_step(*book, x, u[:2], None, *rest)
    for t, t0 in zip(book[:7], before):
        assert torch.equal(t, t0)
