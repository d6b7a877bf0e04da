"""The CUDA cat_decode kernels run on the host (tests/cuda/host_sim.h: a std::thread per CUDA thread, a barrier
per __syncthreads and per warp shuffle, built with ThreadSanitizer when the compiler supports it) against the
float64 reference.

This checks the split-K logic (key shares from the device-side fills, empty shares, the lane-group, warp and
split merges, grouped-query head groups, the loads' layout) and barrier placement without a GPU; it does not
check device-specific behaviour (the 16-byte vector loads, the memory model of real hardware, timing).
"""
import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from fusedlab.reference import cat as ref

import cuda_sim

LOG2E = 1.4426950408889634


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return cuda_sim.build_strict(tmp_path_factory, "cat_decode_sim")


def _decode(sim, tmp_path, q, kc, vc, n_slots, k, v, n_raw, scale, splits):
    B, H, D = q.shape
    Hkv, S, R = kc.shape[1], kc.shape[2], k.shape[2]
    for name, t in dict(q=q, kc=kc, vc=vc, k=k, v=v).items():
        cuda_sim.write_raw(tmp_path, name, t)
    n_slots.to(torch.int64).numpy().tofile(tmp_path / "n_slots.bin")
    n_raw.to(torch.int64).numpy().tofile(tmp_path / "n_raw.bin")
    elem = q.element_size()
    (tmp_path / "params.txt").write_text(f"{B} {H} {Hkv} {S} {R} {D} {elem} {splits} {scale * LOG2E!r}\n")
    r = subprocess.run([sim, "decode", str(tmp_path)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    plan = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", r.stdout)}
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.int16 if q.dtype == torch.bfloat16 else np.float32)
    out = torch.from_numpy(raw).reshape(B, H, D)
    return (out.view(torch.bfloat16) if q.dtype == torch.bfloat16 else out), plan


def _inputs(gen, B, H, Hkv, S, R, D, dtype):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, D) * 2, mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(B, Hkv, R, D), mk(B, Hkv, R, D)


def _reference(q, kc, vc, n_slots, k, v, n_raw, scale):
    return ref.cat_decode(q.double(), kc.double(), vc.double(), n_slots, k.double(), v.double(), n_raw, scale)


CASES = [  # B, H, Hkv, S, R, D, n_slots, n_raw, splits (0: the launch plan's choice)
    # two query heads per kv head; a full cache, a single slot without raw keys, slots empty but raw keys
    (3, 4, 2, 20, 9, 64, [20, 1, 0], [0, 9, 3], 1),
    (3, 4, 2, 20, 9, 64, [20, 1, 0], [0, 9, 3], 3),
    # one head per kv head; more splits than a short sequence has keys (empty shares)
    (3, 2, 2, 37, 5, 64, [37, 2, 11], [5, 0, 4], 5),
    # three heads per kv head (a block of four with one head unused), several steps per split
    (2, 6, 2, 70, 16, 64, [70, 33], [16, 1], 2),
    # eight heads per kv head: two head groups; the launch plan's own split count
    (2, 8, 1, 90, 8, 64, [90, 45], [8, 0], 0),
    # one lane group per warp (float32 at d = 128)
    (2, 4, 2, 24, 6, 128, [24, 3], [2, 6], 3),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}Hkv{c[2]}S{c[3]}R{c[4]}D{c[5]}s{c[8]}")
def test_float32_matches_reference(sim, tmp_path, gen, case):
    B, H, Hkv, S, R, D, ns, nr, splits = case
    n_slots, n_raw = torch.tensor(ns), torch.tensor(nr)
    q, kc, vc, k, v = _inputs(gen, B, H, Hkv, S, R, D, torch.float32)
    scale = 0.7 / math.sqrt(D)
    got, plan = _decode(sim, tmp_path, q, kc, vc, n_slots, k, v, n_raw, scale, splits)
    if splits:
        assert plan["splits"] == splits
    want = _reference(q, kc, vc, n_slots, k, v, n_raw, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_no_keys_gives_nan_like_the_reference(sim, tmp_path, gen):
    """n_slots = n_raw = 0 (the wrapper rejects it; the kernel must not read anything): a softmax over no keys."""
    B, H, Hkv, S, R, D = 3, 2, 1, 8, 4, 64
    q, kc, vc, k, v = _inputs(gen, B, H, Hkv, S, R, D, torch.float32)
    n_slots, n_raw = torch.tensor([3, 0, 0]), torch.tensor([1, 0, 2])
    for splits in (1, 2):
        got, _ = _decode(sim, tmp_path, q, kc, vc, n_slots, k, v, n_raw, 0.125, splits)
        want = _reference(q, kc, vc, n_slots, k, v, n_raw, 0.125)
        assert want[1].isnan().all() and got[1].isnan().all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("D,splits", [(64, 1), (64, 3), (128, 2)])
def test_bfloat16_loads_and_stores(sim, tmp_path, gen, D, splits):
    """bfloat16 rows (8 elements per lane, 16 lanes per row at D = 128): within bfloat16 rounding of the float64
    reference computed from the same bfloat16 inputs."""
    B, H, Hkv, S, R = 2, 4, 2, 30, 7
    q, kc, vc, k, v = _inputs(gen, B, H, Hkv, S, R, D, torch.bfloat16)
    n_slots, n_raw = torch.tensor([30, 4]), torch.tensor([3, 7])
    got, _ = _decode(sim, tmp_path, q, kc, vc, n_slots, k, v, n_raw, 1 / math.sqrt(D), splits)
    want = _reference(q, kc, vc, n_slots, k, v, n_raw, 1 / math.sqrt(D))
    # one bfloat16 rounding of the output (2^-9 relative) on top of the fp32 accumulation
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("B,H,Hkv,S,R,sms,want", [
    # B, H, Hkv, S, R, SMs -> (splits, heads_per_block, head_groups)
    (256, 8, 8, 257, 16, 132, (1, 1, 1)),   # thousands of blocks already: one split, no combine
    (1, 8, 2, 4097, 16, 132, (64, 4, 1)),   # one sequence, long cache: up to kMaxSplits
    (3, 8, 2, 300, 16, 132, (4, 4, 1)),     # (300 + 16) // 64 = 4 shares of at least 64 keys
    (2, 12, 2, 2000, 0, 132, (31, 4, 2)),   # six heads per kv head: two groups of four; 2000 // 64 shares
    (4, 4, 2, 40, 8, 132, (1, 2, 1)),       # fewer key slots than two shares of 64
    (0, 4, 2, 40, 8, 132, (1, 2, 1)),       # an empty batch launches nothing
])
def test_launch_plan(sim, B, H, Hkv, S, R, sms, want):
    r = subprocess.run([sim, "plan", *map(str, (B, H, Hkv, S, R, sms))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    plan = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", r.stdout)}
    assert (plan["splits"], plan["heads_per_block"], plan["head_groups"]) == want
    assert plan["blocks"] == B * Hkv * plan["head_groups"] * plan["splits"]
    assert plan["combine_blocks"] == (-(-B * H // 4) if plan["splits"] > 1 else 0)
