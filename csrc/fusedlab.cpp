// Every op schema of the fusedlab library, in one place. Kernels register per backend in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd live in python/fusedlab/ops.
// The Python module that loads them is csrc/python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(fusedlab, m) {
  // ---- resample: batched particle resampling (python/fusedlab/reference/resample.py defines the semantics).
  // The floating-point output comes first: opcheck's autograd test sums the outputs in order. status is
  // [B, 2] uint8, 0 or 1: the resampled and degenerate flags, which the wrapper views as bool. Without
  // uniforms the op draws them from `generator` (the device's default one when None): on the CPU the values
  // torch.rand would give; on CUDA inside the kernel (Philox, csrc/include/fusedlab/philox.h), so the call is
  // one launch. With raise_degenerate, a group without a finite log-weight is a ValueError naming it (the
  // wrapper's on_degenerate="raise"; on CUDA a synchronization), after the outputs are computed.
  m.def("resample(Tensor log_weights, Tensor? uniforms, str method, float ess_threshold, "
        "Generator? generator=None, bool raise_degenerate=False) -> "
        "(Tensor log_weights_out, Tensor ancestors, Tensor ess, Tensor log_norm, Tensor status)");
  // resample, then reorder a per-particle state [B, K, ...] by the ancestors, in one pass per group.
  m.def("resample_gather(Tensor log_weights, Tensor? uniforms, str method, float ess_threshold, Tensor state, "
        "Generator? generator=None, bool raise_degenerate=False) -> "
        "(Tensor log_weights_out, Tensor ancestors, Tensor ess, Tensor log_norm, Tensor status, Tensor state_out)");
  m.def("gather(Tensor state, Tensor ancestors) -> Tensor");
  // one Feynman-Kac steering step (python/fusedlab/smc/fk.py), in place on the run's bookkeeping: the
  // potential ("diff", "max", "add", "rt") from float32 or float64 rewards [B*K] (NaN read as -inf) and the
  // running reward state, the log-weights advanced and resampled, the latents (FK layout [B*K, ...]) moved
  // by the ancestors, r_state and applied (the log-potentials applied so far; left untouched for "diff",
  // whose final step needs none) moved with them, and the step's log mean weight added to log_norm [B].
  // Row `row` of ess_history and resampled_history [S, B] (float64, bool) receives the step's ESS and
  // resampled flags: a run's trace lives in two buffers allocated before its first step. Every argument is
  // checked before anything is updated or drawn. Without uniforms they are drawn from the generator (as
  // torch.rand draws them). With raise_degenerate, a group left without a finite weight is a ValueError
  // naming it. Returns (ancestors, state_out, rewards moved by the ancestors (float64; at the last step only,
  // empty before)).
  m.def("fk_step(Tensor(a!) log_weights, Tensor rewards, Tensor(b!) r_state, Tensor(c!) applied, "
        "Tensor(d!) log_norm, Tensor(e!) ess_history, Tensor(f!) resampled_history, int row, Tensor state, "
        "Tensor? uniforms, Generator? generator, str potential, float lam, bool first, bool last, str method, "
        "float ess_threshold, bool raise_degenerate) -> (Tensor, Tensor, Tensor)");
  m.def("gather_(Tensor(a!) state, Tensor ancestors) -> ()");

  // ---- newton_schulz: Muon's orthogonalization (python/fusedlab/reference/newton_schulz.py). `coefficients`
  // holds (a, b, c) for each step; the result is in `dtype`, the computation dtype.
  m.def("newton_schulz(Tensor G, float[] coefficients, float norm_scale, float eps, ScalarType dtype) -> Tensor");
  // Muon's step for a batch of same-shaped contiguous float32 parameters (python/fusedlab/optim/muon.py):
  // buf <- lerp(buf, g, 1 - momentum); update = lerp(g, buf, momentum) (nesterov) or buf, viewed as
  // [rows, -1]; O = newton_schulz(update); p <- p (1 - lr weight_decay) - step_lr O. Updates params and bufs.
  // `workspace`, a uint8 CPU tensor the caller keeps between steps, holds the iteration's buffers (replaced
  // by a larger one when too small); without it they are made for the call.
  m.def("muon_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, float momentum, bool nesterov, "
        "float[] coefficients, float norm_scale, float eps, ScalarType dtype, float lr, float weight_decay, "
        "float step_lr, Tensor(c!)? workspace=None) -> ()");

  // ---- symile: the Symile contrastive loss (python/fusedlab/reference/symile.py). "n_squared" negatives for
  // M = len(reps) modalities of shape [N, d]; logit_scale is the (already exponentiated) one-element scale.
  // Returns the loss (dtype of reps) and the [M, N] per-anchor log-sum-exps the backward reuses; `chunk` is
  // the number of outer-modality tuples per tile (0: sized automatically).
  m.def("symile_n_squared(Tensor[] reps, Tensor logit_scale, int chunk) -> (Tensor loss, Tensor lse)");
  // MIP scores [B, C] of candidates [C, d] against the elementwise product of the queries ([B, d] or [d],
  // candidates' dtype and device; B = 1 when every query is 1-D), accumulated in fp32 (float64 for float64).
  m.def("mip(Tensor candidates, Tensor[] queries) -> Tensor");
  m.def("symile_n_squared_backward(Tensor grad, Tensor[] reps, Tensor logit_scale, Tensor lse, int chunk) -> "
        "(Tensor[] grad_reps, Tensor grad_logit_scale)");

  // ---- cat: CAT's compress-attend attention (python/fusedlab/reference/cat.py). Raw queries q [B, H, L, d]
  // see the compressed slots kc/vc [B, Hkv, Nc, d] up to their chunk and the causal prefix of their chunk of
  // k/v [B, Hkv, L, d]; optional compressed queries qc [B, H, Nc, d] see slots 0..c. Returns o, the
  // log-sum-exp [B, H, L] (float32; float64 for float64 inputs), and oc, lse_c (0 rows without qc). The
  // backward returns dq, dk, dv, dkc, dvc and, with qc, dqc.
  m.def("cat_attention(Tensor q, Tensor k, Tensor v, Tensor kc, Tensor vc, Tensor? qc, int chunk_size, "
        "float scale) -> (Tensor o, Tensor lse, Tensor oc, Tensor lse_c)");
  m.def("cat_attention_backward(Tensor grad_o, Tensor? grad_oc, Tensor q, Tensor k, Tensor v, Tensor kc, "
        "Tensor vc, Tensor? qc, Tensor o, Tensor lse, Tensor oc, Tensor lse_c, int chunk_size, float scale) -> "
        "Tensor[]");
  // One generation step (python/fusedlab/reference/cat.py, cat_decode): per sequence b and query head h, q[b, h]
  // (q [B, H, d]) attends in one softmax to the first n_slots[b] compressed slots of kc/vc [B, Hkv, S, d] and the
  // first n_raw[b] raw keys of the current chunk k/v [B, Hkv, R, d] (kv head h / (H / Hkv); n_slots, n_raw
  // integer [B]). Returns [B, H, d] in q's dtype; fp32 accumulation (float64 for float64 on the CPU). No
  // keys at all (n_slots[b] = n_raw[b] = 0) gives NaN, a softmax over nothing. Inference only: no autograd.
  m.def("cat_decode(Tensor q, Tensor kc, Tensor vc, Tensor n_slots, Tensor k, Tensor v, Tensor n_raw, "
        "float scale) -> Tensor");
}
