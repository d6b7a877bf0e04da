"""Triton kernels of the newton_schulz family: Newton-Schulz orthogonalization over a batch of matrices.

Semantics: python/fusedlab/reference/newton_schulz.py. X is the normalized input in the wide orientation
(m <= n). Each step (a, b, c) is three launches, each covering the whole batch (grid axis 1 walks the
batch, int64 batch offsets):

* ``_xxt_kernel``: A = X X^T. A is symmetric, so only the upper-triangle tiles (tile row <= tile column)
  are computed: T (T + 1) / 2 programs per matrix instead of T^2, each storing its tile at both symmetric
  positions. About half the FLOPs of a plain GEMM for this line.
* ``_gram_update_kernel``: B = b A + c A A. A is symmetric, so A A = A A^T is symmetric too: the same
  upper-triangle scheme, with b A added in the epilogue from the A tile (no extra pass over A). Because A
  is symmetric the right operand A[k, j] is read as stored (row-major), without a transposed load.
* ``_update_x_kernel``: X' = a X + B X, a general tiled GEMM with a X added in the epilogue. The last
  step stores straight into the caller's output (transposed for a tall input) when its sizes are
  multiples of 16; otherwise it stores whole tiles and one copy moves the result (masked unaligned stores
  of a whole tile spill registers). For a lone large fp16/bf16 matrix on a GPU this product is torch.baddbmm's
  instead (cuBLAS; ``UPDATE_X``), which measured faster there.

The matrices are zero-padded to whole tiles, which is exact (padded rows and columns of X, A and B stay
zero) and costs no extra tile products (a masked edge tile computes a whole tile anyway): loads need no
masks, every size a kernel sees is a multiple of 16 so loads vectorize, and tiles are addressed by int32
in-tile offsets from 64-bit scalar bases, which keeps registers below ptxas' spill point.

This is the design of the symmetric Newton-Schulz kernels of flash-muon, modded-nanogpt and Dion (upper
tiles mirrored; fused epilogues), written for this library: fixed configurations (no autotuning, so the
interpreter runs the same launches), batched launches and a transposed final store.

Products accumulate in fp32 (fp64 for float64) with ``input_precision="ieee"``: bf16/fp16 operands still
use tensor cores on the GPU (the setting only concerns fp32 operands), while fp32 operands get exact
products and fp32 sums instead of TF32, so the fp32 path is reproducible and comparable with the
reference. The b A + c A A and a X + B X epilogues are computed in the accumulator type and rounded once.

The normalization (Frobenius norm in fp32, scaled by max |G| so it neither underflows nor overflows,
clamped at eps) runs as plain torch ops, the reference's ``normalize`` itself: a few O(mn) passes next to
the O(m^2 n) products. The tall-to-wide transpose is fused into the cast copy that produces X.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import triton
import triton.language as tl

from fusedlab.reference.newton_schulz import normalize
from fusedlab.triton_kernels._common import cdiv, check_device, empty

#: CUDA's limit on grid axis 1; larger batches are walked by each program in strides of this many matrices.
MAX_GRID_BATCH = 65535

#: Tests set this so every kernel output starts as NaN: a tile the kernels fail to write then fails.
POISON_BUFFERS = False


def _out(shape, dtype, device) -> torch.Tensor:
    return empty(shape, dtype, device, POISON_BUFFERS)

# (BLOCK, BLOCK_K, num_warps, num_stages) per compute dtype and size class; tiles are BLOCK x BLOCK
# (square, so a tile and its mirror cover the same elements). Chosen for an H100 (228 KB shared memory and
# 132 SMs): "large" is the 128x128x64, 8-warp, 4-stage tile of the published symmetric kernels (128 KB of
# pipeline buffers); "small" quarters it so that a matrix of size ~1024 still gives a wave of programs. fp32
# operands run on CUDA cores (ieee) and fp64 on the fp64 units: smaller tiles, sized so that ptxas does not
# spill (tests/test_triton_aot.py).
CONFIGS = {
    ("half", "large"): (128, 64, 8, 4),
    ("half", "small"): (64, 64, 4, 4),
    ("fp32", "large"): (64, 16, 8, 3),
    ("fp32", "small"): (32, 16, 4, 3),
    ("fp64", "large"): (32, 16, 4, 3),
    ("fp64", "small"): (32, 16, 4, 3),
}
#: How X' = a X + B X is computed: "triton" (``_update_x_kernel``), "matmul" (torch.baddbmm with beta = a: cuBLAS
#: on a GPU, so the two symmetric products stay Triton's and the general one is the vendor GEMM's; then the
#: result takes one extra copy into the caller's layout) or "auto": "matmul" for a lone matrix of the large
#: class in fp16/bf16 on a CUDA device, where it measured faster (H200, bf16: 4096^2 2.63 against 2.82 ms,
#: 4096 x 16384 8.47 against 10.15 ms), "triton" otherwise (batches, small matrices, fp32, the interpreter).
UPDATE_X = "auto"
_UPDATE_X_CHOICES = ("auto", "triton", "matmul")


def update_x_by_matmul(dtype: torch.dtype, m: int, batch: int, device: torch.device) -> bool:
    """Whether a call computes a X + B X with torch.baddbmm (see ``UPDATE_X``)."""
    if UPDATE_X not in _UPDATE_X_CHOICES:
        raise ValueError(f"UPDATE_X must be one of {_UPDATE_X_CHOICES}, got {UPDATE_X!r}")
    if UPDATE_X != "auto":
        return UPDATE_X == "matmul"
    return (device.type == "cuda" and batch == 1 and _DTYPE_KIND[dtype] == "half"
            and size_class(dtype, m, batch) == "large")

#: A call is "large" when the large tile still yields this many upper-triangle programs over the batch
#: (about one wave on an H100); otherwise the small tile fills the GPU better.
LARGE_MIN_PROGRAMS = 128

_DTYPE_KIND = {torch.bfloat16: "half", torch.float16: "half", torch.float32: "fp32", torch.float64: "fp64"}
DTYPES = tuple(_DTYPE_KIND)


# --------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _upper_tile(p):
    """The p-th tile (row, col) of the upper triangle, enumerated column by column: p = col (col + 1) / 2 + row."""
    col = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # an inexact square root can land one off: correct both ways
    col = tl.where(col * (col + 1) // 2 > p, col - 1, col)
    col = tl.where((col + 1) * (col + 2) // 2 <= p, col + 1, col)
    return p - col * (col + 1) // 2, col


@triton.jit
def _matmul_tile(a_ptr, a_offs, a_step, b_ptr, b_offs, b_step, K, acc, BLOCK_K: tl.constexpr):
    """acc + sum over k of a[i, k] b[k, j]: tiles at scalar base pointers that advance by a_step / b_step per
    BLOCK_K, plus int32 in-tile offsets (fewer registers than 64-bit pointer tensors). K % BLOCK_K == 0."""
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptr + a_offs), tl.load(b_ptr + b_offs), acc, input_precision="ieee",
                     out_dtype=acc.dtype)
        a_ptr += a_step
        b_ptr += b_step
    return acc


@triton.jit
def _zero_acc(ptr, BLOCK: tl.constexpr):
    if ptr.dtype.element_ty == tl.float64:
        return tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        return tl.zeros((BLOCK, BLOCK), dtype=tl.float32)


@triton.jit
def _store_symmetric(c_ptr, c, i0, j0, M, BLOCK: tl.constexpr):
    """Store tile c at rows i0.., columns j0.. of an M x M matrix and, off the diagonal, c^T at rows j0.., cols i0..."""
    r = tl.arange(0, BLOCK)
    offs = r[:, None] * M + r[None, :]
    tl.store(c_ptr + i0 * M + j0 + offs, c)
    if i0 != j0:  # a diagonal tile is its own mirror
        tl.store(c_ptr + j0 * M + i0 + offs, tl.trans(c))


@triton.jit
def _xxt_kernel(x_ptr, a_ptr, batch, M, N, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # M, N: multiples of BLOCK and BLOCK_K (the caller zero-pads), so no load needs a mask
    pid_m, pid_n = _upper_tile(tl.program_id(0))
    i0 = tl.cast(pid_m * BLOCK, tl.int64)
    j0 = tl.cast(pid_n * BLOCK, tl.int64)
    r = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    a_offs = r[:, None] * N + rk[None, :]
    b_offs = rk[:, None] + r[None, :] * N  # X^T[k, j] = X[j, k]: the same rows, read transposed
    for g in range(tl.program_id(1), batch, tl.num_programs(1)):
        b = tl.cast(g, tl.int64)
        x = x_ptr + b * M * N
        acc = _matmul_tile(x + i0 * N, a_offs, BLOCK_K, x + j0 * N, b_offs, BLOCK_K, N, _zero_acc(x_ptr, BLOCK),
                           BLOCK_K)
        _store_symmetric(a_ptr + b * M * M, acc.to(a_ptr.dtype.element_ty), i0, j0, M, BLOCK)


@triton.jit
def _gram_update_kernel(a_ptr, out_ptr, batch, M, coef_b: tl.float64, coef_c: tl.float64, BLOCK: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n = _upper_tile(tl.program_id(0))
    i0 = tl.cast(pid_m * BLOCK, tl.int64)
    j0 = tl.cast(pid_n * BLOCK, tl.int64)
    r = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    a_offs = r[:, None] * M + rk[None, :]
    b_offs = rk[:, None] * M + r[None, :]  # A A = A A^T: the right operand A[k, j] is read as stored
    for g in range(tl.program_id(1), batch, tl.num_programs(1)):
        b = tl.cast(g, tl.int64)
        a = a_ptr + b * M * M
        acc = _matmul_tile(a + i0 * M, a_offs, BLOCK_K, a + j0, b_offs, BLOCK_K * M, M, _zero_acc(a_ptr, BLOCK),
                           BLOCK_K)
        tile = tl.load(a + i0 * M + j0 + r[:, None] * M + r[None, :]).to(acc.dtype)
        acc = tl.full([], coef_c, acc.dtype) * acc + tl.full([], coef_b, acc.dtype) * tile
        _store_symmetric(out_ptr + b * M * M, acc.to(out_ptr.dtype.element_ty), i0, j0, M, BLOCK)


@triton.jit
def _update_x_kernel(b_ptr, x_ptr, out_ptr, batch, M, N, m_out, n_out, out_batch_stride, out_row_stride,
                     coef_a: tl.float64, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, TRANS_OUT: tl.constexpr):
    """out[i, j] = a X[i, j] + (B X)[i, j] for i < m_out, j < n_out; TRANS_OUT stores out[j, i] instead."""
    tiles_n = N // BLOCK
    i0 = tl.cast((tl.program_id(0) // tiles_n) * BLOCK, tl.int64)
    j0 = tl.cast((tl.program_id(0) % tiles_n) * BLOCK, tl.int64)
    r = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    a_offs = r[:, None] * M + rk[None, :]
    b_offs = rk[:, None] * N + r[None, :]
    ri = i0 + r
    rj = j0 + r
    ok = (ri < m_out)[:, None] & (rj < n_out)[None, :]
    for g in range(tl.program_id(1), batch, tl.num_programs(1)):
        b = tl.cast(g, tl.int64)
        x = x_ptr + b * M * N
        acc = _matmul_tile(b_ptr + b * M * M + i0 * M, a_offs, BLOCK_K, x + j0, b_offs, BLOCK_K * N, M,
                           _zero_acc(x_ptr, BLOCK), BLOCK_K)
        tile = tl.load(x + i0 * N + j0 + r[:, None] * N + r[None, :]).to(acc.dtype)
        c = (acc + tl.full([], coef_a, acc.dtype) * tile).to(out_ptr.dtype.element_ty)
        out = out_ptr + b * out_batch_stride
        if TRANS_OUT:  # out holds the caller's tall orientation: element (i, j) goes to row j
            tl.store(out + rj[None, :] * out_row_stride + ri[:, None], c, mask=ok)
        else:
            tl.store(out + ri[:, None] * out_row_stride + rj[None, :], c, mask=ok)


# --------------------------------------------------------------------------------------------------------
# launch configuration (shared by the launches and the ahead-of-time compile test)


def size_class(dtype: torch.dtype, m: int, batch: int) -> str:
    """"large" when the large tile still gives LARGE_MIN_PROGRAMS upper-triangle programs, else "small"."""
    t = cdiv(m, CONFIGS[(_DTYPE_KIND[dtype], "large")][0])
    return "large" if batch * t * (t + 1) // 2 >= LARGE_MIN_PROGRAMS else "small"


def launch_config(dtype: torch.dtype, m: int, batch: int) -> dict:
    """BLOCK, BLOCK_K, num_warps, num_stages of every launch of one call (m: the smaller matrix dimension)."""
    block, block_k, warps, stages = CONFIGS[(_DTYPE_KIND[dtype], size_class(dtype, m, batch))]
    return dict(BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def padded(size: int, cfg: dict) -> int:
    """``size`` rounded up to a whole number of tiles (BLOCK and BLOCK_K are powers of two)."""
    p = max(cfg["BLOCK"], cfg["BLOCK_K"])
    return cdiv(size, p) * p


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def aot_configs(full: bool = False) -> Iterator[dict]:
    """Kernel specializations this module launches, for ahead-of-time compile checks.

    Each item: name, kernel, signature, constexprs, attrs, options (see triton_kernels/resample.py). Every
    size and stride the kernels see is divisible by 16: the launches zero-pad to whole tiles and store
    straight into the caller's output only when its sizes are multiples of 16. The default set: every
    distinct configuration of bf16, fp32 and fp64; ``full=True`` adds fp16 (bf16's configurations).
    """
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64) if full else (
        torch.bfloat16, torch.float32, torch.float64)
    for dtype in dtypes:
        kind = _DTYPE_KIND[dtype]
        ty = "*" + _TRITON_TYPES[dtype]
        seen = set()
        for cls in ("large", "small"):
            if CONFIGS[(kind, cls)] in seen:
                continue
            seen.add(CONFIGS[(kind, cls)])
            block, block_k, warps, stages = CONFIGS[(kind, cls)]
            options = {"num_warps": warps, "num_stages": stages}
            tiles = {"BLOCK": block, "BLOCK_K": block_k}
            tag = f"{_TRITON_TYPES[dtype]} {cls} BLOCK={block} BLOCK_K={block_k}"
            yield dict(name=f"xxt[{tag}]", kernel=_xxt_kernel,
                       signature={"x_ptr": ty, "a_ptr": ty, "batch": "i32", "M": "i32", "N": "i32",
                                  "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
                       constexprs=dict(tiles), attrs=_attrs(2, [3, 4]), options=dict(options))
            yield dict(name=f"gram_update[{tag}]", kernel=_gram_update_kernel,
                       signature={"a_ptr": ty, "out_ptr": ty, "batch": "i32", "M": "i32", "coef_b": "fp64",
                                  "coef_c": "fp64", "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
                       constexprs=dict(tiles), attrs=_attrs(2, [3]), options=dict(options))
            for trans in (False, True):
                yield dict(name=f"update_x[{tag}{' transposed out' if trans else ''}]", kernel=_update_x_kernel,
                           signature={"b_ptr": ty, "x_ptr": ty, "out_ptr": ty, "batch": "i32", "M": "i32", "N": "i32",
                                      "m_out": "i32", "n_out": "i32", "out_batch_stride": "i32",
                                      "out_row_stride": "i32", "coef_a": "fp64", "BLOCK": "constexpr",
                                      "BLOCK_K": "constexpr", "TRANS_OUT": "constexpr"},
                           constexprs={**tiles, "TRANS_OUT": trans}, attrs=_attrs(3, [4, 5, 6, 7, 8, 9]),
                           options=dict(options))


def _attrs(n_ptrs: int, aligned_ints: Sequence[int]) -> dict:
    # torch allocations are 16-byte aligned and the launcher specializes on that (and on ints divisible by 16)
    return {(i,): [["tt.divisibility", 16]] for i in [*range(n_ptrs), *aligned_ints]}


# --------------------------------------------------------------------------------------------------------
# Python API


def newton_schulz(G: torch.Tensor, coefficients: Sequence[float], norm_scale: float, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz over G [..., m, n] with the (a, b, c) of each step flattened in ``coefficients``; the
    result in ``dtype`` with G's shape. X = G / max(norm_scale ||G||_F, eps), the norm in fp32 (fp64 for
    float64), then per step A = X X^T, B = b A + c A A, X = a X + B X on the wide orientation."""
    from fusedlab.ops.newton_schulz import check_matrices  # imported late: ops imports this module

    check_matrices(G)
    check_device(G, "G")
    coefficients = [float(v) for v in coefficients]
    if len(coefficients) % 3:
        raise ValueError(f"coefficients must hold (a, b, c) per step, got {len(coefficients)} values")
    if not all(math.isfinite(v) for v in coefficients):
        raise ValueError(f"coefficients must be finite, got {coefficients}")
    if not (isinstance(norm_scale, (int, float)) and math.isfinite(norm_scale) and norm_scale > 0):
        raise ValueError(f"norm_scale must be a finite number > 0, got {norm_scale!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")

    rows, cols = G.shape[-2:]
    if G.numel() == 0:
        return torch.empty(G.shape, dtype=dtype, device=G.device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = normalize(G.reshape(-1, rows, cols), norm_scale, eps, acc)  # the reference's formula, in acc
    steps = len(coefficients) // 3
    if steps == 0:
        return g.to(dtype).reshape(G.shape)

    tall = rows > cols
    batch = g.shape[0]
    m, n = (cols, rows) if tall else (rows, cols)
    cfg = launch_config(dtype, m, batch)
    mp, np_ = padded(m, cfg), padded(n, cfg)
    # zero padding to whole tiles is exact: padded rows and columns of X, A and B stay zero
    X = (torch.empty if (mp, np_) == (m, n) else torch.zeros)((batch, mp, np_), dtype=dtype, device=G.device)
    X[:, :m, :n].copy_(g.mT if tall else g)  # cast and transpose in one copy
    del g
    t = mp // cfg["BLOCK"]
    gb = min(batch, MAX_GRID_BATCH)
    grid_sym = (t * (t + 1) // 2, gb)
    grid_x = (t * (np_ // cfg["BLOCK"]), gb)
    A = _out((batch, mp, mp), dtype, G.device)
    Bm = _out((batch, mp, mp), dtype, G.device)
    matmul = update_x_by_matmul(dtype, m, batch, G.device)
    # the last step stores into the caller's layout when its sizes are multiples of 16 (see the module doc)
    direct = m % 16 == 0 and n % 16 == 0 and not matmul
    spare = _out((batch, mp, np_), dtype, G.device) if steps > 1 or not direct else None
    out = _out((batch, rows, cols), dtype, G.device)
    for s in range(steps):
        a, b, c = coefficients[3 * s: 3 * s + 3]
        _xxt_kernel[grid_sym](X, A, batch, mp, np_, **cfg)
        _gram_update_kernel[grid_sym](A, Bm, batch, mp, b, c, **cfg)
        if matmul:  # spare = a X + B X in one GEMM (the a X term rides in beta), zero padding kept
            torch.baddbmm(X, Bm, X, beta=a, out=spare)
            X, spare = spare, X
        elif s == steps - 1 and direct:
            _update_x_kernel[grid_x](Bm, X, out, batch, mp, np_, m, n, m * n, m if tall else n, a, TRANS_OUT=tall,
                                     **cfg)
        else:
            _update_x_kernel[grid_x](Bm, X, spare, batch, mp, np_, mp, np_, mp * np_, np_, a, TRANS_OUT=False, **cfg)
            X, spare = spare, X
    if not direct:
        out.copy_(X[:, :m, :n].mT if tall else X[:, :m, :n])
    return out.view(G.shape)
