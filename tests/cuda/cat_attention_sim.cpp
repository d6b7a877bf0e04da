// Host run of the CUDA cat_attention kernels (tests/test_cat_attention_cuda_sim.py drives it).
//   cat_attention_sim forward DIR    DIR/params.txt: B H Hkv L Nc l D elem_bytes has_qc qk_scale scale
//                                    (elem_bytes 4: float32, 2: bfloat16); inputs q k v kc vc [qc]
//                                    (elements); outputs o lse [oc lse_c] (lse float32)
//   cat_attention_sim backward DIR   the same params; inputs q k v kc vc o lse d_o [qc oc lse_c d_oc];
//                                    outputs dq dk dv dkc dvc delta [dqc delta_c]
// Every output starts as a poison value, so a row no block wrote shows up in the comparison.
#include "host_sim.h"
#include "sim_io.h"

#include <fstream>
#include <string>

#include "sim_bf16.h"
#include "fusedlab/cat_attention.cuh"

namespace fca = fusedlab::cat::cuda;

struct Params {
  int64_t B;
  int H, Hkv, L, Nc, l, D, elem, has_qc;
  float qk_scale, scale;
};

template <typename T>
static std::vector<T> input(const std::string& dir, const char* name) {
  const std::vector<unsigned char> bytes = read_file(dir + "/" + name + ".bin");
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

template <typename T>
static void output(const std::string& dir, const char* name, const std::vector<T>& x) {
  write_file(dir + "/" + name + ".bin", x.data(), x.size() * sizeof(T));
}

template <typename T, int D>
static int run(const std::string& dir, const Params& pr, bool backward, T poison) {
  const size_t nq = static_cast<size_t>(pr.B * pr.H), nkv = static_cast<size_t>(pr.B * pr.Hkv);
  const size_t raw = nq * pr.L * D, comp = nq * pr.Nc * D, kraw = nkv * pr.L * D, kcomp = nkv * pr.Nc * D;
  const std::vector<T> q = input<T>(dir, "q"), k = input<T>(dir, "k"), v = input<T>(dir, "v"),
                       kc = input<T>(dir, "kc"), vc = input<T>(dir, "vc");
  const std::vector<T> qc = pr.has_qc ? input<T>(dir, "qc") : std::vector<T>();
  fca::AttnParams<T> p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.kc = kc.data();
  p.vc = vc.data();
  p.qc = pr.has_qc ? qc.data() : nullptr;
  p.B = pr.B;
  p.H = pr.H;
  p.Hkv = pr.Hkv;
  p.L = pr.L;
  p.Nc = pr.Nc;
  p.l = pr.l;
  p.qk_scale = pr.qk_scale;
  p.scale = pr.scale;
  const float fpoison = std::nanf("");
  if (!backward) {
    std::vector<T> o(raw, poison), oc(pr.has_qc ? comp : 0, poison);
    std::vector<float> lse(nq * pr.L, fpoison), lse_c(pr.has_qc ? nq * pr.Nc : 0, fpoison);
    p.out_o = o.data();
    p.out_oc = oc.data();
    p.lse = lse.data();
    p.lse_c = lse_c.data();
    const int64_t blocks = pr.B * pr.H * fca::query_tiles<D>(pr.L, pr.Nc, pr.has_qc);
    fl_sim::launch(static_cast<unsigned>(blocks), fca::kAttnThreads, 0, [&] { fca::attn_fwd_kernel<T, D>(p); });
    output(dir, "o", o);
    output(dir, "lse", lse);
    if (pr.has_qc) {
      output(dir, "oc", oc);
      output(dir, "lse_c", lse_c);
    }
    return 0;
  }
  const std::vector<T> o = input<T>(dir, "o"), d_o = input<T>(dir, "d_o");
  std::vector<float> lse = input<float>(dir, "lse");
  const std::vector<T> oc = pr.has_qc ? input<T>(dir, "oc") : std::vector<T>();
  const std::vector<T> d_oc = pr.has_qc ? input<T>(dir, "d_oc") : std::vector<T>();
  std::vector<float> lse_c = pr.has_qc ? input<float>(dir, "lse_c") : std::vector<float>();
  std::vector<T> dq(raw, poison), dqc(pr.has_qc ? comp : 0, poison), dk(kraw, poison), dv(kraw, poison),
      dkc(kcomp, poison), dvc(kcomp, poison);
  std::vector<float> delta(nq * pr.L, fpoison), delta_c(pr.has_qc ? nq * pr.Nc : 0, fpoison);
  p.o = o.data();
  p.d_o = d_o.data();
  p.oc = pr.has_qc ? oc.data() : nullptr;
  p.d_oc = pr.has_qc ? d_oc.data() : nullptr;
  p.lse = lse.data();
  p.lse_c = pr.has_qc ? lse_c.data() : nullptr;
  p.out_o = dq.data();
  p.out_oc = pr.has_qc ? dqc.data() : nullptr;
  p.dk = dk.data();
  p.dv = dv.data();
  p.dkc = dkc.data();
  p.dvc = dvc.data();
  p.delta = delta.data();
  p.delta_c = pr.has_qc ? delta_c.data() : nullptr;
  const int64_t q_blocks = pr.B * pr.H * fca::query_tiles<D>(pr.L, pr.Nc, pr.has_qc);
  const int64_t k_blocks = pr.B * pr.Hkv * fca::key_tiles<D>(pr.L, pr.Nc);
  // the two launches of launch_attn_backward, in stream order
  fl_sim::launch(static_cast<unsigned>(q_blocks), fca::kAttnThreads, 0, [&] { fca::attn_bwd_dq_kernel<T, D>(p); });
  fl_sim::launch(static_cast<unsigned>(k_blocks), fca::kAttnThreads, 0, [&] { fca::attn_bwd_dkv_kernel<T, D>(p); });
  output(dir, "dq", dq);
  output(dir, "dk", dk);
  output(dir, "dv", dv);
  output(dir, "dkc", dkc);
  output(dir, "dvc", dvc);
  output(dir, "delta", delta);
  if (pr.has_qc) {
    output(dir, "dqc", dqc);
    output(dir, "delta_c", delta_c);
  }
  return 0;
}

template <typename T>
static int run_dim(const std::string& dir, const Params& pr, bool backward, T poison) {
  if (pr.D == 64) return run<T, 64>(dir, pr, backward, poison);
  if (pr.D == 128) return run<T, 128>(dir, pr, backward, poison);
  std::fprintf(stderr, "head dim %d not instantiated\n", pr.D);
  return 2;
}

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1], dir = argv[2];
  if (mode != "forward" && mode != "backward") return 2;
  std::ifstream pf(dir + "/params.txt");
  Params pr;
  if (!(pf >> pr.B >> pr.H >> pr.Hkv >> pr.L >> pr.Nc >> pr.l >> pr.D >> pr.elem >> pr.has_qc >> pr.qk_scale >>
        pr.scale))
    return 2;
  const bool backward = mode == "backward";
  if (pr.elem == 4) return run_dim<float>(dir, pr, backward, 1e30f);
  if (pr.elem == 2) return run_dim<SimBf16>(dir, pr, backward, SimBf16{0x7f00});
  return 2;
}
