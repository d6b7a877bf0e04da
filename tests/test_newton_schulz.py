"""Newton-Schulz: the C++ CPU kernel against the float64 reference and against torch.optim.Muon's own code."""
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import fusedlab
from fusedlab.reference import newton_schulz as ref

KELLER = (3.4445, -4.7750, 2.0315)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (3, 32, 80), (2, 2, 40, 24), (1, 7)])
@pytest.mark.parametrize("coefficients", ["keller", "polar_express"])
def test_cpu_matches_reference_float64(shape, coefficients, gen):
    G = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = fusedlab.ops.newton_schulz(G, coefficients=coefficients, dtype=torch.float64)
    torch.testing.assert_close(got, ref.newton_schulz(G, 5, coefficients, dtype=torch.float64), rtol=1e-10, atol=1e-10)


# min(m, n) of 384 and more: X X^T (X^T X when tall) and bA + cA^2 by 4, 6 or 8 row panels, mirrored (edges
# uneven at 500, 650 and 777 rows)
@pytest.mark.parametrize("shape", [(384, 400), (2, 500, 420), (3, 500, 530), (650, 660), (777, 800)])
def test_cpu_symmetric_panels_match_reference_float64(shape, gen):
    G = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = fusedlab.ops.newton_schulz(G, dtype=torch.float64, backend="cpu")
    torch.testing.assert_close(got, ref.newton_schulz(G, 5, "keller", dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_normalization_pass(in_dtype, dtype, gen):
    """Zero steps give the normalized input: the C++ passes for contiguous batches (float64 sums of squares,
    then one scale-and-cast pass) agree with the ATen expression strided batches take, and with
    G / max(||G||, eps) to the cast's rounding, at several scales and past one work chunk (2^16 elements)."""
    for scale in (1e-3, 1.0, 1e3):
        G = (torch.randn(3, 300, 260, generator=gen) * scale).to(in_dtype)
        fused = torch.ops.fusedlab.newton_schulz(G, [], 1.0, 1e-7, dtype)
        strided = torch.ops.fusedlab.newton_schulz(G.mT.contiguous().mT, [], 1.0, 1e-7, dtype)
        assert fused.dtype == dtype
        # the two sums of squares differ in order only: the float32 scale may differ in its last bit
        rtol = {torch.float32: 2e-7, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        atol = 2 ** -24 if dtype == torch.float16 else 0  # float16's subnormal spacing
        torch.testing.assert_close(fused.double(), strided.double(), rtol=rtol, atol=atol)
        exact = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(fused.double(), exact, rtol=rtol + 1e-7, atol=atol)


@pytest.mark.parametrize("shape", [(128, 64), (64, 192), (4, 96, 96)])
def test_float32_path_within_1e4(shape, gen):
    G = torch.randn(shape, generator=gen)
    got = fusedlab.ops.newton_schulz(G, dtype=torch.float32)
    assert rel(got, ref.newton_schulz(G.double())) < 1e-4


def test_torch_order_reference_is_torch(gen):
    G = torch.randn(96, 160, generator=gen)
    assert torch.equal(ref.newton_schulz_torch_order(G), torch_ns(G, KELLER, 5, 1e-7))
    assert torch.equal(ref.newton_schulz_torch_order(G.T), torch_ns(G.T, KELLER, 5, 1e-7))


@pytest.mark.parametrize("shape", [(128, 128), (96, 256), (256, 96), (384, 384), (400, 640), (640, 400)])
def test_bf16_error_at_most_twice_torch(shape, gen):
    """The tolerance rule: against a float64 Newton-Schulz with the same coefficients, the bf16 kernel errs at
    most twice as much as torch's own bf16 computation (measured as the mean over 4 draws)."""
    ours, theirs = 0.0, 0.0
    for _ in range(4):
        G = torch.randn(shape, generator=gen)
        exact = ref.newton_schulz(G.double())
        ours += rel(fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16), exact)
        theirs += rel(torch_ns(G, KELLER, 5, 1e-7), exact)
    assert ours <= 2 * theirs, (ours, theirs)


BANDS = [("keller", (0.45, 1.25)), ("polar_express", (0.8, 1.2))]


def spread_spectrum(gen, m, n):
    """(G, U, V): an m x n (m <= n) float64 matrix U diag(s) V^T * 3.7 with s spanning a factor 100."""
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(-2, 0, m, dtype=torch.float64)
    return (U * s) @ V.T * 3.7, U, V


def assert_in_band(X, U, V, band):
    """X's singular values lie in band and its singular vectors are U's and V's (X ~ U diag(s') V^T)."""
    sv = torch.linalg.svdvals(X.double())
    assert band[0] < sv.min() and sv.max() < band[1], (sv.min(), sv.max())
    proj = U.T @ X.double() @ V  # diag(s') when X = U diag(s') V^T
    off = proj - torch.diag(torch.diagonal(proj))
    assert off.norm() / proj.norm() < 2e-2


@pytest.mark.parametrize("coefficients, band", BANDS)
def test_singular_values_in_band(coefficients, band, gen):
    """Singular values spanning a factor 100 (after Frobenius normalization about [0.004, 0.4]) land in the
    set's band (scalar analysis: Keller [0.47, 1.20], Polar Express [0.84, 1.12] for inputs in [1e-3, 1]);
    the singular vectors are the input's, as in the exact polar factor U V^T."""
    G, U, V = spread_spectrum(gen, 64, 128)
    assert_in_band(fusedlab.ops.newton_schulz(G, coefficients=coefficients, dtype=torch.float32), U, V, band)


def test_zero_scale_invariance_and_rank_deficient(gen):
    assert torch.equal(fusedlab.ops.newton_schulz(torch.zeros(2, 8, 16), dtype=torch.float32), torch.zeros(2, 8, 16))
    G = torch.randn(32, 48, generator=gen)
    base = fusedlab.ops.newton_schulz(G, dtype=torch.float32)
    for scale in (1e-15, 1e-6, 1e6, 1e15):
        got = fusedlab.ops.newton_schulz(G * scale, dtype=torch.float32, eps=1e-30)
        assert rel(got, base) < 1e-5, scale
    low = torch.randn(32, 3, generator=gen) @ torch.randn(3, 48, generator=gen)
    out = fusedlab.ops.newton_schulz(low)
    assert torch.isfinite(out).all()


def test_opcheck(gen):
    G = torch.randn(2, 16, 24, generator=gen)
    flat = [v for _ in range(3) for v in KELLER]
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fusedlab.newton_schulz.default, (G, flat, 1.0, 1e-7, dt))
    # the row-panel path, wide and tall (the tall one iterated in its own layout)
    for shape in ((2, 384, 400), (2, 420, 384)):
        G = torch.randn(shape, generator=gen)
        torch.library.opcheck(torch.ops.fusedlab.newton_schulz.default, (G, flat[:6], 1.0, 1e-7, torch.float32))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    f = torch.compile(lambda g: fusedlab.ops.newton_schulz(g, dtype=torch.float32), fullgraph=True)
    G = torch.randn(3, 16, 40, generator=gen)
    torch.testing.assert_close(f(G), fusedlab.ops.newton_schulz(G, dtype=torch.float32))


def test_extreme_scales_empty_matrices_and_autocast(gen):
    """Norms past float32's range (every element finite) and subnormal inputs with eps = 0 normalize on every
    path; empty matrices come back empty; autocast does not lower a requested float32 on the paths written as
    torch products; leading dims of the torch-order reference; a numpy eps."""
    import numpy as np

    G = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    want = ref.newton_schulz(G, 5)
    big = (G / G.abs().max() * 1e38).float()  # ||G||_F above float32's largest value
    tiny = (G * 1e-40).float()  # subnormal: 1 / ||G|| passes float32's range
    for backend, method in (("cpu", "standard"), ("reference", "standard"), ("auto", "gram")):
        for x, eps in ((big, 1e-7), (tiny, 0.0)):
            got = fusedlab.ops.newton_schulz(x, dtype=torch.float32, eps=eps, backend=backend, method=method)
            assert rel(got, want) < 1e-3, (backend, method, eps)
    huge64 = G * 1e160  # float64 norms overflow without the max-abs scaling too
    assert rel(fusedlab.ops.newton_schulz(huge64, dtype=torch.float64, backend="reference"), want) < 1e-10
    for backend in ("cpu", "reference"):
        assert fusedlab.ops.newton_schulz(torch.randn(4, 0, 5), backend=backend).shape == (4, 0, 5)
    wide = torch.randn(256, 768, generator=gen)
    exact = ref.newton_schulz(wide.double(), 5)
    for backend in ("auto", "reference"):  # "auto" takes the Gram path at this shape in float32
        plain = fusedlab.ops.newton_schulz(wide, dtype=torch.float32, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = fusedlab.ops.newton_schulz(wide, dtype=torch.float32, backend=backend)
        assert cast.dtype == torch.float32 and rel(cast, exact) < 2 * rel(plain, exact) + 1e-6, backend
    batch = torch.randn(2, 3, 8, 12, generator=gen)
    torch.testing.assert_close(ref.newton_schulz_torch_order(batch),
                               ref.newton_schulz_torch_order(batch.reshape(6, 8, 12)).reshape(batch.shape))
    torch.testing.assert_close(fusedlab.ops.newton_schulz(G.float(), eps=np.float32(1e-7), dtype=torch.float32),
                               fusedlab.ops.newton_schulz(G.float(), dtype=torch.float32))


def test_torch_compile_fullgraph_with_the_default_dtype(gen):
    """The hardware probe behind the default dtype is answered before tracing (a cache torch.compile would
    trace through otherwise stops the graph)."""
    torch._dynamo.reset()
    f = torch.compile(fusedlab.ops.newton_schulz, fullgraph=True, backend="aot_eager")
    G = torch.randn(2, 16, 48, generator=gen)
    torch.testing.assert_close(f(G), fusedlab.ops.newton_schulz(G))


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(5)), ValueError, "at least 2 dims"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3, dtype=torch.int32)), TypeError, "G must be float16, bfloat16, float32 or float64"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), coefficients="kellerr"), ValueError, "coefficients must be one of"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), coefficients=[(1.0, 2.0)]), ValueError, "triple"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), coefficients=(math.nan, 1.0, 1.0)), ValueError, "finite"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), eps=-1.0), ValueError, "eps"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), dtype=torch.int8), ValueError, "dtype"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3).to(torch.float8_e4m3fn)), TypeError, "G must be float16"),
    (lambda: fusedlab.ops.newton_schulz(torch.zeros(2, 3), backend="cuda"), ValueError, "needs CUDA tensors"),
])
def test_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_not_differentiable_says_so(gen):
    G = torch.randn(8, 16, generator=gen, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        fusedlab.ops.newton_schulz(G, dtype=torch.float32).sum().backward()


@pytest.mark.parametrize("shape, both, triton_only", [
    ((1024, 1024), "cuda", "reference"), ((1, 4096, 16384), "cuda", "reference"), ((4096, 4096), "triton", "triton"),
    ((64, 768, 768), "cuda", "triton"), ((2, 1024, 1024), "cuda", "triton"), ((3000, 2048), "triton", "triton")])
def test_auto_rule_for_cuda_batches(shape, both, triton_only):
    """What "auto" runs for a CUDA batch (decided from the shape and the kernels loaded)."""
    from fusedlab.ops.newton_schulz import auto_cuda_choice

    assert auto_cuda_choice(shape, ["cuda", "triton"]) == both
    assert auto_cuda_choice(shape, ["triton"]) == triton_only
    assert auto_cuda_choice(shape, []) == "reference"
    assert auto_cuda_choice(shape, ["cuda"]) == "cuda"


def test_bench_rows_take_the_cuda_backend_on_gpus(monkeypatch):
    """python -m fusedlab bench/demo time the CUDA kernel beside the Triton one where both load."""
    from fusedlab import __main__ as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fusedlab, "backends", lambda: ["auto", "cuda", "triton", "cpu", "reference"])
    plans = dict(cli._devices_and_backends("all"))
    assert cli._ns_backends(plans["cuda"]) == ["cuda", "triton"]
    assert cli._ns_backends(plans["cpu"]) == ["cpu"]
