"""Triton kernels of the cat family: CAT's compress-attend attention, forward and backward, flash-style.

Semantics: python/fusedlab/reference/cat.py. The two key streams stay apart (no interleaved sequence), so
a tile of raw queries visits only what it can see:

* ``_cat_fwd_kernel``: one program per (query tile, batch x head). It runs one online softmax (base 2,
  fp32) over the compressed slots 0..(last chunk in the tile), then over the raw keys from the start of
  the tile's first chunk to its last row, with the chunk-diagonal causal mask; it stores o and the
  log-sum-exp (natural log) for the backward. The compressed queries, when given, ride in the same launch:
  programs past the raw row tiles take their row tiles (row c sees slots 0..c; no raw keys), chosen at run
  time by ``_stream_rows``. At L = 4096 and l = 16 a 64-row tile visits 257 slots and 64 raw keys instead
  of dense causal attention's 2048 keys on average.
* ``_cat_bwd_dq_kernel``: the forward's loops again (both query streams in one launch, as there),
  recomputing P from the saved log-sum-exp, with dS = P (dP - delta). delta = rowsum(o * do) (fp32) comes
  from the program's own o and dO tiles; each query row belongs to one program, which also stores its
  delta for the dK/dV kernels launched after it.
* ``_cat_bwd_dkv_raw_kernel``: one program per (raw key tile, batch x kv head): the queries that see those
  keys are in the same chunks and not earlier, so the loop is short; the query heads of the kv head's
  group are summed in the program (no atomics).
* ``_cat_bwd_dkv_slot_kernel``: one program per (slot tile, batch x kv head, row split): slot s is seen by
  every raw query from s * l on, a long loop (as in the compression branch of native sparse attention),
  so the raw queries are split into ranges over grid axis 2 when the other two axes leave SMs idle; the
  splits write fp32 partial sums that ``_cat_split_sum_kernel`` adds up, dK and dV in one launch, in split
  order (deterministic, no atomics). The compressed queries c >= s go to the first split.

Products accumulate in fp32 with ``input_precision="ieee"`` (fp32 operands get exact products rather than
TF32; fp16/bf16 operands use tensor cores either way). P is rounded to the value dtype for the P V and
P^T dO products, as in FlashAttention. Fixed configurations, no autotuning: the interpreter runs the
same launches. Index arithmetic on batch and head offsets is 64-bit.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from fusedlab.triton_kernels._common import cdiv, check_device, empty, next_power_of_2

#: Tests set this so every kernel output starts as NaN: a row the kernels fail to write then fails.
POISON_BUFFERS = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kind, pass, padded head dim) where kind is "half"
#: (fp16/bf16) or "fp32" and pass is "fwd", "dq" or "dkv". Chosen so that no kernel spills registers on
#: sm_90 (tests/test_triton_aot.py reads ptxas' counts): d = 128 takes 8 warps for half types; exact fp32
#: products run on FMA units and take smaller tiles. dQ takes the forward's tiles, except at fp32 d = 64:
#: since it reads o and serves both query streams, 32x32 tiles spill there (12-630 bytes with 1-2 stages,
#: 4-8 warps), 32 query rows x 16 keys with 2 stages do not.
CONFIGS = {
    ("half", "fwd", 64): (64, 64, 4, 2),
    ("half", "fwd", 128): (64, 64, 8, 2),
    ("half", "dq", 64): (64, 64, 4, 2),
    ("half", "dq", 128): (64, 64, 8, 2),
    ("half", "dkv", 64): (32, 64, 4, 2),
    ("half", "dkv", 128): (32, 32, 8, 2),
    ("fp32", "fwd", 64): (32, 32, 4, 1),
    ("fp32", "fwd", 128): (16, 16, 4, 2),
    ("fp32", "dq", 64): (32, 16, 4, 2),
    ("fp32", "dq", 128): (16, 16, 4, 2),
    ("fp32", "dkv", 64): (16, 32, 4, 2),
    ("fp32", "dkv", 128): (16, 32, 8, 2),
}

#: The interpreter costs milliseconds per program and per block op; tests may shrink the tiles.
INTERPRET_CONFIG: Optional[tuple] = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(dtype, pas, d):
    if INTERPRET_CONFIG is not None:
        return INTERPRET_CONFIG
    return CONFIGS[("fp32" if dtype == torch.float32 else "half", pas, 64 if _block_d(d) <= 64 else 128)]


# --------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _softmax_tile(q, kt_ptrs, vt_ptrs, kv_mask, seen, m_i, l_i, acc, qk_scale):
    """One key tile of the forward's online softmax (base 2): rescale the running sum and output."""
    kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)
    s = tl.where(seen, tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _stream_rows(pid, RAW_TILES, T, NC, CHUNK, BLOCK_M: tl.constexpr):
    """Which query stream a program of the combined grid serves: programs [0, RAW_TILES) take row tiles of the
    T raw queries, the rest row tiles of the NC compressed ones. Returns the tile's rows, their bounds, each
    row's chunk (a compressed row c is chunk c), the slot range [0, slot_end) and the raw key range
    [raw_start, raw_end) (empty for compressed rows)."""
    compressed = pid >= RAW_TILES
    pid_m = tl.where(compressed, pid - RAW_TILES, pid)
    n_rows = tl.where(compressed, NC, T)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1
    chunk = tl.where(compressed, rows, rows // CHUNK)
    slot_end = tl.where(compressed, last + 1, last // CHUNK + 1)
    raw_start = ((pid_m * BLOCK_M) // CHUNK) * CHUNK
    raw_end = tl.where(compressed, raw_start, last + 1)
    return compressed, rows, row_ok, chunk, slot_end, raw_start, raw_end


@triton.jit(do_not_specialize=["T", "NC", "RAW_TILES"])
def _cat_fwd_kernel(q_ptr, qc_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, oc_ptr, lse_ptr, lse_c_ptr,
                    stride_qb, stride_qh, stride_qcb, stride_qch, stride_kb, stride_kh, stride_cb, stride_ch,
                    H, GROUP, T, NC, CHUNK, RAW_TILES, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # T raw query rows, NC slots (= compressed query rows); rows are HEAD_DIM apart in every tensor
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    compressed, rows, row_ok, chunk, slot_end, raw_start, raw_end = _stream_rows(
        tl.program_id(0), RAW_TILES, T, NC, CHUNK, BLOCK_M)
    if compressed:
        q_base = qc_ptr + b * stride_qcb + h * stride_qch
        o_base = oc_ptr + b * stride_qcb + h * stride_qch
        lse_base = lse_c_ptr + bh.to(tl.int64) * NC
    else:
        q_base = q_ptr + b * stride_qb + h * stride_qh
        o_base = o_ptr + b * stride_qb + h * stride_qh
        lse_base = lse_ptr + bh.to(tl.int64) * T
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_kb + hk * stride_kh
    kc_base = kc_ptr + b * stride_cb + hk * stride_ch
    vc_base = vc_ptr + b * stride_cb + hk * stride_ch

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_base + rows[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols0 = tl.arange(0, BLOCK_N)
    # compressed slots: slot 0 is visible to every row, so m_i is finite after the first tile
    for start in range(0, slot_end, BLOCK_N):
        cols = start + cols0
        offs = cols[:, None] * HEAD_DIM + dims[None, :]
        kv_mask = (cols < slot_end)[:, None] & dim_ok[None, :]
        m_i, l_i, acc = _softmax_tile(q, kc_base + offs, vc_base + offs, kv_mask, cols[None, :] <= chunk[:, None],
                                      m_i, l_i, acc, qk_scale)
    # raw keys: from the first row's chunk start to the last row (chunk-diagonal causal mask); none for
    # compressed rows
    for start in range(raw_start, raw_end, BLOCK_N):
        cols = start + cols0
        offs = cols[:, None] * HEAD_DIM + dims[None, :]
        kv_mask = (cols < raw_end)[:, None] & dim_ok[None, :]
        seen = ((cols // CHUNK)[None, :] == chunk[:, None]) & (cols[None, :] <= rows[:, None])
        m_i, l_i, acc = _softmax_tile(q, k_base + offs, v_base + offs, kv_mask, seen, m_i, l_i, acc, qk_scale)
    o = acc / l_i[:, None]
    tl.store(o_base + rows[:, None] * HEAD_DIM + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit
def _dq_tile(q, do, lse2, delta, dq, kt_ptrs, vt_ptrs, kv_mask, seen, qk_scale):
    """One key tile of the dQ loop: recompute P from the log-sum-exp (base 2), dS = P (dP - delta)."""
    kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)
    vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale
    p = tl.where(seen, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision="ieee")


@triton.jit(do_not_specialize=["T", "NC", "RAW_TILES"])
def _cat_bwd_dq_kernel(q_ptr, qc_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, oc_ptr, do_ptr, doc_ptr, lse_ptr,
                       lse_c_ptr, delta_ptr, delta_c_ptr, dq_ptr, dqc_ptr,
                       stride_qb, stride_qh, stride_qcb, stride_qch, stride_kb, stride_kh, stride_cb, stride_ch,
                       H, GROUP, T, NC, CHUNK, RAW_TILES, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    compressed, rows, row_ok, chunk, slot_end, raw_start, raw_end = _stream_rows(
        tl.program_id(0), RAW_TILES, T, NC, CHUNK, BLOCK_M)
    if compressed:
        q_off = b * stride_qcb + h * stride_qch
        q_base = qc_ptr + q_off
        o_base = oc_ptr + q_off
        do_base = doc_ptr + q_off
        dq_base = dqc_ptr + q_off
        lse_base = lse_c_ptr + bh.to(tl.int64) * NC
        delta_base = delta_c_ptr + bh.to(tl.int64) * NC
    else:
        q_off = b * stride_qb + h * stride_qh
        q_base = q_ptr + q_off
        o_base = o_ptr + q_off
        do_base = do_ptr + q_off
        dq_base = dq_ptr + q_off
        lse_base = lse_ptr + bh.to(tl.int64) * T
        delta_base = delta_ptr + bh.to(tl.int64) * T
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_kb + hk * stride_kh
    kc_base = kc_ptr + b * stride_cb + hk * stride_ch
    vc_base = vc_ptr + b * stride_cb + hk * stride_ch

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile = rows[:, None] * HEAD_DIM + dims[None, :]
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_base + tile, mask=tile_mask, other=0.0)
    do = tl.load(do_base + tile, mask=tile_mask, other=0.0)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    # delta here, not in torch beforehand (two casts, a product, a sum: four launches the host pays for);
    # the dK/dV kernels, launched after this one on the same stream, read it back
    o = tl.load(o_base + tile, mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_base + rows, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols0 = tl.arange(0, BLOCK_N)
    for start in range(0, slot_end, BLOCK_N):
        cols = start + cols0
        kv_mask = (cols < slot_end)[:, None] & dim_ok[None, :]
        offs = cols[:, None] * HEAD_DIM + dims[None, :]
        seen = (cols[None, :] <= chunk[:, None]) & row_ok[:, None]
        dq = _dq_tile(q, do, lse2, delta, dq, kc_base + offs, vc_base + offs, kv_mask, seen, qk_scale)
    for start in range(raw_start, raw_end, BLOCK_N):  # empty for compressed rows
        cols = start + cols0
        kv_mask = (cols < raw_end)[:, None] & dim_ok[None, :]
        offs = cols[:, None] * HEAD_DIM + dims[None, :]
        seen = ((cols // CHUNK)[None, :] == chunk[:, None]) & (cols[None, :] <= rows[:, None]) & row_ok[:, None]
        dq = _dq_tile(q, do, lse2, delta, dq, k_base + offs, v_base + offs, kv_mask, seen, qk_scale)
    tl.store(dq_base + tile, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _dkv_tile(kt, vt, dk, dv, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, q_mask, row_ok, seen, qk_scale):
    """One query tile of a dK/dV loop (keys on the rows: S^T = K Q^T)."""
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    st = tl.dot(kt, tl.trans(q), input_precision="ieee") * qk_scale  # [BLOCK_N keys, BLOCK_M queries]
    pt = tl.where(seen, tl.exp2(st - lse2[None, :]), 0.0)
    dv = dv + tl.dot(pt.to(do.dtype), do, input_precision="ieee")
    dpt = tl.dot(vt, tl.trans(do), input_precision="ieee")
    dst = pt * (dpt - delta[None, :])
    dk = dk + tl.dot(dst.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _dkv_rows(kt, vt, dk, dv, q_ptr, do_ptr, lse_ptr, delta_ptr, row_base, lo, hi, cols, dims, dim_ok, CHUNK,
              qk_scale, SEEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key tile (keys ``cols``) over query rows [lo, hi). SEEN: 0 raw keys (same
    chunk, not later), 1 slots seen by raw queries (slot <= chunk), 2 slots seen by compressed queries."""
    rows0 = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        rows = start + rows0
        row_ok = rows < hi
        qtile = rows[:, None] * HEAD_DIM + dims[None, :]
        q_mask = row_ok[:, None] & dim_ok[None, :]
        if SEEN == 0:
            seen = ((cols // CHUNK)[:, None] == (rows // CHUNK)[None, :]) & (cols[:, None] <= rows[None, :])
        elif SEEN == 1:
            seen = cols[:, None] <= (rows // CHUNK)[None, :]
        else:
            seen = cols[:, None] <= rows[None, :]
        dk, dv = _dkv_tile(kt, vt, dk, dv, q_ptr + qtile, do_ptr + qtile, lse_ptr + row_base + rows,
                           delta_ptr + row_base + rows, q_mask, row_ok, seen & row_ok[None, :], qk_scale)
    return dk, dv


@triton.jit
def _load_key_tile(k_ptr, v_ptr, cols, n, dims, dim_ok, HEAD_DIM: tl.constexpr):
    """A tile of keys and values (rows ``cols`` of n) and its offsets and mask, for the dK/dV kernels."""
    ktile = cols[:, None] * HEAD_DIM + dims[None, :]
    kmask = (cols < n)[:, None] & dim_ok[None, :]
    return tl.load(k_ptr + ktile, mask=kmask, other=0.0), tl.load(v_ptr + ktile, mask=kmask, other=0.0), ktile, kmask


@triton.jit
def _cat_bwd_dkv_raw_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                            stride_qb, stride_qh, stride_kb, stride_kh,
                            HKV, GROUP, L, CHUNK, qk_scale, scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    H = HKV * GROUP
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k_off = b * stride_kb + hk * stride_kh
    kt, vt, ktile, kmask = _load_key_tile(k_ptr + k_off, v_ptr + k_off, cols, L, dims, dim_ok, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # queries that see these keys: from the first key to the end of the last key's chunk
    last_col = tl.minimum(pid_n * BLOCK_N + BLOCK_N, L) - 1
    q_end = tl.minimum((last_col // CHUNK + 1) * CHUNK, L)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_off = b * stride_qb + h * stride_qh
        dk, dv = _dkv_rows(kt, vt, dk, dv, q_ptr + q_off, do_ptr + q_off, lse_ptr, delta_ptr, (b * H + h) * L,
                           pid_n * BLOCK_N, q_end, cols, dims, dim_ok, CHUNK, qk_scale, 0, HEAD_DIM, BLOCK_M)
    tl.store(dk_ptr + k_off + ktile, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + k_off + ktile, dv.to(dv_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _cat_bwd_dkv_slot_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, qc_ptr, doc_ptr, lse_c_ptr, delta_c_ptr,
                             kc_ptr, vc_ptr, dkc_ptr, dvc_ptr,
                             stride_qb, stride_qh, stride_cqb, stride_cqh, stride_cb, stride_ch,
                             HKV, GROUP, L, NC, CHUNK, ROWS_PER_SPLIT, split_stride, qk_scale, scale,
                             HAS_QC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid axis 2 splits the raw queries into ranges of ROWS_PER_SPLIT; each split stores its partial
    # sums split_stride elements after the previous one (the caller adds them up), so a slot tile's long
    # loop over every later query runs on several SMs
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    H = HKV * GROUP
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    c_off = b * stride_cb + hk * stride_ch
    kt, vt, ktile, kmask = _load_key_tile(kc_ptr + c_off, vc_ptr + c_off, cols, NC, dims, dim_ok, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_off = b * stride_qb + h * stride_qh
        # raw queries t see slot s when t // CHUNK >= s; this split takes rows [lo, hi)
        lo = tl.maximum(pid_n * BLOCK_N * CHUNK, pid_s * ROWS_PER_SPLIT)
        hi = tl.minimum(L, (pid_s + 1) * ROWS_PER_SPLIT)
        dk, dv = _dkv_rows(kt, vt, dk, dv, q_ptr + q_off, do_ptr + q_off, lse_ptr, delta_ptr, (b * H + h) * L,
                           lo, hi, cols, dims, dim_ok, CHUNK, qk_scale, 1, HEAD_DIM, BLOCK_M)
        if HAS_QC and pid_s == 0:
            cq_off = b * stride_cqb + h * stride_cqh
            dk, dv = _dkv_rows(kt, vt, dk, dv, qc_ptr + cq_off, doc_ptr + cq_off, lse_c_ptr, delta_c_ptr,
                               (b * H + h) * NC, pid_n * BLOCK_N, NC, cols, dims, dim_ok, CHUNK, qk_scale, 2,
                               HEAD_DIM, BLOCK_M)
    out_off = pid_s.to(tl.int64) * split_stride + c_off
    tl.store(dkc_ptr + out_off + ktile, (dk * scale).to(dkc_ptr.dtype.element_ty), mask=kmask)
    tl.store(dvc_ptr + out_off + ktile, dv.to(dvc_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _cat_split_sum_kernel(part_k_ptr, part_v_ptr, dk_ptr, dv_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """dK and dV of the slots from the slot kernel's SPLITS fp32 partial sums (split s at s * N elements):
    one launch for both, added in split order (the same bits every run) and rounded once to the output."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    pk = part_k_ptr + offs
    pv = part_v_ptr + offs
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, SPLITS):
        acc_k += tl.load(pk, mask=ok, other=0.0)
        acc_v += tl.load(pv, mask=ok, other=0.0)
        # step the 64-bit pointers: SPLITS * N may pass 2^31 where N does not
        pk += N
        pv += N
    tl.store(dk_ptr + offs, acc_k.to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + offs, acc_v.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cat_decode_kernel(q_ptr, kc_ptr, vc_ptr, n_slots_ptr, k_ptr, v_ptr, n_raw_ptr, o_ptr,
                       H, HKV, S, R, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Generation: one program per (sequence, kv head) carries the kv head's GROUP query heads (rows of a
    BLOCK_G tile) through one online softmax over the sequence's filled slots, then its filled raw keys."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    group = H // HKV
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offs = (b * H + hk * group + g)[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_ok[:, None] & dim_ok[None, :], other=0.0)
    # fills kept inside the cache: the wrapper does not check device tensors on the host (a sync per step)
    n_slots = tl.minimum(tl.maximum(tl.load(n_slots_ptr + b), 0), S)
    n_raw = tl.minimum(tl.maximum(tl.load(n_raw_ptr + b), 0), R)
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    cols0 = tl.arange(0, BLOCK_N)
    slot_base = (b * HKV + hk) * S * HEAD_DIM
    for start in range(0, n_slots, BLOCK_N):  # n_slots >= 1: m_i is finite after the first tile
        cols = start + cols0
        offs = slot_base + cols[:, None] * HEAD_DIM + dims[None, :]
        kv_mask = (cols < n_slots)[:, None] & dim_ok[None, :]
        m_i, l_i, acc = _softmax_tile(q, kc_ptr + offs, vc_ptr + offs, kv_mask, (cols < n_slots)[None, :], m_i,
                                      l_i, acc, qk_scale)
    raw_base = (b * HKV + hk) * R * HEAD_DIM
    for start in range(0, n_raw, BLOCK_N):
        cols = start + cols0
        offs = raw_base + cols[:, None] * HEAD_DIM + dims[None, :]
        kv_mask = (cols < n_raw)[:, None] & dim_ok[None, :]
        m_i, l_i, acc = _softmax_tile(q, k_ptr + offs, v_ptr + offs, kv_mask, (cols < n_raw)[None, :], m_i, l_i,
                                      acc, qk_scale)
    tl.store(o_ptr + q_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & dim_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Python API (inputs already checked by fusedlab.ops.cat; every tensor contiguous)


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def forward(q, k, v, kc, vc, qc, chunk: int, scale: float):
    """(o, lse, oc, lse_c); oc and lse_c are empty (0 rows) without ``qc``. One launch for both query
    streams: the grid's first programs take the raw row tiles, the rest the compressed ones."""
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (kc, "kc"), (vc, "vc")):
        check_device(t, name)
    B, H, L, d = q.shape
    Hkv, NC = kc.shape[1], kc.shape[2]
    BM, BN, warps, stages = _config(q.dtype, "fwd", d)
    o = empty(q.shape, q.dtype, q.device, POISON_BUFFERS)
    lse = empty((B, H, L), torch.float32, q.device, POISON_BUFFERS)
    if qc is None:  # placeholders the kernel never reads: no program takes compressed rows
        oc, lse_c = q.new_empty((B, H, 0, d)), lse.new_empty((B, H, 0))
        qc_arg, oc_arg, lse_c_arg, c_tiles = q, o, lse, 0
    else:
        oc = empty(qc.shape, qc.dtype, qc.device, POISON_BUFFERS)
        lse_c = empty((B, H, NC), torch.float32, q.device, POISON_BUFFERS)
        qc_arg, oc_arg, lse_c_arg, c_tiles = qc, oc, lse_c, cdiv(NC, BM)
    raw_tiles = cdiv(L, BM)
    if raw_tiles + c_tiles:
        _cat_fwd_kernel[(raw_tiles + c_tiles, B * H)](
            q, qc_arg, k, v, kc, vc, o, oc_arg, lse, lse_c_arg, q.stride(0), q.stride(1), qc_arg.stride(0),
            qc_arg.stride(1), k.stride(0), k.stride(1), kc.stride(0), kc.stride(1), H, H // Hkv, L, NC, chunk,
            raw_tiles, scale * LOG2E, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
            num_stages=stages)
    return o, lse, oc, lse_c


def backward(do, doc, q, k, v, kc, vc, qc, o, lse, oc, lse_c, chunk: int, scale: float):
    """(dq, dk, dv, dkc, dvc, dqc); dqc is None without ``qc``."""
    B, H, L, d = q.shape
    Hkv, NC = kc.shape[1], kc.shape[2]
    group = H // Hkv
    BD = _block_d(d)
    # rowsum(o * do), written by the dq kernel (which reads o and do anyway) for the dK/dV kernels
    delta = empty((B, H, L), torch.float32, q.device, POISON_BUFFERS)
    dq = empty(q.shape, q.dtype, q.device, POISON_BUFFERS)
    dk = empty(k.shape, k.dtype, k.device, POISON_BUFFERS)
    dv = empty(v.shape, v.dtype, v.device, POISON_BUFFERS)
    dkc = empty(kc.shape, kc.dtype, kc.device, POISON_BUFFERS)
    dvc = empty(vc.shape, vc.dtype, vc.device, POISON_BUFFERS)
    BM, BN, warps, stages = _config(q.dtype, "dq", d)
    # one launch for both query streams, as in the forward; it also writes delta (and delta_c)
    dqc = None
    has_qc = qc is not None
    if has_qc:
        delta_c = empty((B, H, NC), torch.float32, q.device, POISON_BUFFERS)
        dqc = empty(qc.shape, qc.dtype, qc.device, POISON_BUFFERS)
        c_tiles = cdiv(NC, BM)
    else:  # placeholders the kernels never read (no compressed programs, HAS_QC=False in the slot kernel)
        qc, oc, doc, lse_c, delta_c, c_tiles = q, o, do, lse, delta, 0
    raw_tiles = cdiv(L, BM)
    if raw_tiles + c_tiles:
        _cat_bwd_dq_kernel[(raw_tiles + c_tiles, B * H)](
            q, qc, k, v, kc, vc, o, oc, do, doc, lse, lse_c, delta, delta_c, dq, dq if dqc is None else dqc,
            q.stride(0), q.stride(1), qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), kc.stride(0),
            kc.stride(1), H, group, L, NC, chunk, raw_tiles, scale * LOG2E, scale, HEAD_DIM=d, BLOCK_D=BD,
            BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _config(q.dtype, "dkv", d)
    common = dict(HEAD_DIM=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    # with L == 0 the dq kernel writes no delta, and neither dK/dV kernel reads one: the raw kernel is not
    # launched and the slot kernel's raw row range [lo, min(L, ...)) is empty (delta_c is written above)
    if L:
        _cat_bwd_dkv_raw_kernel[(cdiv(L, BN), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            Hkv, group, L, chunk, scale * LOG2E, scale, **common)
    tiles = cdiv(NC, BN) * B * Hkv
    splits = _slot_splits(tiles, L, BM)
    rows_per_split = cdiv(cdiv(max(L, 1), splits), BM) * BM
    if splits > 1:  # fp32 partial sums per split, added up by _cat_split_sum_kernel below
        part_k = empty((splits,) + tuple(kc.shape), torch.float32, kc.device, POISON_BUFFERS)
        part_v = empty((splits,) + tuple(vc.shape), torch.float32, vc.device, POISON_BUFFERS)
    else:
        part_k, part_v = dkc, dvc
    _cat_bwd_dkv_slot_kernel[(cdiv(NC, BN), B * Hkv, splits)](
        q, do, lse, delta, qc, doc, lse_c, delta_c, kc, vc, part_k, part_v, q.stride(0), q.stride(1),
        qc.stride(0), qc.stride(1), kc.stride(0), kc.stride(1), Hkv, group, L, NC, chunk, rows_per_split,
        kc.numel(), scale * LOG2E, scale, HAS_QC=has_qc, **common)
    if splits > 1:
        n = kc.numel()
        _cat_split_sum_kernel[(cdiv(n, SPLIT_SUM_BLOCK),)](part_k, part_v, dkc, dvc, n, splits,
                                                                 BLOCK=SPLIT_SUM_BLOCK, num_warps=4)
    return dq, dk, dv, dkc, dvc, dqc


#: Elements per program of the split reduction (8 per thread at 4 warps: 16-byte fp32 loads).
SPLIT_SUM_BLOCK = 1024
#: Tests set this to force a number of row splits in the slot kernel (None: chosen from the grid size).
SLOT_SPLITS: Optional[int] = None
#: Programs the slot kernel aims for: four per SM of an H100/H200 (132 SMs).
_TARGET_PROGRAMS = 4 * 132


def _slot_splits(tiles: int, L: int, block_m: int) -> int:
    """Row splits for the slot kernel: enough programs to fill the GPU, each split at least 4 row tiles."""
    if SLOT_SPLITS is not None:
        return max(1, min(SLOT_SPLITS, cdiv(max(L, 1), block_m)))
    return max(1, min(cdiv(_TARGET_PROGRAMS, max(tiles, 1)), cdiv(max(L, 1), 4 * block_m)))


def decode(q, kc, vc, n_slots, k, v, n_raw, scale: float):
    """One query per sequence against its compressed cache: q [B, H, d] -> [B, H, d]."""
    for t, name in ((q, "q"), (kc, "kc"), (k, "k")):
        check_device(t, name)
    B, H, d = q.shape
    Hkv, S, R = kc.shape[1], kc.shape[2], k.shape[2]
    o = empty(q.shape, q.dtype, q.device, POISON_BUFFERS)
    if B == 0:
        return o
    _cat_decode_kernel[(B, Hkv)](q, kc, vc, n_slots, k, v, n_raw, o, H, Hkv, S, R, scale * LOG2E, HEAD_DIM=d,
                                 BLOCK_D=_block_d(d), BLOCK_G=_block_g(H // Hkv), BLOCK_N=DECODE_BLOCK_N,
                                 num_warps=4, num_stages=2)
    return o


#: Keys per tile of the decode kernel.
DECODE_BLOCK_N = 64


def _block_g(group: int) -> int:
    return max(16, next_power_of_2(group))  # tl.dot takes at least 16 rows


# --------------------------------------------------------------------------------------------------------
# ahead-of-time compile list


def aot_configs(full: bool = False) -> Iterator[dict]:
    """Kernel specializations this module launches, for ahead-of-time compile checks (see
    triton_kernels/newton_schulz.py for the item format): head dims 64 and 128 in bf16 and fp32 (``full``
    adds fp16 and head dim 32)."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16, torch.float32)
    dims = (32, 64, 128) if full else (64, 128)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    yield from _decode_aot_configs(dtypes, dims, names)
    for dtype in dtypes:
        ty = "*" + names[dtype]
        for d in dims:
            kind = "fp32" if dtype == torch.float32 else "half"
            BM, BN, warps, stages = CONFIGS[(kind, "fwd", 64 if d <= 64 else 128)]
            opts = {"num_warps": warps, "num_stages": stages}
            tag = f"{names[dtype]} d={d}"
            consts = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=BM, BLOCK_N=BN)
            # one specialization serves both query streams (the program id picks the stream at run time)
            yield dict(name=f"cat_fwd[{tag}]", kernel=_cat_fwd_kernel,
                       signature={**{n: ty for n in ("q_ptr", "qc_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "o_ptr",
                                                     "oc_ptr")},
                                  "lse_ptr": "*fp32", "lse_c_ptr": "*fp32", **{n: "i64" for n in _FWD_STRIDES},
                                  **{n: "i32" for n in ("H", "GROUP", "T", "NC", "CHUNK", "RAW_TILES")},
                                  "qk_scale": "fp32", **{n: "constexpr" for n in consts}},
                       constexprs=dict(consts), attrs=_attrs(10), options=dict(opts))
            BM, BN, warps, stages = CONFIGS[(kind, "dq", 64 if d <= 64 else 128)]
            opts = {"num_warps": warps, "num_stages": stages}
            consts = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=BM, BLOCK_N=BN)
            yield dict(name=f"cat_bwd_dq[{tag}]", kernel=_cat_bwd_dq_kernel,
                       signature={**{n: ty for n in ("q_ptr", "qc_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "o_ptr",
                                                     "oc_ptr", "do_ptr", "doc_ptr")},
                                  **{n: "*fp32" for n in ("lse_ptr", "lse_c_ptr", "delta_ptr", "delta_c_ptr")},
                                  "dq_ptr": ty, "dqc_ptr": ty, **{n: "i64" for n in _FWD_STRIDES},
                                  **{n: "i32" for n in ("H", "GROUP", "T", "NC", "CHUNK", "RAW_TILES")},
                                  "qk_scale": "fp32", "scale": "fp32", **{n: "constexpr" for n in consts}},
                       constexprs=dict(consts), attrs=_attrs(16), options=dict(opts))
            BM, BN, warps, stages = CONFIGS[(kind, "dkv", 64 if d <= 64 else 128)]
            opts = {"num_warps": warps, "num_stages": stages}
            tiles = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=BM, BLOCK_N=BN)
            yield dict(name=f"cat_bwd_dkv_raw[{tag}]", kernel=_cat_bwd_dkv_raw_kernel,
                       signature={"q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "do_ptr": ty, "lse_ptr": "*fp32",
                                  "delta_ptr": "*fp32", "dk_ptr": ty, "dv_ptr": ty,
                                  **{n: "i64" for n in ("stride_qb", "stride_qh", "stride_kb", "stride_kh")},
                                  **{n: "i32" for n in ("HKV", "GROUP", "L", "CHUNK")}, "qk_scale": "fp32",
                                  "scale": "fp32", **{n: "constexpr" for n in tiles}},
                       constexprs=dict(tiles), attrs=_attrs(8), options=dict(opts))
            # the slot kernel stores straight into the gradients, or fp32 partial sums when split
            variants = [(False, ty), (True, ty)] + ([(False, "*fp32")] if ty != "*fp32" else [])
            for has_qc, out_ty in variants:
                yield dict(name=f"cat_bwd_dkv_slot[{tag} qc={has_qc} out={out_ty[1:]}]",
                           kernel=_cat_bwd_dkv_slot_kernel,
                           signature={"q_ptr": ty, "do_ptr": ty, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                                      "qc_ptr": ty, "doc_ptr": ty, "lse_c_ptr": "*fp32", "delta_c_ptr": "*fp32",
                                      "kc_ptr": ty, "vc_ptr": ty, "dkc_ptr": out_ty, "dvc_ptr": out_ty,
                                      **{n: "i64" for n in ("stride_qb", "stride_qh", "stride_cqb", "stride_cqh",
                                                            "stride_cb", "stride_ch")},
                                      **{n: "i32" for n in ("HKV", "GROUP", "L", "NC", "CHUNK", "ROWS_PER_SPLIT")},
                                      "split_stride": "i64", "qk_scale": "fp32", "scale": "fp32",
                                      "HAS_QC": "constexpr",
                                      **{n: "constexpr" for n in tiles}},
                           constexprs=dict(HAS_QC=has_qc, **tiles), attrs=_attrs(12), options=dict(opts))
        # the split reduction: fp32 partial sums in, the gradients' dtype out; N is i64 past 2^31 elements
        for n_ty in ("i32", "i64"):
            yield dict(name=f"cat_split_sum[{names[dtype]} N={n_ty}]", kernel=_cat_split_sum_kernel,
                       signature={"part_k_ptr": "*fp32", "part_v_ptr": "*fp32", "dk_ptr": ty, "dv_ptr": ty,
                                  "N": n_ty, "SPLITS": "i32", "BLOCK": "constexpr"},
                       constexprs=dict(BLOCK=SPLIT_SUM_BLOCK), attrs=_attrs(4),
                       options={"num_warps": 4, "num_stages": 2})


def _decode_aot_configs(dtypes, dims, names) -> Iterator[dict]:
    for dtype in dtypes:
        ty = "*" + names[dtype]
        for d in dims:
            yield dict(name=f"cat_decode[{names[dtype]} d={d}]", kernel=_cat_decode_kernel,
                       signature={"q_ptr": ty, "kc_ptr": ty, "vc_ptr": ty, "n_slots_ptr": "*i64", "k_ptr": ty,
                                  "v_ptr": ty, "n_raw_ptr": "*i64", "o_ptr": ty,
                                  **{n: "i32" for n in ("H", "HKV", "S", "R")}, "qk_scale": "fp32",
                                  **{n: "constexpr" for n in ("HEAD_DIM", "BLOCK_D", "BLOCK_G", "BLOCK_N")}},
                       constexprs=dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_G=16, BLOCK_N=DECODE_BLOCK_N),
                       attrs=_attrs(8), options={"num_warps": 4, "num_stages": 2})


_FWD_STRIDES = ("stride_qb", "stride_qh", "stride_qcb", "stride_qch", "stride_kb", "stride_kh", "stride_cb",
                "stride_ch")


def _attrs(n_ptrs: int) -> dict:
    # torch allocations are 16-byte aligned and the launcher specializes on that
    return {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}
