// C++ CPU kernels of the cat family: CAT's compress-attend attention, forward and backward.
// Semantics: python/fusedlab/reference/cat.py.
//
// The raw queries are processed in blocks of whole chunks. A block's queries see the compressed slots
// 0..(its last chunk) and, chunk by chunk, the causal prefix of their own chunk, so each block costs one
// [rows x slots] product and one batch of [l x l] chunk products, at BLAS speed; nothing of size L x L or
// L x Nc is ever formed (the slot products of a block stop at its last chunk, which also halves them on
// average). The softmax is one per query over both parts (shared max and sum); the log-sum-exp is saved and
// the backward recomputes the probabilities from it, flash-style. Query heads are folded into their kv
// head's group, so grouped-query attention needs no copies of k and v. Half inputs compute in float32.
//
// cat_decode (one query per sequence against a compressed cache, generation) is a plain loop per (b, h): a
// few hundred keys per query, so the scores, their max and the weighted sum of values are computed directly,
// in float64 for float64 inputs and float32 otherwise, over exactly the filled slots and raw keys.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "fusedlab/checks.h"

namespace fusedlab {
namespace {

// rows per block: whole chunks, about this many query rows (bounds the block's score tensors)
constexpr int64_t kBlockRows = 512;

struct Shapes : CatAttentionShapes {
  int64_t rows_per_block;
  at::ScalarType compute;
};

Shapes check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
             const at::Tensor& vc, const c10::optional<at::Tensor>& qc, int64_t l, double scale, const char* op) {
  Shapes s;
  static_cast<CatAttentionShapes&>(s) = check_cat_attention_args(q, k, v, kc, vc, qc, l, scale, op);
  s.rows_per_block = std::max<int64_t>(1, kBlockRows / l) * l;
  s.compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return s;
}

// [B, H, T, d] (contiguous, compute dtype) viewed as [B, Hkv, G, T, d]
at::Tensor grouped(const at::Tensor& t, const Shapes& s) {
  return t.view({s.B, s.Hkv, s.G, t.size(2), s.d});
}

// Rows [r0, r1) of a [..., T, d] tensor, zero-padded at the end to n_chunks * l rows, as [..., n_chunks, l, d]
at::Tensor chunked(const at::Tensor& t, int64_t r0, int64_t r1, int64_t l) {
  const int64_t n = (r1 - r0 + l - 1) / l;
  auto rows = t.narrow(-2, r0, r1 - r0);
  if (n * l != r1 - r0) rows = at::constant_pad_nd(rows, {0, 0, 0, n * l - (r1 - r0)});
  auto sizes = rows.sizes().vec();
  sizes.pop_back();
  sizes.pop_back();
  sizes.insert(sizes.end(), {n, l, rows.size(-1)});
  return rows.reshape(sizes);
}

// The masks of one block of raw queries [r0, r1): slot visibility [R, ns] and the chunk-causal mask
// [n, l, l] (false where the key or the query is padding). True = seen.
std::pair<at::Tensor, at::Tensor> block_masks(int64_t r0, int64_t r1, int64_t ns, const Shapes& s) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto rows = at::arange(r0, r1, opts);
  auto slot_seen = at::arange(ns, opts).unsqueeze(0) <= at::floor_divide(rows, s.l).unsqueeze(1);
  const int64_t n = (r1 - r0 + s.l - 1) / s.l;
  auto pos = at::arange(n * s.l, opts).view({n, s.l});
  auto valid = (pos + r0) < r1;
  auto j = at::arange(s.l, opts);
  auto causal = j.unsqueeze(0) <= j.unsqueeze(1);  // [l (query), l (key)]
  auto raw_seen = causal.unsqueeze(0) & valid.unsqueeze(2) & valid.unsqueeze(1);
  return {slot_seen, raw_seen};
}

// Scores of one block: S1 [B, Hkv, G, R, ns] over slots, S2 [B, Hkv, G, n, l, l] over raw keys (masked
// entries -inf), and the per-query log-sum-exp over both [B, Hkv, G, R].
struct BlockScores {
  at::Tensor s1, s2, lse;
};

BlockScores block_scores(const at::Tensor& qb, const at::Tensor& qb_chunks, const at::Tensor& kc_ns,
                         const at::Tensor& k_chunks, const at::Tensor& slot_seen, const at::Tensor& raw_seen,
                         double scale, int64_t R) {
  const double ninf = -std::numeric_limits<double>::infinity();
  // qb [B, Hkv, G, R, d] x kc_ns [B, Hkv, 1, d, ns]
  auto s1 = at::matmul(qb, kc_ns.unsqueeze(2).transpose(-1, -2)).mul_(scale).masked_fill_(~slot_seen, ninf);
  // qb_chunks [B, Hkv, G, n, l, d] x k_chunks [B, Hkv, 1, n, d, l]
  auto s2 = at::matmul(qb_chunks, k_chunks.unsqueeze(2).transpose(-1, -2)).mul_(scale).masked_fill_(~raw_seen, ninf);
  auto s2_rows = s2.flatten(3, 4).narrow(3, 0, R);  // [B, Hkv, G, R, l]
  auto m = at::maximum(s1.amax(-1), s2_rows.amax(-1));  // finite: slot 0 is seen by every query
  auto sum = (s1 - m.unsqueeze(-1)).exp_().sum(-1) + (s2_rows - m.unsqueeze(-1)).exp_().sum(-1);
  return {s1, s2, m + sum.log_()};
}

// Compressed queries: a causal softmax over the slots. Returns (S, lse) with S [B, Hkv, G, Nc, Nc].
std::pair<at::Tensor, at::Tensor> compressed_scores(const at::Tensor& qcg, const at::Tensor& kc, double scale) {
  const int64_t Nc = kc.size(2);
  auto c = at::arange(Nc, at::TensorOptions().dtype(at::kLong));
  auto seen = c.unsqueeze(0) <= c.unsqueeze(1);
  auto s = at::matmul(qcg, kc.unsqueeze(2).transpose(-1, -2)).mul_(scale)
               .masked_fill_(~seen, -std::numeric_limits<double>::infinity());
  return {s, at::logsumexp(s, -1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cat_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kc_in,
    const at::Tensor& vc_in, const c10::optional<at::Tensor>& qc_in, int64_t chunk_size, double scale) {
  const Shapes s = check(q_in, k_in, v_in, kc_in, vc_in, qc_in, chunk_size, scale, "cat_attention");
  auto prep = [&](const at::Tensor& t) { return t.to(s.compute).contiguous(); };
  auto q = prep(q_in), k = prep(k_in), v = prep(v_in), kc = prep(kc_in), vc = prep(vc_in);
  auto qg = grouped(q, s);
  auto o = at::empty({s.B, s.Hkv, s.G, s.L, s.d}, q.options());
  auto lse = at::empty({s.B, s.Hkv, s.G, s.L}, q.options());
  for (int64_t r0 = 0; r0 < s.L; r0 += s.rows_per_block) {
    const int64_t r1 = std::min(s.L, r0 + s.rows_per_block), R = r1 - r0, ns = (r1 - 1) / s.l + 1;
    auto [slot_seen, raw_seen] = block_masks(r0, r1, ns, s);
    auto qb = qg.narrow(3, r0, R);
    auto sc = block_scores(qb, chunked(qg, r0, r1, s.l), kc.narrow(2, 0, ns), chunked(k, r0, r1, s.l), slot_seen,
                           raw_seen, scale, R);
    auto p1 = (sc.s1 - sc.lse.unsqueeze(-1)).exp_();
    auto lse_chunks = at::constant_pad_nd(sc.lse, {0, sc.s2.size(3) * s.l - R}).view(
        {s.B, s.Hkv, s.G, sc.s2.size(3), s.l, 1});
    auto p2 = (sc.s2 - lse_chunks).exp_();
    auto ob = at::matmul(p1, vc.narrow(2, 0, ns).unsqueeze(2)) +
              at::matmul(p2, chunked(v, r0, r1, s.l).unsqueeze(2)).flatten(3, 4).narrow(3, 0, R);
    o.narrow(3, r0, R).copy_(ob);
    lse.narrow(3, r0, R).copy_(sc.lse);
  }
  auto out_o = o.view({s.B, s.H, s.L, s.d}).to(q_in.scalar_type());
  auto out_lse = lse.view({s.B, s.H, s.L});
  if (!qc_in.has_value())
    return {out_o, out_lse, at::empty({s.B, s.H, 0, s.d}, q_in.options()), at::empty({s.B, s.H, 0}, lse.options())};
  auto [sc_c, lse_c] = compressed_scores(grouped(prep(*qc_in), s), kc, scale);
  auto oc = at::matmul((sc_c - lse_c.unsqueeze(-1)).exp_(), vc.unsqueeze(2));
  return {out_o, out_lse, oc.view({s.B, s.H, s.Nc, s.d}).to(q_in.scalar_type()), lse_c.view({s.B, s.H, s.Nc})};
}

std::vector<at::Tensor> cat_attention_backward_cpu(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& doc_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& kc_in, const at::Tensor& vc_in, const c10::optional<at::Tensor>& qc_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, const at::Tensor& oc_in, const at::Tensor& lse_c_in,
    int64_t chunk_size, double scale) {
  const Shapes s = check(q_in, k_in, v_in, kc_in, vc_in, qc_in, chunk_size, scale, "cat_attention_backward");
  FL_CHECK(qc_in.has_value() == doc_in.has_value(), "fusedlab.cat_attention_backward: doc must be given "
           "exactly when qc is");
  auto prep = [&](const at::Tensor& t) { return t.to(s.compute).contiguous(); };
  auto q = prep(q_in), k = prep(k_in), v = prep(v_in), kc = prep(kc_in), vc = prep(vc_in);
  auto qg = grouped(q, s), dog = grouped(prep(do_in), s);
  auto lse = prep(lse_in).view({s.B, s.Hkv, s.G, s.L});
  auto delta = (grouped(prep(o_in), s) * dog).sum(-1);  // [B, Hkv, G, L]
  auto dq = at::empty_like(qg);
  auto dk = at::empty_like(k), dv = at::empty_like(v);
  auto dkc = at::zeros_like(kc), dvc = at::zeros_like(vc);
  for (int64_t r0 = 0; r0 < s.L; r0 += s.rows_per_block) {
    const int64_t r1 = std::min(s.L, r0 + s.rows_per_block), R = r1 - r0, ns = (r1 - 1) / s.l + 1;
    const int64_t n = (R + s.l - 1) / s.l;
    auto [slot_seen, raw_seen] = block_masks(r0, r1, ns, s);
    auto kc_ns = kc.narrow(2, 0, ns).unsqueeze(2), vc_ns = vc.narrow(2, 0, ns).unsqueeze(2);
    auto k_ch = chunked(k, r0, r1, s.l).unsqueeze(2), v_ch = chunked(v, r0, r1, s.l).unsqueeze(2);
    auto qb = qg.narrow(3, r0, R), q_ch = chunked(qg, r0, r1, s.l);
    auto do_b = dog.narrow(3, r0, R), do_ch = chunked(dog, r0, r1, s.l);
    auto lse_b = lse.narrow(3, r0, R), delta_b = delta.narrow(3, r0, R);
    auto pad = [&](const at::Tensor& t) {  // [B, Hkv, G, R] -> [B, Hkv, G, n, l, 1]
      return at::constant_pad_nd(t, {0, n * s.l - R}).view({s.B, s.Hkv, s.G, n, s.l, 1});
    };
    const double ninf = -std::numeric_limits<double>::infinity();
    // probabilities recomputed from the saved log-sum-exp
    auto p1 = at::matmul(qb, kc_ns.transpose(-1, -2)).mul_(scale).masked_fill_(~slot_seen, ninf)
                  .sub_(lse_b.unsqueeze(-1)).exp_();
    auto p2 = at::matmul(q_ch, k_ch.transpose(-1, -2)).mul_(scale).masked_fill_(~raw_seen, ninf)
                  .sub_(pad(lse_b)).exp_();
    // dS = P (dP - delta), dP = dO V^T
    auto ds1 = p1 * (at::matmul(do_b, vc_ns.transpose(-1, -2)) - delta_b.unsqueeze(-1));
    auto ds2 = p2 * (at::matmul(do_ch, v_ch.transpose(-1, -2)) - pad(delta_b));
    dq.narrow(3, r0, R).copy_((at::matmul(ds1, kc_ns) + at::matmul(ds2, k_ch).flatten(3, 4).narrow(3, 0, R)) * scale);
    // slots: sum over the group's heads; raw keys: this block's rows are exactly its keys
    dkc.narrow(2, 0, ns).add_(at::matmul(ds1.transpose(-1, -2), qb).sum(2), scale);
    dvc.narrow(2, 0, ns).add_(at::matmul(p1.transpose(-1, -2), do_b).sum(2));
    auto dk_ch = at::matmul(ds2.transpose(-1, -2), q_ch).sum(2).mul_(scale);  // [B, Hkv, n, l, d]
    auto dv_ch = at::matmul(p2.transpose(-1, -2), do_ch).sum(2);
    dk.narrow(2, r0, R).copy_(dk_ch.flatten(2, 3).narrow(2, 0, R));
    dv.narrow(2, r0, R).copy_(dv_ch.flatten(2, 3).narrow(2, 0, R));
  }
  std::vector<at::Tensor> grads;
  if (qc_in.has_value()) {
    auto qcg = grouped(prep(*qc_in), s), docg = grouped(prep(*doc_in), s);
    auto lse_c = prep(lse_c_in).view({s.B, s.Hkv, s.G, s.Nc});
    auto c = at::arange(s.Nc, at::TensorOptions().dtype(at::kLong));
    auto seen = c.unsqueeze(0) <= c.unsqueeze(1);
    auto pc = at::matmul(qcg, kc.unsqueeze(2).transpose(-1, -2)).mul_(scale)
                  .masked_fill_(~seen, -std::numeric_limits<double>::infinity()).sub_(lse_c.unsqueeze(-1)).exp_();
    auto delta_c = (grouped(prep(oc_in), s) * docg).sum(-1);
    auto dsc = pc * (at::matmul(docg, vc.unsqueeze(2).transpose(-1, -2)) - delta_c.unsqueeze(-1));
    auto dqc = at::matmul(dsc, kc.unsqueeze(2)).mul_(scale);
    dkc.add_(at::matmul(dsc.transpose(-1, -2), qcg).sum(2), scale);
    dvc.add_(at::matmul(pc.transpose(-1, -2), docg).sum(2));
    grads.push_back(dqc.view({s.B, s.H, s.Nc, s.d}).to(qc_in->scalar_type()));
  }
  const auto dt = q_in.scalar_type();
  std::vector<at::Tensor> out = {dq.view({s.B, s.H, s.L, s.d}).to(dt), dk.to(dt), dv.to(dt), dkc.to(dt), dvc.to(dt)};
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}

at::Tensor cat_decode_cpu(const at::Tensor& q_in, const at::Tensor& kc_in, const at::Tensor& vc_in,
                          const at::Tensor& n_slots_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& n_raw_in, double scale) {
  check_cat_decode_args(q_in, kc_in, vc_in, n_slots_in, k_in, v_in, n_raw_in, scale);
  auto q = q_in.contiguous(), kc = kc_in.contiguous(), vc = vc_in.contiguous(), k = k_in.contiguous(),
       v = v_in.contiguous();
  auto ns_t = n_slots_in.to(at::kLong).contiguous(), nr_t = n_raw_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), Hkv = kc.size(1), S = kc.size(2), R = k.size(2);
  const int64_t* ns = ns_t.data_ptr<int64_t>();
  const int64_t* nr = nr_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    FL_CHECK(ns[b] >= 0 && ns[b] <= S, "fusedlab.cat_decode: n_slots must lie in [0, ", S, "], got n_slots[", b,
             "] = ", ns[b]);
    FL_CHECK(nr[b] >= 0 && nr[b] <= R, "fusedlab.cat_decode: n_raw must lie in [0, ", R, "], got n_raw[", b,
             "] = ", nr[b]);
  }
  auto out = at::empty_like(q);
  if (out.numel() == 0) return out;
  const int64_t G = H / Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fusedlab_cat_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t *kcp = kc.data_ptr<scalar_t>(), *vcp = vc.data_ptr<scalar_t>();
    const scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (S + R) * d));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qv(d), acc(d), s(S + R);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, hkv = (bh % H) / G, n_s = ns[b], n_r = nr[b];
        for (int64_t e = 0; e < d; ++e) qv[e] = static_cast<acc_t>(qp[bh * d + e]);
        // the filled rows of both streams, as one key list: slots, then raw keys
        auto row = [&](const scalar_t* slots, const scalar_t* raw, int64_t j) {
          return j < n_s ? slots + ((b * Hkv + hkv) * S + j) * d : raw + ((b * Hkv + hkv) * R + (j - n_s)) * d;
        };
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n_s + n_r; ++j) {
          const scalar_t* kr = row(kcp, kp, j);
          acc_t dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += qv[e] * static_cast<acc_t>(kr[e]);
          s[j] = dot * static_cast<acc_t>(scale);
          mx = std::max(mx, s[j]);
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t sum = 0;
        for (int64_t j = 0; j < n_s + n_r; ++j) {
          const acc_t p = std::exp(s[j] - mx);
          const scalar_t* vr = row(vcp, vp, j);
          sum += p;
          for (int64_t e = 0; e < d; ++e) acc[e] += p * static_cast<acc_t>(vr[e]);
        }
        // no keys: 0 / 0 = NaN, as the reference's softmax over nothing
        for (int64_t e = 0; e < d; ++e) op[bh * d + e] = static_cast<scalar_t>(acc[e] / sum);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CPU, m) {
  m.impl("cat_attention", &cat_attention_cpu);
  m.impl("cat_attention_backward", &cat_attention_backward_cpu);
  m.impl("cat_decode", &cat_decode_cpu);
}

}  // namespace fusedlab
