"""Triton backend of the cat family vs the float64 reference: under TRITON_INTERPRET=1 on CPUs (small tiles,
L <= 128), on the GPU when there is one. Every kernel output starts NaN, so an unwritten row fails."""
import pytest
import torch

import fusedlab
from fusedlab.reference import cat as ref
from fusedlab.triton_kernels import cat as tk

pytestmark = [
    pytest.mark.skipif("triton" not in fusedlab.backends(), reason="Triton backend not available"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)
    if INTERPRETED:  # the interpreter's cost grows with programs x block ops: 16 x 16 tiles
        monkeypatch.setattr(tk, "INTERPRET_CONFIG", (16, 16, 4, 1))


def draw(gen, B, H, Hkv, L, Nc, d, with_qc):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [mk(B, H, L, d), mk(B, Hkv, L, d), mk(B, Hkv, L, d), mk(B, Hkv, Nc, d), mk(B, Hkv, Nc, d),
            mk(B, H, Nc, d) if with_qc else None]


def run_both(inputs, l, dtype, gen):
    """Kernel outputs and gradients (in ``dtype``) and the float64 reference's, on the same inputs."""
    with_qc = inputs[5] is not None
    ours = [None if t is None else t.to(dtype).to(DEVICE).requires_grad_() for t in inputs]
    exact = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out = fusedlab.ops.cat_attention(*ours[:5], l, qc=ours[5], return_lse=True, backend="triton")
    want = fusedlab.ops.cat_attention(*exact[:5], l, qc=exact[5], return_lse=True, backend="reference")
    n = 2 if with_qc else 1  # outputs that take a gradient
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in want[:n]]
    used = [t for t in ours if t is not None]
    got_g = torch.autograd.grad([o for o in out[:n]], used, [g.to(dtype).to(DEVICE) for g in grads_out])
    want_g = torch.autograd.grad(list(want[:n]), [t for t in exact if t is not None], grads_out)
    return list(out) + list(got_g), list(want) + list(want_g)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# (B, H, Hkv, L, l, extra slots, d, qc): L not a multiple of l or of the tile, l = 1, l > tile, l > L, GQA
CASES = [(1, 2, 1, 37, 5, 1, 16, True), (2, 2, 2, 40, 16, 1, 16, False), (1, 4, 2, 33, 1, 0, 8, True),
         (1, 1, 1, 50, 20, 2, 32, True), (1, 2, 1, 9, 16, 3, 16, True)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}L{}l{}x{}d{}qc{}".format(*c))
def test_forward_backward_float32(case, gen):
    B, H, Hkv, L, l, extra, d, with_qc = case
    Nc = -(-L // l) + extra
    got, want = run_both(draw(gen, B, H, Hkv, L, Nc, d, with_qc), l, torch.float32, gen)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5, (rel(a, b))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("splits", [2, 3])
def test_slot_gradients_split_over_rows(splits, gen, monkeypatch):
    """The slot kernel's row splits (partial sums added up afterwards) give the unsplit gradients."""
    monkeypatch.setattr(tk, "SLOT_SPLITS", splits)
    B, H, Hkv, L, l, d = 1, 2, 1, 70, 3, 16
    got, want = run_both(draw(gen, B, H, Hkv, L, L // l + 2, d, True), l, torch.float32, gen)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5
    # half types: fp32 partial sums rounded once into the fp16 gradients, as the unsplit kernel rounds
    inputs = draw(gen, B, H, Hkv, L, L // l + 2, d, False)
    split_half, _ = run_both(inputs, l, torch.float16, torch.Generator().manual_seed(5))
    monkeypatch.setattr(tk, "SLOT_SPLITS", 1)
    whole_half, _ = run_both(inputs, l, torch.float16, torch.Generator().manual_seed(5))
    for a, b in zip(split_half, whole_half):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.timeout(120)
def test_split_sum_over_several_programs_with_a_partial_last_one(gen, monkeypatch):
    """Three row splits with qc and grouped heads, L = 45 and Nc = 25 off the 16-row tiles, d = 8 inside a
    16-wide tile, and a split reduction of 64 elements a program over 2 x 2 x 25 x 8 = 800 (the last program
    half full): every gradient, delta-dependent ones included, matches the reference."""
    monkeypatch.setattr(tk, "SLOT_SPLITS", 3)
    monkeypatch.setattr(tk, "SPLIT_SUM_BLOCK", 64)
    B, H, Hkv, L, l, Nc, d = 2, 4, 2, 45, 2, 25, 8
    assert (B * Hkv * Nc * d) % 64
    got, want = run_both(draw(gen, B, H, Hkv, L, Nc, d, True), l, torch.float32, gen)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5, rel(a, b)


@pytest.mark.timeout(120)
def test_gradients_without_raw_queries(gen):
    """L = 0 with qc: only the compressed queries' dq launch runs (no raw delta is written, and the dK/dV
    kernels visit no raw rows); the slot gradients, from the compressed queries alone, match the reference."""
    got, want = run_both(draw(gen, 1, 2, 1, 0, 5, 16, True), 4, torch.float32, gen)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        if b.numel():
            assert rel(a, b) < 1e-5, rel(a, b)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("used", ["o", "oc", "lse"])
def test_gradients_when_an_output_is_unused(used, gen):
    """The eager path gets None for the outputs a loss does not use (no zero-filled gradients): a loss on o
    alone, on oc alone, or on o while the log-sum-exps are also returned."""
    inputs = draw(gen, 1, 2, 1, 21, 6, 16, True)
    ours = [t.float().to(DEVICE).requires_grad_() for t in inputs]
    exact = [t.clone().requires_grad_() for t in inputs]
    lse = used == "lse"
    out = fusedlab.ops.cat_attention(*ours[:5], 4, qc=ours[5], return_lse=lse, backend="triton")
    want = fusedlab.ops.cat_attention(*exact[:5], 4, qc=exact[5], return_lse=lse, backend="reference")
    pick = 1 if used == "oc" else 0
    g = torch.randn(want[pick].shape, generator=gen, dtype=torch.float64)
    got_g = torch.autograd.grad(out[pick], ours, g.float().to(DEVICE), allow_unused=True)
    want_g = torch.autograd.grad(want[pick], exact, g, allow_unused=True)
    for a, b in zip(got_g, want_g):
        if b is None or not b.abs().max() > 0:  # no path to this input (dqc for a loss on o): zero or None
            assert a is None or not a.abs().max() > 0
        else:
            assert rel(a, b) < 1e-5


@pytest.mark.timeout(120)
def test_float16_within_twice_torch_half(gen):
    """The tolerance rule: the kernel's fp16 error against float64 is at most twice that of a dense masked
    attention computed by torch in fp16 (fp16 products, fp32 softmax rounded to fp16 before P V)."""
    B, H, Hkv, L, l, d = 1, 2, 1, 40, 8, 16
    Nc = L // l + 1
    inputs = draw(gen, B, H, Hkv, L, Nc, d, False)
    got, want = run_both(inputs, l, torch.float16, gen)
    q, k, v, kc, vc = [t.half() for t in inputs[:5]]
    mask = ref.raw_mask(L, Nc, l).to(DEVICE)
    keys, vals = torch.cat([kc, k], 2).to(DEVICE), torch.cat([vc, v], 2).to(DEVICE)
    s = (q.to(DEVICE) @ keys.transpose(-1, -2)) * (d ** -0.5)
    p = torch.softmax(s.float().masked_fill(~mask, -float("inf")), -1).half()
    torch_half = p @ vals
    assert rel(got[0], want[0]) <= 2 * rel(torch_half, want[0]) + 1e-6


@pytest.mark.timeout(120)
def test_opcheck(gen):
    B, H, Hkv, L, l, d = 1, 2, 1, 20, 8, 16
    q, k, v, kc, vc, qc = [t.float().to(DEVICE) for t in draw(gen, B, H, Hkv, L, 4, d, True)]
    for t in (q, k, v, kc, vc, qc):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fusedlab.cat_attention_triton.default, (q, k, v, kc, vc, qc, l, 0.25))
    torch.library.opcheck(torch.ops.fusedlab.cat_attention_triton.default, (q, k, v, kc, vc, None, l, 0.25))


@pytest.mark.timeout(300)
def test_torch_compile_fullgraph_takes_the_custom_ops(gen):
    """Compiled code traces the custom ops (eager calls skip them); both give the same gradients."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    kc, vc = (torch.randn(1, 2, 4, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    loss = lambda *a: fusedlab.ops.cat_attention(*a, 8, backend="triton").square().sum()  # noqa: E731
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, kc, vc), (q, k, v, kc, vc))
    eager = torch.autograd.grad(loss(q, k, v, kc, vc), (q, k, v, kc, vc))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("H,Hkv,d", [(4, 4, 16), (4, 2, 32), (8, 2, 16)])
def test_decode_matches_reference(H, Hkv, d, gen):
    """Variable fill per sequence (a single slot, no raw keys, full caches); every output row written."""
    B, S, R = 4, 70, 17
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, kc, vc, k, v = mk(B, H, d), mk(B, Hkv, S, d), mk(B, Hkv, S, d), mk(B, Hkv, R, d), mk(B, Hkv, R, d)
    n_slots = torch.tensor([1, 70, 33, 5]).to(DEVICE)
    n_raw = torch.tensor([0, 17, 4, 1]).to(DEVICE)
    got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend="triton")
    want = fusedlab.ops.cat_decode(q.double(), kc.double(), vc.double(), n_slots, k.double(), v.double(), n_raw,
                                   backend="reference")
    assert rel(got, want.cpu()) < 1e-5
    torch.library.opcheck(torch.ops.fusedlab.cat_decode_triton.default,
                          (q, kc, vc, n_slots, k, v, n_raw, 0.3), test_utils=("test_schema", "test_faketensor"))


def test_decode_kernel_keeps_fills_inside_the_cache(gen):
    """Device fills are not checked on the host (that would synchronize every decode step): the kernel clamps
    them to [0, S] and [0, R], so an overfull fill reads the whole cache and nothing past it."""
    B, H, d, S, R = 2, 2, 16, 6, 3
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, kc, vc, k, v = mk(B, H, d), mk(B, H, S, d), mk(B, H, S, d), mk(B, H, R, d), mk(B, H, R, d)
    got = torch.ops.fusedlab.cat_decode_triton(q, kc, vc, torch.tensor([9, 2]).to(DEVICE), k, v,
                                               torch.tensor([1, 7]).to(DEVICE), 0.25)
    want = fusedlab.ops.cat_decode(q, kc, vc, torch.tensor([S, 2]).to(DEVICE), k, v, torch.tensor([1, R]).to(DEVICE),
                                   0.25, backend="reference")
    assert rel(got, want) < 1e-5
