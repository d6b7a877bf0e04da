"""The Triton and CUDA backends of the cat family on a CUDA device, at training sizes, and the CUDA decode kernel.

fp32 runs exact products (input_precision="ieee") and stays within 1e-5 of the float64 reference. fp16 and
bf16 follow the tolerance rule: against float64, the kernel's output and gradients err at most twice as
much as torch's own same-dtype attention over the dense mask (scaled_dot_product_attention with a boolean
mask). The CUDA cat_decode kernel is held to the same rules against the reference and the Triton decode kernel.
Skipped without a GPU (marker `gpu`).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedlab
from fusedlab.reference import cat as ref
from fusedlab.triton_kernels import cat as tk

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    if "triton" not in fusedlab.backends():
        pytest.skip("backend 'triton' not available here")
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)


def draw(gen, B, H, Hkv, L, Nc, d, with_qc):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEV)  # noqa: E731
    return [mk(B, H, L, d), mk(B, Hkv, L, d), mk(B, Hkv, L, d), mk(B, Hkv, Nc, d), mk(B, Hkv, Nc, d),
            mk(B, H, Nc, d) if with_qc else None]


def outputs_and_grads(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in inputs]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return [o.detach() for o in outs] + list(gs)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sdpa_dense(q, k, v, kc, vc, l):
    """torch's same-dtype attention over the dense CAT mask (the tolerance rule's yardstick)."""
    L, Nc = q.shape[2], kc.shape[2]
    g = q.shape[1] // k.shape[1]
    keys = torch.cat([kc, k], 2).repeat_interleave(g, 1)
    vals = torch.cat([vc, v], 2).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=ref.raw_mask(L, Nc, l, q.device))


def needs_cuda_kernel(backend, d=64):
    if backend == "cuda" and "cuda" not in fusedlab.backends():
        pytest.skip("fusedlab._C_cuda not built")
    if backend == "cuda" and d not in (64, 128):
        pytest.skip("the CUDA kernel is instantiated for head dims 64 and 128")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,H,Hkv,L,l,d,with_qc", [(2, 4, 4, 1000, 16, 64, True), (1, 8, 2, 777, 33, 128, True),
                                                   (2, 2, 1, 300, 4, 64, False), (1, 2, 2, 129, 1, 32, True)])
def test_float32_matches_reference(B, H, Hkv, L, l, d, with_qc, backend, gen):
    needs_cuda_kernel(backend, d)
    Nc = -(-L // l) + 1
    inputs = draw(gen, B, H, Hkv, L, Nc, d, with_qc)
    gouts = [torch.randn(B, H, L, d, generator=gen, dtype=torch.float64).to(DEV)]
    if with_qc:
        gouts.append(torch.randn(B, H, Nc, d, generator=gen, dtype=torch.float64).to(DEV))
    call = lambda backend: (lambda q, k, v, kc, vc, qc=None: fusedlab.ops.cat_attention(  # noqa: E731
        q, k, v, kc, vc, l, qc=qc, backend=backend))
    got = outputs_and_grads(call(backend), [None if t is None else t.float() for t in inputs], gouts)
    want = outputs_and_grads(call("reference"), inputs, gouts)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l,d,Hkv", [(16, 64, 4), (4, 128, 2), (32, 64, 1)])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_within_twice_torch(dtype, l, d, Hkv, backend, gen):
    needs_cuda_kernel(backend, d)
    B, H, L = 2, 4, 1024
    Nc = L // l + 1
    inputs = draw(gen, B, H, Hkv, L, Nc, d, False)[:5]
    gouts = [torch.randn(B, H, L, d, generator=gen, dtype=torch.float64).to(DEV)]
    half = [t.to(dtype) for t in inputs]
    got = outputs_and_grads(lambda *a: fusedlab.ops.cat_attention(*a, l, backend=backend), half, gouts)
    theirs = outputs_and_grads(lambda *a: sdpa_dense(*a, l), half, gouts)
    exact = outputs_and_grads(lambda *a: fusedlab.ops.cat_attention(*a, l, backend="reference"), inputs, gouts)
    for name, a, b, e in zip(["o", "dq", "dk", "dv", "dkc", "dvc"], got, theirs, exact):
        assert rel(a, e) <= 2 * rel(b, e), (name, rel(a, e), rel(b, e))


@pytest.mark.timeout(300)
def test_opcheck_cuda(gen):
    q, k, v, kc, vc, qc = [t.float().requires_grad_() for t in draw(gen, 1, 4, 2, 100, 8, 64, True)]
    torch.library.opcheck(torch.ops.fusedlab.cat_attention_triton.default, (q, k, v, kc, vc, qc, 16, 0.125))


@pytest.mark.timeout(300)
def test_opcheck_cuda_kernel_and_its_errors(gen):
    needs_cuda_kernel("cuda")
    q, k, v, kc, vc, qc = [t.float().requires_grad_() for t in draw(gen, 1, 4, 2, 100, 8, 64, True)]
    torch.library.opcheck(torch.ops.fusedlab.cat_attention.default, (q, k, v, kc, vc, qc, 16, 0.125))
    o, oc = fusedlab.ops.cat_attention(q, k, v, kc, vc, 16, qc=qc, backend="cuda")
    (o.sum() + oc.sum()).backward()  # the saved tensors and the two backward launches on the device
    with pytest.raises(ValueError, match="head dims"):
        fusedlab.ops.cat_attention(*(t.detach()[..., :32] for t in (q, k, v, kc, vc)), 16, backend="cuda")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        fusedlab.ops.cat_attention(*(t.detach().double() for t in (q, k, v, kc, vc)), 16, backend="cuda")


@pytest.mark.timeout(300)
def test_torch_compile_fullgraph_forward_backward(gen):
    torch._dynamo.reset()
    q, k, v, kc, vc, _ = [None if t is None else t.bfloat16().requires_grad_()
                          for t in draw(gen, 2, 4, 4, 256, 17, 64, False)]

    @torch.compile(fullgraph=True)
    def loss(q, k, v, kc, vc):
        return fusedlab.ops.cat_attention(q, k, v, kc, vc, 16).float().square().sum()

    compiled = torch.autograd.grad(loss(q, k, v, kc, vc), (q, k, v, kc, vc))
    eager = torch.autograd.grad(fusedlab.ops.cat_attention(q, k, v, kc, vc, 16).float().square().sum(),
                                (q, k, v, kc, vc))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.timeout(300)
def test_model_cached_generation_equals_recompute_on_cuda(gen):
    """fp32 on the GPU: the Triton forward for the prefill and the recomputes, the Triton decode kernel for
    the cached steps; greedy tokens agree."""
    torch.manual_seed(0)
    cfg = fusedlab.nn.CATConfig(vocab_size=64, dim=64, n_heads=4, n_kv_heads=2, compressor_dim=32,
                                compressor_heads=2, chunk_sizes=(8, 16), max_seq_len=128)
    model = fusedlab.nn.CATTransformer(cfg).to(DEV).eval()
    prompt = torch.randint(0, 64, (3, 11), generator=gen).to(DEV)
    got = model.generate(prompt, 40, chunk_size=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(40):
            seq = torch.cat([seq, model(seq, 8)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


# ---------------------------------------------------------------------------------------------- decode: CUDA kernel


def poison_allocator(mb=16):
    """Leave NaN bytes in the caching allocator's free blocks, so output rows a kernel fails to write show up
    (a fresh output would otherwise often land on an earlier backend's correct result)."""
    blocks = [torch.full((mb << 18,), math.nan, dtype=torch.float32, device=DEV)]
    blocks += [torch.full((n,), math.nan, dtype=torch.float32, device=DEV) for n in [1 << 10] * 32 + [1 << 16] * 16]
    del blocks


def sdpa_decode(q, kc, vc, n_slots, k, v, n_raw):
    """torch's same-dtype attention of each query over its filled slots and raw keys (the tolerance yardstick)."""
    S, R, g = kc.shape[2], k.shape[2], q.shape[1] // kc.shape[1]
    seen = torch.cat([torch.arange(S, device=q.device)[None] < n_slots[:, None],
                      torch.arange(R, device=q.device)[None] < n_raw[:, None]], 1)[:, None, None]
    keys = torch.cat([kc, k], 2).repeat_interleave(g, 1)
    vals = torch.cat([vc, v], 2).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q[:, :, None], keys, vals, attn_mask=seen)[:, :, 0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("S,R,H,Hkv", [(300, 16, 8, 2),   # several key shares per sequence, 4 heads per block
                                       (40, 8, 6, 2),     # one share: the split kernel writes the output itself
                                       (100, 4, 4, 4)])   # one head per kv head
def test_decode_cuda_matches_reference_and_triton(dtype, d, S, R, H, Hkv, gen):
    """B = 3 with different fills (a full cache without raw keys, a single slot with a full chunk, half of each):
    fp32 within 1e-5 of the float64 reference and of the Triton kernel; bf16 within twice torch's own bf16
    attention error against float64, and as close to the Triton kernel."""
    if "cuda" not in fusedlab.backends():
        pytest.skip("backend 'cuda' not available here (fusedlab._C_cuda not built)")
    B = 3
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEV)  # noqa: E731
    exact = [mk(B, H, d), mk(B, Hkv, S, d), mk(B, Hkv, S, d), mk(B, Hkv, R, d), mk(B, Hkv, R, d)]
    n_slots = torch.tensor([S, 1, S // 2 + 1], device=DEV)
    n_raw = torch.tensor([0, R, R // 2], device=DEV)
    q, kc, vc, k, v = [t.to(dtype) for t in exact]
    poison_allocator()
    got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend="cuda")
    assert got.dtype == dtype and got.shape == (B, H, d) and got.isfinite().all()
    tri = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend="triton")
    truth = fusedlab.ops.cat_decode(*exact[:3], n_slots, *exact[3:], n_raw, backend="reference")
    if dtype == torch.float32:
        assert rel(got, truth) < 1e-5
        assert rel(got, tri) < 1e-5
    else:
        theirs = rel(sdpa_decode(q, kc, vc, n_slots, k, v, n_raw), truth)
        assert rel(got, truth) <= 2 * theirs
        assert rel(got, tri) <= 2 * theirs


@pytest.mark.timeout(300)
def test_decode_cuda_opcheck_and_errors(gen):
    if "cuda" not in fusedlab.backends():
        pytest.skip("backend 'cuda' not available here (fusedlab._C_cuda not built)")
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    q, kc, vc, k, v = mk(2, 4, 64), mk(2, 2, 70, 64), mk(2, 2, 70, 64), mk(2, 2, 5, 64), mk(2, 2, 5, 64)
    n_slots, n_raw = torch.tensor([70, 3], device=DEV), torch.tensor([5, 0], device=DEV)
    torch.library.opcheck(torch.ops.fusedlab.cat_decode.default, (q, kc, vc, n_slots, k, v, n_raw, 0.125),
                          test_utils=("test_schema", "test_faketensor"))
    # a view starting off a 16-byte boundary is copied, not misread
    base = mk(2 * 2 * 70 * 64 + 1)
    kc_off = base[1:].view(2, 2, 70, 64)
    got = torch.ops.fusedlab.cat_decode(q, kc_off, vc, n_slots, k, v, n_raw, 0.125)
    want = torch.ops.fusedlab.cat_decode(q, kc_off.clone(), vc, n_slots, k, v, n_raw, 0.125)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="head dims 64 or 128"):
        fusedlab.ops.cat_decode(q[..., :32], kc[..., :32], vc[..., :32], n_slots, k[..., :32], v[..., :32], n_raw,
                                backend="cuda")
    with pytest.raises(RuntimeError, match="head dims 64 and 128"):
        torch.ops.fusedlab.cat_decode(q[..., :32].contiguous(), kc[..., :32].contiguous(), vc[..., :32].contiguous(),
                                      n_slots, k[..., :32].contiguous(), v[..., :32].contiguous(), n_raw, 0.125)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fusedlab.cat_decode(q.double(), kc.double(), vc.double(), n_slots, k.double(), v.double(), n_raw,
                                      0.125)
