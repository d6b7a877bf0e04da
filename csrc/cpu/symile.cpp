// C++ CPU kernels of the symile family: the "n_squared" Symile loss and its exact gradients without the
// N^(M-1) x d products the symile package builds. Semantics: python/fusedlab/reference/symile.py.
//
// Every anchor's logits are slices of one tensor S = s T, T[i_0..i_{M-1}] = sum_t prod_m r_m[i_m, t]. S is
// streamed in tiles [K, N, N]: K tuples u of rows of the outer modalities 2..M-1 (W_u = the elementwise
// product of those rows) against every row i of r_0 and j of r_1, S[u, i, j] = (r_0[i] * W_u) . (s r_1[j]),
// one mm per tile. Each tile feeds all M anchors' log-sum-exps, so the forward makes one N^M d pass instead
// of M, and only those [M, N] log-sum-exps are kept: the backward recomputes the tiles.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "fusedlab/message.h"
#include "fusedlab/symile_glue.h"

namespace fusedlab {
namespace {

// elements of a [K, N, max(N, d)] tile: a few such buffers live at once, a few MB in float32. They are
// allocated once per call and reused by every tile (fresh large allocations cost a page fault per 4 KB).
constexpr int64_t kTileElements = int64_t{1} << 19;

struct Prepared {
  std::vector<at::Tensor> r;  // contiguous, in the accumulation dtype
  at::Tensor s;               // 0-dim, accumulation dtype
  int64_t M, N, d, tuples, chunk;
};

Prepared prepare(at::TensorList reps, const at::Tensor& logit_scale, int64_t chunk, const char* op) {
  check_symile_args(reps, logit_scale, op);
  FL_CHECK(chunk >= 0, "fusedlab.", op, ": chunk must be >= 0 (0 picks the tile size), got ", chunk);
  const at::Tensor& r0 = reps[0];
  Prepared p;
  p.M = static_cast<int64_t>(reps.size());
  p.N = r0.size(0);
  p.d = r0.size(1);
  const at::ScalarType acc = r0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor& r : reps) p.r.push_back(r.to(acc).contiguous());
  p.s = logit_scale.to(r0.device(), acc).reshape({});
  p.tuples = 1;
  for (int64_t m = 2; m < p.M; ++m) {
    FL_CHECK(p.tuples <= std::numeric_limits<int64_t>::max() / p.N, "fusedlab.", op,
             ": N^(M-2) overflows int64 for N = ", p.N, ", M = ", p.M);
    p.tuples *= p.N;
  }
  const int64_t auto_chunk = std::max<int64_t>(1, kTileElements / (p.N * std::max<int64_t>({p.N, p.d, 1})));
  p.chunk = std::min(chunk > 0 ? chunk : auto_chunk, p.tuples);
  return p;
}

// Row indices of each outer modality m = 2..M-1 for tuples [u0, u0 + K); the last modality varies fastest.
std::vector<at::Tensor> tuple_rows(const Prepared& p, int64_t u0, int64_t K) {
  std::vector<at::Tensor> idx(p.M - 2);
  at::Tensor u = at::arange(u0, u0 + K, at::TensorOptions().dtype(at::kLong).device(p.r[0].device()));
  for (int64_t m = p.M - 1; m >= 2; --m) {
    idx[m - 2] = u.remainder(p.N);
    u = u.floor_divide(p.N);
  }
  return idx;
}

// W [K, d]: the elementwise product of the outer modalities' rows for each tuple ([1, d] of ones for M = 2).
at::Tensor tuple_product(const Prepared& p, const std::vector<at::Tensor>& idx, std::vector<at::Tensor>* rows) {
  if (p.M == 2) return at::ones({1, p.d}, p.r[0].options());
  at::Tensor W;
  for (int64_t m = 2; m < p.M; ++m) {
    at::Tensor rm = p.r[m].index_select(0, idx[m - 2]);
    W = W.defined() ? W.mul(rm) : rm;
    if (rows) rows->push_back(rm);
  }
  return W;
}

// The leading K tuples of a work buffer sized for p.chunk, and out= ops that write into such views.
at::Tensor lead(const at::Tensor& buf, int64_t K) { return buf.narrow(0, 0, K); }
at::Tensor mul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { return at::mul_out(out, a, b); }
at::Tensor sub_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { return at::sub_out(out, a, b); }
at::Tensor mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { return at::mm_out(out, a, b); }

// S [K, N, N] for tuples [u0, u0 + K) into sbuf, with Q = r_0 * W_u [K, N, d] into qbuf (the backward needs it).
at::Tensor tile_logits(const Prepared& p, const at::Tensor& W, const at::Tensor& r1s_t, const at::Tensor& qbuf,
                       const at::Tensor& sbuf, at::Tensor* Q_out) {
  const int64_t K = W.size(0);
  at::Tensor Q = p.r[0].unsqueeze(0);
  if (p.M > 2) Q = mul_into(lead(qbuf, K), Q, W.unsqueeze(1));
  const at::Tensor S = lead(sbuf, K);
  mm_into(S.view({K * p.N, p.N}), Q.view({K * p.N, p.d}), r1s_t);
  if (Q_out) *Q_out = Q;
  return S;
}

// log sum exp over `dims` of S, shifted by its max there; T (S's shape) holds the exponentials.
at::Tensor shifted_lse(const at::Tensor& S, at::IntArrayRef dims, const at::Tensor& T) {
  const at::Tensor mx = S.amax(dims, /*keepdim=*/true);
  sub_into(T, S, mx).exp_();
  return T.sum(dims).log_().add_(mx.squeeze(dims));
}

std::tuple<at::Tensor, at::Tensor> symile_n_squared_cpu(at::TensorList reps, const at::Tensor& logit_scale,
                                                        int64_t chunk) {
  const Prepared p = prepare(reps, logit_scale, chunk, "symile_n_squared");
  const int64_t M = p.M, N = p.N;
  const auto opts = p.r[0].options();
  const at::Tensor r1s_t = p.r[1].mul(p.s).t();
  const double ninf = -std::numeric_limits<double>::infinity();
  at::Tensor lse0 = at::full({N}, ninf, opts), lse1 = at::full({N}, ninf, opts);
  at::Tensor tuple_lse = at::empty({M > 2 ? p.tuples : 0}, opts);
  const at::Tensor qbuf = at::empty({M > 2 ? p.chunk : 0, N, p.d}, opts);
  const at::Tensor sbuf = at::empty({p.chunk, N, N}, opts), tbuf = at::empty({p.chunk, N, N}, opts);
  for (int64_t u0 = 0; u0 < p.tuples; u0 += p.chunk) {
    const int64_t K = std::min(p.chunk, p.tuples - u0);
    const at::Tensor W = tuple_product(p, tuple_rows(p, u0, K), nullptr);
    const at::Tensor S = tile_logits(p, W, r1s_t, qbuf, sbuf, nullptr);
    // rows (u, i) reduced over j once serve anchor 0 and the outer anchors; anchor 1 needs its own pass
    const at::Tensor row_lse = shifted_lse(S, {2}, lead(tbuf, K)).view({K, N});
    lse0 = lse0.logaddexp(row_lse.logsumexp({0}));
    lse1 = lse1.logaddexp(shifted_lse(S, {0, 1}, lead(tbuf, K)).view({N}));
    if (M > 2) tuple_lse.narrow(0, u0, K).copy_(row_lse.logsumexp({1}));
  }
  return symile_finish_forward(p.r, p.s, lse0, lse1, tuple_lse, reps[0].scalar_type());
}

std::tuple<std::vector<at::Tensor>, at::Tensor> symile_n_squared_backward_cpu(const at::Tensor& grad,
                                                                             at::TensorList reps,
                                                                             const at::Tensor& logit_scale,
                                                                             const at::Tensor& lse, int64_t chunk) {
  const Prepared p = prepare(reps, logit_scale, chunk, "symile_n_squared_backward");
  const int64_t M = p.M, N = p.N, d = p.d;
  const auto opts = p.r[0].options();
  check_symile_backward_args(grad, lse, M, N);
  const at::Tensor L = lse.to(opts.dtype()).contiguous();
  const at::Tensor l0 = L.select(0, 0).view({1, N, 1}), l1 = L.select(0, 1).view({1, 1, N});
  const at::Tensor r1s_t = p.r[1].mul(p.s).t();

  // U_m: dL/dr_m / s, first from E = sum over anchors of exp(S - lse_anchor) (dL/dS = g (E / (M N) - D / N),
  // D the aligned-tuple indicator); the grad factor and D's term are applied after the loop
  std::vector<at::Tensor> U;
  for (int64_t m = 0; m < M; ++m) U.push_back(at::zeros({N, d}, opts));
  const at::Tensor qbuf = at::empty({M > 2 ? p.chunk : 0, N, d}, opts), hbuf = at::empty({p.chunk, N, d}, opts);
  const at::Tensor sbuf = at::empty({p.chunk, N, N}, opts), ebuf = at::empty({p.chunk, N, N}, opts);
  const at::Tensor tbuf = at::empty({M > 2 ? p.chunk : 0, N, M > 2 ? N : 0}, opts);
  const at::Tensor xbuf = at::empty({M > 2 ? p.chunk : 0, N, d}, opts);
  for (int64_t u0 = 0; u0 < p.tuples; u0 += p.chunk) {
    const int64_t K = std::min(p.chunk, p.tuples - u0);
    const std::vector<at::Tensor> idx = tuple_rows(p, u0, K);
    std::vector<at::Tensor> rows;
    const at::Tensor W = tuple_product(p, idx, &rows);
    at::Tensor Q;
    const at::Tensor S = tile_logits(p, W, r1s_t, qbuf, sbuf, &Q);
    at::Tensor E = sub_into(lead(ebuf, K), S, l0).exp_();
    if (M == 2) {
      E.add_(S.sub_(l1).exp_());  // S is not needed after this
    } else {
      E.add_(sub_into(lead(tbuf, K), S, l1).exp_());
      // the outer anchors' terms in one exp: sum_m exp(S - a_m) = exp(S - b) sum_m exp(b - a_m) with b the
      // least a_m; S <= every a_m, so no factor exceeds 1 or M - 2
      std::vector<at::Tensor> a;
      for (int64_t m = 2; m < M; ++m) a.push_back(L.select(0, m).index_select(0, idx[m - 2]));
      const at::Tensor A = at::stack(a);
      const at::Tensor b = std::get<0>(A.min(0));
      const at::Tensor w = b.unsqueeze(0).sub(A).exp_().sum(0);
      E.add_(S.sub_(b.view({K, 1, 1})).exp_().mul_(w.view({K, 1, 1})));
    }
    const at::Tensor E2 = E.view({K * N, N});
    U[1].addmm_(E2.t(), Q.view({K * N, d}));
    const at::Tensor H = lead(hbuf, K);  // H[u, i] = sum_j E[u, i, j] r_1[j]
    mm_into(H.view({K * N, d}), E2, p.r[1]);
    U[0].add_(M == 2 ? H.select(0, 0) : mul_into(lead(xbuf, K), H, W.unsqueeze(1)).sum(0));
    if (M > 2) {
      const at::Tensor gW = mul_into(lead(xbuf, K), H, p.r[0].unsqueeze(0)).sum(1);  // d/dW_u, [K, d]
      for (int64_t m = 2; m < M; ++m) {
        at::Tensor g = gW;
        for (int64_t o = 2; o < M; ++o)
          if (o != m) g = g.mul(rows[o - 2]);
        U[m].index_add_(0, idx[m - 2], g);
      }
    }
  }

  return symile_finish_backward(U, p.r, p.s, grad, reps, logit_scale);
}

// The query product is one query batch's size, so on a CPU one pass forms it (in float32, float64 for float64,
// rounded once to the inputs' dtype) and the BLAS GEMM against the candidates, which accumulates in float32
// for half types too (bf16 on the CPU's matrix units), is the whole cost.
at::Tensor mip_cpu(const at::Tensor& candidates, at::TensorList queries) {
  const int64_t B = check_mip_args(candidates, queries);
  const at::ScalarType dt = candidates.scalar_type(), acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor P = queries[0].to(acc);
  for (size_t m = 1; m < queries.size(); ++m) P = P.mul(queries[m].to(acc));
  return at::mm(P.to(dt).expand({B, candidates.size(1)}), candidates.t());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CPU, m) {
  m.impl("mip", &mip_cpu);
  m.impl("symile_n_squared", &symile_n_squared_cpu);
  m.impl("symile_n_squared_backward", &symile_n_squared_backward_cpu);
}

}  // namespace fusedlab
