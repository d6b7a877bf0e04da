"""Triton backend of the newton_schulz family on a CUDA device, at the sizes Muon sees.

bf16 follows the tolerance rule: against a float64 Newton-Schulz with the same coefficients (the reference
on the GPU), the kernel errs at most twice as much as torch.optim.Muon's own bf16 computation
(``torch.optim._muon._zeropower_via_newtonschulz``, applied matrix by matrix). fp32 products are exact
(input_precision="ieee"), so fp32 stays within 1e-4 of float64. Skipped without a GPU (marker `gpu`).
"""
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import fusedlab
from fusedlab.reference import newton_schulz as ref
from fusedlab.triton_kernels import newton_schulz as tk

pytestmark = pytest.mark.gpu

DEV = "cuda"
KELLER = (3.4445, -4.7750, 2.0315)
SHAPES = [(1024, 1024), (768, 3072), (16, 256, 256)]


@pytest.fixture(autouse=True)
def need_triton(monkeypatch):
    if "triton" not in fusedlab.backends():
        pytest.skip(f"backend 'triton' not available here ({fusedlab.backends()})")
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def torch_muon_ns(G):
    flat = G.reshape(-1, *G.shape[-2:])
    return torch.stack([torch_ns(g, KELLER, 5, 1e-7) for g in flat.unbind(0)]).reshape(G.shape)


@pytest.mark.parametrize("shape", SHAPES + [(3072, 768)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_within_twice_torch_muon(shape, gen):
    ours = theirs = 0.0
    for _ in range(2):
        G = torch.randn(shape, generator=gen).to(DEV)
        exact = ref.newton_schulz(G.double())
        got = fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, backend="triton")
        assert got.dtype == torch.bfloat16 and got.shape == G.shape and torch.isfinite(got).all()
        ours += rel(got, exact)
        theirs += rel(torch_muon_ns(G), exact)
    assert ours <= 2 * theirs, (ours, theirs)


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
    """A batch large enough for the 128 x 128 tiles; "auto" sends CUDA tensors to the Triton kernels."""
    G = torch.randn(16, 640, 1280, generator=gen).to(DEV)
    assert tk.size_class(torch.bfloat16, 640, 16) == "large"
    got = fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16)
    assert torch.equal(got, fusedlab.ops.newton_schulz(G, dtype=torch.bfloat16, backend="triton"))
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
