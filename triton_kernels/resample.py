"""Triton kernels of the resample family: fused per-group resampling (optionally with the state gather) and
the plain state gather.

Semantics: python/fusedlab/reference/resample.py. One program handles one group of K particles at a time
(programs loop over groups, so the scratch below is per program, not per group), in float64, walking the
group in chunks of CHUNK lanes so registers do not grow with K. Per group:

* max, then weights w = exp(x - max), their sums and running sums; ESS, log_norm, the resample decision;
* the CDF goes to a float64 scratch row of BLOCK_K = next_power_of_2(K) entries (exactly 1 from the last
  positive weight on, and in the padding) and every point finds its ancestor by a vectorized binary search
  of log2(BLOCK_K) gathered loads (a register tensor cannot be indexed by data);
* sorted points (multinomial, residual remainder) are not sorted: the ancestor map is monotone, so the
  ancestors of sorted points are the sorted ancestors of the unsorted points. Each point's ancestor is
  counted into a histogram (atomics), and slot i takes the first j whose running count exceeds i: the same
  search as residual's deterministic copies. Exactly the reference's result, without an O(K log^2 K) sort
  held in registers.

Only tl.exp / tl.log / tl.floor are used (no libdevice), so the TRITON_INTERPRET=1 interpreter runs the same
code as the GPU.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from fusedlab.triton_kernels._common import cdiv, check_device, empty, next_power_of_2

from fusedlab.reference import resample as _ref

RESIDUAL_SNAP = tl.constexpr(_ref.RESIDUAL_SNAP)  # a global the kernels read: a constexpr

#: Largest BLOCK_K (next power of two of K) handled here. Larger groups: backend="cuda" or "cpu".
MAX_BLOCK_K = 1 << 20
#: Lanes a program works on at once; K is walked in chunks of this size (a power of two).
MAX_CHUNK = 512
#: Smallest chunk: one warp's lanes.
MIN_CHUNK = 32
#: Gather tiles hold this many words per thread.
WORDS_PER_THREAD = 8
#: Widest row tile, in words; wider rows loop over tiles.
MAX_BLOCK_D = 512
#: The plain gather's second grid dimension is capped (CUDA's limit); its programs stride over the rest.
MAX_GRID_D = 65535
#: Upper bound of the per-program scratch of one launch; fewer programs run when groups are huge.
SCRATCH_BYTES = 256 << 20

METHOD_IDS = {name: i for i, name in enumerate(_ref.METHODS)}  # the order of resample.h's enum

# Raw words the state is copied as: any dtype moves bit-for-bit, as the widest word dividing a row.
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

#: Tests set this so outputs and scratch start as NaN / all-ones bits: a slot the kernel fails to write
#: then fails the comparison instead of passing by luck.
POISON_BUFFERS = False


def _out(shape, dtype, device) -> torch.Tensor:
    return empty(shape, dtype, device, POISON_BUFFERS)


# --------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _count_le(table_ptr, p, mask, BLOCK_K: tl.constexpr, LOG2_BLOCK_K: tl.constexpr):
    """Per lane, #{j : table[j] <= p} capped at BLOCK_K - 1; table: BLOCK_K non-decreasing values."""
    pos = tl.zeros(p.shape, dtype=tl.int32)
    for r in tl.static_range(LOG2_BLOCK_K):
        v = tl.load(table_ptr + pos + ((BLOCK_K >> (r + 1)) - 1), mask=mask, other=float("inf"))
        pos = tl.where(v <= p, pos + (BLOCK_K >> (r + 1)), pos)
    return pos


@triton.jit
def _weights(lw_row, idx, K, m, degenerate):
    """w = exp(x - max) in float64 (1 for a degenerate group, 0 for NaN/-inf and padding), and x."""
    x = tl.load(lw_row + idx, mask=idx < K, other=float("-inf")).to(tl.float64)
    x = tl.where(x != x, float("-inf"), x)  # NaN counts as a dead particle
    w = tl.where(degenerate, 1.0, tl.exp(x - tl.where(degenerate, 0.0, m)))
    return tl.where(idx < K, w, 0.0), x


@triton.jit
def _normalize(src, dst, total, last, lanes, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """dst = src / total, exactly 1 from `last` on (padding included)."""
    for c0 in range(0, BLOCK_K, CHUNK):
        idx = c0 + lanes
        c = tl.load(src + idx, mask=idx < last, other=1.0) / total
        tl.store(dst + idx, tl.where(idx >= last, 1.0, c))


@triton.jit
def _draw_counts(cdf, u_row, counts, n, last, lanes, BLOCK_K: tl.constexpr, LOG2_BLOCK_K: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Histogram of the ancestors of the points u[0..n) under `cdf` (clamped to `last`)."""
    for c0 in range(0, n, CHUNK):
        k = c0 + lanes
        km = k < n
        p = tl.load(u_row + k, mask=km, other=0.0)
        a = tl.minimum(_count_le(cdf, p, km, BLOCK_K, LOG2_BLOCK_K), last)
        tl.atomic_add(counts + a, 1, mask=km, sem="relaxed")


@triton.jit
def _running_counts(counts, dst, K, lanes, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """dst = inclusive cumsum of counts[0..K) (as float64, exact), continued flat over the padding."""
    carry = tl.full([], 0, tl.int32)
    for c0 in range(0, BLOCK_K, CHUNK):
        idx = c0 + lanes
        c = tl.load(counts + idx, mask=idx < K, other=0, cache_modifier=".cg")  # written by atomics in L2
        tl.store(dst + idx, (carry + tl.cumsum(c, axis=0)).to(tl.float64))
        carry += tl.sum(c, axis=0)


@triton.jit
def _expand(table, anc_out, n, lanes, BLOCK_K: tl.constexpr, LOG2_BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """anc_out[i] = first j with table[j] > i for i < n: j repeated as often as its count."""
    for c0 in range(0, n, CHUNK):
        i = c0 + lanes
        im = i < n
        j = _count_le(table, i.to(tl.float64), im, BLOCK_K, LOG2_BLOCK_K)
        tl.store(anc_out + i, j.to(tl.int64), mask=im)


@triton.jit
def _resample_kernel(lw_ptr, u_ptr, anc_ptr, lw_out_ptr, ess_ptr, log_norm_ptr, status_ptr, table_ptr,
                     count_ptr, state_ptr, state_out_ptr, B, K, U, D, ess_threshold: tl.float64,
                     log_k: tl.float64, METHOD: tl.constexpr, BLOCK_K: tl.constexpr, LOG2_BLOCK_K: tl.constexpr,
                     CHUNK: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    NEG_INF: tl.constexpr = float("-inf")
    INF: tl.constexpr = float("inf")
    pid = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    # this program's scratch: two float64 tables and one int32 histogram of BLOCK_K entries each
    tab_a = table_ptr + pid.to(tl.int64) * (2 * BLOCK_K)
    tab_b = tab_a + BLOCK_K
    counts = count_ptr + pid.to(tl.int64) * BLOCK_K
    out_zero = tl.zeros([CHUNK], dtype=lw_out_ptr.dtype.element_ty)

    for g in range(pid, B, tl.num_programs(0)):
        b = tl.cast(g, tl.int64)
        lw_row = lw_ptr + b * K
        anc_row = anc_ptr + b * K
        out_row = lw_out_ptr + b * K
        u_row = u_ptr + b * U

        m = tl.full([], NEG_INF, tl.float64)
        for c0 in range(0, K, CHUNK):
            x = tl.load(lw_row + c0 + lanes, mask=c0 + lanes < K, other=NEG_INF).to(tl.float64)
            m = tl.maximum(m, tl.max(tl.where(x != x, NEG_INF, x), axis=0))
        degenerate = (m == INF) | (m == NEG_INF)

        # sums, the last positive weight, and the unnormalized running sum of w into tab_a
        s = tl.full([], 0.0, tl.float64)
        s2 = tl.full([], 0.0, tl.float64)
        last = tl.full([], 0, tl.int32)
        for c0 in range(0, K, CHUNK):
            idx = c0 + lanes
            w, x = _weights(lw_row, idx, K, m, degenerate)
            tl.store(tab_a + idx, s + tl.cumsum(w, axis=0), mask=idx < K)
            if METHOD == 0:
                tl.store(counts + idx, tl.zeros([CHUNK], dtype=tl.int32), mask=idx < K)
            s += tl.sum(w, axis=0)
            s2 += tl.sum(w * w, axis=0)
            last = tl.maximum(last, tl.max(tl.where(w > 0.0, idx, 0), axis=0))
        ess = tl.where(degenerate, 0.0, s * s / s2)
        log_s = tl.log(s)
        tl.store(ess_ptr + b, ess)
        tl.store(log_norm_ptr + b, tl.where(degenerate, NEG_INF, m + log_s - log_k))
        do_resample = degenerate | (ess_threshold >= 1.0) | (ess < ess_threshold * K)
        # the flags as 0/1 bytes [B, 2]: resampled, degenerate (ref.FLAG_*)
        tl.store(status_ptr + 2 * b, do_resample.to(tl.uint8))
        tl.store(status_ptr + 2 * b + 1, degenerate.to(tl.uint8))

        if do_resample:
            for c0 in range(0, K, CHUNK):
                tl.store(out_row + c0 + lanes, out_zero, mask=c0 + lanes < K)
            if METHOD == 3:
                # residual: n_j = floor(K w_j / S) copies first; running counts -> tab_a, running
                # residual weights -> tab_b
                n_det = tl.full([], 0.0, tl.float64)
                r_sum = tl.full([], 0.0, tl.float64)
                r_last = tl.full([], 0, tl.int32)
                for c0 in range(0, BLOCK_K, CHUNK):
                    idx = c0 + lanes
                    w, x = _weights(lw_row, idx, K, m, degenerate)
                    kw = K * w / s
                    n = tl.floor(kw + RESIDUAL_SNAP * K)  # whole numbers stay whole (resample.h)
                    r = tl.maximum(kw - n, 0.0)
                    tl.store(tab_a + idx, n_det + tl.cumsum(n, axis=0))
                    tl.store(tab_b + idx, r_sum + tl.cumsum(r, axis=0))
                    tl.store(counts + idx, tl.zeros([CHUNK], dtype=tl.int32), mask=idx < K)
                    n_det += tl.sum(n, axis=0)
                    r_sum += tl.sum(r, axis=0)
                    r_last = tl.maximum(r_last, tl.max(tl.where(r > 0.0, idx, 0), axis=0))
                n_fix = n_det.to(tl.int32)
                n_rest = K - n_fix
                tl.debug_barrier()
                _expand(tab_a, anc_row, n_fix, lanes, BLOCK_K, LOG2_BLOCK_K, CHUNK)
                if n_rest > 0:
                    tl.debug_barrier()  # tab_a is rewritten below
                    _normalize(tab_b, tab_a, r_sum, r_last, lanes, BLOCK_K, CHUNK)
                    tl.debug_barrier()
                    _draw_counts(tab_a, u_row, counts, n_rest, r_last, lanes, BLOCK_K, LOG2_BLOCK_K, CHUNK)
                    tl.debug_barrier()
                    _running_counts(counts, tab_b, K, lanes, BLOCK_K, CHUNK)
                    tl.debug_barrier()
                    _expand(tab_b, anc_row + n_fix, n_rest, lanes, BLOCK_K, LOG2_BLOCK_K, CHUNK)
            else:
                tl.debug_barrier()
                _normalize(tab_a, tab_b, s, last, lanes, BLOCK_K, CHUNK)
                tl.debug_barrier()
                if METHOD == 0:
                    _draw_counts(tab_b, u_row, counts, K, last, lanes, BLOCK_K, LOG2_BLOCK_K, CHUNK)
                    tl.debug_barrier()
                    _running_counts(counts, tab_a, K, lanes, BLOCK_K, CHUNK)
                    tl.debug_barrier()
                    _expand(tab_a, anc_row, K, lanes, BLOCK_K, LOG2_BLOCK_K, CHUNK)
                else:
                    for c0 in range(0, K, CHUNK):
                        idx = c0 + lanes
                        im = idx < K
                        if METHOD == 2:
                            u = tl.load(u_row)
                        else:
                            u = tl.load(u_row + idx, mask=im, other=0.0)
                        pts = (idx.to(tl.float64) + u) / K
                        a = tl.minimum(_count_le(tab_b, pts, im, BLOCK_K, LOG2_BLOCK_K), last)
                        tl.store(anc_row + idx, a.to(tl.int64), mask=im)
        else:
            for c0 in range(0, K, CHUNK):
                idx = c0 + lanes
                w, x = _weights(lw_row, idx, K, m, degenerate)
                carried = x - (m + log_s) + log_k  # keeps the group's mean weight at 1
                tl.store(out_row + idx, carried.to(lw_out_ptr.dtype.element_ty), mask=idx < K)
                tl.store(anc_row + idx, idx.to(tl.int64), mask=idx < K)

        if HAS_STATE:
            tl.debug_barrier()  # the ancestors were stored by other threads of this program
            src = state_ptr + b * K * D
            dst = state_out_ptr + b * K * D
            for i0 in range(0, K, BLOCK_I):
                ii = i0 + tl.arange(0, BLOCK_I)
                im = ii < K
                a = tl.load(anc_row + ii, mask=im, other=0)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    m2 = im[:, None] & (dd < D)[None, :]
                    v = tl.load(src + a[:, None] * D + dd[None, :], mask=m2)
                    tl.store(dst + ii.to(tl.int64)[:, None] * D + dd[None, :], v, mask=m2)
        tl.debug_barrier()  # the next group reuses this program's scratch


@triton.jit
def _gather_kernel(state_ptr, anc_ptr, out_ptr, N, K, D, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    rm = rows < N
    a = tl.load(anc_ptr + rows, mask=rm, other=0)
    src = ((rows // K) * K + a) * D
    dst = rows * D
    for d0 in range(tl.program_id(1) * BLOCK_D, D, tl.num_programs(1) * BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = rm[:, None] & (dd < D)[None, :]
        v = tl.load(state_ptr + src[:, None] + dd[None, :], mask=m2)
        tl.store(out_ptr + dst[:, None] + dd[None, :], v, mask=m2)


# --------------------------------------------------------------------------------------------------------
# launch configuration (shared by the launches and the ahead-of-time compile test)


def block_k(K: int) -> int:
    """Entries of a group's scratch tables: next_power_of_2(K), at least MIN_CHUNK."""
    return max(MIN_CHUNK, next_power_of_2(K))


def chunk(blk: int) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, blk))


def resample_num_warps(chunk_lanes: int) -> int:
    """One thread per 8 lanes of a chunk (a float64 value is two registers), 1 to 4 warps."""
    return max(1, min(4, chunk_lanes // 128))


def tile(D: int, max_rows: int, num_warps: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_D): a gather tile of WORDS_PER_THREAD words per thread over rows of D words."""
    words = WORDS_PER_THREAD * 32 * num_warps
    block_d = min(MAX_BLOCK_D, words, next_power_of_2(max(D, 1)))
    block_i = max(1, min(words // block_d, next_power_of_2(max(max_rows, 1))))
    return block_i, block_d


GATHER_NUM_WARPS = 4


def _resample_meta(K: int, method: str, D: int) -> dict:
    blk = block_k(K)
    lanes = chunk(blk)
    num_warps = resample_num_warps(lanes)
    block_i, block_d = tile(D, K, num_warps) if D > 0 else (1, 1)
    return dict(METHOD=METHOD_IDS[method], BLOCK_K=blk, LOG2_BLOCK_K=blk.bit_length() - 1, CHUNK=lanes,
                HAS_STATE=D > 0, BLOCK_I=block_i, BLOCK_D=block_d, num_warps=num_warps, num_stages=1)


def _gather_meta(D: int, N: int) -> dict:
    block_i, block_d = tile(D, N, GATHER_NUM_WARPS)
    return dict(BLOCK_I=block_i, BLOCK_D=block_d, num_warps=GATHER_NUM_WARPS, num_stages=1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(B: int, blk: int, num_warps: int, device: torch.device) -> int:
    """Programs of a resample launch: enough to fill the GPU, within SCRATCH_BYTES of scratch."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fill = _sm_count(index) * max(1, 32 // num_warps)
    else:  # the interpreter runs programs one after another; two still exercise the loop over groups
        fill = 2
    return max(1, min(B, fill, SCRATCH_BYTES // (blk * 20)))


_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                 torch.int16: "i16", torch.uint8: "u8"}
_RS_PTRS = ("lw_ptr", "u_ptr", "anc_ptr", "lw_out_ptr", "ess_ptr", "log_norm_ptr", "status_ptr", "table_ptr",
            "count_ptr", "state_ptr", "state_out_ptr")


def aot_configs(full: bool = False) -> Iterator[dict]:
    """Kernel specializations this module launches, for ahead-of-time compile checks.

    Each item: name, kernel, signature, constexprs, attrs, options (for triton.compile's ASTSource and
    options), built by the meta functions the launches use. The default set: every method and dtype at the
    smallest, a one-chunk and the largest BLOCK_K; the fused gather per word size at narrow and wide rows; the
    plain gather per word size. ``full=True`` adds every BLOCK_K in between.
    """
    blocks = [MIN_CHUNK, MAX_CHUNK, MAX_BLOCK_K]
    if full:
        blocks = [1 << e for e in range(MIN_CHUNK.bit_length() - 1, MAX_BLOCK_K.bit_length())]
    cases = []
    for blk in blocks:
        for dtype in (torch.float32, torch.float64):
            for method in METHOD_IDS:
                cases.append((blk, dtype, method, None, 0))
    for blk in (MIN_CHUNK, MAX_CHUNK):
        for word in (torch.int64, torch.int32, torch.uint8):
            for D in (1, 4096):
                cases.append((blk, torch.float32, "systematic", word, D))
    for blk, dtype, method, word, D in cases:
        meta = _resample_meta(blk, method, D)
        ptr_types = [dtype, torch.float64, torch.int64, dtype, torch.float64, torch.float64, torch.uint8,
                     torch.float64, torch.int32, word or torch.uint8, word or torch.uint8]
        signature = {n: "*" + _TRITON_TYPES[t] for n, t in zip(_RS_PTRS, ptr_types)}
        signature.update(B="i32", K="i32", U="i32", D="i32", ess_threshold="fp64", log_k="fp64")
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        signature.update({k: "constexpr" for k in meta})
        state = f"state={_TRITON_TYPES[word]} D={D}" if word is not None else "no state"
        yield dict(name=f"resample[{method} {_TRITON_TYPES[dtype]} BLOCK_K={blk} {state}]",
                   kernel=_resample_kernel, signature=signature, constexprs=meta, attrs=_aligned(len(_RS_PTRS)),
                   options=options)
    for word in (torch.int64, torch.int32, torch.uint8):
        for D in (1, 3, 4096):
            meta = _gather_meta(D, 1 << 20)
            options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
            signature = {"state_ptr": "*" + _TRITON_TYPES[word], "anc_ptr": "*i64",
                         "out_ptr": "*" + _TRITON_TYPES[word], "N": "i32", "K": "i32", "D": "i32",
                         "BLOCK_I": "constexpr", "BLOCK_D": "constexpr"}
            yield dict(name=f"gather[{_TRITON_TYPES[word]} D={D}]", kernel=_gather_kernel, signature=signature,
                       constexprs=meta, attrs=_aligned(3), options=options)


def _aligned(n_ptrs: int) -> dict:
    # torch allocations are 16-byte aligned and the launcher specializes on that: mirror it
    return {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}


# --------------------------------------------------------------------------------------------------------
# Python API


def _as_words(rows: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous tensors' bytes as [rows, D] views of one integer word type: the widest that divides a row
    and every tensor's address (the same D for all)."""
    raws = [t.reshape(rows, -1).view(torch.uint8) for t in tensors]
    for size, dtype in _WORDS.items():
        if raws[0].shape[1] % size == 0 and all(r.data_ptr() % size == 0 for r in raws):
            return [r.view(dtype) for r in raws]
    raise AssertionError("unreachable: uint8 words always fit")


def _check_state(state, B: int, K: int, device) -> None:
    from fusedlab.ops.resample import check_state  # one copy of the message; imported late (ops imports us)

    check_state(state, B, K, device)


def resample(log_weights: torch.Tensor, uniforms: torch.Tensor, method: str, ess_threshold: float,
             state: Optional[torch.Tensor]):
    """Resample B groups of K particles in one launch (semantics: python/fusedlab/reference/resample.py).

    Returns (ancestors int64 [B, K], log_weights [B, K] in the input dtype, ess float64 [B], log_norm float64 [B],
    status uint8 [B, 2] (the resampled and degenerate flags), ``state`` reordered by the ancestors or None when
    ``state`` is None).
    """
    if method not in METHOD_IDS:
        raise ValueError(f"method must be one of {tuple(METHOD_IDS)}, got {method!r}")
    if not isinstance(log_weights, torch.Tensor):
        raise TypeError(f"log_weights must be a torch.Tensor, got {type(log_weights).__name__}")
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be 2-D [B, K], got shape {list(log_weights.shape)}")
    B, K = log_weights.shape
    if K < 1:
        raise ValueError(f"log_weights must have K >= 1 particles, got shape {list(log_weights.shape)}")
    if log_weights.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"log_weights must be float32 or float64, got {log_weights.dtype}")
    check_device(log_weights, "log_weights")
    if block_k(K) > MAX_BLOCK_K:
        raise ValueError(f"log_weights: the Triton backend handles at most {MAX_BLOCK_K} particles per group, "
                         f"got K={K}; use backend='cuda' or backend='cpu'")
    if not isinstance(uniforms, torch.Tensor):
        raise TypeError(f"uniforms must be a torch.Tensor, got {type(uniforms).__name__}")
    if uniforms.dtype != torch.float64:
        raise ValueError(f"uniforms must be float64, got {uniforms.dtype}")
    need = 1 if method == "systematic" else K
    if tuple(uniforms.shape) != (B, need):
        raise ValueError(f"uniforms must have shape [{B}, {need}] for method {method!r}, "
                         f"got {list(uniforms.shape)}")
    if uniforms.device != log_weights.device:
        raise ValueError(f"uniforms must be on {log_weights.device} like log_weights, got {uniforms.device}")
    thr = float(ess_threshold)
    if not thr >= 0.0:
        raise ValueError(f"ess_threshold must be >= 0, got {ess_threshold!r}")
    if state is not None:
        _check_state(state, B, K, log_weights.device)

    dev = log_weights.device
    lw = log_weights.contiguous()
    u = uniforms.contiguous()
    anc = _out((B, K), torch.int64, dev)
    lw_out = _out((B, K), lw.dtype, dev)
    ess = _out((B,), torch.float64, dev)
    log_norm = _out((B,), torch.float64, dev)
    status = _out((B, 2), torch.uint8, dev)
    state_out = None
    D = 0
    src = dst = anc  # stand-ins when there is no state: never touched
    if state is not None:
        state = state.resolve_conj().resolve_neg().contiguous()
        state_out = _out(state.shape, state.dtype, dev)
        if state.numel() > 0:
            src, dst = _as_words(B * K, state, state_out)
            D = src.shape[1]
    if B == 0:
        return anc, lw_out, ess, log_norm, status, state_out

    meta = _resample_meta(K, method, D)
    blk = meta["BLOCK_K"]
    grid = _num_programs(B, blk, meta["num_warps"], dev)
    tables = _out((grid, 2 * blk), torch.float64, dev)
    counts = _out((grid, blk), torch.int32, dev)
    _resample_kernel[(grid,)](lw, u, anc, lw_out, ess, log_norm, status, tables, counts, src, dst, B, K,
                              u.shape[1], D, thr, math.log(K), **meta)
    return anc, lw_out, ess, log_norm, status, state_out


def gather(state: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """out[b, i, ...] = state[b, ancestors[b, i], ...] for any trailing shape and dtype (copied bit-for-bit)."""
    if not isinstance(ancestors, torch.Tensor):
        raise TypeError(f"ancestors must be a torch.Tensor, got {type(ancestors).__name__}")
    if ancestors.dim() != 2:
        raise ValueError(f"ancestors must be 2-D [B, K], got shape {list(ancestors.shape)}")
    if ancestors.dtype.is_floating_point or ancestors.dtype.is_complex or ancestors.dtype == torch.bool:
        raise ValueError(f"ancestors must be an integer tensor (int64), got {ancestors.dtype}")
    B, K = ancestors.shape
    _check_state(state, B, K, ancestors.device)
    check_device(state, "state")
    anc = ancestors.to(torch.int64).contiguous()
    st = state.resolve_conj().resolve_neg().contiguous()
    out = _out(st.shape, st.dtype, st.device)
    if st.numel() == 0:
        return out
    bad = (anc < 0) | (anc >= K)
    if bool(bad.any()):  # an out-of-range index would read outside the group: refuse it
        i = int(torch.nonzero(bad.flatten())[0])
        raise ValueError(f"ancestors must lie in [0, {K}), found {int(anc.flatten()[i])} at flat index {i}")
    src, dst = _as_words(B * K, st, out)
    N, D = src.shape
    meta = _gather_meta(D, N)
    grid = (cdiv(N, meta["BLOCK_I"]), min(MAX_GRID_D, cdiv(D, meta["BLOCK_D"])))
    _gather_kernel[grid](src, anc, dst, N, K, D, **meta)
    return out
