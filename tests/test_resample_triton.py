"""Triton backend of the resample family vs the reference: under TRITON_INTERPRET=1 on CPUs, on the GPU
when there is one. Small fixed shapes (the interpreter costs milliseconds per program); every output and
scratch buffer of the Triton kernels starts NaN / all-ones, so an unwritten slot fails the comparison."""
import math

import pytest
import torch

import fusedlab
from fusedlab.triton_kernels import resample as tk

pytestmark = [
    pytest.mark.skipif("triton" not in fusedlab.backends(), reason="Triton backend not available"),
    # the 3.6 interpreter converts 1-element arrays to Python ints for runtime loop bounds
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

METHODS = fusedlab.smc.METHODS
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 7), (1, 64), (3, 100)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)


def draw_uniforms(method, B, K, gen):
    u = torch.rand((B,) if method == "systematic" else (B, K), dtype=torch.float64, generator=gen)
    return u.to(DEVICE)


def random_log_weights(B, K, gen, dtype=torch.float64, dead=0.2, nan=0.05):
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64) * 3.0
    lw[torch.rand(B, K, generator=gen) < dead] = -math.inf
    lw[torch.rand(B, K, generator=gen) < nan] = math.nan
    alive = torch.isfinite(lw).any(-1)
    lw[~alive, 0] = 0.0  # keep every group non-degenerate here
    return lw.to(dtype).to(DEVICE)


def run(lw, method, thr, u, backend, **kw):
    return fusedlab.smc.resample(lw, method, thr, uniforms=u, backend=backend, **kw)


def assert_same(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.equal(a.ancestors.cpu(), b.ancestors.cpu())
    assert torch.equal(a.resampled.cpu(), b.resampled.cpu()) and torch.equal(a.degenerate.cpu(), b.degenerate.cpu())
    assert a.log_weights.dtype == dtype and a.ancestors.dtype == torch.int64 and a.ess.dtype == torch.float64
    torch.testing.assert_close(a.log_weights, b.log_weights, rtol=tol, atol=tol, equal_nan=False)
    torch.testing.assert_close(a.ess, b.ess, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.log_norm, b.log_norm, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(method, thr, dtype, gen):
    for B, K in SHAPES:
        lw = random_log_weights(B, K, gen, dtype)
        u = draw_uniforms(method, B, K, gen)
        assert_same(run(lw, method, thr, u, "triton"), run(lw, method, thr, u, "reference"), dtype)


@pytest.mark.parametrize("method", METHODS)
def test_several_chunks_and_groups_per_program(method, gen, monkeypatch):
    # 32-lane chunks: K = 100 walks four chunks with running sums carried over; B = 5 groups on the
    # interpreter's two programs reuse their scratch rows
    monkeypatch.setattr(tk, "MAX_CHUNK", 32)
    for K, thr in ((100, 1.0), (64, 0.7)):
        lw = random_log_weights(5, K, gen, dead=0.5)
        u = draw_uniforms(method, 5, K, gen)
        assert_same(run(lw, method, thr, u, "triton"), run(lw, method, thr, u, "reference"), torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_two_chunks_at_the_default_chunk_size(method, gen):
    K = tk.MAX_CHUNK + 88
    lw = random_log_weights(2, K, gen, dead=0.3)
    u = draw_uniforms(method, 2, K, gen)
    assert_same(run(lw, method, 1.0, u, "triton"), run(lw, method, 1.0, u, "reference"), torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_structured_weights(method, gen):
    # exact ties: equal weights (residual: K copies, no draws), one survivor, halves, a K-divisible pattern
    K = 8
    rows = [torch.zeros(K), torch.full((K,), -math.inf), torch.zeros(K), torch.tensor([0.0, -math.inf] * 4),
            torch.log(torch.tensor([1.0, 3.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0]))]
    rows[1][5] = 1.5
    rows[2][: K // 2] = math.log(3.0)
    lw = torch.stack(rows).double().to(DEVICE)
    u = draw_uniforms(method, len(rows), K, gen)
    a = run(lw, method, 1.0, u, "triton")
    assert_same(a, run(lw, method, 1.0, u, "reference"), torch.float64)
    assert (a.ancestors[1] == 5).all()
    if method == "residual":
        assert torch.equal(a.ancestors[0].cpu(), torch.arange(K))


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_groups_resample_uniformly(method, gen):
    lw = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    lw[1] = -math.inf
    lw[2] = math.nan
    lw[2, 3] = -math.inf
    lw[3, 5] = math.inf
    lw = lw.to(DEVICE)
    u = draw_uniforms(method, 4, 7, gen)
    a = run(lw, method, 0.0, u, "triton", on_degenerate="uniform")
    assert_same(a, run(lw, method, 0.0, u, "reference", on_degenerate="uniform"), torch.float64)
    assert a.degenerate.tolist() == [False, True, True, True]
    assert a.resampled.tolist() == [False, True, True, True]
    assert torch.all(a.ess[1:] == 0) and torch.all(a.log_norm[1:] == -math.inf)
    with pytest.raises(ValueError, match="no finite log-weight"):
        run(lw, method, 0.0, u, "triton")


@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_first_particle_never_chosen(method):
    lw = torch.log(torch.tensor([[0.0, 0.5, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)).to(DEVICE)
    u = torch.zeros((2,) if method == "systematic" else (2, 4), dtype=torch.float64, device=DEVICE)
    a = run(lw, method, 1.0, u, "triton")
    assert_same(a, run(lw, method, 1.0, u, "reference"), torch.float64)
    assert (a.ancestors[0] != 0).all() and (a.ancestors[1] == 2).all()


def test_carried_weights_keep_mean_one(gen):
    lw = random_log_weights(3, 64, gen, nan=0.0)
    r = run(lw, "systematic", 0.0, draw_uniforms("systematic", 3, 64, gen), "triton")
    assert not r.resampled.any() and torch.equal(r.ancestors.cpu(), torch.arange(64).expand(3, 64))
    torch.testing.assert_close(r.log_weights.exp().mean(-1), torch.ones(3, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(r.log_norm, torch.logsumexp(lw, -1) - math.log(64))


def test_noncontiguous_and_empty_batch(gen):
    lw = random_log_weights(7, 3, gen).t()  # [3, 7], strided
    u = draw_uniforms("stratified", 3, 7, gen)
    assert_same(run(lw, "stratified", 1.0, u, "triton"), run(lw, "stratified", 1.0, u, "reference"), torch.float64)
    r = run(torch.zeros(0, 5, device=DEVICE), "multinomial", 1.0, torch.zeros(0, 5, dtype=torch.float64,
                                                                                device=DEVICE), "triton")
    assert r.ancestors.shape == (0, 5) and r.ess.shape == (0,)


# -------------------------------------------------------------------------------------------- state gather


STATE_CASES = [(d, t) for d in (torch.float32, torch.int64, torch.bool) for t in ((), (4,), (2, 3))]


def random_state(B, K, dtype, trailing, gen):
    x = torch.randn(B, K, *trailing, generator=gen)
    if dtype == torch.bool:
        return (x > 0).to(DEVICE)
    if dtype == torch.int64:
        return (x * 2**40).to(torch.int64).to(DEVICE)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype,trailing", STATE_CASES, ids=[f"{d}-{t}"[6:] for d, t in STATE_CASES])
def test_fused_resample_gather(dtype, trailing, gen):
    method = METHODS[STATE_CASES.index((dtype, trailing)) % len(METHODS)]
    B, K = 3, 7
    lw = random_log_weights(B, K, gen)
    u = draw_uniforms(method, B, K, gen)
    state = random_state(B, K, dtype, trailing, gen)
    a = run(lw, method, 0.5, u, "triton", state=state)
    b = run(lw, method, 0.5, u, "reference", state=state)
    assert_same(a, b, torch.float64)
    assert a.state.dtype == dtype and a.state.shape == state.shape
    assert torch.equal(a.state, b.state)


def test_fused_gather_multi_tile_rows(gen, monkeypatch):
    # rows wider than one tile (MAX_BLOCK_D words) and more rows than one tile holds
    monkeypatch.setattr(tk, "MAX_BLOCK_D", 4)
    monkeypatch.setattr(tk, "WORDS_PER_THREAD", 1)
    lw = random_log_weights(2, 40, gen)
    u = draw_uniforms("residual", 2, 40, gen)
    state = torch.randn(2, 40, 3, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    a = run(lw, "residual", 1.0, u, "triton", state=state)
    assert torch.equal(a.state, fusedlab.reference.resample.gather(state, a.ancestors))


def test_state_at_an_odd_address(gen):
    # a view 4 bytes into its storage: the source cannot be read as 8-byte words, the fresh output could
    B, K = 2, 6
    base = torch.randn(1 + B * K * 4, generator=gen).to(DEVICE)
    state = base[1:].view(B, K, 4)
    anc = torch.randint(0, K, (B, K), generator=gen).to(DEVICE)
    expect = fusedlab.reference.resample.gather(state, anc)
    assert torch.equal(fusedlab.smc.gather(state, anc, backend="triton"), expect)
    lw = random_log_weights(B, K, gen)
    u = draw_uniforms("multinomial", B, K, gen)
    a = run(lw, "multinomial", 1.0, u, "triton", state=state)
    assert torch.equal(a.state, fusedlab.reference.resample.gather(state, a.ancestors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.float16, torch.complex64])
def test_gather(dtype, gen):
    for trailing in ((), (4,), (2, 3), (0,)):
        B, K = 3, 5
        state = random_state(B, K, torch.float32, trailing, gen)
        state = (state > 0) if dtype == torch.bool else state.to(dtype)
        anc = torch.randint(0, K, (B, K), generator=gen).to(DEVICE)
        expect = fusedlab.reference.resample.gather(state, anc)
        out = fusedlab.smc.gather(state, anc, backend="triton")
        assert out.dtype == dtype and torch.equal(out, expect)
        inplace = state.clone()
        assert fusedlab.smc.gather_(inplace, anc, backend="triton") is inplace
        assert torch.equal(inplace, expect)


def test_gather_strided_and_nan_payloads(gen):
    state = torch.randn(2, 4, 3, 5, generator=gen).to(DEVICE).transpose(2, 3)  # non-contiguous
    state[0, 1, 2, 1] = math.nan
    anc = torch.tensor([[1, 1, 0, 3], [2, 0, 0, 1]], device=DEVICE)
    out = fusedlab.smc.gather(state, anc, backend="triton")
    torch.testing.assert_close(out, fusedlab.reference.resample.gather(state, anc), rtol=0, atol=0, equal_nan=True)


# -------------------------------------------------------------------------------------------------- opcheck


def test_opcheck(gen):
    B, K = 2, 5
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    u = torch.rand(B, K, generator=gen, dtype=torch.float64).to(DEVICE)
    state = torch.randn(B, K, 2, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.fusedlab.resample_triton.default, (lw, u, "stratified", 0.5))
    torch.library.opcheck(torch.ops.fusedlab.resample_gather_triton.default, (lw, u, "residual", 1.0, state))
    anc = torch.randint(0, K, (B, K), generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.fusedlab.gather_triton.default, (state, anc))


# --------------------------------------------------------------------------------------------------- errors


def _lw(B=2, K=4, dtype=torch.float64):
    return torch.zeros(B, K, dtype=dtype, device=DEVICE)


def _u(B=2, K=4):
    return torch.rand(B, K, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("call,pattern", [
    (lambda: tk.resample(_lw()[0], _u(), "stratified", 0.5, None), "log_weights must be 2-D"),
    (lambda: tk.resample(_lw(K=0), _u(K=0), "stratified", 0.5, None), "log_weights must have K >= 1"),
    (lambda: tk.resample(_lw(dtype=torch.float16), _u(), "stratified", 0.5, None), "log_weights must be float32"),
    (lambda: tk.resample(_lw(), _u().float(), "stratified", 0.5, None), "uniforms must be float64"),
    (lambda: tk.resample(_lw(), _u(), "systematic", 0.5, None), r"uniforms must have shape \[2, 1\]"),
    (lambda: tk.resample(_lw(), _u(), "stratified", -1.0, None), "ess_threshold must be >= 0"),
    (lambda: tk.resample(_lw(), _u(), "stratified", math.nan, None), "ess_threshold must be >= 0"),
    (lambda: tk.resample(_lw(), _u(), "systemic", 0.5, None), "method must be one of"),
    (lambda: tk.resample(_lw(), _u(), "stratified", 0.5, torch.zeros(2, 3, device=DEVICE)),
     r"state must have shape \[B, K, ...\] = \[2, 4, ...\]"),
    (lambda: tk.gather(torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE)),
     "ancestors must be an integer tensor"),
    (lambda: tk.gather(torch.zeros(2, 4, device=DEVICE), torch.zeros(8, dtype=torch.int64, device=DEVICE)),
     "ancestors must be 2-D"),
    (lambda: tk.gather(torch.zeros(2, 4, device=DEVICE), torch.full((2, 4), 4, device=DEVICE)),
     r"ancestors must lie in \[0, 4\), found 4 at flat index 0"),
    (lambda: tk.gather(torch.zeros(2, 4, device=DEVICE), torch.full((2, 4), -1, device=DEVICE)),
     r"ancestors must lie in \[0, 4\), found -1"),
])
def test_errors_name_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_group_size_limit_points_to_other_backends():
    K = tk.MAX_BLOCK_K + 1
    with pytest.raises(ValueError, match="backend='cuda' or backend='cpu'"):
        tk.resample(torch.zeros(1, K, device=DEVICE), torch.rand(1, 1, dtype=torch.float64, device=DEVICE),
                    "systematic", 1.0, None)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-tensor refusal outside the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="log_weights must be a CUDA tensor"):
        tk.resample(_lw(), _u(), "stratified", 0.5, None)
    with pytest.raises(ValueError, match="state must be a CUDA tensor"):
        tk.gather(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int64))
