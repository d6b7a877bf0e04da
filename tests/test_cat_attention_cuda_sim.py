"""The CUDA cat_attention kernels (forward, and the backward's dq and dkv launches) run on the host
(tests/cuda/host_sim.h: a std::thread per CUDA thread, a barrier per __syncthreads and per warp shuffle,
built with ThreadSanitizer when the compiler supports it) against the float64 reference and its autograd.

This checks the tiling (query tiles of both streams, each tile's key ranges, the dkv kernel's query ranges
per key tile), the masks, the online softmax, grouped-query heads and barrier placement without a GPU; it
does not check device-specific behaviour (the memory model of real hardware, timing).
"""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from fusedlab.reference import cat as ref

import cuda_sim

LOG2E = 1.4426950408889634


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return cuda_sim.build_strict(tmp_path_factory, "cat_attention_sim")


def _read(tmp_path, name, shape, dtype):
    np_dtype = {torch.bfloat16: np.int16, torch.float32: np.float32}[dtype]
    out = torch.from_numpy(np.fromfile(tmp_path / f"{name}.bin", dtype=np_dtype)).reshape(shape)
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def _run(sim, tmp_path, mode, shapes, scale, tensors):
    B, H, Hkv, L, Nc, l, D, elem, has_qc = shapes
    for name, t in tensors.items():
        cuda_sim.write_raw(tmp_path, name, t)
    (tmp_path / "params.txt").write_text(
        f"{B} {H} {Hkv} {L} {Nc} {l} {D} {elem} {int(has_qc)} {scale * LOG2E!r} {scale!r}\n")
    r = subprocess.run([sim, mode, str(tmp_path)], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"


def _inputs(gen, B, H, Hkv, L, Nc, D, dtype, with_qc):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    t = dict(q=mk(B, H, L, D), k=mk(B, Hkv, L, D), v=mk(B, Hkv, L, D), kc=mk(B, Hkv, Nc, D), vc=mk(B, Hkv, Nc, D))
    if with_qc:
        t["qc"] = mk(B, H, Nc, D)
    return t


def _reference(t, l, scale, grads=None):
    """Float64 outputs (o, lse[, oc, lse_c]) and, given output gradients, the inputs' gradients by autograd."""
    x = {n: a.double().requires_grad_(grads is not None) for n, a in t.items()}
    out = ref.cat_attention(x["q"], x["k"], x["v"], x["kc"], x["vc"], l, x.get("qc"), scale)
    if grads is None:
        return [o.detach() for o in out], None
    loss = (out[0] * grads["d_o"].double()).sum()
    if "qc" in x:
        loss = loss + (out[2] * grads["d_oc"].double()).sum()
    loss.backward()
    return [o.detach() for o in out], {n: a.grad for n, a in x.items()}


CASES = [  # B, H, Hkv, L, Nc, l, D, qc
    (1, 2, 1, 37, 9, 5, 64, True),     # L not a multiple of l; two query heads per kv head; an extra slot
    (2, 2, 2, 40, 40, 1, 64, False),   # l = 1: each token sees its own key and the slots up to its position
    (1, 4, 2, 70, 6, 16, 64, True),    # three raw query tiles, chunks across tile edges
    (1, 1, 1, 45, 1, 64, 64, False),   # one chunk longer than L: plain causal attention plus the start slot
    (1, 2, 1, 64, 35, 2, 64, True),    # two compressed query tiles; slots past the last chunk
    (1, 2, 1, 45, 8, 7, 128, True),    # head dim 128 (16-row tiles)
]
IDS = [f"B{c[0]}H{c[1]}Hkv{c[2]}L{c[3]}Nc{c[4]}l{c[5]}D{c[6]}{'qc' if c[7] else ''}" for c in CASES]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_float32_matches_reference(sim, tmp_path, gen, case):
    B, H, Hkv, L, Nc, l, D, with_qc = case
    t = _inputs(gen, B, H, Hkv, L, Nc, D, torch.float32, with_qc)
    scale = 0.8 / math.sqrt(D)
    _run(sim, tmp_path, "forward", (B, H, Hkv, L, Nc, l, D, 4, with_qc), scale, t)
    want, _ = _reference(t, l, scale)
    names = [("o", (B, H, L, D)), ("lse", (B, H, L))] + ([("oc", (B, H, Nc, D)), ("lse_c", (B, H, Nc))]
                                                         if with_qc else [])
    for (name, shape), w in zip(names, want):
        got = _read(tmp_path, name, shape, torch.float32)
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_float32_matches_reference_autograd(sim, tmp_path, gen, case):
    B, H, Hkv, L, Nc, l, D, with_qc = case
    t = _inputs(gen, B, H, Hkv, L, Nc, D, torch.float32, with_qc)
    scale = 0.8 / math.sqrt(D)
    g = {"d_o": torch.randn(B, H, L, D, generator=gen)}
    if with_qc:
        g["d_oc"] = torch.randn(B, H, Nc, D, generator=gen)
    out, want = _reference(t, l, scale, g)
    saved = {"o": out[0].float(), "lse": out[1].float()}
    if with_qc:
        saved.update(oc=out[2].float(), lse_c=out[3].float())
    _run(sim, tmp_path, "backward", (B, H, Hkv, L, Nc, l, D, 4, with_qc), scale, {**t, **saved, **g})
    shapes = dict(q=(B, H, L, D), k=(B, Hkv, L, D), v=(B, Hkv, L, D), kc=(B, Hkv, Nc, D), vc=(B, Hkv, Nc, D),
                  qc=(B, H, Nc, D))
    for name in t:
        got = _read(tmp_path, "d" + name, shapes[name], torch.float32)
        torch.testing.assert_close(got.double(), want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    delta = _read(tmp_path, "delta", (B, H, L), torch.float32)
    torch.testing.assert_close(delta.double(), (saved["o"].double() * g["d_o"].double()).sum(-1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.timeout(300)
def test_bfloat16_forward_and_backward(sim, tmp_path, gen):
    """bfloat16 loads and stores with fp32 accumulation: within a few bfloat16 roundings of the float64
    reference computed from the same bfloat16 inputs."""
    B, H, Hkv, L, Nc, l, D = 1, 2, 1, 40, 6, 8, 64
    t = _inputs(gen, B, H, Hkv, L, Nc, D, torch.bfloat16, True)
    scale = 1 / math.sqrt(D)
    shape = (B, H, Hkv, L, Nc, l, D, 2, True)
    _run(sim, tmp_path, "forward", shape, scale, t)
    g = {"d_o": torch.randn(B, H, L, D, generator=gen).bfloat16(),
         "d_oc": torch.randn(B, H, Nc, D, generator=gen).bfloat16()}
    out, want = _reference(t, l, scale, g)
    o = _read(tmp_path, "o", (B, H, L, D), torch.bfloat16)
    oc = _read(tmp_path, "oc", (B, H, Nc, D), torch.bfloat16)
    torch.testing.assert_close(o.double(), out[0], rtol=2 ** -7, atol=2e-3)
    torch.testing.assert_close(oc.double(), out[2], rtol=2 ** -7, atol=2e-3)
    lse = _read(tmp_path, "lse", (B, H, L), torch.float32)
    torch.testing.assert_close(lse.double(), out[1], rtol=1e-5, atol=1e-5)
    saved = {"o": out[0].bfloat16(), "lse": out[1].float(), "oc": out[2].bfloat16(), "lse_c": out[3].float()}
    _run(sim, tmp_path, "backward", shape, scale, {**t, **saved, **g})
    for name, shp in dict(q=(B, H, L, D), k=(B, Hkv, L, D), kc=(B, Hkv, Nc, D), qc=(B, H, Nc, D)).items():
        got = _read(tmp_path, "d" + name, shp, torch.bfloat16).double()
        scale_of = want[name].abs().max()
        assert (got - want[name]).abs().max() <= 0.02 * scale_of, name
