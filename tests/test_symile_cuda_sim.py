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
    """(max, sum of exp(S - max)) pairs [rows, N] -> log-sum-exps merged over the rows."""
    raw = torch.from_numpy(np.fromfile(path, dtype=np.float32)).double().view(rows, N, 2)
    assert not raw.isnan().any(), f"{path.name}: entries no block wrote"
    return (raw[..., 0] + raw[..., 1].log()).logsumexp(0)


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


def _merge_pairs_fp32(path, rows, n):
    """The glue's merge (csrc/cuda/symile.cu, merge_pairs) in float32, as the kernels' backward receives it."""
    raw = torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(rows, n, 2)
    return (raw[..., 0] + raw[..., 1].log()).logsumexp(0)


def _sim_loss_grads(sim, tmp_path, reps, scale, sms):
    """Gradients of every modality and of the scale the way the CUDA op computes them: the forward kernel's
    pairs merged in float32, the backward kernel's sums, finished as symile_finish_backward does (g = 1)."""
    M, N = len(reps), reps[0].shape[0]
    plan = _run(sim, tmp_path, "forward", reps, scale, sms)
    row = _merge_pairs_fp32(tmp_path / "row_part.bin", plan["chunks"], N)
    col = _merge_pairs_fp32(tmp_path / "col_part.bin", plan["blocks"], N)
    lse = [row, col]
    if M > 2:
        tup = _merge_pairs_fp32(tmp_path / "tuple_part.bin", plan["row_groups"], N ** (M - 2)).view([N] * (M - 2))
        for m in range(2, M):  # each outer anchor: its tuples' log-sum-exps merged over the other outer indices
            lse.append(tup.movedim(m - 2, 0).reshape(N, -1).logsumexp(1))
    _run(sim, tmp_path, "backward", reps, scale, sms, lse=torch.stack(lse))
    s = torch.tensor(scale, dtype=torch.float32)
    grads, grad_scale = [], None
    for m in range(M):
        Um = torch.from_numpy(np.fromfile(tmp_path / f"U{m}.bin", dtype=np.float32)).view(N, -1)
        aligned = torch.ones_like(reps[0])
        for o in range(M):
            if o != m:
                aligned = aligned * reps[o]
        Um = Um * (1.0 / (M * N)) - aligned * (1.0 / N)
        if m == 0:
            grad_scale = (reps[0] * Um).sum()
        grads.append(Um * s)
    return grads + [grad_scale]


@pytest.mark.timeout(300)
def test_float32_gradients_within_twice_torch_at_large_logits(sim, tmp_path, gen):
    """Forward, the glue's merge and backward together on LayerNorm-scale rows with scale 100 (logits ~1e3):
    the backward's E = exp(S - L) must come from the same roundings as the forward's log-sum-exps, or the
    aligned tuples' E ~ 1 no longer cancels against g / N. Per draw, the gradient error against float64 (on
    the same fp32 rows) as a ratio to float32 PyTorch's; their geometric mean over 4 draws at each of
    M = 2, 3, 4 at most 1.5 (the rule of tests/test_symile_triton.py)."""
    ratios = []
    for M, N, d in [(2, 13, 24), (3, 9, 24), (4, 5, 24)]:
        for _ in range(4):
            raw = [torch.randn(N, d, generator=gen, dtype=torch.float64) * 3 + 1 for _ in range(M)]
            reps = [torch.nn.functional.layer_norm(r, (d,)).float() for r in raw]
            exact = _reference_grads([r.double() for r in reps], torch.tensor(100.0, dtype=torch.float64))
            plain = _reference_grads(reps, torch.tensor(100.0))
            ours = _sim_loss_grads(sim, tmp_path, reps, 100.0, 132)
            err = lambda got: sum(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, exact))  # noqa: E731
            ratios.append(err(ours) / max(err(plain), 1e-30))
    geo = math.exp(sum(math.log(max(r, 1e-30)) for r in ratios) / len(ratios))
    assert geo <= 1.5, (geo, ratios)


def _reference_grads(reps, scale):
    reps = [r.clone().requires_grad_() for r in reps]
    scale = scale.clone().requires_grad_()
    ref.symile_loss_n_squared(reps, scale).backward()
    return [r.grad for r in reps] + [scale.grad]
