"""Triton and CUDA backends of the newton_schulz family on a CUDA device, at the sizes Muon sees.

bf16 follows the tolerance rule: against a float64 Newton-Schulz with the same coefficients (the reference
on the GPU), the kernel errs at most twice as much as torch.optim.Muon's own bf16 computation
(``torch.optim._muon._zeropower_via_newtonschulz``, applied matrix by matrix). fp32 products are exact
(Triton: input_precision="ieee"; CUDA: cuBLAS under torch's default, non-TF32 matmul precision), so fp32
stays within 1e-4 of float64. Tests named *cuda_backend* run the CUDA kernel (fusedlab._C_cuda), the others
the Triton kernels. Skipped without a GPU (marker `gpu`).
"""
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import fusedlab
from fusedlab import _backend
from fusedlab.ops.newton_schulz import auto_cuda_choice
from fusedlab.reference import newton_schulz as ref
from fusedlab.triton_kernels import newton_schulz as tk

pytestmark = pytest.mark.gpu

DEV = "cuda"
KELLER = (3.4445, -4.7750, 2.0315)
SHAPES = [(1024, 1024), (768, 3072), (16, 256, 256)]


@pytest.fixture(autouse=True)
def need_backend(request, monkeypatch):
    backend = "cuda" if "cuda_backend" in request.node.name else "triton"
    if backend not in fusedlab.backends():
        pytest.skip(f"backend {backend!r} not available here ({fusedlab.backends()})")
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)
    if backend == "cuda":  # float32 products in IEEE float32 (torch's default), whatever the session set
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def torch_muon_ns(G):
    flat = G.reshape(-1, *G.shape[-2:])
    return torch.stack([torch_ns(g, KELLER, 5, 1e-7) for g in flat.unbind(0)]).reshape(G.shape)


def check_bf16_within_twice_torch_muon(run, shape, gen):
    """``run(G)`` in bf16, over two draws: its error against float64 at most twice torch.optim.Muon's."""
    ours = theirs = 0.0
    for _ in range(2):
        G = torch.randn(shape, generator=gen).to(DEV)
        exact = ref.newton_schulz(G.double())
        got = run(G)
        assert got.dtype == torch.bfloat16 and got.shape == G.shape and torch.isfinite(got).all()
        ours += rel(got, exact)
        theirs += rel(torch_muon_ns(G), exact)
    assert ours <= 2 * theirs, (ours, theirs)


@pytest.mark.parametrize("shape", SHAPES + [(3072, 768)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_within_twice_torch_muon(shape, gen):
    check_bf16_within_twice_torch_muon(
        lambda G: fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, backend="triton"), shape, gen)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, gen):
    G = torch.randn(shape, generator=gen).to(DEV)
    got = fusedlab.ops.newton_schulz(G, coefficients="polar_express", dtype=torch.float32, backend="triton")
    assert rel(got, ref.newton_schulz(G.double(), 5, "polar_express")) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype, gen):
    G = torch.randn(4, 200, 136, generator=gen).to(DEV)  # unaligned: padded tiles and the copied last step
    exact = ref.newton_schulz(G.double())
    got = fusedlab.ops.newton_schulz(G, dtype=dtype, backend="triton")
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    else:
        assert rel(got, exact) <= 2 * rel(ref.newton_schulz(G, dtype=torch.float16), exact)


def test_large_class_and_auto(gen):
    """A batch large enough for the 128 x 128 tiles; "auto" runs the GPU kernel auto_cuda_choice names."""
    G = torch.randn(16, 640, 1280, generator=gen).to(DEV)
    assert tk.size_class(torch.bfloat16, 640, 16) == "large"
    got = fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16)
    which = auto_cuda_choice(G.shape, [b for b in ("cuda", "triton") if b in _backend.backends()])
    assert which in ("cuda", "triton")
    assert torch.equal(got, fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, backend=which))
    exact = ref.newton_schulz(G.double())
    assert rel(got, exact) <= 2 * rel(torch_muon_ns(G), exact)


def test_zero_and_singular_value_band(gen):
    assert torch.equal(fusedlab.ops.newton_schulz(torch.zeros(2, 256, 512, device=DEV), backend="triton"),
                       torch.zeros(2, 256, 512, dtype=torch.bfloat16, device=DEV))
    G = torch.randn(512, 1024, generator=gen).to(DEV)
    sv = torch.linalg.svdvals(fusedlab.ops.newton_schulz(G, coefficients="polar_express", backend="triton").double())
    assert 0.6 < sv.min() and sv.max() < 1.25, (sv.min(), sv.max())
    assert not math.isnan(sv.sum().item())


def test_opcheck_on_cuda(gen):
    G = torch.randn(2, 64, 96, generator=gen).to(DEV)
    flat = [v for _ in range(2) for v in KELLER]
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fusedlab.newton_schulz_triton.default, (G, flat, 1.0, 1e-7, dt))


def test_torch_compile_fullgraph_cuda(gen):
    torch._dynamo.reset()
    G = torch.randn(3, 128, 192, generator=gen).to(DEV)
    f = torch.compile(lambda g: fusedlab.ops.newton_schulz(g, dtype=torch.float32, backend="triton"), fullgraph=True)
    torch.testing.assert_close(f(G), fusedlab.ops.newton_schulz(G, dtype=torch.float32, backend="triton"))


# ---- the CUDA backend (csrc/cuda/newton_schulz.cu)

CUDA_SHAPES = SHAPES + [(3072, 768), (4, 384, 192), (3, 200, 136)]  # tall, batched tall, unaligned


def poison_allocator(mb=64):
    """Leave NaN bytes in the caching allocator's free blocks, so outputs a kernel fails to write show up:
    one large block for the large pool, and many blocks of 4 KiB to 512 KiB for the small pool (<= 1 MiB)."""
    blocks = [torch.full((mb << 18,), math.nan, dtype=torch.float32, device=DEV)]
    blocks += [torch.full((n,), math.nan, dtype=torch.float32, device=DEV) for n in [1 << 10] * 64 + [1 << 17] * 32]
    del blocks


def cuda_ns(G, **kw):
    poison_allocator()
    return fusedlab.ops.newton_schulz(G, backend="cuda", **kw)


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_bf16_within_twice_torch_muon(shape, gen):
    check_bf16_within_twice_torch_muon(lambda G: cuda_ns(G, dtype=torch.bfloat16), shape, gen)


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_float32_matches_reference(shape, gen):
    G = torch.randn(shape, generator=gen).to(DEV)
    got = cuda_ns(G, coefficients="polar_express", dtype=torch.float32)
    assert got.is_contiguous() and got.shape == G.shape
    assert rel(got, ref.newton_schulz(G.double(), 5, "polar_express")) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 200, 136), (2, 136, 200)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_other_dtypes(dtype, shape, gen):
    G = torch.randn(shape, generator=gen).to(DEV)
    exact = ref.newton_schulz(G.double())
    got = cuda_ns(G, dtype=dtype)
    assert got.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    else:
        assert rel(got, exact) <= 2 * rel(ref.newton_schulz(G, dtype=torch.float16), exact)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cuda_backend_input_dtypes(in_dtype, gen):
    """G in any floating dtype: the prologue reads it directly (no upcast copy), as the CPU kernel's result."""
    G = torch.randn(3, 96, 160, generator=gen).to(in_dtype)
    got = cuda_ns(G.to(DEV), dtype=torch.float32)
    torch.testing.assert_close(got.cpu(), fusedlab.ops.newton_schulz(G, dtype=torch.float32, backend="cpu"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(256, 512), (512, 256), (3, 64, 96), (3, 96, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_zero_gives_zero(shape, gen):
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(cuda_ns(torch.zeros(shape, device=DEV), dtype=dtype),
                           torch.zeros(shape, dtype=dtype, device=DEV))
    if len(shape) == 3:  # one zero matrix in a batch: zero out, its neighbours normalized on their own
        G = torch.randn(shape, generator=gen).to(DEV)
        G[1] = 0
        got = cuda_ns(G, dtype=torch.float32)
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        torch.testing.assert_close(got[0], cuda_ns(G[0], dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1024, 1024), (300, 1000), (1000, 300), (5, 70, 45), (5, 45, 70)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_prologue_matches_cpu_and_triton(shape, dtype, gen):
    """steps=0 is the normalization alone (scale, cast, G's layout): the CUDA kernel's float64 norm and
    float32 reciprocal as the CPU kernel's, up to their summation orders (at most a rounding of the result);
    Triton divides by a float32 norm (a few float32 roundings off; within a rounding in bf16)."""
    G = torch.randn(shape, generator=gen) * 3
    got = cuda_ns(G.to(DEV), steps=0, coefficients="polar_express", dtype=dtype)
    cpu = fusedlab.ops.newton_schulz(G, steps=0, coefficients="polar_express", dtype=dtype, backend="cpu")
    triton = fusedlab.ops.newton_schulz(G.to(DEV), steps=0, coefficients="polar_express", dtype=dtype,
                                        backend="triton")
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23
    torch.testing.assert_close(got.cpu(), cpu, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(got, triton, rtol=max(2 * ulp, 1e-5), atol=0)
    assert (got.cpu() == cpu).float().mean() > 0.99  # a different rounding is rare
    # deterministic: a fixed two-level reduction, no atomics
    assert torch.equal(got, cuda_ns(G.to(DEV), steps=0, coefficients="polar_express", dtype=dtype))


def test_cuda_backend_tiny_norm_needs_no_eps(gen):
    """The sum of squares is float64: a float32 G of norm ~1e-28 (squares underflow in float32) normalizes as
    G itself does when eps = 0."""
    G = torch.randn(3, 64, 96, generator=gen).to(DEV)
    tiny = cuda_ns(G * 1e-30, eps=0.0, dtype=torch.float32)
    torch.testing.assert_close(tiny, cuda_ns(G, eps=0.0, dtype=torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tall", [False, True])
def test_cuda_backend_layouts(tall, gen):
    """A transposed view of a contiguous batch is read in place; other strided inputs are copied once."""
    base = torch.randn(4, 96, 160, generator=gen).to(DEV)
    if not tall:
        base = base.mT.contiguous()  # [4, 160, 96]: its .mT is a wide view
    rows, cols = base.mT.shape[-2:]
    views = {"mT": base.mT, "sliced": torch.randn(4, rows, 2 * cols, generator=gen).to(DEV)[..., ::2]}
    for name, G in views.items():
        assert not G.is_contiguous()
        got = cuda_ns(G, dtype=torch.float32)
        want = cuda_ns(G.contiguous(), dtype=torch.float32)
        assert got.is_contiguous() and got.shape == G.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_cuda_backend_opcheck(gen):
    flat = [v for _ in range(2) for v in KELLER]
    for shape in ((2, 64, 96), (2, 96, 64)):
        G = torch.randn(shape, generator=gen).to(DEV)
        for dt in (torch.float32, torch.bfloat16):
            torch.library.opcheck(torch.ops.fusedlab.newton_schulz.default, (G, flat, 1.0, 1e-7, dt))


def test_cuda_backend_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    G = torch.randn(3, 192, 128, generator=gen).to(DEV)
    f = torch.compile(lambda g: fusedlab.ops.newton_schulz(g, dtype=torch.float32, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(f(G), cuda_ns(G, dtype=torch.float32))


def test_cuda_backend_muon_step(gen):
    """Muon(backend="cuda") steps as Muon on the Triton backend does (float32 iterations: both exact to 1e-4)."""
    shapes = [(96, 64), (96, 64), (64, 160)]
    params = {b: [torch.nn.Parameter(torch.zeros(s, device=DEV)) for s in shapes] for b in ("cuda", "triton")}
    grads = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    for b, ps in params.items():
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        fusedlab.optim.Muon(ps, lr=0.02, ns_dtype=torch.float32, backend=b).step()
    for p, q in zip(params["cuda"], params["triton"]):
        assert torch.isfinite(p).all() and p.abs().max() > 0
        assert rel(p, q) < 1e-4
