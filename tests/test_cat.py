"""The cat family's reference and public wrapper on the CPU: semantics against a per-token loop, causality,
gradients, autocast and argument errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedlab
from fusedlab.reference import cat as ref


def draw(gen, B, H, Hkv, L, Nc, d, dtype=torch.float64, qc=True):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    t = [mk(B, H, L, d), mk(B, Hkv, L, d), mk(B, Hkv, L, d), mk(B, Hkv, Nc, d), mk(B, Hkv, Nc, d)]
    return t + [mk(B, H, Nc, d) if qc else None]


def per_token_loop(q, k, v, kc, vc, l, qc, scale):
    """Token by token: a dense softmax over exactly the keys each query may see (kv heads by group)."""
    B, H, L, d = q.shape
    group = H // k.shape[1]
    o = torch.empty_like(q)
    oc = torch.empty_like(qc) if qc is not None else None
    for h in range(H):
        hk = h // group
        for t in range(L):
            b = t // l
            keys = torch.cat([kc[:, hk, : b + 1], k[:, hk, b * l: t + 1]], 1)
            vals = torch.cat([vc[:, hk, : b + 1], v[:, hk, b * l: t + 1]], 1)
            w = torch.softmax((keys @ q[:, h, t, :, None]).squeeze(-1) * scale, -1)
            o[:, h, t] = (w[:, :, None] * vals).sum(1)
        if qc is not None:
            for c in range(qc.shape[2]):
                w = torch.softmax((kc[:, hk, : c + 1] @ qc[:, h, c, :, None]).squeeze(-1) * scale, -1)
                oc[:, h, c] = (w[:, :, None] * vc[:, hk, : c + 1]).sum(1)
    return o, oc


@pytest.mark.parametrize("B,H,Hkv,L,l,extra,d", [(1, 2, 2, 13, 4, 1, 8), (2, 4, 2, 9, 1, 0, 4),
                                                 (1, 3, 1, 7, 16, 2, 8), (2, 2, 1, 12, 3, 1, 5)])
def test_reference_matches_per_token_loop(B, H, Hkv, L, l, extra, d, gen):
    Nc = -(-L // l) + extra
    q, k, v, kc, vc, qc = draw(gen, B, H, Hkv, L, Nc, d)
    scale = 0.7
    o, lse, oc, lse_c = ref.cat_attention(q, k, v, kc, vc, l, qc, scale)
    want_o, want_oc = per_token_loop(q, k, v, kc, vc, l, qc, scale)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oc, want_oc, rtol=1e-12, atol=1e-12)
    # lse of token 0: slot 0 and itself
    s0 = torch.stack([(q[:, :, 0] * kc[:, :, 0].repeat_interleave(H // Hkv, 1)).sum(-1),
                      (q[:, :, 0] * k[:, :, 0].repeat_interleave(H // Hkv, 1)).sum(-1)], -1) * scale
    torch.testing.assert_close(lse[:, :, 0], torch.logsumexp(s0, -1))
    assert lse.dtype == torch.float64 and lse_c.shape == (B, H, Nc)


def test_no_output_depends_on_a_later_token(gen):
    """Changing token t+1.. (raw keys, values, and the slots of later chunks) leaves outputs 0..t alone."""
    L, l, Nc = 16, 4, 5
    q, k, v, kc, vc, _ = draw(gen, 1, 2, 1, L, Nc, 8, qc=False)
    base = fusedlab.ops.cat_attention(q, k, v, kc, vc, l)
    for t in (0, 3, 6, 11):
        k2, v2, kc2, vc2 = k.clone(), v.clone(), kc.clone(), vc.clone()
        k2[:, :, t + 1:] += 1.0
        v2[:, :, t + 1:] -= 2.0
        first_hidden = t // l + 1  # slot c >= 1 holds the compression of chunk c - 1: slots past t's chunk
        kc2[:, :, first_hidden:] += 3.0
        vc2[:, :, first_hidden:] += 3.0
        out = fusedlab.ops.cat_attention(q, k2, v2, kc2, vc2, l)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(out[:, :, t + 1:], base[:, :, t + 1:])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend, gen):
    q, k, v, kc, vc, qc = [t.requires_grad_() for t in draw(gen, 1, 2, 1, 6, 3, 3)]
    f = lambda *a: fusedlab.ops.cat_attention(*a[:5], 3, qc=a[5], backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, kc, vc, qc))


# ------------------------------------------------------------------------------------------- the C++ op


def cpu_vs_reference(inputs, l, dtype, gen, tol):
    """Outputs, log-sum-exps and gradients of the C++ op (in ``dtype``) against the float64 reference."""
    ours = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    exact = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out = fusedlab.ops.cat_attention(*ours[:5], l, qc=ours[5], return_lse=True, backend="cpu")
    want = fusedlab.ops.cat_attention(*exact[:5], l, qc=exact[5], return_lse=True, backend="reference")
    n = 2 if inputs[5] is not None else 1
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in want[:n]]
    got_g = torch.autograd.grad(out[:n], [t for t in ours if t is not None], [g.to(dtype) for g in gouts])
    want_g = torch.autograd.grad(want[:n], [t for t in exact if t is not None], gouts)
    for a, b in zip(list(out) + list(got_g), list(want) + list(want_g)):
        assert (a.double() - b).norm() <= tol * b.norm()  # a gradient can be exactly zero (L = 1, say)


@pytest.mark.parametrize("B,H,Hkv,L,l,extra,d,with_qc", [(1, 2, 2, 13, 4, 1, 8, True), (2, 4, 2, 9, 1, 0, 4, False),
                                                         (1, 3, 1, 7, 16, 2, 8, True), (1, 2, 1, 1100, 3, 1, 8, True),
                                                         (2, 2, 2, 1030, 64, 0, 16, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cpu_op_matches_reference(B, H, Hkv, L, l, extra, d, with_qc, dtype, tol, gen):
    """Includes L over several row blocks (blocks of whole chunks, about 512 rows), ragged last chunks."""
    Nc = -(-L // l) + extra
    cpu_vs_reference(draw(gen, B, H, Hkv, L, Nc, d, qc=with_qc), l, dtype, gen, tol)


def test_cpu_op_half_types_compute_in_float32(gen):
    inputs = draw(gen, 1, 2, 1, 40, 11, 8, qc=False)
    half = [t.bfloat16() for t in inputs[:5]]
    got = fusedlab.ops.cat_attention(*half, 4, backend="cpu")
    want = fusedlab.ops.cat_attention(*(t.float() for t in half), 4, backend="reference")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16())


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 70), l=st.integers(1, 20), extra=st.integers(0, 2), G=st.sampled_from([1, 2]),
       with_qc=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_op_drawn_shapes(L, l, extra, G, with_qc, seed):
    gen = torch.Generator().manual_seed(seed)
    cpu_vs_reference(draw(gen, 1, 2 * G, 2, L, -(-L // l) + extra, 4, qc=with_qc), l, torch.float64, gen, 1e-12)


def test_cpu_op_opcheck(gen):
    q, k, v, kc, vc, qc = [t.requires_grad_() for t in draw(gen, 1, 4, 2, 21, 7, 8)]
    torch.library.opcheck(torch.ops.fusedlab.cat_attention.default, (q, k, v, kc, vc, qc, 4, 0.3))
    torch.library.opcheck(torch.ops.fusedlab.cat_attention.default, (q, k, v, kc, vc, None, 4, 0.3))


@pytest.mark.timeout(300)
def test_cpu_op_compiles_fullgraph(gen):
    torch._dynamo.reset()
    q, k, v, kc, vc, _ = [None if t is None else t.float().requires_grad_() for t in draw(gen, 1, 2, 1, 30, 8, 8,
                                                                                          qc=False)]
    loss = lambda *a: fusedlab.ops.cat_attention(*a, 4).square().sum()  # noqa: E731
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, kc, vc), (q, k, v, kc, vc))
    eager = torch.autograd.grad(loss(q, k, v, kc, vc), (q, k, v, kc, vc))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_return_forms_and_default_scale(gen):
    q, k, v, kc, vc, qc = draw(gen, 1, 2, 2, 8, 3, 16, dtype=torch.float32)
    o = fusedlab.ops.cat_attention(q, k, v, kc, vc, 4)
    o2, lse = fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, return_lse=True)
    o3, oc, lse3, lse_c = fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, qc=qc, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(o, o3) and torch.equal(lse, lse3)
    assert lse.dtype == torch.float32 and oc.shape == qc.shape and lse_c.shape == (1, 2, 3)
    torch.testing.assert_close(o, fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, scale=0.25))
    # numpy and torch integer chunk sizes are sizes; a bool is not
    torch.testing.assert_close(o, fusedlab.ops.cat_attention(q, k, v, kc, vc, np.int64(4)))
    torch.testing.assert_close(o, fusedlab.ops.cat_attention(q, k, v, kc, vc, torch.tensor(4)))
    with pytest.raises(ValueError, match="chunk_size must be an int"):
        fusedlab.ops.cat_attention(q, k, v, kc, vc, True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_log_sum_exps_carry_no_gradient_on_any_backend(backend, gen):
    """As FlashAttention's: the returned log-sum-exps are constants for autograd, so every backend gives the
    same gradients whatever a loss does with them."""
    q, k, v, kc, vc, qc = (t.requires_grad_() for t in draw(gen, 1, 2, 2, 8, 3, 16, dtype=torch.float64))
    o, oc, lse, lse_c = fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, qc=qc, return_lse=True, backend=backend)
    assert not lse.requires_grad and not lse_c.requires_grad and o.requires_grad and oc.requires_grad


def test_autocast_casts_inputs(gen):
    q, k, v, kc, vc, _ = draw(gen, 1, 2, 1, 8, 2, 8, dtype=torch.float32, qc=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = fusedlab.ops.cat_attention(q, k, v, kc, vc, 4)
    assert o.dtype == torch.bfloat16
    want = fusedlab.ops.cat_attention(*(t.bfloat16() for t in (q, k, v, kc, vc)), 4)
    assert torch.equal(o, want)


def test_triton_refuses_float64_and_cuda_needs_cuda_tensors(gen):
    q, k, v, kc, vc, _ = draw(gen, 1, 1, 1, 4, 1, 4, qc=False)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, backend="cuda")
    if "triton" in fusedlab.backends():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            fusedlab.ops.cat_attention(q, k, v, kc, vc, 4, backend="triton")


def _bad(**change):
    g = torch.Generator().manual_seed(0)
    args = dict(zip(["q", "k", "v", "kc", "vc", "qc"], draw(g, 2, 4, 2, 10, 4, 8, dtype=torch.float32)))
    args.update(chunk_size=4)
    args.update(change)
    return args


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(q=torch.zeros(4, 10, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.zeros(2, 2, 10, 8, dtype=torch.int64)), TypeError, "k must be float16"),
    (dict(v=torch.zeros(2, 2, 10, 8, dtype=torch.float64)), TypeError, "v must have q's dtype"),
    (dict(k=torch.zeros(2, 2, 9, 8), v=torch.zeros(2, 2, 9, 8)), ValueError, "k must be"),
    (dict(k=torch.zeros(2, 3, 10, 8), v=torch.zeros(2, 3, 10, 8), kc=torch.zeros(2, 3, 4, 8),
          vc=torch.zeros(2, 3, 4, 8)), ValueError, "multiple of k's 3 heads"),
    (dict(kc=torch.zeros(2, 2, 2, 8), vc=torch.zeros(2, 2, 2, 8)), ValueError, r"Nc >= ceil\(L / chunk_size\) = 3"),
    (dict(vc=torch.zeros(2, 2, 5, 8)), ValueError, "kc and vc must have one shape"),
    (dict(qc=torch.zeros(2, 4, 3, 8)), ValueError, "qc must be"),
    (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (dict(chunk_size=2.0), ValueError, "chunk_size must be an int >= 1"),
    (dict(scale=math.nan), ValueError, "scale must be a finite number"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_argument_errors(change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fusedlab.ops.cat_attention(**_bad(**change))


# -------------------------------------------------------------------------------------------- decode


def test_decode_matches_attention_over_the_filled_cache(gen):
    """Variable fill per sequence: each query sees exactly its first n_slots slots and n_raw raw keys."""
    B, H, Hkv, S, R, d = 3, 4, 2, 6, 5, 8
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, kc, vc, k, v = mk(B, H, d), mk(B, Hkv, S, d), mk(B, Hkv, S, d), mk(B, Hkv, R, d), mk(B, Hkv, R, d)
    n_slots, n_raw = torch.tensor([6, 1, 3]), torch.tensor([0, 5, 2])
    got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, scale=0.4)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            keys = torch.cat([kc[b, hk, : n_slots[b]], k[b, hk, : n_raw[b]]])
            vals = torch.cat([vc[b, hk, : n_slots[b]], v[b, hk, : n_raw[b]]])
            want = torch.softmax(keys @ q[b, h] * 0.4, 0) @ vals
            torch.testing.assert_close(got[b, h], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, pattern", [(dict(n_slots=torch.tensor([0, 1])), r"n_slots must lie in \[1, 4\]"),
                                             (dict(n_raw=torch.tensor([3, 1])), r"n_raw must lie in \[0, 2\]"),
                                             (dict(n_raw=torch.tensor([1.0, 0.0])), "n_raw must be an integer"),
                                             (dict(q=torch.zeros(2, 3, 8)), "multiple of the cache's 2 kv heads"),
                                             (dict(k=torch.zeros(2, 2, 2, 4)), "expected q"),
                                             (dict(kc=torch.zeros(2, 0, 4, 8), vc=torch.zeros(2, 0, 4, 8),
                                                   k=torch.zeros(2, 0, 2, 8), v=torch.zeros(2, 0, 2, 8)),
                                              "multiple of the cache's 0 kv heads")])
def test_decode_errors(change, pattern):
    args = dict(q=torch.zeros(2, 4, 8), kc=torch.zeros(2, 2, 4, 8), vc=torch.zeros(2, 2, 4, 8),
                n_slots=torch.tensor([4, 1]), k=torch.zeros(2, 2, 2, 8), v=torch.zeros(2, 2, 2, 8),
                n_raw=torch.tensor([0, 2]))
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        fusedlab.ops.cat_decode(**args)


def test_decode_under_autocast_casts_inputs(gen):
    """As cat_attention: under torch.autocast a float32 cache and a bfloat16 query are cast to the autocast
    dtype first (a generation loop's query comes from an autocast linear, its cache may not)."""
    q = torch.randn(2, 4, 8, generator=gen).bfloat16()
    kc, vc = torch.randn(2, 2, 2, 4, 8, generator=gen)
    k, v = torch.randn(2, 2, 2, 3, 8, generator=gen)
    n_slots, n_raw = torch.tensor([4, 2]), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw)
    want = fusedlab.ops.cat_decode(*(t.bfloat16() for t in (q, kc, vc)), n_slots, *(t.bfloat16() for t in (k, v)), n_raw)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# -------------------------------------------------------------------------------------------- decode: the C++ op


def decode_inputs(gen, B, H, Hkv, S, R, d, dtype=torch.float64):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, d), mk(B, Hkv, S, d), mk(B, Hkv, S, d), mk(B, Hkv, R, d), mk(B, Hkv, R, d)


@pytest.mark.parametrize("B,H,Hkv,S,R,d", [(3, 4, 2, 9, 5, 8), (4, 6, 2, 33, 16, 64), (2, 8, 1, 17, 1, 128),
                                           (5, 2, 2, 1, 3, 16)])
def test_decode_cpu_op_exact_in_float64(B, H, Hkv, S, R, d, gen):
    """Random fills per sequence, a full cache, a single slot, no raw keys and (at the op) no slots."""
    q, kc, vc, k, v = decode_inputs(gen, B, H, Hkv, S, R, d)
    n_slots = torch.randint(1, S + 1, (B,), generator=gen)
    n_raw = torch.randint(0, R + 1, (B,), generator=gen)
    n_slots[0], n_raw[0] = S, R
    n_slots[1], n_raw[1] = 1, 0
    if B > 2:
        n_slots[2], n_raw[2] = 0, R  # raw keys only (the wrapper asks for a slot; the op does not)
    got = torch.ops.fusedlab.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.3)
    want = ref.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wrapped = fusedlab.ops.cat_decode(q, kc, vc, n_slots.clamp(min=1), k, v, n_raw, 0.3, backend="cpu")
    torch.testing.assert_close(wrapped, ref.cat_decode(q, kc, vc, n_slots.clamp(min=1), k, v, n_raw, 0.3),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_cpu_op_reduced_precision(dtype, gen):
    """float32 within 1e-5 of the float64 reference; half types computed in float32, so within one rounding of
    the output of the reference over the same (rounded) inputs."""
    B, H, Hkv, S, R, d = 3, 4, 2, 40, 8, 64
    q, kc, vc, k, v = decode_inputs(gen, B, H, Hkv, S, R, d, dtype)
    n_slots, n_raw = torch.tensor([40, 7, 1]), torch.tensor([8, 0, 3])
    got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend="cpu")
    assert got.dtype == dtype
    want = ref.cat_decode(q.double(), kc.double(), vc.double(), n_slots, k.double(), v.double(), n_raw)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_decode_no_keys_is_nan_like_the_reference(gen):
    q, kc, vc, k, v = decode_inputs(gen, 2, 2, 1, 4, 3, 8)
    n_slots, n_raw = torch.tensor([0, 2]), torch.tensor([0, 1])
    got = torch.ops.fusedlab.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.5)
    want = ref.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.5)
    assert got[0].isnan().all() and want[0].isnan().all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), Hkv=st.integers(1, 3), G=st.integers(1, 3), S=st.integers(1, 40), R=st.integers(0, 17),
       d=st.sampled_from([1, 3, 8, 64]), seed=st.integers(0, 2 ** 31 - 1))
def test_decode_cpu_op_drawn_shapes(B, Hkv, G, S, R, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, kc, vc, k, v = decode_inputs(gen, B, Hkv * G, Hkv, S, R, d)
    n_slots = torch.randint(1, S + 1, (B,), generator=gen)
    n_raw = torch.randint(0, R + 1, (B,), generator=gen)
    got = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw)  # auto on CPU tensors: the C++ op
    want = ref.cat_decode(q, kc, vc, n_slots, k, v, n_raw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_decode_cpu_op_opcheck(gen):
    q, kc, vc, k, v = decode_inputs(gen, 3, 4, 2, 9, 5, 16, torch.float32)
    n_slots, n_raw = torch.tensor([9, 1, 4]), torch.tensor([0, 5, 2])
    torch.library.opcheck(torch.ops.fusedlab.cat_decode.default, (q, kc, vc, n_slots, k, v, n_raw, 0.25))
    torch.library.opcheck(torch.ops.fusedlab.cat_decode.default,
                          (q.double(), kc.double(), vc.double(), n_slots.int(), k.double(), v.double(), n_raw.int(),
                           0.25))


def test_decode_auto_on_cpu_takes_the_cpp_op_unless_a_gradient_is_needed(gen):
    q, kc, vc, k, v = decode_inputs(gen, 2, 4, 2, 6, 3, 8)
    n_slots, n_raw = torch.tensor([6, 2]), torch.tensor([1, 3])
    op = torch.ops.fusedlab.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.35)
    assert torch.equal(fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, 0.35), op)
    q.requires_grad_()
    o = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw)  # the reference: differentiable
    (g,) = torch.autograd.grad(o.sum(), q)
    assert g.shape == q.shape and g.abs().sum() > 0
    o = fusedlab.ops.cat_decode(q, kc, vc, n_slots, k, v, n_raw, backend="cpu")
    with pytest.raises(RuntimeError, match="cat_decode has no backward"):
        o.sum().backward()


@pytest.mark.parametrize("change, pattern", [
    (dict(q=torch.zeros(2, 4, 8, 1)), r"q must be 3-D \[B, H, d\]"),
    (dict(vc=torch.zeros(2, 2, 3, 8)), "vc must have kc's shape"),
    (dict(k=torch.zeros(2, 1, 2, 8), v=torch.zeros(2, 1, 2, 8)), r"k must be \[B, Hkv, R, d\] = \[2, 2, R, 8\]"),
    (dict(q=torch.zeros(2, 3, 8)), "q's 3 heads must be a multiple of kc's 2 kv heads"),
    (dict(v=torch.zeros(2, 2, 2, 8, dtype=torch.float64)), "v must have q's dtype"),
    (dict(n_raw=torch.tensor([1.0, 0.0])), "n_raw must be an integer tensor"),
    (dict(n_slots=torch.tensor([1, 1, 1])), r"n_slots must have shape \[2\]"),
    (dict(n_slots=torch.tensor([5, 1])), r"n_slots must lie in \[0, 4\], got n_slots\[0\] = 5"),
    (dict(n_raw=torch.tensor([0, -1])), r"n_raw must lie in \[0, 2\], got n_raw\[1\] = -1"),
    (dict(scale=math.inf), "scale must be a finite number"),
])
def test_decode_cpu_op_errors(change, pattern):
    args = dict(q=torch.zeros(2, 4, 8), kc=torch.zeros(2, 2, 4, 8), vc=torch.zeros(2, 2, 4, 8),
                n_slots=torch.tensor([4, 1]), k=torch.zeros(2, 2, 2, 8), v=torch.zeros(2, 2, 2, 8),
                n_raw=torch.tensor([0, 2]), scale=0.5)
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.fusedlab.cat_decode(*args.values())


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_attention_cpu_ops_reject_a_non_finite_scale(gen, scale):
    """The wrapper checks the scale; the ops check it too, for direct calls (the backward included)."""
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(2))
    o, lse, oc, lse_c = torch.ops.fusedlab.cat_attention(q, k, v, kc, vc, None, 2, 0.5)
    with pytest.raises(RuntimeError, match="cat_attention: scale must be a finite number"):
        torch.ops.fusedlab.cat_attention(q, k, v, kc, vc, None, 2, scale)
    with pytest.raises(RuntimeError, match="cat_attention_backward: scale must be a finite number"):
        torch.ops.fusedlab.cat_attention_backward(torch.ones_like(o), None, q, k, v, kc, vc, None, o, lse, oc,
                                                  lse_c, 2, scale)


def test_decode_cuda_backend_needs_cuda_tensors_and_auto_never_takes_it(gen):
    assert fusedlab._backend.resolve("auto", "cat", torch.device("cpu")) == "cpu"
    assert fusedlab._backend.AUTO_GPU_PREFERENCE["cat"] == ("triton",)
    qd, kcd, vcd, kd, vd = decode_inputs(gen, 1, 2, 2, 3, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fusedlab.ops.cat_decode(qd, kcd, vcd, torch.tensor([3]), kd, vd, torch.tensor([1]), backend="cuda")
