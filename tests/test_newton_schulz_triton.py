"""Triton backend of the newton_schulz family vs the float64 reference: under TRITON_INTERPRET=1 on CPUs, on
the GPU when there is one. Matrices stay <= 64 (the interpreter costs milliseconds per program); every
buffer the kernels write starts as NaN, so a tile they fail to write fails the comparison. Tests that
need several tiles per matrix shrink the tiles to 16 x 16 (``small_tiles``)."""
import math

import pytest
import torch
import triton
import triton.language as tl

import fusedlab
from fusedlab.reference import newton_schulz as ref
from fusedlab.triton_kernels import newton_schulz as tk

pytestmark = [
    pytest.mark.skipif("triton" not in fusedlab.backends(), reason="Triton backend not available"),
    # the 3.6 interpreter converts 1-element arrays to Python ints for runtime loop bounds
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"
SHAPES = [(32, 48), (48, 32), (2, 40, 40), (3, 16, 64)]
KELLER = (3.4445, -4.7750, 2.0315)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(tk, "POISON_BUFFERS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 x 16 tiles for every dtype: several upper-triangle tiles (mirrored stores) and K steps."""
    monkeypatch.setattr(tk, "CONFIGS", {k: (16, 16, 1, 1) for k in tk.CONFIGS})


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def triton_ns(G, steps=5, coefficients="keller", dtype=torch.float32, eps=1e-7):
    return fusedlab.ops.newton_schulz(G.to(DEVICE), steps, coefficients, eps, dtype, backend="triton")


def randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("tiles", ["default", "16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(shape, tiles, gen, request):
    """fp32 operands with exact products (ieee) and fp32 sums: within 1e-4 of the float64 reference; the
    coefficient set alternates between the two tilings so both sets meet both."""
    if tiles == "16":
        request.getfixturevalue("small_tiles")
    coefficients = "keller" if (SHAPES.index(shape) + (tiles == "16")) % 2 == 0 else "polar_express"
    G = randn(shape, gen)
    got = triton_ns(G, coefficients=coefficients)
    assert got.dtype == torch.float32 and got.shape == G.shape and got.device.type == DEVICE
    assert rel(got, ref.newton_schulz(G.double(), 5, coefficients)) < 1e-4


@pytest.mark.parametrize("shape", [(40, 24), (2, 16, 48)])
def test_float16_within_twice_torch(shape, gen, small_tiles):
    """The tolerance rule: against float64, the fp16 kernel errs at most twice as much as the same Newton-Schulz
    written in fp16 torch ops (the reference run in float16)."""
    G = randn(shape, gen)
    exact = ref.newton_schulz(G.double())
    ours = rel(triton_ns(G, dtype=torch.float16), exact)
    theirs = rel(ref.newton_schulz(G.to(DEVICE), dtype=torch.float16), exact)
    assert ours <= 2 * theirs, (ours, theirs)


@pytest.mark.skipif(INTERPRET, reason="bf16 arithmetic is not faithful under the Triton interpreter")
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_bfloat16_within_twice_torch(shape, gen):
    G = randn(shape, gen)
    exact = ref.newton_schulz(G.double())
    ours = rel(triton_ns(G, dtype=torch.bfloat16), exact)
    theirs = rel(ref.newton_schulz(G.to(DEVICE), dtype=torch.bfloat16), exact)
    assert ours <= 2 * theirs, (ours, theirs)


def test_float64_matches_reference(gen, small_tiles):
    G = randn((2, 24, 40), gen, torch.float64)
    torch.testing.assert_close(triton_ns(G, coefficients="polar_express", dtype=torch.float64).cpu(),
                               ref.newton_schulz(G, 5, "polar_express"), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coefficients, steps", [((2.0, -1.5, 0.5), 3), ([(3.0, -3.2, 1.2), (1.875, -1.25, 0.375)], 4)])
def test_explicit_triples(coefficients, steps, gen):
    """One triple repeated, and a list shorter than ``steps`` (its last triple repeats)."""
    G = randn((24, 40), gen)
    got = triton_ns(G, steps, coefficients)
    assert rel(got, ref.newton_schulz(G.double(), steps, coefficients)) < 1e-4


@pytest.mark.parametrize("abc", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (-0.5, 2.0, -3.0)])
def test_each_term_of_one_step(abc, gen, small_tiles):
    """One step isolates the kernels: a X (the update epilogue), b X X^T X (symmetric X X^T, mirrored tiles)
    and c (X X^T)^2 X (symmetric A A); 40 x 56 pads to 48 x 64, i.e. 3 x 4 tiles of 16."""
    G = randn((40, 56), gen)
    X = G.double() / torch.linalg.matrix_norm(G.double())
    a, b, c = abc
    A = X @ X.T
    want = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(triton_ns(G, 1, abc).double().cpu(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_by_matmul(dtype, gen, small_tiles, monkeypatch):
    """UPDATE_X = "matmul": the symmetric kernels with a X + B X from torch.baddbmm (cuBLAS on a GPU), wide,
    tall (the copy back transposes) and unaligned, one step (each term) and five; the kernel variant agrees."""
    monkeypatch.setattr(tk, "UPDATE_X", "matmul")
    for shape, steps, coefficients in (((40, 56), 1, (-0.5, 2.0, -3.0)), ((2, 48, 16), 5, "keller"),
                                       ((37, 21), 5, "polar_express")):
        G = randn(shape, gen)
        got = fusedlab.ops.newton_schulz(G.to(DEVICE), steps, coefficients, dtype=dtype, backend="triton")
        assert got.shape == G.shape and got.dtype == dtype
        assert rel(got, ref.newton_schulz(G.double(), steps, coefficients)) < (1e-10 if dtype == torch.float64 else 1e-4)
    monkeypatch.setattr(tk, "UPDATE_X", "cublas")
    with pytest.raises(ValueError, match="UPDATE_X must be one of"):
        triton_ns(G)


def test_update_x_auto_takes_the_gemm_for_a_lone_large_half_matrix_on_a_gpu(monkeypatch):
    """UPDATE_X = "auto" (the default): cuBLAS's GEMM only for one large fp16/bf16 matrix on a CUDA device, where
    it measured faster; the Triton kernel for batches, small matrices, fp32 and CPU tensors (the interpreter)."""
    monkeypatch.setattr(tk, "UPDATE_X", "auto")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert tk.update_x_by_matmul(torch.bfloat16, 4096, 1, cuda)
    assert tk.update_x_by_matmul(torch.float16, 4096, 1, cuda)
    assert not tk.update_x_by_matmul(torch.bfloat16, 4096, 1, cpu)
    assert not tk.update_x_by_matmul(torch.float32, 4096, 1, cuda)
    assert not tk.update_x_by_matmul(torch.bfloat16, 4096, 2, cuda)
    assert not tk.update_x_by_matmul(torch.bfloat16, 256, 1, cuda)  # the small class
    for choice, want in (("triton", False), ("matmul", True)):
        monkeypatch.setattr(tk, "UPDATE_X", choice)
        assert tk.update_x_by_matmul(torch.float32, 64, 8, cpu) is want


def test_tall_input_unaligned_and_transposed_store(gen):
    """A tall G is orthogonalized on its transpose; sizes that are multiples of 16 store straight into the
    output (transposed for a tall G), others store whole tiles and copy."""
    for shape in ((64, 32), (2, 48, 16), (37, 21)):
        G = randn(shape, gen)
        assert rel(triton_ns(G, coefficients="polar_express"), ref.newton_schulz(G.double(), 5, "polar_express")) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_tile_class(dtype, gen, monkeypatch):
    """The "large" configuration (picked for many upper-triangle tiles) on a small input."""
    monkeypatch.setattr(tk, "LARGE_MIN_PROGRAMS", 1)
    assert tk.size_class(dtype, 40, 2) == "large"
    G = randn((2, 40, 72), gen)
    exact = ref.newton_schulz(G.double())
    got = triton_ns(G, dtype=dtype)
    if dtype == torch.float32:
        assert rel(got, exact) < 1e-4
    else:
        assert rel(got, exact) <= 2 * rel(ref.newton_schulz(G.to(DEVICE), dtype=dtype), exact)


def test_batch_wider_than_the_grid(gen, monkeypatch):
    """Programs walk the batch in strides of the grid's batch dimension when it is capped."""
    monkeypatch.setattr(tk, "MAX_GRID_BATCH", 2)
    G = randn((5, 16, 24), gen)
    assert rel(triton_ns(G, 2), ref.newton_schulz(G.double(), 2)) < 1e-5


# ------------------------------------------------------------------------------------------ special inputs


def test_zero_input_gives_zero():
    for shape in ((2, 16, 24), (24, 8)):
        out = triton_ns(torch.zeros(shape))
        assert torch.equal(out.cpu(), torch.zeros(shape))


def test_steps_zero_empty_and_noncontiguous(gen):
    G = randn((3, 20, 12), gen)
    norm = torch.linalg.matrix_norm(G.double(), keepdim=True)
    torch.testing.assert_close(triton_ns(G, 0).double().cpu(), G.double() / norm, rtol=1e-6, atol=1e-7)
    assert triton_ns(torch.zeros(0, 8, 16)).shape == (0, 8, 16)
    assert triton_ns(torch.zeros(4, 0)).shape == (4, 0)
    strided = randn((24, 40), gen).T  # [40, 24], not contiguous
    assert rel(triton_ns(strided), ref.newton_schulz(strided.double())) < 1e-4


def test_scale_invariance(gen):
    G = randn((16, 32), gen)
    base = triton_ns(G)
    for scale in (1e-30, 1e30):
        assert rel(triton_ns(G * scale, eps=1e-38), base) < 1e-5, scale


def test_auto_and_cpu_paths_unchanged(gen):
    """CPU tensors still go to the C++ kernel under "auto"; CUDA tensors to a GPU kernel."""
    from fusedlab import _backend

    assert _backend.resolve("auto", "newton_schulz", torch.device("cpu")) == "cpu"
    if DEVICE == "cuda":
        assert _backend.resolve("auto", "newton_schulz", torch.device("cuda")) in ("cuda", "triton")
    G = randn((16, 24), gen)
    assert torch.equal(fusedlab.ops.newton_schulz(G, dtype=torch.float32),
                       fusedlab.ops.newton_schulz(G, dtype=torch.float32, backend="cpu"))


# ------------------------------------------------------------------------------------------ tile mapping


@triton.jit
def _upper_tile_probe(out_ptr, total, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row, col = tk._upper_tile(p)
    tl.store(out_ptr + 2 * p, row, mask=p < total)
    tl.store(out_ptr + 2 * p + 1, col, mask=p < total)


def test_upper_tile_enumeration():
    """Program p maps to (row, col) with row <= col, every upper tile exactly once, for up to 1024 tiles a side."""
    t = 1024
    total = t * (t + 1) // 2
    out = torch.full((total, 2), -1, dtype=torch.int32, device=DEVICE)
    _upper_tile_probe[(triton.cdiv(total, 8192),)](out, total, BLOCK=8192)
    col = torch.repeat_interleave(torch.arange(t), torch.arange(1, t + 1))
    row = torch.arange(total) - col * (col + 1) // 2
    assert torch.equal(out.cpu(), torch.stack([row, col], 1).int())


# ------------------------------------------------------------------------------------------------ opcheck


def test_opcheck(gen):
    G = randn((2, 16, 24), gen).to(DEVICE)
    flat = [v for _ in range(2) for v in KELLER]
    torch.library.opcheck(torch.ops.fusedlab.newton_schulz_triton.default, (G, flat, 1.0, 1e-7, torch.float32))


# ------------------------------------------------------------------------------------------------- errors


def _G(*shape, dtype=torch.float32):
    return torch.zeros(shape or (4, 8), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: tk.newton_schulz(_G(8), list(KELLER), 1.0, 1e-7, torch.float32), ValueError, "G must be"),
    (lambda: tk.newton_schulz(_G(dtype=torch.int32), list(KELLER), 1.0, 1e-7, torch.float32), TypeError,
     "G must be float16, bfloat16, float32 or float64"),
    (lambda: tk.newton_schulz([[1.0]], list(KELLER), 1.0, 1e-7, torch.float32), TypeError, "G must be a torch.Tensor"),
    (lambda: tk.newton_schulz(_G(), [1.0, 2.0], 1.0, 1e-7, torch.float32), ValueError,
     r"coefficients must hold \(a, b, c\) per step, got 2"),
    (lambda: tk.newton_schulz(_G(), [1.0, math.inf, 0.0], 1.0, 1e-7, torch.float32), ValueError,
     "coefficients must be finite"),
    (lambda: tk.newton_schulz(_G(), list(KELLER), 0.0, 1e-7, torch.float32), ValueError, "norm_scale must be"),
    (lambda: tk.newton_schulz(_G(), list(KELLER), 1.0, -1.0, torch.float32), ValueError, "eps must be"),
    (lambda: tk.newton_schulz(_G(), list(KELLER), 1.0, math.nan, torch.float32), ValueError, "eps must be"),
    (lambda: tk.newton_schulz(_G(), list(KELLER), 1.0, 1e-7, torch.int8), ValueError, "dtype must be one of"),
    (lambda: fusedlab.ops.newton_schulz(_G().cpu(), backend="cuda"), ValueError, "needs CUDA tensors"),
])
def test_errors_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-tensor refusal outside the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="G must be a CUDA tensor"):
        tk.newton_schulz(_G(), list(KELLER), 1.0, 1e-7, torch.float32)
