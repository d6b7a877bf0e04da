"""fusedlab.nn.CATAttention: a drop-in causal self-attention layer."""
import pytest
import torch

import fusedlab
from fusedlab.nn.cat import rotary


@pytest.mark.parametrize("L,l,heads,kv", [(21, 4, 4, 2), (8, 8, 2, 2), (5, 16, 2, 1), (30, 1, 2, 2)])
def test_causal_and_shapes(L, l, heads, kv, gen):
    torch.manual_seed(0)
    layer = fusedlab.nn.CATAttention(dim=16, n_heads=heads, chunk_size=l, n_kv_heads=kv).double()
    x = torch.randn(2, L, 16, generator=gen, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    for t in range(0, L - 1, max(1, L // 4)):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, L - t - 1, 16, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(x2)[:, : t + 1], y[:, : t + 1], rtol=1e-12, atol=1e-12)


def test_each_chunk_sees_earlier_chunks_through_the_compressor(gen):
    """Token outputs of chunk 2 change when chunk 0 changes (via its compressed slot), and the compressor
    is the only route: zero its weights and the dependence on earlier chunks goes away."""
    torch.manual_seed(0)
    layer = fusedlab.nn.CATAttention(dim=8, n_heads=2, chunk_size=4, rope_base=None).double()
    x = torch.randn(1, 12, 8, generator=gen, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :4] += 1.0
    assert not torch.allclose(layer(x)[:, 8:], layer(x2)[:, 8:])
    with torch.no_grad():
        layer.compress.weight.zero_()
    torch.testing.assert_close(layer(x)[:, 8:], layer(x2)[:, 8:])


def test_backward_reaches_every_parameter(gen):
    layer = fusedlab.nn.CATAttention(dim=16, n_heads=4, chunk_size=4, n_kv_heads=2)
    layer(torch.randn(2, 13, 16, generator=gen)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.skipif("triton" not in fusedlab.backends(), reason="Triton backend not available")
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
def test_triton_backend_matches_reference(gen, monkeypatch):
    from fusedlab.triton_kernels import cat as tk

    if not torch.cuda.is_available():
        monkeypatch.setattr(tk, "INTERPRET_CONFIG", (16, 16, 4, 1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = fusedlab.nn.CATAttention(dim=32, n_heads=2, chunk_size=8).to(dev)
    x = torch.randn(1, 40, 32, generator=gen).to(dev)
    want = layer(x)
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)


def test_rotary_is_a_rotation_and_identity_at_zero(gen):
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    pos = torch.arange(5)
    r = rotary(x, pos)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotary(x, torch.zeros(5, dtype=torch.int64)), x)
    # relative: <R(p) a, R(p + s) b> depends on s only
    a, b = x[0, 0], x[1, 0]
    dots = [(rotary(a[None], torch.tensor([p])) * rotary(b[None], torch.tensor([p + 2]))).sum() for p in (0, 3, 7)]
    # float64 inputs get float64 angle tables: the dots agree to float64 precision
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-12, atol=1e-12)
    # and match an exact rotation
    ang = 7 * 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    want = torch.cat([a[:4] * ang.cos() - a[4:] * ang.sin(), a[:4] * ang.sin() + a[4:] * ang.cos()])
    torch.testing.assert_close(rotary(a[None], torch.tensor([7]))[0], want, rtol=1e-14, atol=1e-14)


def test_empty_batch():
    layer = fusedlab.nn.CATAttention(32, 4, 4)
    assert layer(torch.randn(0, 5, 32)).shape == (0, 5, 32)


@pytest.mark.parametrize("kw, pattern", [(dict(n_heads=3, n_kv_heads=2), "multiple of n_kv_heads"),
                                         (dict(chunk_size=0), "chunk_size must be an int"),
                                         (dict(dim=0), "must be >= 1")])
def test_constructor_errors(kw, pattern):
    args = dict(dim=16, n_heads=4, chunk_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=pattern):
        fusedlab.nn.CATAttention(**args)


def test_input_shape_error():
    with pytest.raises(ValueError, match=r"x must be \[B, L, 16\]"):
        fusedlab.nn.CATAttention(16, 4, 4)(torch.zeros(2, 5, 8))
