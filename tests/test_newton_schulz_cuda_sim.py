"""The CUDA newton_schulz prologue and epilogue kernels run on the host (tests/cuda/host_sim.h: a std::thread per
CUDA thread, a barrier per __syncthreads, built with ThreadSanitizer when the compiler supports it).

Checked: the float64 sum of squares per chunk, the second-level sum in its fixed order, the scale and cast
(bit for bit against the same arithmetic done by torch, and within one rounding of the C++ CPU op's
normalization), the transposed writes for shapes that are not multiples of the 32 x 32 tile, the epilogue's
transposed copy, and the host versions of the float -> bf16/fp16 and fp16 -> float conversions. Not checked:
the device's own conversion intrinsics, the memory model of real hardware, the launch configuration.
"""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

import fusedlab  # noqa: F401  (the C++ CPU op, the normalization's cross-check)

import cuda_sim

CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
THREADS, MAX_CHUNKS, TILE, UNIT = 256, 1024, 32, 256 * 8  # fusedlab/newton_schulz_cuda.cuh


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("nssim")
    probe_dir = d / "probe"
    probe_dir.mkdir()
    torch.ones(4).numpy().tofile(probe_dir / "floats.bin")
    probe = lambda out: subprocess.run([out, "convert", str(probe_dir)], capture_output=True).returncode == 0  # noqa
    return cuda_sim.build(d, "newton_schulz_sim", probe)[0]


def _run(sim, mode, path):
    r = subprocess.run([sim, mode, str(path)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    return r.stdout


def _save(t, path):
    t.contiguous().view(-1).view(torch.uint8).numpy().tofile(path)


def _load(path, dtype, shape):
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype).reshape(shape)


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _level2_sum(partials):
    """The scale kernel's second level, in its order: thread t adds partials t, t + 256, ... from 0.0, then the
    block's tree over the 256 threads."""
    v = np.zeros(THREADS)
    for k, x in enumerate(partials):
        v[k % THREADS] += x
    w = THREADS // 2
    while w:
        v[:w] = v[:w] + v[w:2 * w]
        w //= 2
    return float(v[0])


def _plan(batch, rows, cols, transpose, sms, min_chunk):
    """plan_prologue of the header, restated."""
    numel = rows * cols
    chunks = max(1, min(-(-numel // min_chunk), MAX_CHUNKS, (2**31 - 1) // batch))
    chunk_len = -(-numel // chunks)
    chunks = -(-numel // chunk_len)
    units = (-(-rows // TILE)) * (-(-cols // TILE)) if transpose else -(-numel // UNIT)
    groups = max(1, min(-(-(max(sms, 1) * 8) // batch), units))
    return chunks, chunk_len, groups


# (batch, rows, cols, sm_count, min_chunk): small shapes, none of them tile multiples except 64 x 96, with
# min_chunk and sm_count set so that matrices split into several chunks and blocks take several tiles or
# units in turn. (Each launch costs about 0.4 s under ThreadSanitizer, each block about 25 ms: hence few cases.)
SHAPES = [(3, 5, 7, 1, 8), (2, 40, 33, 1, 400), (2, 64, 96, 1, 8192), (4, 100, 70, 1, 4096), (1, 1, 50, 1, 16),
          (2, 50, 1, 1, 16)]
PAIRS = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float32, torch.float32),
         (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float64, torch.float64),
         (torch.float64, torch.bfloat16), (torch.bfloat16, torch.float16)]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def _inputs(batch, rows, cols, dtype, gen, special):
    G = torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64) * 3
    if special == 1:
        G[0] = 0  # a zero matrix: the norm clamps at eps, the output stays zero
    if special == 2 and dtype != torch.float16 and batch > 1:
        G[1] *= 1e-30  # float32 squares would underflow: the sum of squares is float64
    return G.to(dtype)


def _check_prologue(sim, tmp_path, gen, src_dtype, dtype, shapes):
    """Runs every (shape, transpose, special input) case in one process and checks each output."""
    cases, inputs = [], []
    for (batch, rows, cols, sms, min_chunk), transpose, special in shapes:
        G = _inputs(batch, rows, cols, src_dtype, gen, special)
        # eps = 0 on the tiny matrix: the norm itself, not eps, must set its scale
        norm_scale, eps = (1.0, 0.0) if special == 2 else (1.02, 1e-7)
        _save(G, tmp_path / f"src_{len(cases)}.bin")
        cases.append((batch, rows, cols, transpose, sms, min_chunk, norm_scale, eps))
        inputs.append(G)
    (tmp_path / "cases.txt").write_text("".join(
        f"{CODE[src_dtype]} {CODE[dtype]} {b} {r} {c} {t} {s} {mc} {ns!r} {e!r}\n"
        for b, r, c, t, s, mc, ns, e in cases))
    _run(sim, "prologue", tmp_path)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for i, ((batch, rows, cols, transpose, sms, min_chunk, norm_scale, eps), G) in enumerate(zip(cases, inputs)):
        chunks, chunk_len, groups = map(int, (tmp_path / f"plan_{i}.txt").read_text().split())
        assert (chunks, chunk_len, groups) == _plan(batch, rows, cols, transpose, sms, min_chunk)
        partials = np.fromfile(tmp_path / f"partials_{i}.bin", dtype=np.float64).reshape(batch, chunks)
        flat = G.double().reshape(batch, -1)
        for m in range(batch):
            want = [flat[m, k * chunk_len:(k + 1) * chunk_len].square().sum().item() for k in range(chunks)]
            np.testing.assert_allclose(partials[m], want, rtol=1e-13, atol=0)
        out_shape = (batch, cols, rows) if transpose else (batch, rows, cols)
        got = _load(tmp_path / f"dst_{i}.bin", dtype, out_shape)
        got = got.mT if transpose else got
        # the same arithmetic in torch: inv in float64 from the kernel's own partials, cast to acc, scale, cast
        want = torch.empty(batch, rows, cols, dtype=dtype)
        for m in range(batch):
            d = math.sqrt(_level2_sum(partials[m])) * norm_scale
            inv = torch.tensor(1.0 / (eps if d < eps else d), dtype=torch.float64).to(acc)
            want[m] = (G[m].to(acc) * inv).to(dtype)
        assert torch.equal(_bits(got), _bits(want)), (i, cases[i], (got.double() - want.double()).abs().max())
        # and within a rounding or two of the C++ CPU op's normalization (its own summation order; in float64
        # the two norms' summation orders alone differ by a few units in the last place)
        cpu = torch.ops.fusedlab.newton_schulz(G, [], norm_scale, eps, dtype)
        torch.testing.assert_close(got, cpu, rtol=(8 if dtype == torch.float64 else 2) * ULP[dtype], atol=0)


@pytest.mark.timeout(300)
def test_prologue_shapes(sim, tmp_path, gen):
    """Every shape, transposed and not, float32 -> bf16 (Muon's usual cast)."""
    shapes = [(s, t, k % 3) for k, s in enumerate(SHAPES) for t in (0, 1)]
    _check_prologue(sim, tmp_path, gen, torch.float32, torch.bfloat16, shapes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{str(p[0])[6:]}->{str(p[1])[6:]}")
def test_prologue_dtypes(sim, tmp_path, gen, pair):
    """Each input -> output dtype pair on one ragged shape, transposed (with a zero matrix) and not (with a tiny
    one and eps = 0)."""
    shape = (2, 40, 33, 1, 400)
    _check_prologue(sim, tmp_path, gen, *pair, [(shape, 1, 1), (shape, 0, 2)])


@pytest.mark.timeout(300)
def test_prologue_many_chunks(sim, tmp_path, gen):
    """More than 256 partials per matrix: the threads of the second level add several each before the tree."""
    _check_prologue(sim, tmp_path, gen, torch.float32, torch.float32, [((1, 20, 15, 1, 1), 0, 0)])


@pytest.mark.timeout(300)
def test_epilogue_transpose(sim, tmp_path, gen):
    shapes = [(3, 5, 7, 1), (2, 40, 33, 1), (3, 33, 65, 4)]
    cases, inputs = [], []
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for batch, rows, cols, sms in shapes:
            X = torch.randn(batch, rows, cols, generator=gen).to(dtype)
            _save(X, tmp_path / f"src_{len(cases)}.bin")
            cases.append(f"{X.element_size()} {batch} {rows} {cols} {sms}\n")
            inputs.append(X)
    (tmp_path / "cases.txt").write_text("".join(cases))
    _run(sim, "transpose", tmp_path)
    for i, X in enumerate(inputs):
        got = _load(tmp_path / f"dst_{i}.bin", X.dtype, X.mT.shape)
        assert torch.equal(got, X.mT), i


@pytest.mark.timeout(120)
def test_host_conversions_match_torch(sim, tmp_path, gen):
    """The host build's float -> bf16 / fp16 rounding and fp16 -> float widening, bit for bit against torch
    (NaNs only as NaNs): random bit patterns, the half range's edges, ties and subnormals."""
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0**-24, 2.0**-25,
                            2.0**-25 * 1.0001, 3 * 2.0**-25, 2.0**-14, 2.0**-14 * (1 - 2.0**-12), 1 + 2.0**-8,
                            1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 6.1e-5, math.inf, -math.inf, math.nan,
                            3.4e38, 1e-45, -2.0**-24 * 1.5], dtype=torch.float32)
    x = torch.cat([bits.view(torch.float32), special,
                   torch.randn(50_000, generator=gen) * 2.0 ** torch.randint(-30, 18, (50_000,), generator=gen)])
    x.numpy().tofile(tmp_path / "floats.bin")
    _run(sim, "convert", tmp_path)
    # float32 subnormals are left out of the bf16 comparison: CPUs with native bf16 conversion may flush them
    normal = (x.abs() >= torch.finfo(torch.float32).tiny) | (x == 0) | ~x.isfinite()
    for name, dtype in (("bf16.bin", torch.bfloat16), ("fp16.bin", torch.float16)):
        got = torch.from_numpy(np.fromfile(tmp_path / name, dtype=np.int16)).view(dtype)
        want = x.to(dtype)
        keep = ~want.isnan() & (normal if dtype == torch.bfloat16 else True)
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16)), name
    widened = torch.from_numpy(np.fromfile(tmp_path / "fp16_widened.bin", dtype=np.float32))
    want = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    nan = want.isnan()
    assert torch.equal(widened.isnan(), nan)
    assert torch.equal(widened[~nan].view(torch.int32), want[~nan].view(torch.int32))
