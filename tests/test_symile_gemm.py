"""The symile GEMM chunks (ops/symile_gemm.py: "n_squared" as chunks of library GEMMs, what "auto" takes on
CUDA tensors at large N and d) vs the float64 reference. Their ATen ops run on CPU tensors too, so the custom
ops are checked here directly with tiny tiles (many chunks, chunk edges inside the tuple grid); the gpu tests
run them on the GPU."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedlab
from fusedlab.ops import symile_gemm
from fusedlab.reference import symile as ref

F64 = torch.float64


def make_reps(M, N, d, gen, kind="l2", device="cpu", dtype=F64):
    raw = [torch.randn(N, d, generator=gen, dtype=F64) * 3 + 1 for _ in range(M)]
    reps = [F.normalize(r, dim=1) if kind == "l2" else F.layer_norm(r, (d,)) for r in raw]
    return [r.to(device=device, dtype=dtype) for r in reps]


def loss_and_grads(fn, reps, scale):
    reps = [r.detach().clone().requires_grad_() for r in reps]
    scale = scale.detach().clone().requires_grad_()
    loss = fn(reps, scale)
    return [loss] + list(torch.autograd.grad(loss, reps + [scale]))


def gemm_op(tile):
    return lambda reps, s: torch.ops.fusedlab.symile_n_squared_gemm(reps, s, tile)[0]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("M,N,d,tile", [(2, 9, 5, 1 << 25), (3, 7, 6, 1 << 25), (3, 7, 6, 60), (4, 5, 3, 30),
                                        (4, 6, 7, 1 << 25), (5, 3, 4, 10)])
def test_float64_matches_reference(M, N, d, tile, gen):
    reps = make_reps(M, N, d, gen, "layernorm")
    scale = torch.tensor(3.0, dtype=F64)
    got = loss_and_grads(gemm_op(tile), reps, scale)
    want = loss_and_grads(ref.symile_loss_n_squared, reps, scale)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12


def test_chunks_bound_the_operand_as_well_as_the_logits(gen, monkeypatch):
    """With d > N a chunk's [chunk * N, d] operand outgrows its N x chunk x N logits: both stay within
    tile_elems, and the loss and gradients are unchanged."""
    seen = []
    logits = symile_gemm._logits

    def spy(reps, w, acc):
        S, P = logits(reps, w, acc)
        seen.append((S.numel(), P.numel()))
        return S, P

    monkeypatch.setattr(symile_gemm, "_logits", spy)
    reps, scale, tile = make_reps(4, 4, 64, gen), torch.tensor(2.0, dtype=F64), 1024
    got = loss_and_grads(gemm_op(tile), reps, scale)
    assert seen and max(max(s) for s in seen) <= tile, seen
    for a, b in zip(got, loss_and_grads(ref.symile_loss_n_squared, reps, scale)):
        assert rel(a, b) < 1e-12


def test_autocast_forward_and_backward_see_the_same_logits(gen):
    """Under autocast the GEMM chunks still compute in float32 in both passes (the backward recomputes the
    forward's logits): the same loss and gradients as outside autocast, at logits in the hundreds."""
    reps, scale = make_reps(3, 6, 8, gen, "layernorm", dtype=torch.float32), torch.tensor(20.0)
    want = loss_and_grads(gemm_op(1 << 25), reps, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(gemm_op(1 << 25), reps, scale)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and rel(a, b) < 1e-6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("M", [2, 3, 4])
def test_zero_features(M):
    """d = 0: every logit is 0, so the loss is log of the number of negatives per anchor plus one, and the
    gradients are empty; the reference agrees."""
    reps = [torch.zeros(3, 0, dtype=F64, requires_grad=True) for _ in range(M)]
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    got = loss_and_grads(gemm_op(5), reps, scale)
    want = loss_and_grads(ref.symile_loss_n_squared, reps, scale)
    assert abs(got[0].item() - (M - 1) * math.log(3)) < 1e-12
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_torch(dtype, gen):
    """fp32 and bf16 inputs: the error against float64 (output and gradients) is at most twice that of the
    reference computed in the same dtype by plain PyTorch."""
    ours_err = torch_err = 0.0
    for M, N, d in [(2, 13, 24), (3, 9, 24), (4, 5, 24)]:
        reps = make_reps(M, N, d, gen)
        scale = torch.tensor(20.0, dtype=F64)
        exact = loss_and_grads(ref.symile_loss_n_squared, reps, scale)
        low = [r.to(dtype) for r in reps]
        ours = loss_and_grads(gemm_op(50), low, scale.to(dtype))
        plain = loss_and_grads(ref.symile_loss_n_squared, low, scale.to(dtype))
        assert all(o.dtype == dtype for o in ours)
        ours_err += sum(rel(a, b) for a, b in zip(ours, exact))
        torch_err += sum(rel(a, b) for a, b in zip(plain, exact))
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)


@pytest.mark.timeout(120)
def test_opcheck(gen):
    reps = [r.requires_grad_() for r in make_reps(3, 4, 5, gen)]
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedlab.symile_n_squared_gemm.default, (reps, scale, 20))
    loss, lse = torch.ops.fusedlab.symile_n_squared_gemm(reps, scale, 20)
    torch.library.opcheck(torch.ops.fusedlab.symile_n_squared_gemm_backward.default,
                          (torch.tensor(1.0, dtype=F64), [r.detach() for r in reps], scale.detach(), lse, 20))


@pytest.mark.timeout(60)
def test_cuda_backend_needs_cuda_tensors(gen):
    reps = make_reps(3, 4, 5, gen)
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        fusedlab.ops.symile_loss(reps, 2.0, "n_squared", backend="cuda")


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_chunks_match_reference_on_gpu(dtype, gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for M, N, d in [(2, 70, 40), (3, 33, 64), (4, 9, 24)]:
        reps = make_reps(M, N, d, gen)
        scale = torch.tensor(20.0, dtype=F64)
        exact = loss_and_grads(ref.symile_loss_n_squared, reps, scale)
        low = [r.to("cuda", dtype) for r in reps]
        ours = loss_and_grads(gemm_op(symile_gemm.TILE_ELEMS), low, scale.to("cuda", dtype))
        plain = loss_and_grads(ref.symile_loss_n_squared, low, scale.to("cuda", dtype))
        errs = [rel(a, b) for a, b in zip(ours, exact)]
        assert sum(errs) <= 2 * sum(rel(a, b) for a, b in zip(plain, exact)), errs
    # several chunks at a realistic size: the same fp32 sums in another order, so equal up to the output's
    # rounding (bf16 gradients: a last-bit difference in a few entries)
    reps = make_reps(3, 200, 128, gen)
    low = [r.to("cuda", dtype) for r in reps]
    s = torch.tensor(20.0, dtype=F64)
    want = loss_and_grads(gemm_op(1 << 25), low, s.to("cuda", dtype))
    got = loss_and_grads(gemm_op(200 * 200 * 7), low, s.to("cuda", dtype))
    for a, b in zip(got, want):
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_auto_takes_the_gemm_tiles_where_measured_faster(gen):
    from fusedlab.ops import symile as ops_symile

    calls = []
    real = symile_gemm.forward
    try:
        symile_gemm.forward = lambda *a: calls.append(a[0][0].shape) or real(*a)
        small = [r.to("cuda", torch.bfloat16) for r in make_reps(3, 64, 64, gen)]
        big = [r.to("cuda", torch.bfloat16) for r in make_reps(3, ops_symile.GEMM_MIN_N, ops_symile.GEMM_MIN_D, gen)]
        fusedlab.ops.symile_loss(small, 20.0, "n_squared")
        assert calls == []
        fusedlab.ops.symile_loss(big, 20.0, "n_squared")
        assert len(calls) == 1
        fusedlab.ops.symile_loss([r.double() for r in small[:2]] * 3, 20.0, "n_squared")  # M = 6, float64
        assert len(calls) == 2
        fusedlab.ops.symile_loss([r.float() for r in small], 20.0, "n_squared")  # float32: always the tiles
        assert len(calls) == 3
    finally:
        symile_gemm.forward = real
