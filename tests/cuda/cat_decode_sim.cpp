// Host run of the CUDA cat_decode kernels (tests/test_cat_decode_cuda_sim.py drives it).
//   cat_decode_sim decode DIR   DIR/params.txt: B H Hkv S R D elem_bytes splits qk_scale
//                               (elem_bytes 4: float32, 2: bfloat16; splits 0: the launch plan's choice)
//                               inputs q kc vc k v (elements), n_slots n_raw (int64); output out.bin
//                               (elements); prints the launch plan (splits=.. heads_per_block=.. ...)
//   cat_decode_sim plan B H Hkv S R SMS   prints the launch plan for SMS multiprocessors, runs nothing
#include "host_sim.h"
#include "sim_io.h"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "sim_bf16.h"
#include "fusedlab/cat_decode.cuh"

namespace fcd = fusedlab::cat::cuda;

// Inputs are copied into 16-byte aligned buffers, as the glue guarantees on the device.
struct Aligned {
  std::vector<uint4> words;
  explicit Aligned(const std::vector<unsigned char>& bytes) : words(bytes.size() / 16 + 1) {
    std::memcpy(words.data(), bytes.data(), bytes.size());
  }
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(words.data());
  }
};

static void print_plan(const fcd::DecodePlan& plan);

template <typename T, int D, int HG>
static void run_split(const fcd::DecodeParams<T>& p, const fcd::DecodePlan& plan) {
  fl_sim::launch(static_cast<unsigned>(plan.blocks), fcd::kThreads, 0,
                 [&] { fcd::decode_split_kernel<T, D, HG>(p); });
}

template <typename T, int D>
static int run(const std::string& dir, int64_t B, int H, int Hkv, int64_t S, int64_t R, int splits, float qk_scale,
               T poison) {
  const Aligned q(read_file(dir + "/q.bin")), kc(read_file(dir + "/kc.bin")), vc(read_file(dir + "/vc.bin")),
      k(read_file(dir + "/k.bin")), v(read_file(dir + "/v.bin")), ns(read_file(dir + "/n_slots.bin")),
      nr(read_file(dir + "/n_raw.bin"));
  const fcd::DecodePlan plan = fcd::plan_decode(B, H, Hkv, S, R, 132, splits);
  std::vector<T> out(static_cast<size_t>(B * H * D), poison);  // a missed write shows as the poison value
  // NaN partials: a combine that read a partial no block wrote would return NaN
  std::vector<float> part_acc(static_cast<size_t>(B * H * plan.splits * D), std::nanf(""));
  std::vector<float> part_ml(static_cast<size_t>(B * H * plan.splits * 2), std::nanf(""));
  fcd::DecodeParams<T> p;
  p.q = q.as<T>();
  p.kc = kc.as<T>();
  p.vc = vc.as<T>();
  p.k = k.as<T>();
  p.v = v.as<T>();
  p.n_slots = ns.as<int64_t>();
  p.n_raw = nr.as<int64_t>();
  p.out = out.data();
  p.part_acc = part_acc.data();
  p.part_ml = part_ml.data();
  p.B = B;
  p.S = S;
  p.R = R;
  p.H = H;
  p.Hkv = Hkv;
  p.head_groups = plan.head_groups;
  p.splits = plan.splits;
  p.qk_scale = qk_scale;
  switch (plan.heads_per_block) {
    case 1: run_split<T, D, 1>(p, plan); break;
    case 2: run_split<T, D, 2>(p, plan); break;
    default: run_split<T, D, fcd::kMaxHeadsPerBlock>(p, plan); break;
  }
  if (plan.splits > 1)
    fl_sim::launch(static_cast<unsigned>(plan.combine_blocks), fcd::kThreads, 0, [&] {
      fcd::decode_combine_kernel<T, D>(p.part_acc, p.part_ml, p.out, B * H, plan.splits);
    });
  write_file(dir + "/out.bin", out.data(), out.size() * sizeof(T));
  print_plan(plan);
  return 0;
}

template <typename T>
static int run_dim(const std::string& dir, int64_t B, int H, int Hkv, int64_t S, int64_t R, int D, int splits,
                   float qk_scale, T poison) {
  if (D == 64) return run<T, 64>(dir, B, H, Hkv, S, R, splits, qk_scale, poison);
  if (D == 128) return run<T, 128>(dir, B, H, Hkv, S, R, splits, qk_scale, poison);
  std::fprintf(stderr, "head dim %d not instantiated\n", D);
  return 2;
}

static void print_plan(const fcd::DecodePlan& plan) {
  std::printf("splits=%d heads_per_block=%d head_groups=%d blocks=%lld combine_blocks=%lld\n", plan.splits,
              plan.heads_per_block, plan.head_groups, static_cast<long long>(plan.blocks),
              static_cast<long long>(plan.combine_blocks));
}

int main(int argc, char** argv) {
  if (argc == 8 && std::string(argv[1]) == "plan") {
    const auto arg = [&](int i) { return std::stoll(argv[i]); };
    print_plan(fcd::plan_decode(arg(2), arg(3), arg(4), arg(5), arg(6), static_cast<int>(arg(7))));
    return 0;
  }
  if (argc < 3 || std::string(argv[1]) != "decode") return 2;
  const std::string dir = argv[2];
  std::ifstream pf(dir + "/params.txt");
  int64_t B, S, R;
  int H, Hkv, D, elem, splits;
  float qk_scale;
  if (!(pf >> B >> H >> Hkv >> S >> R >> D >> elem >> splits >> qk_scale)) return 2;
  if (elem == 4) return run_dim<float>(dir, B, H, Hkv, S, R, D, splits, qk_scale, 1e30f);
  if (elem == 2) return run_dim<SimBf16>(dir, B, H, Hkv, S, R, D, splits, qk_scale, SimBf16{0x7f00});
  return 2;
}
