"""Triton kernels of the symile family: the "n_squared" Symile loss, forward and backward, for M = 2, 3, 4.

Semantics: python/fusedlab/reference/symile.py. All anchors read one logit tensor
S[i, j, u] = s sum_t r_0[i, t] W_u[t] r_1[j, t], where a tuple u picks one row of each "outer" modality
2..M-1 (u = u_2 N + u_3 for M = 4), W_u is the elementwise product of those rows (no W for M = 2) and
U = N^(M-2). Neither N^M logits nor the N^(M-1) x d products of the symile package are ever formed:

* ``_symile_fwd_kernel``: one program per (row block of r_0, range of column blocks of r_1, range of
  tuples). Each tile S[i-block, j-block, u] is one GEMM over d in BLOCK_D slices, with r_0 * W_u formed
  as the left operand on the fly. One pass over the tiles feeds every anchor's log-sum-exp: running
  (max, sum of exp) over (j, u) per row i, over u per column j (complete per column block), and the whole
  tile's log-sum-exp per tuple u. The programs store partial log-sum-exps; torch.logsumexp merges them
  (for M = 4 the per-tuple values merge over the other outer index into the two outer anchors). Only the
  [M, N] log-sum-exps are kept for the backward.
* ``_symile_bwd_kernel``: recomputes the tiles. With E = sum_a exp(S - L_a) (dL/dS is g E / (M N) minus
  g / N on the aligned tuples, applied in torch), the kernel accumulates U_m = dL/dr_m / s without the
  factor: U_0 += W_u * (E r_1), U_1 += E^T (r_0 * W_u), and for the outer modalities
  dW_u = sum_i r_0[i] * (E r_1)[i], times the other outer row. One program owns (row block, slice of
  BLOCK_DV output columns, range of column blocks, range of tuples); the logits always take the full d,
  so d > BLOCK_DV recomputes them once per column slice. By default the programs add their fp32 partial
  sums with atomics (not bitwise reproducible).
* Under torch.use_deterministic_algorithms the same kernel stores its U_0 and U_1 partial sums into
  per-program slabs that torch adds up, and ``_symile_bwd_outer_kernel`` computes the outer modalities'
  sums with programs that own tuples (each dW_u complete in one program): one more pass over the tiles,
  no atomics. Both recompute the logits exactly as the forward did: the aligned tuples' terms of E are
  close to 1 and cancel against the g / N term, which only works to fp32 precision when E comes from the
  same rounded logits as the log-sum-exps.

dL/ds = sum G T equals <r_0, dL/dr_0> / s = <r_0, U_0> (S is linear in r_0), computed in torch.
Products accumulate in fp32: fp32 operands with ``input_precision="ieee"`` (exact products, as the other
families), fp16/bf16 operands on tensor cores, with r_0 * W_u and E rounded to the input dtype before
their GEMMs (as torch would, and as FlashAttention rounds P). float64 is not supported here.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from fusedlab.triton_kernels._common import cdiv, check_device, empty, next_power_of_2

#: Tests set this so every buffer a kernel writes starts as NaN: an entry the kernels fail to write fails.
POISON_BUFFERS = False

#: Programs a launch aims for (four per SM of an H100/H200, 132 SMs); tests lower it to force splits.
TARGET_PROGRAMS = 4 * 132

#: A logit no real one reaches: masked entries take it, so no -inf - (-inf) NaN arises in the statistics.
_NEG = tl.constexpr(-1.0e30)

#: (BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DV, num_warps, num_stages) per (kind, pass): kind "half" (fp16/bf16,
#: tensor cores) or "fp32" (ieee products on FMA units); pass "fwd", "bwd" (_symile_bwd_kernel) or "outer"
#: (_symile_bwd_outer_kernel). BLOCK_DV is capped at d's next power of two (one output slice for d <= 128);
#: at d = 256 and 1024 the configurations below are the largest tiles tried that ptxas compiles for sm_90
#: without spills (tests/test_triton_aot.py; the outer kernel parks a few loop-invariant values, see
#: ALLOWED_SPILLS there); a 256-wide BLOCK_DV, which would halve the backward's recomputation at d >= 256,
#: spilled. BLOCK_D is the same in every pass: fp32 logits are then recomputed with the forward's roundings.
CONFIGS = {
    ("half", "fwd"): (128, 64, 64, 0, 8, 3),
    ("half", "bwd"): (32, 64, 64, 128, 8, 2),
    ("half", "outer"): (64, 64, 64, 128, 8, 2),
    ("fp32", "fwd"): (64, 64, 32, 0, 8, 2),
    ("fp32", "bwd"): (16, 16, 32, 128, 4, 2),
    ("fp32", "outer"): (32, 32, 32, 128, 8, 2),
}

#: The interpreter costs milliseconds per program and per block op; tests may shrink the tiles:
#: (BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DV) for every launch.
INTERPRET_CONFIG: Optional[tuple] = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(dtype: torch.dtype, pas: str, d: int) -> dict:
    kind = "fp32" if dtype == torch.float32 else "half"
    bi, bj, bd, bdv, warps, stages = CONFIGS[(kind, pas)]
    if INTERPRET_CONFIG is not None:
        bi, bj, bd, bdv = INTERPRET_CONFIG
        warps, stages = 4, 1
    # one output slice covers a small d: no recomputation of the logits per slice
    bdv = max(16, min(bdv, next_power_of_2(max(d, 1))))
    cfg = dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    if pas != "fwd":
        cfg["BLOCK_DV"] = bdv
    return cfg


# --------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _tuple_w(r2_ptr, r3_ptr, u, N, D, dd, d_ok, M: tl.constexpr):
    """W_u[dd] in fp32: the product of the outer modalities' rows of tuple u (u = u_2 N + u_3 for M = 4)."""
    if M == 3:
        w = tl.load(r2_ptr + u * D + dd, mask=d_ok, other=0.0).to(tl.float32)
    else:
        w = tl.load(r2_ptr + (u // N) * D + dd, mask=d_ok, other=0.0).to(tl.float32)
        w = w * tl.load(r3_ptr + (u % N) * D + dd, mask=d_ok, other=0.0).to(tl.float32)
    return w


@triton.jit
def _logits_tile(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, row_ok, cols, col_ok, u, N, D, scale,
                 M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """S[rows, cols, u] = scale * (r_0[rows] * W_u) r_1[cols]^T over all of d, in BLOCK_D slices (fp32).

    fp32 inputs take the scale into the left operand, so the tile is the dot's own result: a multiply after
    it could be contracted with the backward's S - L into one FMA, and E would then come from other
    roundings than the forward's log-sum-exps. fp16/bf16 operands keep it outside (no overflow of the
    scaled operand; their E is rounded to the input type anyway)."""
    in_ty: tl.constexpr = r0_ptr.dtype.element_ty
    fold: tl.constexpr = in_ty == tl.float32
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    dd0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dd0
        d_ok = dd < D
        a = tl.load(r0_ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if M > 2:
            w = _tuple_w(r2_ptr, r3_ptr, u, N, D, dd, d_ok, M)
            if fold:
                w = w * scale
            a = (a.to(tl.float32) * w[None, :]).to(in_ty)
        elif fold:
            a = a * scale
        b = tl.load(r1_ptr + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    if not fold:
        acc = acc * scale
    return acc


@triton.jit
def _symile_fwd_kernel(r0_ptr, r1_ptr, r2_ptr, r3_ptr, scale_ptr, lse0_ptr, lse1_ptr, lseu_ptr, N, D, U,
                       J_BLOCKS, U_PER_PROG, M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Partial log-sum-exps: lse0[(js, us), i] over the program's (j, u); lse1[(ib, us), j] over its (i, u);
    lseu[(ib, jb), u] over the tile's (i, j)."""
    ib = tl.program_id(0)
    js = tl.program_id(1)
    us = tl.program_id(2)
    n_us = tl.num_programs(2)
    n_jb = tl.cdiv(N, BLOCK_J)
    scale = tl.load(scale_ptr).to(tl.float32)
    rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < N
    j_lo = js * J_BLOCKS * BLOCK_J
    j_hi = tl.minimum(j_lo + J_BLOCKS * BLOCK_J, N)
    u_lo = us * U_PER_PROG
    u_hi = tl.minimum(u_lo + U_PER_PROG, U)

    m0 = tl.full([BLOCK_I], _NEG, tl.float32)
    l0 = tl.zeros([BLOCK_I], tl.float32)
    for j0 in range(j_lo, j_hi, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]
        m1 = tl.full([BLOCK_J], _NEG, tl.float32)
        l1 = tl.zeros([BLOCK_J], tl.float32)
        for u in range(u_lo, u_hi):
            s = _logits_tile(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, row_ok, cols, col_ok, u, N, D, scale,
                             M, BLOCK_I, BLOCK_J, BLOCK_D)
            s = tl.where(valid, s, _NEG)
            # anchor 0 (rows, over j and u) and anchor 1 (columns, over i and u): online max and sum
            m0_new = tl.maximum(m0, tl.max(s, 1))
            l0 = l0 * tl.exp(m0 - m0_new) + tl.sum(tl.exp(s - m0_new[:, None]), 1)
            m0 = m0_new
            m1_new = tl.maximum(m1, tl.max(s, 0))
            l1 = l1 * tl.exp(m1 - m1_new) + tl.sum(tl.exp(s - m1_new[None, :]), 0)
            m1 = m1_new
            if M > 2:  # the outer anchors: this tile's share of tuple u's log-sum-exp over (i, j)
                mt = tl.max(tl.max(s, 1), 0)
                lt = tl.sum(tl.sum(tl.exp(s - mt), 1), 0)
                tile = (ib * n_jb + j0 // BLOCK_J).to(tl.int64)
                tl.store(lseu_ptr + tile * U + u, mt + tl.log(lt))
        tl.store(lse1_ptr + (ib * n_us + us).to(tl.int64) * N + cols, m1 + tl.log(l1), mask=col_ok)
    tl.store(lse0_ptr + (js * n_us + us).to(tl.int64) * N + rows, m0 + tl.log(l0), mask=row_ok)


@triton.jit
def _grad_weights(s, l0, l1, lse_ptr, u, N, valid, M: tl.constexpr):
    """E = sum over anchors a of exp(S - L_a) on a tile (0 outside ``valid``), from the [M, N] log-sum-exps."""
    e = tl.exp(s - l0[:, None]) + tl.exp(s - l1[None, :])
    if M == 3:
        e += tl.exp(s - tl.load(lse_ptr + 2 * N + u))
    if M == 4:
        # both outer anchors in one exp: S <= every log-sum-exp, so no factor exceeds 1
        a2 = tl.load(lse_ptr + 2 * N + u // N)
        a3 = tl.load(lse_ptr + 3 * N + u % N)
        b = tl.minimum(a2, a3)
        e += tl.exp(s - b) * (tl.exp(b - a2) + tl.exp(b - a3))
    return tl.where(valid, e, 0.0)


@triton.jit
def _symile_bwd_kernel(r0_ptr, r1_ptr, r2_ptr, r3_ptr, scale_ptr, lse_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr,
                       N, D, U, J_BLOCKS, U_PER_PROG, M: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
    """U_0 and U_1 (see the module doc), and with ATOMIC the outer modalities' U_m too. ATOMIC: fp32 atomics
    into [N, D] buffers. Otherwise stores: U_0 into slab g0[(js, us)], U_1 into slab g1[(ib, us)] (every
    entry of every slab written once); _symile_bwd_outer_kernel then computes the outer modalities."""
    n_cs = tl.cdiv(D, BLOCK_DV)
    ib = tl.program_id(0) // n_cs
    cs = tl.program_id(0) % n_cs
    js = tl.program_id(1)
    us = tl.program_id(2)
    n_us = tl.num_programs(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    in_ty = r0_ptr.dtype.element_ty
    rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < N
    c = cs * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_ok = c < D
    j_lo = js * J_BLOCKS * BLOCK_J
    j_hi = tl.minimum(j_lo + J_BLOCKS * BLOCK_J, N)
    u_lo = us * U_PER_PROG
    u_hi = tl.minimum(u_lo + U_PER_PROG, U)
    r0c_mask = row_ok[:, None] & c_ok[None, :]
    l0 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    acc0 = tl.zeros([BLOCK_I, BLOCK_DV], tl.float32)
    for j0 in range(j_lo, j_hi, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]
        r1c_mask = col_ok[:, None] & c_ok[None, :]
        l1 = tl.load(lse_ptr + N + cols, mask=col_ok, other=0.0)
        acc1 = tl.zeros([BLOCK_J, BLOCK_DV], tl.float32)
        for u in range(u_lo, u_hi):
            s = _logits_tile(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, row_ok, cols, col_ok, u, N, D, scale,
                             M, BLOCK_I, BLOCK_J, BLOCK_D)
            e = _grad_weights(s, l0, l1, lse_ptr, u, N, valid, M).to(in_ty)
            r1c = tl.load(r1_ptr + cols[:, None] * D + c[None, :], mask=r1c_mask, other=0.0)
            h = tl.dot(e, r1c, input_precision="ieee")  # (E r_1)[rows, c]
            r0c = tl.load(r0_ptr + rows[:, None] * D + c[None, :], mask=r0c_mask, other=0.0)
            if M > 2:
                wc = _tuple_w(r2_ptr, r3_ptr, u, N, D, c, c_ok, M)
                acc0 += h * wc[None, :]
                acc1 = tl.dot(tl.trans(e), (r0c.to(tl.float32) * wc[None, :]).to(in_ty), acc1,
                              input_precision="ieee")
                if ATOMIC:
                    dw = tl.sum(r0c.to(tl.float32) * h, 0)  # this tile's share of dL/dW_u (up to the factor)
                    if M == 3:
                        tl.atomic_add(g2_ptr + u * D + c, dw, mask=c_ok, sem="relaxed")
                    else:
                        u2 = u // N
                        u3 = u % N
                        x3 = tl.load(r3_ptr + u3 * D + c, mask=c_ok, other=0.0).to(tl.float32)
                        x2 = tl.load(r2_ptr + u2 * D + c, mask=c_ok, other=0.0).to(tl.float32)
                        tl.atomic_add(g2_ptr + u2 * D + c, dw * x3, mask=c_ok, sem="relaxed")
                        tl.atomic_add(g3_ptr + u3 * D + c, dw * x2, mask=c_ok, sem="relaxed")
            else:
                acc0 += h
                acc1 = tl.dot(tl.trans(e), r0c, acc1, input_precision="ieee")
        if ATOMIC:
            tl.atomic_add(g1_ptr + cols[:, None] * D + c[None, :], acc1, mask=r1c_mask, sem="relaxed")
        else:
            slab1 = (ib * n_us + us).to(tl.int64) * N * D
            tl.store(g1_ptr + slab1 + cols[:, None] * D + c[None, :], acc1, mask=r1c_mask)
    if ATOMIC:
        tl.atomic_add(g0_ptr + rows[:, None] * D + c[None, :], acc0, mask=r0c_mask, sem="relaxed")
    else:
        slab0 = (js * n_us + us).to(tl.int64) * N * D
        tl.store(g0_ptr + slab0 + rows[:, None] * D + c[None, :], acc0, mask=r0c_mask)


@triton.jit
def _tuple_grad(r0_ptr, r1_ptr, r2_ptr, r3_ptr, lse_ptr, u, scale, N, D, c, c_ok, M: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dW_u[c] / the factor: sum over every (i, j) of E[i, j, u] r_0[i, c] r_1[j, c], tile by tile."""
    in_ty = r0_ptr.dtype.element_ty
    dw = tl.zeros([BLOCK_DV], tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        row_ok = rows < N
        l0 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        h = tl.zeros([BLOCK_I, BLOCK_DV], tl.float32)
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < N
            l1 = tl.load(lse_ptr + N + cols, mask=col_ok, other=0.0)
            s = _logits_tile(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, row_ok, cols, col_ok, u, N, D, scale,
                             M, BLOCK_I, BLOCK_J, BLOCK_D)
            e = _grad_weights(s, l0, l1, lse_ptr, u, N, row_ok[:, None] & col_ok[None, :], M).to(in_ty)
            r1c = tl.load(r1_ptr + cols[:, None] * D + c[None, :], mask=col_ok[:, None] & c_ok[None, :], other=0.0)
            h = tl.dot(e, r1c, h, input_precision="ieee")
        r0c = tl.load(r0_ptr + rows[:, None] * D + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        dw += tl.sum(r0c.to(tl.float32) * h, 0)
    return dw


@triton.jit
def _symile_bwd_outer_kernel(r0_ptr, r1_ptr, r2_ptr, r3_ptr, scale_ptr, lse_ptr, g2_ptr, g3_ptr, N, D, U2_PER_PROG,
                             M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr, BLOCK_U: tl.constexpr):
    """The outer modalities' U_m without atomics: a program owns tuples and loops over every (i, j) tile, so
    each dW_u is complete in the program. M = 3: tuples [a, a + U2_PER_PROG), U_2 rows stored directly. M = 4:
    u_2 in [a, a + U2_PER_PROG) times u_3 in [b, b + BLOCK_U); U_2[u_2] summed over the u_3 block goes to slab
    g2[u_3 block], U_3[u_3] summed over the u_2 range to slab g3[u_2 range] (every entry written once)."""
    n_cs = tl.cdiv(D, BLOCK_DV)
    cs = tl.program_id(0) % n_cs
    ub = tl.program_id(0) // n_cs
    scale = tl.load(scale_ptr).to(tl.float32)
    c = cs * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_ok = c < D
    a_lo = tl.program_id(1) * U2_PER_PROG
    a_hi = tl.minimum(a_lo + U2_PER_PROG, N)
    if M == 3:
        for u in range(a_lo, a_hi):
            dw = _tuple_grad(r0_ptr, r1_ptr, r2_ptr, r3_ptr, lse_ptr, u, scale, N, D, c, c_ok, M, BLOCK_I,
                             BLOCK_J, BLOCK_D, BLOCK_DV)
            tl.store(g2_ptr + u * D + c, dw, mask=c_ok)
    else:
        t = tl.arange(0, BLOCK_U)
        b_lo = ub * BLOCK_U
        acc3 = tl.zeros([BLOCK_U, BLOCK_DV], tl.float32)
        for u2 in range(a_lo, a_hi):
            x2 = tl.load(r2_ptr + u2 * D + c, mask=c_ok, other=0.0).to(tl.float32)
            acc2 = tl.zeros([BLOCK_DV], tl.float32)
            for u3 in range(b_lo, tl.minimum(b_lo + BLOCK_U, N)):
                dw = _tuple_grad(r0_ptr, r1_ptr, r2_ptr, r3_ptr, lse_ptr, u2 * N + u3, scale, N, D, c, c_ok, M,
                                 BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DV)
                acc2 += dw * tl.load(r3_ptr + u3 * D + c, mask=c_ok, other=0.0).to(tl.float32)
                acc3 = tl.where((t == u3 - b_lo)[:, None], acc3 + (dw * x2)[None, :], acc3)
            tl.store(g2_ptr + ub.to(tl.int64) * N * D + u2 * D + c, acc2, mask=c_ok)
        slab3 = tl.program_id(1).to(tl.int64) * N * D
        tl.store(g3_ptr + slab3 + (b_lo + t)[:, None] * D + c[None, :], acc3,
                 mask=((b_lo + t) < N)[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# launch geometry


def _splits(n_ib: int, n_jb: int, U: int, target: int) -> tuple[int, int, int, int]:
    """(column blocks per program, column splits, tuples per program, tuple splits): tuples are split first
    (their partial statistics are the cheapest to merge), then column blocks, until about ``target``
    programs; no program is left empty."""
    n_us = min(U, max(1, cdiv(target, n_ib)))
    u_per = cdiv(U, n_us)
    n_us = cdiv(U, u_per)
    n_js = min(n_jb, max(1, cdiv(target, n_ib * n_us)))
    j_per = cdiv(n_jb, n_js)
    n_js = cdiv(n_jb, j_per)
    return j_per, n_js, u_per, n_us


def _prepare(reps, logit_scale, op: str):
    if isinstance(reps, torch.Tensor) or not isinstance(reps, (list, tuple)) or not 2 <= len(reps) <= 4:
        raise ValueError(f"{op}: reps must be a list of 2 to 4 tensors [N, d] (the Triton kernels cover "
                         f"M = 2, 3, 4), got {len(reps) if isinstance(reps, (list, tuple)) else type(reps).__name__}")
    r0 = reps[0]
    for m, r in enumerate(reps):
        if not isinstance(r, torch.Tensor) or r.dim() != 2:
            raise ValueError(f"{op}: reps[{m}] must be a 2-D tensor [N, d]")
        if r.dtype not in DTYPES:
            raise TypeError(f"{op}: reps[{m}] must be float16, bfloat16 or float32 for the Triton kernels, got "
                            f"{r.dtype} (float64 runs on backend='cpu' or 'reference')")
        if r.dtype != r0.dtype or r.shape != r0.shape or r.device != r0.device:
            raise ValueError(f"{op}: reps[{m}] must match reps[0] (dtype {r0.dtype}, shape {tuple(r0.shape)}, "
                             f"device {r0.device}), got {r.dtype}, {tuple(r.shape)}, {r.device}")
        check_device(r, f"reps[{m}]")
    N, D = r0.shape
    if N < 1:
        raise ValueError(f"{op}: reps must have N >= 1 rows, got shape {tuple(r0.shape)}")
    if N * max(D, 1) >= 2**31:
        raise ValueError(f"{op}: reps must have N * d < 2^31 (int32 offsets), got {N} x {D}")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        raise ValueError(f"{op}: logit_scale must be a one-element tensor")
    reps = [r.contiguous() for r in reps]
    scale = logit_scale.detach().reshape(1).to(device=r0.device, dtype=torch.float32)
    return reps, scale, len(reps), N, D


def _outer(reps):
    """The pointers for r_2, r_3 (r_0 stands in where a modality is absent; the kernels never read it)."""
    return reps[2] if len(reps) > 2 else reps[0], reps[3] if len(reps) > 3 else reps[0]


@triton.jit
def _mip_kernel(c_ptr, q1_ptr, q2_ptr, q3_ptr, out_ptr, B, C, D, q1_stride, q2_stride, q3_stride,
                NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, c] = sum_t q1[b, t] q2[b, t] q3[b, t] cand[c, t] for a (B block, C block): the query product
    formed per BLOCK_D slice in fp32, rounded to the input dtype (as torch rounds its product) and fed to
    one tile GEMM. A query's row stride 0 broadcasts a 1-D query over B."""
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < B, cols < C
    dd0 = tl.arange(0, BLOCK_D)
    # row pointers, loop-invariant
    q1_rows = q1_ptr + rows[:, None].to(tl.int64) * q1_stride
    q2_rows = q2_ptr + rows[:, None].to(tl.int64) * q2_stride
    q3_rows = q3_ptr + rows[:, None].to(tl.int64) * q3_stride
    c_rows = c_ptr + cols[:, None].to(tl.int64) * D
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dd0
        d_ok = dd < D
        qm = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q1_rows + dd[None, :], mask=qm, other=0.0)
        in_ty = q.dtype
        if NQ > 1:
            q = (q.to(tl.float32) * tl.load(q2_rows + dd[None, :], mask=qm, other=0.0).to(tl.float32)).to(in_ty)
        if NQ > 2:
            q = (q.to(tl.float32) * tl.load(q3_rows + dd[None, :], mask=qm, other=0.0).to(tl.float32)).to(in_ty)
        c = tl.load(c_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(c), acc, input_precision="ieee")
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Python API


def forward(reps, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in the reps' dtype, the [M, N] fp32 per-anchor log-sum-exps of the logits)."""
    reps, scale, M, N, D = _prepare(reps, logit_scale, "symile_n_squared_triton")
    dev = reps[0].device
    cfg = _config(reps[0].dtype, "fwd", D)
    BI, BJ = cfg["BLOCK_I"], cfg["BLOCK_J"]
    n_ib, n_jb = cdiv(N, BI), cdiv(N, BJ)
    U = N ** (M - 2)
    j_per, n_js, u_per, n_us = _splits(n_ib, n_jb, U, TARGET_PROGRAMS)
    lse0 = empty((n_js * n_us, N), torch.float32, dev, POISON_BUFFERS)
    lse1 = empty((n_ib * n_us, N), torch.float32, dev, POISON_BUFFERS)
    lseu = empty((n_ib * n_jb, U) if M > 2 else (1,), torch.float32, dev, POISON_BUFFERS)
    _symile_fwd_kernel[(n_ib, n_js, n_us)](reps[0], reps[1], *_outer(reps), scale, lse0, lse1, lseu, N, D, U,
                                           j_per, u_per, M=M, **cfg)
    lse = [lse0.logsumexp(0), lse1.logsumexp(0)]
    if M == 3:
        lse.append(lseu.logsumexp(0))
    elif M == 4:
        per_tuple = lseu.logsumexp(0).view(N, N)  # [u_2, u_3]
        lse += [per_tuple.logsumexp(1), per_tuple.logsumexp(0)]
    lse = torch.stack(lse)
    positive = reps[0].float()
    for r in reps[1:]:
        positive = positive * r.float()
    loss = lse.sum() / (M * N) - scale[0] * positive.sum() / N
    return loss.to(reps[0].dtype), lse


def backward(grad: torch.Tensor, reps, logit_scale: torch.Tensor, lse: torch.Tensor,
             deterministic: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of the loss (times ``grad``) for every modality (reps' dtype) and for the logit scale (its
    dtype and shape). ``deterministic``: no atomics (partial sums stored per program and added by torch)."""
    reps, scale, M, N, D = _prepare(reps, logit_scale, "symile_n_squared_triton_backward")
    if lse.shape != (M, N):
        raise ValueError(f"symile_n_squared_triton_backward: lse must have shape [M, N] = [{M}, {N}], got "
                         f"{tuple(lse.shape)}")
    if grad.numel() != 1:
        raise ValueError(f"symile_n_squared_triton_backward: grad must be a scalar, got shape {tuple(grad.shape)}")
    dev = reps[0].device
    lse = lse.to(device=dev, dtype=torch.float32).contiguous()
    if D == 0:  # every logit is 0: no gradient (and no column slice to launch)
        return [torch.zeros_like(r) for r in reps], torch.zeros_like(logit_scale)
    cfg = _config(reps[0].dtype, "bwd", D)
    BI, BJ, BDV = cfg["BLOCK_I"], cfg["BLOCK_J"], cfg["BLOCK_DV"]
    n_ib, n_jb, n_cs = cdiv(N, BI), cdiv(N, BJ), max(1, cdiv(D, BDV))
    U = N ** (M - 2)
    j_per, n_js, u_per, n_us = _splits(n_ib * n_cs, n_jb, U, TARGET_PROGRAMS)
    grid = (n_ib * n_cs, n_js, n_us)
    if not deterministic:
        U_m = [torch.zeros((N, D), dtype=torch.float32, device=dev) for _ in range(M)]
        _symile_bwd_kernel[grid](reps[0], reps[1], *_outer(reps), scale, lse, U_m[0], U_m[1], *_outer(U_m),
                                 N, D, U, j_per, u_per, M=M, ATOMIC=True, **cfg)
    else:
        # the same tiles as the forward (the log-sum-exps only cancel the aligned tuples' large terms
        # exactly when the logits are recomputed with the same roundings), partial sums stored and added
        slabs0 = empty((n_js * n_us, N, D), torch.float32, dev, POISON_BUFFERS)
        slabs1 = empty((n_ib * n_us, N, D), torch.float32, dev, POISON_BUFFERS)
        _symile_bwd_kernel[grid](reps[0], reps[1], *_outer(reps), scale, lse, slabs0, slabs1, slabs0, slabs0,
                                 N, D, U, j_per, u_per, M=M, ATOMIC=False, **cfg)
        U_m = [slabs0.sum(0), slabs1.sum(0)]
        del slabs0, slabs1
        if M > 2:
            U_m += _outer_grads_deterministic(reps, scale, lse, N, D, _config(reps[0].dtype, "outer", D))
    # dL/dS = g (E / (M N) - [aligned tuple] / N): the kernel summed E; the aligned tuples' term is
    # -g / N prod_{o != m} r_o[n] for modality m's row n
    g = grad.detach().reshape(()).to(device=dev, dtype=torch.float32)
    f = [r.float() for r in reps]
    prefix = [torch.ones_like(f[0])]
    for r in f[:-1]:
        prefix.append(prefix[-1] * r)
    suffix = torch.ones_like(f[0])
    grads = [None] * M
    for m in range(M - 1, -1, -1):
        U_m[m] = U_m[m] * (g / (M * N)) - prefix[m] * suffix * (g / N)
        suffix = suffix * f[m]
        grads[m] = (U_m[m] * scale[0]).to(reps[m].dtype)
    grad_scale = (f[0] * U_m[0]).sum()  # S is linear in r_0
    return grads, grad_scale.to(logit_scale.dtype).reshape(logit_scale.shape)


def _outer_grads_deterministic(reps, scale, lse, N: int, D: int, cfg: dict) -> list[torch.Tensor]:
    """U_2 (and U_3) by _symile_bwd_outer_kernel: programs own tuples, so no atomics."""
    M, dev = len(reps), reps[0].device
    n_cs = max(1, cdiv(D, cfg["BLOCK_DV"]))
    n_ub = 1 if M == 3 else cdiv(N, OUTER_BLOCK_U)
    per = cdiv(N, min(N, max(1, cdiv(TARGET_PROGRAMS, n_cs * n_ub))))
    n_a = cdiv(N, per)
    if M == 3:
        g2 = empty((N, D), torch.float32, dev, POISON_BUFFERS)
        g3 = g2
    else:
        g2 = empty((n_ub, N, D), torch.float32, dev, POISON_BUFFERS)
        g3 = empty((n_a, N, D), torch.float32, dev, POISON_BUFFERS)
    _symile_bwd_outer_kernel[(n_cs * n_ub, n_a)](reps[0], reps[1], *_outer(reps), scale, lse, g2, g3, N, D, per,
                                                 M=M, BLOCK_U=OUTER_BLOCK_U, **cfg)
    return [g2] if M == 3 else [g2.sum(0), g3.sum(0)]


#: Tuples u_3 per program of the deterministic M = 4 outer kernel (rows of its U_3 accumulator).
OUTER_BLOCK_U = 16


# --------------------------------------------------------------------------------------------------------
# ahead-of-time compile list


#: (BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages) of the mip kernel per kind ("half", "fp32"); fp32 tiles
#: of 64 x 64 x 32 spilled a few bytes for sm_90 (tests/test_triton_aot.py), 64 x 64 x 16 does not
MIP_CONFIGS = {"half": (128, 128, 64, 8, 3), "fp32": (64, 64, 16, 4, 2)}


def _mip_config(dtype: torch.dtype) -> dict:
    bb, bc, bd, warps, stages = MIP_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    if INTERPRET_CONFIG is not None:
        bb, bc, bd = INTERPRET_CONFIG[:3]
        warps, stages = 4, 1
    return dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def mip(candidates: torch.Tensor, queries: list) -> torch.Tensor:
    """[B, C] multilinear inner products (see _mip_kernel); ``queries``: 1 to 3 tensors [B, d] or [d] of the
    candidates' dtype, at least one 2-D when B > 1 (more than 3 are multiplied together first by the caller).
    A 1-D-only query list gives B = 1."""
    check_device(candidates, "candidates")
    if candidates.dtype not in DTYPES:
        raise ValueError(f"mip (triton): candidates must be float16, bfloat16 or float32, got {candidates.dtype}")
    if not 1 <= len(queries) <= 3:
        raise ValueError(f"mip (triton): 1 to 3 query tensors, got {len(queries)}")
    cand = candidates.contiguous()
    C, D = cand.shape
    qs = [q.contiguous() for q in queries]
    B = max([q.shape[0] for q in qs if q.dim() == 2], default=1)
    strides = [D if q.dim() == 2 else 0 for q in qs]
    while len(qs) < 3:  # absent queries: the kernel never reads them (NQ)
        qs.append(qs[0])
        strides.append(0)
    out = empty((B, C), cand.dtype, cand.device, POISON_BUFFERS)
    if B == 0 or C == 0:
        return out
    cfg = _mip_config(cand.dtype)
    grid = (cdiv(B, cfg["BLOCK_B"]), cdiv(C, cfg["BLOCK_C"]))
    _mip_kernel[grid](cand, qs[0], qs[1], qs[2], out, B, C, D, strides[0], strides[1], strides[2],
                      NQ=len(queries), **cfg)
    return out


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def aot_configs(full: bool = False) -> Iterator[dict]:
    """Kernel specializations this module launches, for ahead-of-time compile checks (see
    triton_kernels/newton_schulz.py for the item format): M = 2, 3, 4 in fp32 and bf16 (``full`` adds fp16)
    with the configurations of d = 256 and 1024 (the same: a 128-wide BLOCK_DV; ``full`` adds d = 64),
    both backward paths."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16, torch.float32)
    dims = (64, 256, 1024) if full else (256, 1024)
    for dtype in dtypes:
        ty = "*" + _TRITON_TYPES[dtype]
        seen = set()
        for d in dims:
            fwd, bwd, outer = _config(dtype, "fwd", d), _config(dtype, "bwd", d), _config(dtype, "outer", d)
            key = (tuple(fwd.items()), tuple(bwd.items()), tuple(outer.items()))
            if key in seen:
                continue
            seen.add(key)
            for M in (2, 3, 4):
                tag = f"{_TRITON_TYPES[dtype]} d={d} M={M}"
                tiles = {k: fwd[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_D")}
                yield dict(name=f"symile_fwd[{tag}]", kernel=_symile_fwd_kernel,
                           signature={"r0_ptr": ty, "r1_ptr": ty, "r2_ptr": ty, "r3_ptr": ty, "scale_ptr": "*fp32",
                                      "lse0_ptr": "*fp32", "lse1_ptr": "*fp32", "lseu_ptr": "*fp32",
                                      **{n: "i32" for n in ("N", "D", "U", "J_BLOCKS", "U_PER_PROG")},
                                      "M": "constexpr", **{n: "constexpr" for n in tiles}},
                           constexprs=dict(M=M, **tiles), attrs=_attrs(8, [9]),
                           options={"num_warps": fwd["num_warps"], "num_stages": fwd["num_stages"]})
                tiles = {k: bwd[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_D", "BLOCK_DV")}
                opts = {"num_warps": bwd["num_warps"], "num_stages": bwd["num_stages"]}
                for atomic in (True, False):
                    yield dict(name=f"symile_bwd[{tag} {'atomic' if atomic else 'deterministic'}]",
                               kernel=_symile_bwd_kernel,
                               signature={"r0_ptr": ty, "r1_ptr": ty, "r2_ptr": ty, "r3_ptr": ty,
                                          "scale_ptr": "*fp32", "lse_ptr": "*fp32",
                                          **{n: "*fp32" for n in ("g0_ptr", "g1_ptr", "g2_ptr", "g3_ptr")},
                                          **{n: "i32" for n in ("N", "D", "U", "J_BLOCKS", "U_PER_PROG")},
                                          "M": "constexpr", "ATOMIC": "constexpr", **{n: "constexpr" for n in tiles}},
                               constexprs=dict(M=M, ATOMIC=atomic, **tiles), attrs=_attrs(10, [11]),
                               options=dict(opts))
                tiles = {k: outer[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_D", "BLOCK_DV")}
                opts = {"num_warps": outer["num_warps"], "num_stages": outer["num_stages"]}
                if M > 2:
                    yield dict(name=f"symile_bwd_outer[{tag}]", kernel=_symile_bwd_outer_kernel,
                               signature={"r0_ptr": ty, "r1_ptr": ty, "r2_ptr": ty, "r3_ptr": ty,
                                          "scale_ptr": "*fp32", "lse_ptr": "*fp32", "g2_ptr": "*fp32",
                                          "g3_ptr": "*fp32", **{n: "i32" for n in ("N", "D", "U2_PER_PROG")},
                                          "M": "constexpr", **{n: "constexpr" for n in tiles},
                                          "BLOCK_U": "constexpr"},
                               constexprs=dict(M=M, BLOCK_U=OUTER_BLOCK_U, **tiles), attrs=_attrs(8, [9]),
                               options=dict(opts))
    yield from _mip_aot(dtypes)


def _mip_aot(dtypes) -> Iterator[dict]:
    for dtype in dtypes:
        ty = "*" + _TRITON_TYPES[dtype]
        cfg = _mip_config(dtype)
        tiles = {k: cfg[k] for k in ("BLOCK_B", "BLOCK_C", "BLOCK_D")}
        for nq in (1, 3):  # the query-product code is the only difference between query counts
            yield dict(name=f"mip[{_TRITON_TYPES[dtype]} NQ={nq}]", kernel=_mip_kernel,
                       signature={"c_ptr": ty, "q1_ptr": ty, "q2_ptr": ty, "q3_ptr": ty, "out_ptr": ty,
                                  **{n: "i32" for n in ("B", "C", "D", "q1_stride", "q2_stride", "q3_stride")},
                                  "NQ": "constexpr", **{n: "constexpr" for n in tiles}},
                       constexprs=dict(NQ=nq, **tiles), attrs=_attrs(5, [7]),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def _attrs(n_ptrs: int, aligned_ints) -> dict:
    # torch allocations are 16-byte aligned and the launcher specializes on that (and on d divisible by 16)
    return {(i,): [["tt.divisibility", 16]] for i in [*range(n_ptrs), *aligned_ints]}
