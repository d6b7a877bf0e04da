"""The CUDA symile kernels run on the host (tests/cuda/host_sim.h: a std::thread per CUDA thread, a barrier per
__syncthreads and per warp shuffle, built with ThreadSanitizer when the compiler supports it) against a dense
float64 oracle: the whole logit tensor S[i_0, ..., i_{M-1}] = s sum_t prod_m r_m[i_m, t], small enough here.

This checks the tiling (tuple chunks, row groups, tiles at the edges of N and d), the three online
log-sum-exps and their per-block partials, the backward's gradient sums with their atomics, and barrier
placement without a GPU; it does not check device-specific behaviour (the memory model of real hardware,
timing).
"""
import math
import os
import re
import string
import subprocess

import numpy as np
import pytest
import torch

from fusedlab.reference import symile as ref

import cuda_sim

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return cuda_sim.build_strict(tmp_path_factory, "symile_sim")


def _run(sim, tmp_path, mode, reps, scale, sms, lse=None):
    M, (N, d) = len(reps), reps[0].shape
    for m, r in enumerate(reps):
        cuda_sim.write_raw(tmp_path, f"r{m}", r)
    cuda_sim.write_raw(tmp_path, "scale", torch.tensor([scale], dtype=torch.float32))
    if lse is not None:
        cuda_sim.write_raw(tmp_path, "lse", lse.float())
    (tmp_path / "params.txt").write_text(f"{M} {N} {d} {reps[0].element_size()} {sms}\n")
    r = subprocess.run([sim, mode, str(tmp_path)], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", r.stdout)}


def _pairs_to_lse(path, rows, N):
    """(max in log2 units, sum) pairs [rows, N] -> natural log-sum-exps merged over the rows."""
    raw = torch.from_numpy(np.fromfile(path, dtype=np.float32)).double().view(rows, N, 2)
    assert not raw.isnan().any(), f"{path.name}: entries no block wrote"
    return ((raw[..., 0] + raw[..., 1].log2()) * LN2).logsumexp(0)


def _dense_logits(reps, scale):
    """S[i_0, ..., i_{M-1}] in float64."""
    M = len(reps)
    letters = string.ascii_lowercase[:M]
    return scale * torch.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *[r.double() for r in reps])


def _anchor_lse(S):
    M = S.dim()
    return torch.stack([S.movedim(m, 0).reshape(S.shape[0], -1).logsumexp(1) for m in range(M)])


def _inputs(gen, M, N, d, dtype):
    return [torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
            for _ in range(M)]


CASES = [  # M, N, d, SMs of the plan (fewer SMs: more tuples per block)
    (2, 37, 20, 132),  # one tuple: rows split into groups; N and d off the tile sizes
    (2, 70, 16, 2),    # three row groups of one tile each
    (3, 33, 40, 1),    # four blocks: chunks of nine tuples, two j tiles
    (3, 20, 64, 132),  # one tuple per block
    (4, 9, 33, 1),     # 81 tuples in four chunks; two d slices
    (2, 40, 0, 132),   # d = 0: no d slice, so no barrier inside the tiles' products
]
IDS = [f"M{c[0]}N{c[1]}d{c[2]}sms{c[3]}" for c in CASES]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_partials_merge_to_every_anchors_lse(sim, tmp_path, gen, case):
    M, N, d, sms = case
    reps = _inputs(gen, M, N, d, torch.float32)
    scale = 7.5
    plan = _run(sim, tmp_path, "forward", reps, scale, sms)
    S = _dense_logits(reps, scale)
    want = _anchor_lse(S)
    torch.testing.assert_close(_pairs_to_lse(tmp_path / "row_part.bin", plan["chunks"], N), want[0], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(_pairs_to_lse(tmp_path / "col_part.bin", plan["blocks"], N), want[1], rtol=1e-5,
                               atol=1e-5)
    U = N ** (M - 2)
    tuple_lse = _pairs_to_lse(tmp_path / "tuple_part.bin", plan["row_groups"], U)
    want_tuple = S.movedim((0, 1), (-2, -1)).reshape(U, N * N).logsumexp(1)  # last outer modality fastest
    torch.testing.assert_close(tuple_lse, want_tuple, rtol=1e-5, atol=1e-5)


def _expected_sums(reps, scale, lse):
    """U_m[n] = sum over entries with i_m = n of E * prod_{o != m} r_o[i_o], E = sum_a exp(S - lse_a[i_a])."""
    M = len(reps)
    S = _dense_logits(reps, scale)
    E = torch.zeros_like(S)
    for a in range(M):
        shape = [1] * M
        shape[a] = -1
        E += (S - lse[a].view(shape)).exp()
    letters = string.ascii_lowercase[:M]
    out = []
    for m in range(M):
        others = [o for o in range(M) if o != m]
        spec = letters + "," + ",".join(f"{letters[o]}z" for o in others) + f"->{letters[m]}z"
        out.append(torch.einsum(spec, E, *[reps[o].double() for o in others]))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_sums_match_dense_oracle(sim, tmp_path, gen, case):
    M, N, d, sms = case
    reps = _inputs(gen, M, N, d, torch.float32)
    scale = 7.5
    lse = _anchor_lse(_dense_logits(reps, scale))
    _run(sim, tmp_path, "backward", reps, scale, sms, lse=lse)
    want = _expected_sums(reps, scale, lse.float().double())
    for m in range(M):
        got = torch.from_numpy(np.fromfile(tmp_path / f"U{m}.bin", dtype=np.float32)).double().view(N, d)
        torch.testing.assert_close(got, want[m], rtol=1e-4, atol=1e-5, msg=lambda s: f"U_{m}: {s}")


@pytest.mark.timeout(300)
def test_bfloat16_inputs(sim, tmp_path, gen):
    """bfloat16 rows, fp32 products: the oracle runs on the same bfloat16 values in float64."""
    M, N, d = 3, 17, 24
    reps = _inputs(gen, M, N, d, torch.bfloat16)
    plan = _run(sim, tmp_path, "forward", reps, 5.0, 132)
    want = _anchor_lse(_dense_logits(reps, 5.0))
    got = _pairs_to_lse(tmp_path / "row_part.bin", plan["chunks"], N)
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    _run(sim, tmp_path, "backward", reps, 5.0, 132, lse=want)
    U2 = torch.from_numpy(np.fromfile(tmp_path / "U2.bin", dtype=np.float32)).double().view(N, d)
    torch.testing.assert_close(U2, _expected_sums(reps, 5.0, want.float().double())[2], rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("B,C,d,two_d,dtype", [
    (37, 45, 40, (1, 1), torch.float32),    # tiles cut at B, C and d
    (1, 70, 33, (0, 0, 1), torch.float32),  # 1-D queries broadcast over the one row
    (5, 9, 64, (1,), torch.float32),        # a single query modality
    (20, 33, 48, (1, 0), torch.bfloat16),
])
def test_mip_kernel_matches_reference(sim, tmp_path, gen, B, C, d, two_d, dtype):
    cand = torch.randn(C, d, generator=gen, dtype=torch.float64).to(dtype)
    queries = [torch.randn(*((B, d) if t else (d,)), generator=gen, dtype=torch.float64).to(dtype) for t in two_d]
    cuda_sim.write_raw(tmp_path, "cand", cand)
    for m, q in enumerate(queries):
        cuda_sim.write_raw(tmp_path, f"q{m}", q)
    flags = " ".join(map(str, two_d))
    (tmp_path / "params.txt").write_text(f"{len(queries)} {B} {C} {d} {cand.element_size()} {flags}\n")
    r = subprocess.run([sim, "mip", str(tmp_path)], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-4000:]}"
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.int16 if dtype == torch.bfloat16 else np.float32)
    got = torch.from_numpy(raw).reshape(B, C)
    got = (got.view(torch.bfloat16) if dtype == torch.bfloat16 else got).double()
    want = ref.mip(cand.double(), [q.double() for q in queries])
    tol = dict(rtol=2 ** -8, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
