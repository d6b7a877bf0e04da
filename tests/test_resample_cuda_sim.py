"""The CUDA resample kernels run on the host (tests/cuda/host_sim.h: a std::thread per CUDA thread, a barrier
per __syncthreads, built with ThreadSanitizer when the compiler supports it) against the reference.

This checks the kernels' logic and barrier placement without a GPU; it does not check device-specific
behaviour (warp shuffles inside cub, the memory model of real hardware, launch configuration).
"""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from fusedlab.reference import resample as ref

import cuda_sim

METHODS = ("multinomial", "stratified", "systematic", "residual")
METHOD_ID = {m: i for i, m in enumerate(METHODS)}  # the enum order of fusedlab/resample.h
SHARED_MAX_K = 4096


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    probe = lambda out: subprocess.run([out, "fastdiv"], capture_output=True).returncode == 0  # noqa: E731
    return cuda_sim.build(tmp_path_factory.mktemp("sim"), "resample_sim", probe)[0]


def _run(sim, *args):
    r = subprocess.run([sim, *map(str, args)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    return r.stdout


def _log_weights(B, K, gen, dtype):
    lw = torch.randn(B, K, generator=gen, dtype=torch.float64) * 3
    lw[torch.rand(B, K, generator=gen) < 0.2] = -math.inf
    lw[torch.rand(B, K, generator=gen) < 0.05] = math.nan
    lw[:, 0] = torch.randn(B, generator=gen, dtype=torch.float64)  # one alive per group
    if B >= 3:
        lw[1] = -math.inf  # degenerate
    if B >= 4:
        lw[2, :] = -math.inf
        lw[2, K // 2] = 1.5  # a single live particle
    if B >= 5 and K >= 3:
        lw[3, 1] = math.inf  # +inf: degenerate too
    return lw.to(dtype)


def _resample(sim, tmp_path, lw, u, method, thr, grid, shared, state=None, philox=None):
    """Runs the resample kernel on u, or with ``philox=(seed, offset)`` on the uniforms it draws itself."""
    B, K = lw.shape
    row_bytes = 0 if state is None else state[0, 0].numel() * state.element_size()
    lw.contiguous().numpy().tofile(tmp_path / "lw.bin")
    if philox is None:
        u.contiguous().numpy().tofile(tmp_path / "u.bin")
    elif (tmp_path / "u.bin").exists():
        (tmp_path / "u.bin").unlink()  # the kernel must not need them
    if state is not None:
        state.contiguous().view(torch.uint8).numpy().tofile(tmp_path / "state.bin")
    rng = "" if philox is None else f" {philox[0]} {philox[1]}"
    (tmp_path / "params.txt").write_text(
        f"{B} {K} {METHOD_ID[method]} {thr!r} {lw.element_size()} {grid} {int(shared)} {row_bytes}{rng}\n")
    _run(sim, "resample", tmp_path)

    def load(name, dtype, shape):
        return torch.from_numpy(np.fromfile(tmp_path / name, dtype=dtype).reshape(shape))

    out = dict(lw=load("lw_out.bin", np.float32 if lw.dtype == torch.float32 else np.float64, (B, K)),
               anc=load("anc.bin", np.int64, (B, K)), ess=load("ess.bin", np.float64, (B,)),
               log_norm=load("log_norm.bin", np.float64, (B,)), status=load("status.bin", np.uint8, (B, 2)))
    if state is not None:
        raw = np.fromfile(tmp_path / "state_out.bin", dtype=np.uint8)
        out["state"] = torch.from_numpy(raw).view(state.dtype).reshape(state.shape)
    return out


def _check(got, lw, u, method, thr):
    want_lw, want_anc, want_ess, want_ln, want_status = ref.resample(lw, u, method, thr)
    assert torch.equal(got["status"], want_status)
    assert torch.equal(got["anc"], want_anc)
    tol = 1e-6 if lw.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got["lw"], want_lw, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(got["ess"], want_ess, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["log_norm"], want_ln, rtol=1e-12, atol=1e-12)


CASES = [  # B, K, grid (blocks; fewer than B exercises the grid-stride loop), scratch in shared memory
    (3, 1, 3, True),  # up to K = 64 with shared scratch: 64-thread blocks
    (5, 7, 2, True),
    (4, 64, 3, True),
    (4, 33, 4, False),
    (3, 65, 3, True),  # 256-thread blocks from K = 65 on
    (3, 300, 2, True),
    (2, 513, 1, False),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resample_kernel_matches_reference(sim, tmp_path, gen, method, dtype):
    for B, K, grid, shared in CASES:
        for thr in (0.0, 0.5, 1.0):
            lw = _log_weights(B, K, gen, dtype)
            u = torch.rand(B, 1 if method == "systematic" else K, generator=gen, dtype=torch.float64)
            got = _resample(sim, tmp_path, lw, u, method, thr, grid, shared)
            _check(got, lw, u, method, thr)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_resample_kernel_large_group_workspace(sim, tmp_path, gen, method):
    B, K = 2, SHARED_MAX_K + 904  # the global-workspace path the glue takes for K > 4096
    lw = _log_weights(B, K, gen, torch.float64)
    lw[1, : K // 2] = -math.inf  # no longer degenerate
    lw[1, 3] = 0.0
    u = torch.rand(B, 1 if method == "systematic" else K, generator=gen, dtype=torch.float64)
    _check(_resample(sim, tmp_path, lw, u, method, 1.0, 1, False), lw, u, method, 1.0)


@pytest.mark.timeout(300)
def test_residual_edge_cases(sim, tmp_path, gen):
    K = 12
    lw = torch.zeros(4, K, dtype=torch.float64)  # equal weights: every copy deterministic, R = 0
    lw[1, :4] = -math.inf  # K w / S = 1.5 for the 8 live ones: 8 copies, 4 residual draws
    lw[2] = torch.log(torch.arange(1, K + 1, dtype=torch.float64))
    lw[3, 5] = 40.0  # one particle takes (nearly) all
    u = torch.rand(4, K, generator=gen, dtype=torch.float64)
    for shared in (True, False):
        _check(_resample(sim, tmp_path, lw, u, "residual", 1.0, 2, shared), lw, u, "residual", 1.0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype,trail", [(torch.float32, ()), (torch.float32, (16,)), (torch.bfloat16, ()),
                                         (torch.bfloat16, (3, 5)), (torch.int64, (3, 5)), (torch.uint8, (3,))])
def test_gather_kernels_match_reference(sim, tmp_path, gen, dtype, trail):
    B, K = 3, 37
    state = (torch.randn(B, K, *trail, generator=gen) * 100).to(dtype)
    anc = torch.randint(0, K, (B, K), generator=gen)
    anc[0] = K - 1
    row_bytes = state[0, 0].numel() * state.element_size()
    state.view(torch.uint8).numpy().tofile(tmp_path / "state.bin")
    anc.numpy().tofile(tmp_path / "anc.bin")
    (tmp_path / "params.txt").write_text(f"{B} {K} {row_bytes} 2\n")
    _run(sim, "gather", tmp_path)
    want = ref.gather(state, anc)
    for name in ("out.bin", "out_wide.bin", "inplace.bin"):
        raw = np.fromfile(tmp_path / name, dtype=np.uint8)
        got = torch.from_numpy(raw).view(dtype).reshape(state.shape)
        assert torch.equal(got, want), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["systematic", "multinomial", "residual"])
def test_fused_resample_gather_kernel(sim, tmp_path, gen, method):
    B, K = 4, 45
    lw = _log_weights(B, K, gen, torch.float32)
    u = torch.rand(B, 1 if method == "systematic" else K, generator=gen, dtype=torch.float64)
    for state in (torch.randn(B, K, 6, generator=gen), torch.randint(0, 1000, (B, K, 3), generator=gen),
                  torch.randn(B, K, generator=gen).to(torch.bfloat16)):
        for shared in (True, False):
            got = _resample(sim, tmp_path, lw, u, method, 0.5, 3, shared, state)
            _check(got, lw, u, method, 0.5)
            assert torch.equal(got["state"], ref.gather(state, got["anc"]))


def test_fastdiv(sim):
    assert "fastdiv ok" in _run(sim, "fastdiv")


# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output block
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT)
def test_philox_known_answers(sim, ctr, key, want):
    """The device header's Philox and the reference's numpy port both give the published blocks."""
    out = _run(sim, "philox", *(f"{x:x}" for x in ctr + key)).split()
    assert tuple(int(w, 16) for w in out) == want
    assert tuple(int(w) for w in ref.philox4x32_10(np.array(ctr, dtype=np.uint32), key)) == want


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_kernel_draws_its_uniforms_from_philox(sim, tmp_path, gen, method):
    """Without uniforms the kernel draws them itself (no launch of their own): the stream of
    reference.philox_uniforms for the call's seed and offset, so its ancestors are the reference's on those."""
    cases = [(5, 7, 2, True), (4, 64, 3, True), (3, 300, 2, True), (2, 513, 1, False)]  # both block sizes
    for (B, K, grid, shared), (seed, offset) in zip(cases, [(0, 0), (2**40 + 7, 12), (99, 4 * 10**9), (5, 8)]):
        lw = _log_weights(B, K, gen, torch.float64)
        u = ref.philox_uniforms(seed, offset, B, 1 if method == "systematic" else K)
        got = _resample(sim, tmp_path, lw, None, method, 1.0, grid, shared, philox=(seed, offset))
        _check(got, lw, u, method, 1.0)
    # a different offset is a different draw (equal weights: 300 draws over 300 particles cannot coincide
    # but by a chance below 1e-100)
    lw = torch.zeros(2, 300, dtype=torch.float64)
    a = _resample(sim, tmp_path, lw, None, "multinomial", 1.0, 1, True, philox=(5, 8))["anc"]
    b = _resample(sim, tmp_path, lw, None, "multinomial", 1.0, 1, True, philox=(5, 16))["anc"]
    assert not torch.equal(a[0], b[0])
