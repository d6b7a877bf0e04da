"""Gram Newton-Schulz (method="gram"): the standard iterate in exact arithmetic, within the bf16 tolerance rule in
half precision, and the rule by which method="auto" takes it."""
import pytest
import torch
from test_newton_schulz import BANDS, assert_in_band, rel, spread_spectrum
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import fusedlab
from fusedlab.ops.newton_schulz import _gram_faster
from fusedlab.reference import newton_schulz as ref

KELLER = (3.4445, -4.7750, 2.0315)
YOU = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
       (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]  # per-step triples, as a user would pass them
COEFFICIENTS = ["keller", "polar_express", YOU]


def gram(G, **kw):
    return fusedlab.ops.newton_schulz(G, method="gram", **kw)


def decaying(gen, m, n, lo):
    """An m x n float32 matrix with singular values spread log-uniformly over [lo, 1] (a momentum-like
    spectrum: where a half-precision Gram matrix loses the small directions first)."""
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    return (U * torch.logspace(0, torch.log10(torch.tensor(lo)).item(), r)) @ V.T


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (3, 16, 56), (2, 2, 40, 24), (1, 7), (9, 9)])
@pytest.mark.parametrize("coefficients", COEFFICIENTS, ids=["keller", "polar_express", "you"])
def test_equals_standard_float64(shape, coefficients, gen):
    """In exact arithmetic every restart schedule gives the standard iterate: float64 agrees to 1e-10, for the
    op (batched products and the plain reference) and the reference with no restart or the published one."""
    G = torch.randn(shape, generator=gen, dtype=torch.float64)
    for steps in (1, 2, 5, 7):
        exact = ref.newton_schulz(G, steps, coefficients)
        for got in (gram(G, steps=steps, coefficients=coefficients, dtype=torch.float64),
                    gram(G, steps=steps, coefficients=coefficients, dtype=torch.float64, backend="reference"),
                    ref.gram_newton_schulz(G, steps, coefficients, restarts=()),
                    ref.gram_newton_schulz(G, steps, coefficients)):
            assert got.shape == G.shape and got.dtype == torch.float64
            torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape, steps", [((96, 384), 5), ((384, 96), 5), ((2, 64, 256), 5), ((128, 512), 8)])
@pytest.mark.parametrize("coefficients", COEFFICIENTS, ids=["keller", "polar_express", "you"])
def test_half_error_at_most_twice_torch_bf16(shape, steps, coefficients, gen):
    """The tolerance rule for half-precision paths: against a float64 standard Newton-Schulz with the same
    coefficients, the Gram path (float16 iteration, bf16 or float16 result) errs at most twice as much as
    torch's bf16 computation (torch.optim.Muon's function for Keller's set, the plain bf16 iteration for the
    others), summed over a Gaussian draw and a spectrum spanning 1e3. Measured: at most 0.3x; with no restart,
    or (Polar Express, 8 steps) one restart after step 2, it fails."""
    m, n = shape[-2:]
    draws = [torch.randn(shape, generator=gen), decaying(gen, m, n, 1e-3).expand(shape)]
    ours = {torch.bfloat16: 0.0, torch.float16: 0.0}
    theirs = 0.0
    for G in draws:
        exact = ref.newton_schulz(G.double(), steps, coefficients)
        for dt in ours:
            out = gram(G, steps=steps, coefficients=coefficients, dtype=dt)
            assert out.dtype == dt
            ours[dt] += rel(out, exact)
        if coefficients == "keller":
            torch_bf16 = torch.stack([torch_ns(g, KELLER, steps, 1e-7) for g in G.reshape(-1, m, n)]).view(shape)
        else:
            torch_bf16 = ref.newton_schulz(G, steps, coefficients, dtype=torch.bfloat16)
        theirs += rel(torch_bf16, exact)
    for dt, err in ours.items():
        assert err <= 2 * theirs, (dt, err, theirs)


def test_float32_within_1e4(gen):
    """float32: the op's float32 bound, on a Gaussian draw and on a spectrum spanning 1e6 (where the Gram matrix
    holds the small directions only to 1e-7 of the large ones). Measured: at most 3e-5; one restart after
    step 2 gave 2.6e-4."""
    for G in (torch.randn(128, 512, generator=gen), decaying(gen, 512, 128, 1e-6)):
        for coefficients in ("keller", "polar_express"):
            exact = ref.newton_schulz(G.double(), 5, coefficients)
            assert rel(gram(G, coefficients=coefficients, dtype=torch.float32), exact) < 1e-4


@pytest.mark.parametrize("coefficients, band", BANDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tall", [False, True])
def test_singular_values_in_band(coefficients, band, dtype, tall, gen):
    """The set's promised band and the input's singular vectors, as for the standard path."""
    G, U, V = spread_spectrum(gen, 64, 256)
    if tall:
        X = gram(G.mT.contiguous(), coefficients=coefficients, dtype=dtype).mT
    else:
        X = gram(G, coefficients=coefficients, dtype=dtype)
    assert_in_band(X, U, V, band)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rank_deficient_and_scale_invariance(dtype, gen):
    zero = torch.zeros(2, 16, 48)
    assert torch.equal(gram(zero, dtype=dtype), zero.to(dtype))
    low = torch.randn(2, 32, 3, generator=gen) @ torch.randn(2, 3, 128, generator=gen)
    for coefficients in ("keller", "polar_express"):
        out = gram(low, coefficients=coefficients, dtype=dtype)
        assert torch.isfinite(out).all()
        sv = torch.linalg.svdvals(out.double())
        assert sv.max() < 1.5, sv.max()  # no spurious direction blown up from the null space
    G = torch.randn(24, 96, generator=gen)
    base = gram(G, dtype=dtype)
    for scale in (1e-15, 1e-6, 1e6, 1e15):
        got = gram(G * scale, dtype=dtype, eps=1e-30)
        assert rel(got, base) < (1e-5 if dtype == torch.float32 else 1e-2), scale


@pytest.mark.parametrize("shape, dtype, device, gram_pays", [
    ((768, 3072), torch.bfloat16, "cpu", False),  # never on CPUs: no faster than the panel kernel
    ((12, 768, 3072), torch.bfloat16, "cpu", False),
    ((768, 3072), torch.float32, "cpu", False),
    ((3072, 768), torch.float32, "cpu", False),
    ((512, 4096), torch.float16, "cpu", False),
    ((768, 3072), torch.float64, "cpu", False),
    ((768, 3072), torch.bfloat16, "cuda", False),  # bf16: 0.51x the CUDA kernel on the H200
    ((12, 3072, 768), torch.float32, "cuda", True),  # float32: the published rule, aspect > 2, short side > 256
    ((768, 3072), torch.float32, "cuda", True),
    ((4096, 16384), torch.float32, "cuda", True),
    ((256, 1024), torch.float32, "cuda", False),
    ((1024, 2048), torch.float32, "cuda", False),
    ((4096, 4096), torch.float32, "cuda", False),
])
def test_auto_rule(shape, dtype, device, gram_pays):
    assert _gram_faster(shape, dtype, device) is gram_pays


def test_auto_dispatch_on_cpu(gen):
    """method="auto" runs the standard path on CPUs; method="gram" the Gram path."""
    G = torch.randn(256, 1024, generator=gen)
    assert torch.equal(fusedlab.ops.newton_schulz(G, dtype=torch.float32),
                       fusedlab.ops.newton_schulz(G, dtype=torch.float32, method="standard"))
    assert torch.equal(fusedlab.ops.newton_schulz(G, dtype=torch.float32, method="gram"), gram(G, dtype=torch.float32))
    assert torch.equal(fusedlab.ops.newton_schulz(G, dtype=torch.float32, backend="cpu"),
                       fusedlab.ops.newton_schulz(G, dtype=torch.float32, method="standard"))
    assert torch.equal(fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16),
                       fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, method="standard"))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    G = torch.randn(2, 256, 768, generator=gen)
    for f in (lambda g: gram(g, dtype=torch.float32), lambda g: fusedlab.ops.newton_schulz(g, dtype=torch.float32)):
        got = torch.compile(f, fullgraph=True)(G)
        torch.testing.assert_close(got, gram(G, dtype=torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw, pattern", [
    (dict(method="polar"), "method must be one of"),
    (dict(method="gram", backend="cpu"), "method='gram' runs on"),
])
def test_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fusedlab.ops.newton_schulz(torch.randn(4, 8), **kw)
