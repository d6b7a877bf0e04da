"""GPU backends of the resample family ("cuda" and "triton") against the reference, on a CUDA device.

Same explicit uniforms everywhere, so ancestors and status must be identical; log-weights, ESS and log_norm
agree to float64 rounding (the sums run in another order). Skipped without a GPU (marker `gpu`) and per
backend when fusedlab.backends() does not list it.
"""
import math

import pytest
import torch

import fusedlab
from fusedlab.reference import resample as ref

pytestmark = pytest.mark.gpu

METHODS = fusedlab.smc.METHODS
GPU_BACKENDS = ("cuda", "triton")
DEV = "cuda"


def need(backend):
    if backend not in fusedlab.backends():
        pytest.skip(f"backend {backend!r} not available here ({fusedlab.backends()})")


def poison_allocator(mb=64):
    """Leave NaN bytes in the caching allocator's free blocks, so outputs a kernel fails to write show up:
    one large block for the large pool, and many blocks of 4 KiB to 512 KiB for the small pool (<= 1 MiB)."""
    blocks = [torch.full((mb << 18,), math.nan, dtype=torch.float32, device=DEV)]
    blocks += [torch.full((n,), math.nan, dtype=torch.float32, device=DEV) for n in [1 << 10] * 64 + [1 << 17] * 32]
    del blocks


def log_weights(B, K, gen, dtype, degenerate=True):
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64) * 3
    lw[torch.rand(B, K, generator=gen) < 0.2] = -math.inf
    lw[torch.rand(B, K, generator=gen) < 0.05] = math.nan
    lw[:, 0] = torch.randn(B, generator=gen, dtype=torch.float64)  # one live particle per group
    if degenerate and B >= 2:
        lw[B // 2] = -math.inf
        lw[B // 2, K // 3] = math.nan
    return lw.to(dtype).to(DEV)


def uniforms(method, B, K, gen):
    return torch.rand((B,) if method == "systematic" else (B, K), generator=gen, dtype=torch.float64).to(DEV)


def assert_matches_reference(got, want, dtype):
    assert torch.equal(got.ancestors.cpu(), want.ancestors.cpu())
    assert torch.equal(got.resampled.cpu(), want.resampled.cpu())
    assert torch.equal(got.degenerate.cpu(), want.degenerate.cpu())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert got.log_weights.dtype == dtype and got.log_weights.device.type == DEV
    torch.testing.assert_close(got.log_weights.cpu(), want.log_weights.cpu(), rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(got.ess.cpu(), want.ess.cpu(), rtol=1e-10, atol=0)
    torch.testing.assert_close(got.log_norm.cpu(), want.log_norm.cpu(), rtol=1e-10, atol=1e-10)


# Triton specializes on the next power of two of K (a compile per new size, method and dtype): its list is
# kept short so the file fits the GPU check's time limit. The CUDA list adds the shared-memory boundary.
SHAPES = {"triton": [(1, 1), (7, 1), (1, 7), (5, 33), (64, 7), (4, 1000), (2, 5000)]}
SHAPES["cuda"] = SHAPES["triton"] + [(3, 300), (2, 4096), (3, 4097)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resample_matches_reference(backend, method, dtype, gen):
    need(backend)
    for B, K in SHAPES[backend]:
        for thr in (0.0, 0.5, 1.0):
            lw = log_weights(B, K, gen, dtype)
            u = uniforms(method, B, K, gen)
            poison_allocator()
            got = fusedlab.smc.resample(lw, method, thr, uniforms=u, on_degenerate="uniform", backend=backend)
            want = fusedlab.smc.resample(lw, method, thr, uniforms=u, on_degenerate="uniform", backend="reference")
            assert_matches_reference(got, want, dtype)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("B,K", [(4096, 7), (1024, 33), (600, 5000)])
def test_resample_many_groups(backend, method, B, K, gen):
    # B = 600 with K > 4096 runs more groups than the workspace path has blocks (grid-stride over groups).
    need(backend)
    lw = log_weights(B, K, gen, torch.float32)
    u = uniforms(method, B, K, gen)
    poison_allocator()
    got = fusedlab.smc.resample(lw, method, 0.5, uniforms=u, on_degenerate="uniform", backend=backend)
    want = fusedlab.smc.resample(lw, method, 0.5, uniforms=u, on_degenerate="uniform", backend="reference")
    assert_matches_reference(got, want, torch.float32)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resample_special_groups(backend):
    need(backend)
    K = 12
    lw = torch.zeros(6, K, dtype=torch.float64)  # equal weights: residual is all deterministic
    lw[1, :4] = -math.inf  # residual: 8 deterministic copies, 4 draws
    lw[2] = torch.log(torch.arange(1, K + 1, dtype=torch.float64))
    lw[3] = -math.inf  # degenerate
    lw[4, 2] = math.inf  # +inf: degenerate
    lw[5, :] = -math.inf
    lw[5, K - 1] = 0.0  # only the last particle alive
    lw = lw.to(DEV)
    g = torch.Generator().manual_seed(0)
    for method in METHODS:
        u = uniforms(method, 6, K, g)
        for thr in (0.0, 1.0):
            got = fusedlab.smc.resample(lw, method, thr, uniforms=u, on_degenerate="uniform", backend=backend)
            want = fusedlab.smc.resample(lw, method, thr, uniforms=u, on_degenerate="uniform", backend="reference")
            assert_matches_reference(got, want, torch.float64)
            assert got.degenerate.cpu().tolist() == [False, False, False, True, True, False]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_degenerate_raise(backend):
    """on_degenerate="raise" names the groups (the CUDA op checks its own status; Triton's in Python), with
    and without a state; nothing is raised when every group has a finite weight."""
    need(backend)
    lw = torch.randn(4, 5, device=DEV)
    lw[1] = -math.inf
    lw[3] = math.nan
    state = torch.randn(4, 5, 3, device=DEV)
    for st in (None, state):
        with pytest.raises(ValueError, match=r"group\(s\) 1, 3 have no finite"):
            fusedlab.smc.resample(lw, state=st, backend=backend)
    lw[1] = 0.0
    lw[3] = 0.0
    r = fusedlab.smc.resample(lw, state=state, backend=backend)
    assert not r.degenerate.any()


@pytest.mark.timeout(300)
def test_default_raise_under_cuda_graph_capture():
    """The default on_degenerate="raise" captures (a device-side assertion instead of a host sync), and a
    generator of another device than the log-weights' is an error."""
    need("cuda")
    lw = torch.randn(8, 16, device=DEV)
    state = torch.randn(8, 16, 4, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fusedlab.smc.resample(lw, state=state, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedlab.smc.resample(lw, state=state, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert out.ancestors.shape == (8, 16) and not out.degenerate.any()
    with pytest.raises(RuntimeError, match="generator"):
        fusedlab.smc.resample(lw, generator=torch.Generator(), backend="cuda")


def test_op_raise_degenerate_captures_and_raises_eagerly():
    """The CUDA op called directly with raise_degenerate: under CUDA graph capture a device-side assertion
    (a read-back would break the capture), eagerly a ValueError naming the dead group."""
    need("cuda")
    lw = torch.randn(8, 16, device=DEV)
    u = torch.rand(8, 1, device=DEV, dtype=torch.float64)
    op = torch.ops.fusedlab.resample
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(lw, u, "systematic", 1.0, None, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(lw, u, "systematic", 1.0, None, True)
    graph.replay()
    torch.cuda.synchronize()
    assert out[1].shape == (8, 16)
    dead = lw.clone()
    dead[3] = -math.inf
    with pytest.raises(ValueError, match="group\\(s\\) 3 have no finite log-weight"):
        op(dead, u, "systematic", 1.0, None, True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_noncontiguous_inputs(backend, gen):
    need(backend)
    lw = log_weights(40, 9, gen, torch.float32).t().contiguous().t()  # [9, 40]-strided view of [40, 9]
    assert not lw.is_contiguous()
    u = uniforms("stratified", 40, 9, gen)
    got = fusedlab.smc.resample(lw, "stratified", 1.0, uniforms=u, on_degenerate="uniform", backend=backend)
    want = fusedlab.smc.resample(lw, "stratified", 1.0, uniforms=u, on_degenerate="uniform", backend="reference")
    assert_matches_reference(got, want, torch.float32)


STATES = [(torch.float32, ()), (torch.float32, (16,)), (torch.float32, (3, 5)), (torch.bfloat16, ()),
          (torch.bfloat16, (16,)), (torch.bfloat16, (3, 5)), (torch.int64, ()), (torch.int64, (16,)),
          (torch.int64, (3, 5))]


def make_state(B, K, dtype, trailing, gen):
    x = torch.randn(B, K, *trailing, generator=gen) * 1000
    return x.to(dtype).to(DEV)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,trailing", STATES)
@pytest.mark.parametrize("B,K", [(3, 7), (64, 33), (3, 5000)])
def test_gather_and_gather_inplace(backend, dtype, trailing, B, K, gen):
    # (3, 5000) with rows of 8 bytes or more exceeds the shared-memory staging of the in-place form.
    need(backend)
    state = make_state(B, K, dtype, trailing, gen)
    anc = torch.randint(0, K, (B, K), generator=gen).to(DEV)
    anc[0, : K // 2] = K - 1  # many children of one particle that is itself overwritten
    want = ref.gather(state, anc)
    poison_allocator()
    got = fusedlab.smc.gather(state, anc, backend=backend)
    assert got.dtype == dtype and torch.equal(got, want)
    inplace = state.clone()
    out = fusedlab.smc.gather_(inplace, anc, backend=backend)
    assert out is inplace and torch.equal(inplace, want)
    # a non-contiguous state (gather only)
    wide = make_state(B, K, dtype, (2,) + trailing, gen)[:, :, 1]
    assert torch.equal(fusedlab.smc.gather(wide, anc, backend=backend), ref.gather(wide, anc))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method,dtype,trailing", [(METHODS[i % 4], d, t) for i, (d, t) in enumerate(STATES)])
def test_resample_with_state(backend, method, dtype, trailing, gen):
    # every method and every state kind, not every pair: the copy does not depend on the method
    need(backend)
    # small groups (fused launch), few groups with big state (resample, then a separate gather launch), many
    # groups with big state (fused again: enough blocks to fill the GPU), K > 4096 (workspace path)
    for B, K, trail in ((37, 19, trailing), (2, 1000, (64,)), (300, 200, (64,)), (2, 5000, trailing)):
        lw = log_weights(B, K, gen, torch.float32)
        u = uniforms(method, B, K, gen)
        state = make_state(B, K, dtype, trail, gen)
        poison_allocator()
        got = fusedlab.smc.resample(lw, method, 0.5, uniforms=u, on_degenerate="uniform", state=state,
                                    backend=backend)
        want = fusedlab.smc.resample(lw, method, 0.5, uniforms=u, on_degenerate="uniform", state=state,
                                     backend="reference")
        assert_matches_reference(got, want, torch.float32)
        assert got.state.dtype == dtype and torch.equal(got.state, want.state)


@pytest.mark.timeout(300)
def test_current_stream_is_used(gen):
    need("cuda")
    lw = log_weights(256, 300, gen, torch.float32)
    u = uniforms("multinomial", 256, 300, gen)
    want = fusedlab.smc.resample(lw, "multinomial", 1.0, uniforms=u, on_degenerate="uniform", backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fusedlab.smc.resample(lw, "multinomial", 1.0, uniforms=u, on_degenerate="uniform", backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert_matches_reference(got, want, torch.float32)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("thr", [0.0, 1.0])
def test_opcheck_cuda(thr, gen):
    need("cuda")
    B, K = 3, 6
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64).to(DEV).requires_grad_(True)
    u = torch.rand(B, K, generator=gen, dtype=torch.float64).to(DEV)
    u1 = torch.rand(B, 1, generator=gen, dtype=torch.float64).to(DEV)
    state = torch.randn(B, K, 2, generator=gen, dtype=torch.float64).to(DEV).requires_grad_(True)
    ops = torch.ops.fusedlab
    torch.library.opcheck(ops.resample.default, (lw, u, "stratified", thr))
    torch.library.opcheck(ops.resample.default, (lw, u1, "systematic", thr))
    torch.library.opcheck(ops.resample_gather.default, (lw, u, "residual", thr, state))
    anc = torch.randint(0, K, (B, K), generator=gen).to(DEV)
    torch.library.opcheck(ops.gather.default, (state, anc))
    torch.library.opcheck(ops.gather_.default, (state.detach().clone(), anc))


@pytest.mark.timeout(300)
def test_cuda_argument_errors(gen):
    need("cuda")
    lw = torch.randn(2, 5, device=DEV)
    with pytest.raises(RuntimeError, match="uniforms must be float64"):
        torch.ops.fusedlab.resample(lw, torch.rand(2, 5, device=DEV), "stratified", 1.0)
    with pytest.raises(RuntimeError, match="uniforms must be on"):
        torch.ops.fusedlab.resample(lw, torch.rand(2, 5, dtype=torch.float64), "stratified", 1.0)
    with pytest.raises(RuntimeError, match="method must be one of"):
        torch.ops.fusedlab.resample(lw, torch.rand(2, 5, dtype=torch.float64, device=DEV), "sorted", 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fusedlab.gather_(torch.randn(5, 2, 3, device=DEV).transpose(0, 1),
                                   torch.zeros(2, 5, dtype=torch.int64, device=DEV))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_cuda(backend, gen):
    need(backend)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(lw, u, state):
        r = fusedlab.smc.resample(lw, "systematic", 0.5, uniforms=u, state=state, backend=backend)
        return r.log_weights, r.log_norm, r.state

    lw = (torch.randn(64, 33, generator=gen) * 2).to(DEV)
    u = uniforms("systematic", 64, 33, gen)
    state = torch.randn(64, 33, 4, generator=gen).to(DEV)
    got = step(lw, u, state)
    want = fusedlab.smc.resample(lw, "systematic", 0.5, uniforms=u, state=state, backend="reference")
    torch.testing.assert_close(got[0], want.log_weights)
    torch.testing.assert_close(got[1], want.log_norm)
    torch.testing.assert_close(got[2], want.state)


def philox_u(seed, offset, B, cols):
    """The uniforms the CUDA kernel draws for this seed and offset, shaped as the wrapper takes them."""
    u = ref.philox_uniforms(seed, offset, B, cols).to(DEV)
    return u[:, 0] if cols == 1 else u


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_cuda_kernel_draws_its_own_philox_uniforms(method, gen):
    """Without uniforms the CUDA kernel draws them from the generator's Philox seed and offset: the stream
    of reference.philox_uniforms (offset 0 after manual_seed, then advanced by each call's increment)."""
    need("cuda")
    B, K = 37, 300
    lw = log_weights(B, K, gen, torch.float64)
    state = torch.randn(B, K, 3, generator=gen).to(DEV)
    cols = 1 if method == "systematic" else K
    step = (2 * cols + 3) // 4 * 4  # words per call: two per uniform, whole Philox blocks
    g = torch.Generator(DEV).manual_seed(1234)
    for call in range(2):
        got = fusedlab.smc.resample(lw, method, generator=g, state=state, on_degenerate="uniform", backend="cuda")
        want = fusedlab.smc.resample(lw, method, uniforms=philox_u(1234, call * step, B, cols), state=state,
                                     on_degenerate="uniform", backend="reference")
        assert_matches_reference(got, want, torch.float64)
        assert torch.equal(got.state, want.state)
    again = fusedlab.smc.resample(lw, method, generator=torch.Generator(DEV).manual_seed(1234), state=state,
                                  on_degenerate="uniform", backend="cuda")
    first = fusedlab.smc.resample(lw, method, uniforms=philox_u(1234, 0, B, cols), on_degenerate="uniform",
                                  backend="reference")
    assert torch.equal(again.ancestors, first.ancestors)


@pytest.mark.timeout(300)
def test_resample_gather_is_one_launch():
    """Issue target: resample + gather in a single launch where B*K*D allows (the uniforms drawn inside)."""
    need("cuda")
    from fusedlab.perf.timing import cuda_launches

    lw = torch.randn(1024, 16, device=DEV)
    state = torch.randn(1024, 16, 16, device=DEV)
    g = torch.Generator(DEV).manual_seed(0)
    n = cuda_launches(lambda: fusedlab.smc.resample(lw, "systematic", state=state, generator=g,
                                                    on_degenerate="uniform", backend="cuda"))
    assert n == 1, n


@pytest.mark.timeout(300)
def test_philox_draws_advance_under_cuda_graph_replay():
    """Captured in a CUDA graph, the kernel reads the graph's seed and offset slots: each replay draws anew
    (graph-safe RNG), and every draw is a valid resampling."""
    need("cuda")
    B, K = 64, 256
    lw = torch.zeros(B, K, device=DEV)  # equal weights: every particle's ancestor is uniform over K
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        fusedlab.smc.resample(lw, "multinomial", on_degenerate="uniform", backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedlab.smc.resample(lw, "multinomial", on_degenerate="uniform", backend="cuda").ancestors
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(out.clone())
    for a in draws:
        assert bool(((a >= 0) & (a < K)).all())
        assert bool((a[:, 1:] >= a[:, :-1]).all())  # multinomial ancestors come out sorted per group
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
