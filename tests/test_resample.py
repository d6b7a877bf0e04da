"""Batched resampling on the C++ CPU path and the reference: exactness, statistics, op registration, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fusedlab
from fusedlab.reference import resample as ref

METHODS = fusedlab.smc.METHODS


def draw_uniforms(method, B, K, gen):
    return torch.rand((B,) if method == "systematic" else (B, K), dtype=torch.float64, generator=gen)


def random_log_weights(B, K, gen, dtype=torch.float64, dead=0.2, scale=3.0):
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64) * scale
    lw[torch.rand(B, K, generator=gen) < dead] = -math.inf
    lw[:, 0] = torch.where(torch.isinf(lw).all(-1), torch.zeros(B, dtype=torch.float64), lw[:, 0])  # keep one alive
    return lw.to(dtype)


def assert_same(a, b, rtol=1e-12):
    assert torch.equal(a.ancestors, b.ancestors)
    assert torch.equal(a.resampled, b.resampled) and torch.equal(a.degenerate, b.degenerate)
    torch.testing.assert_close(a.log_weights, b.log_weights, rtol=rtol, atol=rtol, equal_nan=True)
    torch.testing.assert_close(a.ess, b.ess, rtol=rtol, atol=0)
    torch.testing.assert_close(a.log_norm, b.log_norm, rtol=rtol, atol=rtol)


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_matches_reference(method, thr, dtype, gen):
    B, K = 37, 53
    lw = random_log_weights(B, K, gen, dtype)
    lw[3, 5] = math.nan
    u = draw_uniforms(method, B, K, gen)
    a = fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="cpu")
    b = fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="reference")
    assert_same(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6)
    assert a.log_weights.dtype == dtype and a.ess.dtype == torch.float64 and a.ancestors.dtype == torch.int64


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), K=st.integers(1, 70), method=st.sampled_from(METHODS),
       thr=st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.0]), dead=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_hypothesis(B, K, method, thr, dead, seed):
    gen = torch.Generator().manual_seed(seed)
    lw = random_log_weights(B, K, gen, dead=dead)
    u = draw_uniforms(method, B, K, gen)
    assert_same(fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="cpu"),
                fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 200, 1031])
def test_cpu_matches_reference_around_vector_widths(K, dtype, gen):
    """The CPU kernel's passes run eight lanes or eight running-sum segments at a time with a scalar tail:
    group sizes on either side of those widths, NaN and -inf anywhere (vector body and tail)."""
    B = 6
    for method in METHODS:
        for thr in (0.0, 0.9, 1.0):
            lw = random_log_weights(B, K, gen, dtype, dead=0.1)
            lw[torch.rand(B, K, generator=gen) < 0.1] = math.nan
            lw[:, 0] = torch.where(torch.isfinite(lw).any(-1), lw[:, 0], torch.zeros(B, dtype=dtype))
            u = draw_uniforms(method, B, K, gen)
            assert_same(fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="cpu"),
                        fusedlab.smc.resample(lw, method, thr, uniforms=u, backend="reference"),
                        rtol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [8, 16, 24, 40, 56, 64, 72])
def test_small_systematic_path_matches_generic_passes(K, dtype, gen):
    """Systematic resampling of K = 8, 16, ..., 64 particles runs in registers on AVX-512 CPUs; stratified
    resampling with the same uniform at every point has the same grid points and runs the generic passes. The
    two agree bit for bit: ancestors, weights, ESS and log_norm, with NaN, -inf, carried groups, groups whose
    last particles are dead, degenerate groups (handed back to the generic path) and equal weights with u = 0
    (grid points on the CDF, also handed back). K = 72 checks the comparison itself on the generic path."""
    B = 40
    lw = random_log_weights(B, K, gen, dtype, dead=0.15)
    lw[torch.rand(B, K, generator=gen) < 0.05] = math.nan
    lw[0] = 0.0  # equal weights: with u = 0 every point sits on the CDF
    lw[1, K // 2:] = -math.inf
    lw[2] = -math.inf  # degenerate
    lw[3, 3] = math.inf  # degenerate too: an infinite weight
    lw[4] *= 40.0  # nearly all weight on one particle
    u = torch.rand(B, dtype=torch.float64, generator=gen)
    u[0] = 0.0
    for thr in (0.5, 1.0):
        a = fusedlab.smc.resample(lw, "systematic", thr, uniforms=u, on_degenerate="uniform", backend="cpu")
        b = fusedlab.smc.resample(lw, "stratified", thr, uniforms=u[:, None].expand(B, K).contiguous(),
                                  on_degenerate="uniform", backend="cpu")
        assert_same(a, b, rtol=0)
        assert a.resampled[2:5].all() and a.degenerate[2:4].all() and not a.degenerate[4:].any()
        assert a.resampled.all() if thr == 1.0 else not a.resampled.all()  # both paths: resampled and carried


@pytest.mark.parametrize("K", [1, 2, 3, 4, 10, 16, 64, 100, 1024])
def test_systematic_grid_ties(K, gen):
    """Systematic resampling counts the grid points below each cdf * (K / total) in closed form and falls
    back to comparing with the points where one may sit on the boundary: weights whose CDF lands exactly on
    grid points (equal and dyadic weights), with u at 0, 1/2, just below 1 and tiny, and CDF values near
    the subnormal range, give the reference's ancestors exactly."""
    dyadic = torch.tensor([float(2 ** (j % 5)) for j in range(K)], dtype=torch.float64)
    rows = [torch.zeros(K, dtype=torch.float64), dyadic.log(), torch.randn(K, generator=gen, dtype=torch.float64)]
    if K > 2:
        half = torch.zeros(K, dtype=torch.float64)
        half[K // 2:] = -math.inf  # the CDF reaches 1 at the middle particle
        rows.append(half)
        tiny = torch.zeros(K, dtype=torch.float64)  # CDF values near and in the subnormal range
        tiny[0], tiny[1] = -744.0, -700.0
        rows.append(tiny)
    lw = torch.stack(rows)
    B = lw.shape[0]
    for u0 in (0.0, 0.5, 1.0 - 2.0 ** -53, 2.0 ** -60):
        u = torch.full((B,), u0, dtype=torch.float64)
        assert_same(fusedlab.smc.resample(lw, "systematic", 1.0, uniforms=u, backend="cpu"),
                    fusedlab.smc.resample(lw, "systematic", 1.0, uniforms=u, backend="reference"))


def test_flags_are_views_of_the_op_status(gen):
    """The op writes the resampled and degenerate flags as 0/1 bytes [B, 2]; the wrapper views them as bool
    instead of launching comparisons, so both flags share the op's status buffer."""
    lw = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    lw[0] = 0.0  # ESS = K: carried
    lw[1] = -math.inf  # degenerate
    lw[2] = torch.tensor([0.0, -50.0, -50.0, -50.0, -50.0, -50.0])  # ESS near 1: resampled at threshold 0.5
    u = torch.rand(5, dtype=torch.float64, generator=gen)
    for backend in ("cpu", "reference"):
        r = fusedlab.smc.resample(lw, ess_threshold=0.5, uniforms=u, on_degenerate="uniform", backend=backend)
        assert r.resampled.dtype == torch.bool and r.degenerate.dtype == torch.bool
        assert r.resampled.shape == (5,) and r.degenerate.shape == (5,)
        assert r.resampled.untyped_storage().data_ptr() == r.degenerate.untyped_storage().data_ptr()
        assert r.degenerate.tolist() == [False, True, False, False, False]
        assert r.resampled[1] and r.resampled[2] and not r.resampled[0]


def test_log_norm_ess_and_carried_weights(gen):
    lw = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    r = fusedlab.smc.resample(lw, ess_threshold=0.0)
    w = torch.softmax(lw, -1)
    torch.testing.assert_close(r.log_norm, torch.logsumexp(lw, -1) - math.log(9))
    torch.testing.assert_close(r.ess, 1.0 / (w * w).sum(-1))
    assert not r.resampled.any()
    assert torch.equal(r.ancestors, torch.arange(9).expand(5, 9))
    torch.testing.assert_close(r.log_weights.exp().mean(-1), torch.ones(5, dtype=torch.float64))  # mean 1, kept
    torch.testing.assert_close(torch.softmax(r.log_weights, -1), w)


def test_threshold_semantics(gen):
    lw = torch.zeros(2, 6, dtype=torch.float64)  # ESS = K exactly
    assert fusedlab.smc.resample(lw, ess_threshold=1.0).resampled.all()
    assert not fusedlab.smc.resample(lw, ess_threshold=0.99).resampled.any()
    lw = torch.tensor([[0.0, -50.0, -50.0, -50.0]])
    assert not fusedlab.smc.resample(lw, ess_threshold=0.0).resampled.any()
    assert fusedlab.smc.resample(lw, ess_threshold=0.5).resampled.all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_never_selected(method, gen):
    lw = torch.log(torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    u = torch.zeros((3,) if method == "systematic" else (3, 3), dtype=torch.float64)  # u = 0 exactly
    for backend in ("cpu", "reference"):
        r = fusedlab.smc.resample(lw, method, uniforms=u, backend=backend)
        assert (r.ancestors[0] != 0).all() and (r.ancestors[1] == 2).all() and (r.ancestors[2] == 0).all()
    lw = random_log_weights(64, 50, gen, dead=0.7)
    r = fusedlab.smc.resample(lw, method, generator=gen)
    assert torch.isfinite(torch.gather(lw, 1, r.ancestors)).all()


def test_nan_counts_as_minus_inf(gen):
    lw = random_log_weights(4, 10, gen)
    lw2 = lw.clone()
    lw[:, 3] = math.nan
    lw2[:, 3] = -math.inf
    u = draw_uniforms("stratified", 4, 10, gen)
    assert_same(fusedlab.smc.resample(lw, "stratified", uniforms=u), fusedlab.smc.resample(lw2, "stratified", uniforms=u))


def test_degenerate_groups(gen):
    lw = torch.randn(4, 5, generator=gen)
    lw[1] = -math.inf
    lw[2] = math.nan
    lw[3, 2] = math.inf
    state = torch.randn(4, 5, 2, generator=gen)
    for backend in ("cpu", "reference"):  # the C++ op raises itself; the reference path checks in Python
        with pytest.raises(ValueError, match=r"group\(s\) 1, 2, 3 have no finite"):
            fusedlab.smc.resample(lw, backend=backend)
        with pytest.raises(ValueError, match=r"group\(s\) 1, 2, 3 have no finite"):
            fusedlab.smc.resample(lw, state=state, backend=backend)
    r = fusedlab.smc.resample(lw, on_degenerate="uniform", ess_threshold=0.0, generator=gen)
    assert r.degenerate.tolist() == [False, True, True, True]
    assert r.resampled.tolist() == [False, True, True, True]
    assert torch.isinf(r.log_norm[1:]).all() and (r.ess[1:] == 0).all()
    assert (r.log_weights[1:] == 0).all() and torch.isfinite(r.log_weights).all()
    counts = ref.offspring_counts(r.ancestors, 5)[1:]
    assert (counts == 1).all()  # systematic on equal weights: every particle exactly once


def test_op_raise_degenerate_flag(gen):
    """The C++ ops' raise_degenerate: a ValueError naming at most ten degenerate groups, raised after the
    outputs are computed; without it the flags report them."""
    lw = torch.randn(14, 3, generator=gen)
    lw[2:14] = -math.inf
    u = torch.rand(14, 1, dtype=torch.float64, generator=gen)
    with pytest.raises(ValueError, match=r"group\(s\) 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, \.\.\. have no finite"):
        torch.ops.fusedlab.resample(lw, u, "systematic", 1.0, None, True)
    with pytest.raises(ValueError, match="on_degenerate='uniform'"):
        torch.ops.fusedlab.resample_gather(lw, u, "systematic", 1.0, torch.zeros(14, 3, 1), None, True)
    status = torch.ops.fusedlab.resample(lw, u, "systematic", 1.0, None, False)[4]
    assert status[:, 1].tolist() == [0, 0] + [1] * 12
    lw[2:14] = 0.0
    torch.ops.fusedlab.resample(lw, u, "systematic", 1.0, None, True)  # nothing degenerate: no error


def test_residual_deterministic_part():
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)
    r = fusedlab.smc.resample(w.log(), "residual", uniforms=torch.rand(1, 4, dtype=torch.float64))
    assert r.ancestors.tolist() == [[0, 0, 1, 2]] or r.ancestors.tolist() == [[0, 0, 1, 3]]
    r = fusedlab.smc.resample(torch.tensor([[0.0, 0.0]]), "residual", uniforms=torch.rand(1, 2, dtype=torch.float64))
    assert r.ancestors.tolist() == [[0, 1]]


def test_noncontiguous_and_half_inputs(gen):
    base = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    lw = base.t()  # [6, 9], non-contiguous
    assert not lw.is_contiguous()
    u = draw_uniforms("stratified", 6, 9, gen)
    assert_same(fusedlab.smc.resample(lw, "stratified", uniforms=u), fusedlab.smc.resample(lw.contiguous(), "stratified", uniforms=u))
    h = lw.to(torch.bfloat16)
    r = fusedlab.smc.resample(h, "stratified", uniforms=u)
    assert r.log_weights.dtype == torch.float32
    assert_same(r, fusedlab.smc.resample(h.float(), "stratified", uniforms=u))


def test_autocast_and_deterministic(gen):
    x, w = torch.randn(8, 32, generator=gen), torch.randn(32, 16, generator=gen)
    u = draw_uniforms("systematic", 8, 16, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lw = x @ w  # bf16 under autocast
        assert lw.dtype == torch.bfloat16
        a = fusedlab.smc.resample(lw, uniforms=u)
    assert a.log_weights.dtype == torch.float32  # half types are computed in float32
    assert_same(a, fusedlab.smc.resample(lw.float(), uniforms=u))
    lw = lw.float()
    torch.use_deterministic_algorithms(True)
    try:
        b = fusedlab.smc.resample(lw, uniforms=u)
        state = torch.randn(8, 16, 3, generator=gen)
        g1, g2 = fusedlab.smc.gather(state, b.ancestors), fusedlab.smc.gather(state, b.ancestors)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same(a, b)
    assert torch.equal(g1, g2)


def test_generator_reproducible():
    lw = torch.randn(16, 32)
    a = fusedlab.smc.resample(lw, "multinomial", generator=torch.Generator().manual_seed(7))
    b = fusedlab.smc.resample(lw, "multinomial", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ancestors, b.ancestors)


@pytest.mark.parametrize("method", METHODS)
def test_cpu_op_draws_what_torch_rand_draws(method, gen):
    """Without uniforms the C++ op draws from the generator itself: the same values, in the same order, as
    torch.rand with that generator, and the generator advances as far (the next draw agrees too)."""
    B, K = 6, 9
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64)
    state = torch.randn(B, K, 2, generator=gen)
    for op, extra in ((torch.ops.fusedlab.resample, ()), (torch.ops.fusedlab.resample_gather, (state,))):
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        own = op(lw, None, method, 1.0, *extra, generator=g1)
        u = torch.rand((B, 1) if method == "systematic" else (B, K), dtype=torch.float64, generator=g2)
        given = op(lw, u, method, 1.0, *extra)
        for a, b in zip(own, given):
            assert torch.equal(a, b)
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    # the wrapper takes this path: a seeded call gives what the explicit torch.rand uniforms give
    r = fusedlab.smc.resample(lw, method, generator=torch.Generator().manual_seed(3))
    u = torch.rand((B,) if method == "systematic" else (B, K), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(r.ancestors, fusedlab.smc.resample(lw, method, uniforms=u).ancestors)


# ------------------------------------------------------------------------------------------------ gather


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("trailing", [(), (16,), (3, 5)])
def test_gather(dtype, trailing, gen):
    B, K = 5, 11
    state = (torch.randn(B, K, *trailing, generator=gen) * 10).to(dtype)
    anc = torch.randint(0, K, (B, K), generator=gen)
    expect = ref.gather(state, anc)
    assert torch.equal(fusedlab.smc.gather(state, anc), expect)
    assert torch.equal(fusedlab.smc.gather(state, anc, backend="reference"), expect)
    inplace = state.clone()
    assert fusedlab.smc.gather_(inplace, anc) is inplace
    assert torch.equal(inplace, expect)
    if trailing:  # strided state
        strided = state.transpose(0, -1).contiguous().transpose(0, -1)  # same shape, other strides
        assert not strided.is_contiguous()
        assert torch.equal(fusedlab.smc.gather(strided, anc), ref.gather(strided, anc))


@pytest.mark.parametrize("B, trailing, dtype", [(64, (32,), torch.float32), (128, (16,), torch.float32),
                                                (64, (35,), torch.float32), (64, (72,), torch.bfloat16)])
def test_gather_large_outputs(B, trailing, dtype, gen):
    """Outputs of 8 MiB and more, rows of 128, 64, 140 and 144 bytes (whole 64-byte lines: streamed stores on
    AVX-512 CPUs; else fixed-size and generic row copies), standalone and fused with the resampling."""
    K = 1024
    state = torch.randn(B, K, *trailing, generator=gen).to(dtype)
    anc = torch.randint(0, K, (B, K), generator=gen)
    expect = ref.gather(state, anc)
    assert torch.equal(fusedlab.smc.gather(state, anc), expect)
    lw = random_log_weights(B, K, gen)
    r = fusedlab.smc.resample(lw, "systematic", 1.0, uniforms=torch.rand(B, generator=gen, dtype=torch.float64),
                              state=state)
    assert torch.equal(r.state, ref.gather(state, r.ancestors))


@pytest.mark.parametrize("method", METHODS)
def test_fused_resample_gather(method, gen):
    B, K = 9, 13
    lw = random_log_weights(B, K, gen)
    state = torch.randn(B, K, 2, 3, generator=gen)
    u = draw_uniforms(method, B, K, gen)
    r = fusedlab.smc.resample(lw, method, 0.5, uniforms=u, state=state)
    assert torch.equal(r.state, ref.gather(state, r.ancestors))
    assert_same(r, fusedlab.smc.resample(lw, method, 0.5, uniforms=u))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_residual_keeps_whole_copies(backend, gen):
    """Weights in whole ratios make K w / S whole numbers, which rounding puts a few ulps either side: residual
    resampling still gives each particle at least floor(K w / S) copies, and both backends the same ancestors."""
    patterns = [[1, 2, 3], [6, 2, 1], [1, 1, 1, 1, 2, 2], [3, 1, 0, 2, 1, 1], [5, 3, 2, 2, 1, 1, 1, 1]]
    for pattern in patterns:
        w = torch.tensor(pattern, dtype=torch.float64)
        K = len(pattern)
        x = w.log()[None].expand(64, K).contiguous()
        u = torch.rand(64, K, generator=gen, dtype=torch.float64)
        anc = fusedlab.smc.resample(x, "residual", uniforms=u, backend=backend).ancestors
        copies = torch.stack([(anc == j).sum(-1) for j in range(K)], -1)
        whole = torch.floor(K * w / w.sum() + 1e-9).to(torch.int64)
        assert (copies >= whole).all(), (pattern, copies[0].tolist(), whole.tolist())
        assert torch.equal(anc, fusedlab.smc.resample(x, "residual", uniforms=u, backend="reference").ancestors)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_in_place_gather_and_autograd(backend):
    """gather_ under autograd: a tensor autograd saved is seen to change (its version moves), a leaf that
    requires grad is refused, and a non-leaf's gradient flows through the move; both backends agree."""
    anc = torch.tensor([[2, 2, 0]])
    w = torch.ones(1, 3, 1, requires_grad=True)
    state = torch.arange(3.0).reshape(1, 3, 1)
    used = (w * state).sum()  # saves state
    version = state._version
    fusedlab.smc.gather_(state, anc, backend=backend)
    assert state._version > version and state.flatten().tolist() == [2.0, 2.0, 0.0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        used.backward()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fusedlab.smc.gather_(torch.zeros(1, 3, 1, requires_grad=True), anc, backend=backend)
    a = torch.arange(3.0, requires_grad=True)
    b = a.reshape(1, 3, 1) * 1.0
    fusedlab.smc.gather_(b, anc, backend=backend)
    (b.flatten() * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert a.grad.tolist() == [100.0, 0.0, 11.0]


def test_gather_rejects_out_of_range():
    with pytest.raises(RuntimeError, match="ancestors must lie in"):
        fusedlab.smc.gather(torch.zeros(1, 3), torch.tensor([[0, 3, 1]]))
    # past one thread's share of the check (65536 entries): the first offender is named, whichever thread
    # found one, and the in-place form leaves the state as it was
    anc = torch.randint(0, 8, (20000, 8), generator=torch.Generator().manual_seed(0))
    anc[17000, 5], anc[19999, 7], anc[9000, 2] = 8, -1, -3
    state = torch.randn(20000, 8, 2)
    before = state.clone()
    for fn in (fusedlab.smc.gather, fusedlab.smc.gather_):
        with pytest.raises(RuntimeError, match=r"in \[0, 8\), found -3 at flat index 72002"):
            fn(state, anc, backend="cpu")
    assert torch.equal(state, before)


# ------------------------------------------------------------------------------------------------ statistics
# Offspring counts N_j over B independent groups sharing one weight vector W: E[N_j] = K W_j for every scheme.
# The per-group variance of N_j is at most K W_j (1 - W_j) (multinomial, the largest), so the mean over B
# groups is tested within 5.5 standard errors: a false failure has probability < 4e-8 per particle, < 2e-6
# over the 4 schemes x 12 particles. W and the draws come from fixed seeds, so the test is repeatable.


def dirichlet_weights(K, seed):
    e = -torch.rand(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log()
    return e / e.sum()


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_offspring(method):
    gen = torch.Generator().manual_seed(1234)
    K, B = 12, 40000
    W = dirichlet_weights(K, 5)
    lw = W.log().expand(B, K).contiguous()
    r = fusedlab.smc.resample(lw, method, generator=gen)
    counts = ref.offspring_counts(r.ancestors, K).double()
    se = torch.sqrt(K * W * (1 - W) / B)
    z = (counts.mean(0) - K * W).abs() / se.clamp_min(1e-12)
    assert (z < 5.5).all(), z


def test_lower_variance_than_multinomial():
    # Systematic, stratified and residual offspring counts vary far less than the multinomial K W (1 - W):
    # for this fixed W the exact variances are below a third of it, and with B = 20000 groups the
    # estimates have < 3% relative error, so the factor-1.5 margin holds for this (fixed) seed and W.
    gen = torch.Generator().manual_seed(99)
    K, B = 16, 20000
    W = dirichlet_weights(K, 6)
    lw = W.log().expand(B, K).contiguous()
    var = {}
    for method in METHODS:
        counts = ref.offspring_counts(fusedlab.smc.resample(lw, method, generator=gen).ancestors, K).double()
        var[method] = counts.var(0).sum().item()
    multi = (K * W * (1 - W)).sum().item()
    assert abs(var["multinomial"] / multi - 1) < 0.1, (var, multi)
    for method in ("systematic", "stratified", "residual"):
        assert var[method] * 1.5 < var["multinomial"], var


@pytest.mark.parametrize("method", METHODS)
def test_matches_particles_library(method, gen):
    """The `particles` library's own schemes, replayed with the same random numbers, give the same ancestors."""
    resampling = pytest.importorskip("particles.resampling")
    K = 40
    for trial in range(20):
        W = torch.distributions.Dirichlet(torch.ones(K) * 0.5).sample((1,), ).double()[0].numpy()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        np.random.seed(seed)
        theirs = getattr(resampling, method)(W)
        np.random.seed(seed)
        if method == "systematic":
            u = np.random.rand(1)
        elif method == "stratified":
            u = np.random.rand(K)
        elif method == "multinomial":
            u = resampling.uniform_spacings(K)
        else:
            R = K - int(np.floor(K * W).sum())
            u = np.concatenate([resampling.uniform_spacings(R), np.zeros(K - R)]) if R else np.zeros(K)
        lw = torch.from_numpy(np.log(W))[None]
        ut = torch.from_numpy(np.asarray(u, dtype=np.float64)).reshape((1,) if method == "systematic" else (1, K))
        ours = fusedlab.smc.resample(lw, method, uniforms=ut).ancestors[0].numpy()
        assert np.array_equal(ours, theirs), (trial, ours, theirs)


# ------------------------------------------------------------------------------------------------ registration


def _opcheck_inputs(gen, K=6, B=3):
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.rand(B, K, generator=gen, dtype=torch.float64)
    state = torch.randn(B, K, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    return lw, u, state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("thr", [0.0, 1.0])
def test_opcheck(method, thr, gen):
    lw, u, state = _opcheck_inputs(gen)
    if method == "systematic":
        u = u[:, :1].contiguous()
    torch.library.opcheck(torch.ops.fusedlab.resample.default, (lw, u, method, thr))
    torch.library.opcheck(torch.ops.fusedlab.resample_gather.default, (lw, u, method, thr, state))
    torch.library.opcheck(torch.ops.fusedlab.resample.default, (lw, u, method, thr, None, True))
    anc = torch.randint(0, 6, (3, 6), generator=gen)
    torch.library.opcheck(torch.ops.fusedlab.gather.default, (state, anc))
    torch.library.opcheck(torch.ops.fusedlab.gather_.default, (state.detach().clone(), anc))
    if method == "systematic" and thr == 1.0:  # an 8 MiB state of 64-byte rows: the streamed stores
        big = torch.randn(128, 1024, 16, generator=gen)
        lw_big = torch.randn(128, 1024, generator=gen)
        u_big = torch.rand(128, 1, generator=gen, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fusedlab.resample_gather.default, (lw_big, u_big, method, thr, big))
        anc_big = torch.randint(0, 1024, (128, 1024), generator=gen)
        torch.library.opcheck(torch.ops.fusedlab.gather.default, (big, anc_big))
    if method == "systematic":  # K = 64: the AVX-512 register path, resampled and (thr < 1) carried groups
        spread = torch.tensor([[0.1], [4.0], [0.1], [4.0], [9.0]], dtype=torch.float64)
        lw64 = torch.randn(5, 64, generator=gen, dtype=torch.float64) * spread
        u64 = torch.rand(5, 1, generator=gen, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fusedlab.resample.default, (lw64, u64, method, thr))
        torch.library.opcheck(torch.ops.fusedlab.resample_gather.default,
                              (lw64.float(), u64, method, thr, torch.randn(5, 64, 3, generator=gen)))


def test_gradcheck(gen):
    lw, u, state = _opcheck_inputs(gen)

    def carried(x):
        r = fusedlab.smc.resample(x, "stratified", 0.0, uniforms=u)
        return r.log_weights, r.ess, r.log_norm

    torch.autograd.gradcheck(carried, (lw,))
    x = lw.detach().clone()
    x[0, 1] = -math.inf  # a dead particle gets zero gradient and the rest stay exact
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda y: fusedlab.smc.resample(y, "stratified", 0.0, uniforms=u).log_norm, (x,))
    # resampled groups: log_weights are constant 0, ess and log_norm still differentiable; every backend
    for backend in ("cpu", "reference"):
        torch.autograd.gradcheck(
            lambda y: fusedlab.smc.resample(y, "stratified", 1.0, uniforms=u, backend=backend)[2:4], (lw,))
    # a +inf makes the group degenerate: its outputs are constants and get no gradient
    y = lw.detach().clone()
    y[1, 2] = math.inf
    y.requires_grad_(True)
    r = fusedlab.smc.resample(y, "stratified", 0.0, uniforms=u, on_degenerate="uniform")
    (r.log_norm.nan_to_num(neginf=0).sum() + r.ess.sum() + r.log_weights.sum()).backward()
    assert (y.grad[1] == 0).all() and (y.grad[0] != 0).any()
    anc = torch.randint(0, 6, (3, 6), generator=gen)
    torch.autograd.gradcheck(lambda s: fusedlab.smc.gather(s, anc), (state,))
    torch.autograd.gradcheck(lambda s: fusedlab.smc.resample(lw.detach(), "stratified", 1.0, uniforms=u, state=s).state,
                             (state,))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="inductor")
    def step(lw, u, state):
        r = fusedlab.smc.resample(lw, "systematic", 0.5, uniforms=u)
        return r.log_weights, r.log_norm, fusedlab.smc.gather(state, r.ancestors)

    lw = torch.randn(4, 8, generator=gen)
    u = torch.rand(4, dtype=torch.float64, generator=gen)
    state = torch.randn(4, 8, 3, generator=gen)
    got = step(lw, u, state)
    r = fusedlab.smc.resample(lw, "systematic", 0.5, uniforms=u)
    torch.testing.assert_close(got[0], r.log_weights)
    torch.testing.assert_close(got[1], r.log_norm)
    torch.testing.assert_close(got[2], ref.gather(state, r.ancestors))


def _through_op(lw, u, method, thr, state=None, generator=None, raise_degenerate=False):
    """torch.ops' result in ResampleResult's order (the dispatcher's path, below autograd)."""
    with torch._C._AutoDispatchBelowAutograd():
        if state is None:
            out = torch.ops.fusedlab.resample(lw, u, method, thr, generator, raise_degenerate) + (None,)
        else:
            out = torch.ops.fusedlab.resample_gather(lw, u, method, thr, state, generator, raise_degenerate)
    flags = out[4].view(torch.bool)
    return fusedlab.smc.ResampleResult(out[1], out[0], out[2], out[3], flags[:, 0], flags[:, 1], out[5])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_state", [False, True])
def test_unboxed_call_matches_op(method, with_state, gen):
    """An eager call with nothing to record goes through fusedlab._C.resample (the op by an unboxed call below
    autograd): field for field what the op returns, for explicit uniforms and for a generator seeded alike."""
    lw = random_log_weights(7, 13, gen, dtype=torch.float32)
    lw[3] = -math.inf  # a degenerate group, resampled uniformly
    state = torch.randn(7, 13, 2, 3, generator=gen) if with_state else None
    u = draw_uniforms(method, 7, 13, gen)
    u_op = u[:, None] if method == "systematic" else u
    for thr in (0.0, 0.6, 1.0):
        got = fusedlab.smc.resample(lw, method, thr, uniforms=u, state=state, on_degenerate="uniform")
        want = _through_op(lw, u_op, method, thr, state)
        assert_same(got, want, rtol=0)
        assert got.resampled.dtype == torch.bool and got.degenerate[3] and not got.degenerate[2]
        assert (got.state is None) == (state is None) and (state is None or torch.equal(got.state, want.state))
        got = fusedlab.smc.resample(lw, method, thr, generator=torch.Generator().manual_seed(5), state=state,
                                    on_degenerate="uniform")
        want = _through_op(lw, None, method, thr, state, torch.Generator().manual_seed(5))
        assert_same(got, want, rtol=0)
    with pytest.raises(ValueError, match=r"group\(s\) 3 have no finite log-weight"):
        fusedlab.smc.resample(lw, method, uniforms=u, state=state)
    with pytest.raises(ValueError, match=r"group\(s\) 3 have no finite log-weight"):
        fusedlab._C.resample(lw, u_op, method, 1.0, state, None, True)


def test_unboxed_call_only_where_nothing_would_miss_the_op(gen):
    """A TorchFunctionMode must still see the op (fusedlab._C.resample's C++ call would bypass it), and a call
    that records an autograd graph goes through the op and its autograd formula."""
    from torch.overrides import TorchFunctionMode

    class Recorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    lw = torch.randn(3, 8, generator=gen)
    state = torch.randn(3, 8, 4, generator=gen)
    with Recorder() as rec:
        fusedlab.smc.resample(lw, state=state)
        fusedlab.smc.resample(lw)
    assert torch.ops.fusedlab.resample_gather.default in rec.ops and torch.ops.fusedlab.resample.default in rec.ops
    x = lw.clone().requires_grad_(True)
    r = fusedlab.smc.resample(x, ess_threshold=0.0)
    assert r.log_norm.grad_fn is not None
    r.log_norm.sum().backward()
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(3), rtol=1e-6, atol=1e-6)  # d logsumexp sums to 1


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: fusedlab.smc.resample(torch.zeros(5)), ValueError, "log_weights must be 2-D"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 0)), ValueError, "K >= 1"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), method="sytematic"), ValueError, "did you mean 'systematic'"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), uniforms=torch.rand(2, 3)), ValueError, r"uniforms must have shape \[2\]"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), "stratified", uniforms=torch.rand(2)), ValueError, r"\[2, 3\]"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), uniforms=torch.rand(2, device="meta")), ValueError, "uniforms must be on cpu"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), ess_threshold=-1), ValueError, "ess_threshold"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), ess_threshold=math.nan), ValueError, "ess_threshold"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), on_degenerate="skip"), ValueError, "on_degenerate"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), backend="gpu"), ValueError, "backend must be one of"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), state=torch.zeros(2, 4)), ValueError, r"state must have shape \[B, K, ...\] = \[2, 3"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), uniforms=torch.rand(2), generator=torch.Generator()), ValueError, "not both"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), uniforms=torch.tensor([0.5, 1.0])), ValueError, r"uniforms must lie in \[0, 1\)"),
    (lambda: fusedlab.smc.resample(torch.zeros(2, 3), "stratified", uniforms=torch.full((2, 3), math.nan)), ValueError, "NaN"),
    (lambda: fusedlab.smc.gather(torch.zeros(2, 3), torch.zeros(2, 3)), TypeError, "ancestors must be an integer"),
    (lambda: fusedlab.smc.gather(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.int64)), ValueError, "state must have shape"),
    (lambda: fusedlab.smc.gather_(torch.zeros(3, 2).t(), torch.zeros(2, 3, dtype=torch.int64)), ValueError, "contiguous"),
])
def test_errors_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_cpp_checks_name_the_argument():
    with pytest.raises(RuntimeError, match="method must be one of"):
        torch.ops.fusedlab.resample(torch.zeros(2, 3), torch.rand(2, 1, dtype=torch.float64), "sorted", 1.0)
    with pytest.raises(RuntimeError, match="uniforms must be float64"):
        torch.ops.fusedlab.resample(torch.zeros(2, 3), torch.rand(2, 1), "systematic", 1.0)
    with pytest.raises(RuntimeError, match=r"uniforms must have shape \[2, 3\]"):
        torch.ops.fusedlab.resample(torch.zeros(2, 3), torch.rand(2, 1, dtype=torch.float64), "stratified", 1.0)


def test_backends_listing():
    b = fusedlab.backends()
    assert b[0] == "auto" and b[-2:] == ["cpu", "reference"]
    if not torch.cuda.is_available():
        assert "cuda" not in b
        with pytest.raises((RuntimeError, ValueError), match="backend='cuda' is not available|needs CUDA tensors"):
            fusedlab.smc.resample(torch.zeros(2, 3), backend="cuda")


def test_backend_queries_compile_to_constants():
    """backends() and resolve() run inside compiled code without graph breaks (they read cached answers)."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + len(fusedlab.backends()), fullgraph=True)
    assert f(torch.zeros(2)).tolist() == [len(fusedlab.backends())] * 2


def test_op_checks_uniform_values_on_cpu():
    """The ops called directly (past the wrapper's checks) refuse NaN or out-of-range uniforms on the CPU."""
    x = torch.randn(2, 4, dtype=torch.float64)
    for bad in (float("nan"), 1.0, -0.5):
        with pytest.raises(RuntimeError, match=r"uniforms must lie in \[0, 1\)"):
            torch.ops.fusedlab.resample.default(x, torch.full((2, 1), bad, dtype=torch.float64), "systematic", 1.0)
