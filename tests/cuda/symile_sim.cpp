// Host run of the CUDA symile kernels (tests/test_symile_cuda_sim.py drives it).
//   symile_sim forward DIR    DIR/params.txt: M N d elem_bytes sms (elem_bytes 4: float32, 2: bfloat16; sms
//                             sizes the launch plan); inputs r0.bin .. r{M-1}.bin (elements), scale.bin
//                             (float32); outputs row_part, col_part, tuple_part ((max, sum) float32 pairs);
//                             prints the plan (chunks=.. u_chunk=.. row_groups=.. tiles_per_group=..)
//   symile_sim backward DIR   the same, plus lse.bin [M, N] float32; outputs U0.bin .. U{M-1}.bin (float32)
//   symile_sim mip DIR        DIR/params.txt: nq B C d elem_bytes two_d_0 .. two_d_{nq-1} (1: query m is
//                             [B, d], 0: [d]); inputs cand.bin, q0.bin ..; output out.bin [B, C] (elements)
// Every output starts as a poison value, so an entry no block wrote shows up in the comparison.
#include "host_sim.h"
#include "sim_io.h"

#include <fstream>
#include <string>

#include "sim_bf16.h"
#include "fusedlab/symile_cuda.cuh"

namespace fsc = fusedlab::symile::cuda;

template <typename T>
static std::vector<T> input(const std::string& path) {
  const std::vector<unsigned char> bytes = read_file(path);
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

template <typename T>
static int run(const std::string& dir, bool backward, int M, int N, int d, int sms) {
  std::vector<std::vector<T>> reps;
  for (int m = 0; m < M; ++m) reps.push_back(input<T>(dir + "/r" + std::to_string(m) + ".bin"));
  const std::vector<float> scale = input<float>(dir + "/scale.bin");
  int64_t U = 1;
  for (int m = 2; m < M; ++m) U *= N;
  const fsc::SymilePlan plan = fsc::plan_symile(N, U, sms);
  fsc::SymileParams<T> p{};
  for (int m = 0; m < M; ++m) p.r[m] = reps[m].data();
  p.scale = scale.data();
  p.M = M;
  p.N = N;
  p.d = d;
  p.U = static_cast<int>(U);  // the tests stay far below 2^31 tuples
  p.u_chunk = plan.u_chunk;
  p.row_groups = plan.row_groups;
  p.tiles_per_group = plan.tiles_per_group;
  std::printf("chunks=%lld u_chunk=%lld row_groups=%d tiles_per_group=%d blocks=%lld\n",
              static_cast<long long>(plan.chunks), static_cast<long long>(plan.u_chunk), plan.row_groups,
              plan.tiles_per_group, static_cast<long long>(plan.blocks));
  if (!backward) {
    const float2 poison{std::nanf(""), std::nanf("")};
    std::vector<float2> row(static_cast<size_t>(plan.chunks * N), poison);
    std::vector<float2> col(static_cast<size_t>(plan.blocks * N), poison);
    std::vector<float2> tup(static_cast<size_t>(plan.row_groups * U), poison);
    p.row_part = row.data();
    p.col_part = col.data();
    p.tuple_part = tup.data();
    fl_sim::launch(static_cast<unsigned>(plan.blocks), fsc::kThreads, 0, [&] { fsc::symile_fwd_kernel<T>(p); });
    write_file(dir + "/row_part.bin", row.data(), row.size() * sizeof(float2));
    write_file(dir + "/col_part.bin", col.data(), col.size() * sizeof(float2));
    write_file(dir + "/tuple_part.bin", tup.data(), tup.size() * sizeof(float2));
    return 0;
  }
  const std::vector<float> lse = input<float>(dir + "/lse.bin");
  p.lse = lse.data();
  std::vector<std::vector<float>> sums(M, std::vector<float>(static_cast<size_t>(N) * d, 0.0f));
  for (int m = 0; m < M; ++m) p.grad_sum[m] = sums[m].data();
  fl_sim::launch(static_cast<unsigned>(plan.blocks), fsc::kThreads, 0, [&] { fsc::symile_bwd_kernel<T>(p); });
  for (int m = 0; m < M; ++m)
    write_file(dir + "/U" + std::to_string(m) + ".bin", sums[m].data(), sums[m].size() * sizeof(float));
  return 0;
}

template <typename T>
static int run_mip(const std::string& dir, std::ifstream& pf, T poison) {
  fsc::MipParams<T> p{};
  if (!(pf >> p.nq >> p.B >> p.C >> p.d) || p.nq < 1 || p.nq > fsc::kMaxQueries) return 2;
  int elem;
  pf >> elem;
  const std::vector<T> cand = input<T>(dir + "/cand.bin");
  std::vector<std::vector<T>> qs;
  for (int m = 0; m < p.nq; ++m) qs.push_back(input<T>(dir + "/q" + std::to_string(m) + ".bin"));
  for (int m = 0; m < p.nq; ++m) {
    int two_d;
    pf >> two_d;
    p.queries[m] = qs[m].data();
    p.q_stride[m] = two_d ? p.d : 0;
  }
  std::vector<T> out(static_cast<size_t>(p.B) * p.C, poison);
  p.cand = cand.data();
  p.out = out.data();
  fl_sim::launch(static_cast<unsigned>(fsc::mip_blocks(p.B, p.C)), fsc::kThreads, 0, [&] { fsc::mip_kernel<T>(p); });
  write_file(dir + "/out.bin", out.data(), out.size() * sizeof(T));
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1], dir = argv[2];
  std::ifstream pf(dir + "/params.txt");
  if (mode == "mip") {
    int nq, B, C, d, elem;
    std::ifstream peek(dir + "/params.txt");
    if (!(peek >> nq >> B >> C >> d >> elem)) return 2;
    if (elem == 4) return run_mip<float>(dir, pf, 1e30f);
    if (elem == 2) return run_mip<SimBf16>(dir, pf, SimBf16{0x7f00});
    return 2;
  }
  if (mode != "forward" && mode != "backward") return 2;
  int M, N, d, elem, sms;
  if (!(pf >> M >> N >> d >> elem >> sms) || M < 2 || M > fsc::kMaxModalities) return 2;
  const bool backward = mode == "backward";
  if (elem == 4) return run<float>(dir, backward, M, N, d, sms);
  if (elem == 2) return run<SimBf16>(dir, backward, M, N, d, sms);
  return 2;
}
