// Host run of the CUDA resample kernels (tests/test_resample_cuda_sim.py drives it).
//   resample_sim resample DIR   DIR/params.txt: B K method ess_threshold elem_bytes grid shared row_bytes
//                               [seed offset: the kernel draws its uniforms (Philox) instead of reading u.bin]
//                               inputs lw.bin u.bin [state.bin]; outputs lw_out anc ess log_norm status [state_out]
//   resample_sim philox C0 C1 C2 C3 K0 K1   prints the Philox4x32-10 block of that counter and key (hex words)
//   resample_sim gather DIR     DIR/params.txt: B K row_bytes grid; inputs state.bin anc.bin;
//                               outputs out.bin (out of place), out_wide.bin (64-bit index path), inplace.bin
#include "host_sim.h"
#include "sim_io.h"

#include "fusedlab/resample_cuda.cuh"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

namespace frc = fusedlab::resample::cuda;

template <typename T>
static int run_resample(const std::string& dir, int64_t B, int K, int method, double thr, unsigned grid, bool shared,
                        int64_t row_bytes, const fusedlab::PhiloxArgs* rng) {
  auto lw = read_file(dir + "/lw.bin");
  auto u = rng ? std::vector<unsigned char>() : read_file(dir + "/u.bin");
  // NaN-poisoned: 0 is a valid value of lw_out (resampled) and ess (degenerate), so a missed write must show
  std::vector<T> lw_out(B * K, std::numeric_limits<T>::quiet_NaN());
  std::vector<int64_t> anc(B * K, -7);
  std::vector<double> ess(B, std::numeric_limits<double>::quiet_NaN()), ln(B, std::numeric_limits<double>::quiet_NaN());
  std::vector<uint8_t> status(2 * B, 0xff);  // [B, 2] flags: resampled, degenerate
  const frc::ResamplePlan plan = frc::plan_resample(B, K, method, 132);
  std::vector<double> ws_cdf(shared ? 0 : grid * static_cast<size_t>(K), 12345.0);
  std::vector<int> ws_count(shared ? 0 : grid * static_cast<size_t>(K), 777);
  frc::ResampleParams<T> p;
  p.lw = reinterpret_cast<const T*>(lw.data());
  p.u = rng ? nullptr : reinterpret_cast<const double*>(u.data());
  if (rng) p.rng = *rng;
  p.lw_out = lw_out.data();
  p.anc = anc.data();
  p.ess = ess.data();
  p.log_norm = ln.data();
  p.status = status.data();
  p.ws_cdf = shared ? nullptr : ws_cdf.data();
  p.ws_count = shared ? nullptr : ws_count.data();
  p.B = B;
  p.K = K;
  p.u_cols = method == fusedlab::resample::kSystematic ? 1 : K;
  p.method = method;
  p.ess_threshold = thr;
  const size_t smem = shared ? plan.smem : 0;
  const bool small = frc::group_threads(shared, K) == frc::kSmallThreads;  // the block size the glue launches
  const unsigned threads = small ? frc::kSmallThreads : frc::kThreads;
  std::vector<unsigned char> state, state_out;
  if (row_bytes > 0) {
    state = read_file(dir + "/state.bin");
    state_out.assign(state.size(), 0xEE);
    const frc::RowsPlan r = frc::plan_rows(state.data(), state_out.data(), row_bytes);
    const frc::RowsParams g{state.data(), state_out.data(), r.row_vecs, r.vec_bytes, r.log2_lanes};
    if (small)
      fl_sim::launch(grid, threads, smem, [&] { frc::resample_gather_kernel<T, true, frc::kSmallThreads>(p, g); });
    else if (shared)
      fl_sim::launch(grid, threads, smem, [&] { frc::resample_gather_kernel<T, true>(p, g); });
    else
      fl_sim::launch(grid, threads, smem, [&] { frc::resample_gather_kernel<T, false>(p, g); });
    write_file(dir + "/state_out.bin", state_out.data(), state_out.size());
  } else if (small) {
    fl_sim::launch(grid, threads, smem, [&] { frc::resample_kernel<T, true, frc::kSmallThreads>(p); });
  } else if (shared) {
    fl_sim::launch(grid, threads, smem, [&] { frc::resample_kernel<T, true>(p); });
  } else {
    fl_sim::launch(grid, threads, smem, [&] { frc::resample_kernel<T, false>(p); });
  }
  write_file(dir + "/lw_out.bin", lw_out.data(), lw_out.size() * sizeof(T));
  write_file(dir + "/anc.bin", anc.data(), anc.size() * sizeof(int64_t));
  write_file(dir + "/ess.bin", ess.data(), ess.size() * sizeof(double));
  write_file(dir + "/log_norm.bin", ln.data(), ln.size() * sizeof(double));
  write_file(dir + "/status.bin", status.data(), status.size());
  return 0;
}

template <typename V>
static void run_gather_typed(std::vector<unsigned char>& state, std::vector<unsigned char>& out,
                             std::vector<unsigned char>& out_wide, std::vector<unsigned char>& inplace,
                             const int64_t* anc, int64_t B, int K, const frc::RowsPlan& r, unsigned grid) {
  const V* s = reinterpret_cast<const V*>(state.data());
  fl_sim::launch(grid, frc::kThreads, 0, [&] {
    frc::gather_kernel<V, true>(s, reinterpret_cast<V*>(out.data()), anc, B * K, K, r.row_vecs, r.log2_lanes,
                                frc::FastDivU32(static_cast<uint32_t>(K)));
  });
  fl_sim::launch(grid, frc::kThreads, 0, [&] {
    frc::gather_kernel<V, false>(s, reinterpret_cast<V*>(out_wide.data()), anc, B * K, K, r.row_vecs,
                                 r.log2_lanes, frc::FastDivU32());
  });
  const size_t smem = static_cast<size_t>(K) * r.row_vecs * sizeof(V);
  fl_sim::launch(grid, frc::kThreads, smem, [&] {
    frc::gather_inplace_staged_kernel<V>(reinterpret_cast<V*>(inplace.data()), anc, B, K, r.row_vecs,
                                         r.log2_lanes);
  });
}

static int run_gather(const std::string& dir, int64_t B, int K, int64_t row_bytes, unsigned grid) {
  auto state = read_file(dir + "/state.bin");
  auto ancb = read_file(dir + "/anc.bin");
  const int64_t* anc = reinterpret_cast<const int64_t*>(ancb.data());
  std::vector<unsigned char> out(state.size(), 0xEE), out_wide(state.size(), 0xEE), inplace(state);
  const frc::RowsPlan r = frc::plan_rows(state.data(), out.data(), row_bytes);
  switch (r.vec_bytes) {
    case 16: run_gather_typed<uint4>(state, out, out_wide, inplace, anc, B, K, r, grid); break;
    case 8: run_gather_typed<uint2>(state, out, out_wide, inplace, anc, B, K, r, grid); break;
    case 4: run_gather_typed<uint32_t>(state, out, out_wide, inplace, anc, B, K, r, grid); break;
    case 2: run_gather_typed<uint16_t>(state, out, out_wide, inplace, anc, B, K, r, grid); break;
    default: run_gather_typed<uint8_t>(state, out, out_wide, inplace, anc, B, K, r, grid); break;
  }
  write_file(dir + "/out.bin", out.data(), out.size());
  write_file(dir + "/out_wide.bin", out_wide.data(), out_wide.size());
  write_file(dir + "/inplace.bin", inplace.data(), inplace.size());
  std::printf("vec_bytes=%d lanes=%d\n", r.vec_bytes, 1 << r.log2_lanes);
  return 0;
}

// FastDivU32 against plain division, the divisors and dividends near the edges included.
static int check_fastdiv() {
  const uint32_t ds[] = {1, 2, 3, 5, 7, 33, 1000, 4096, 5000, 65535, 65536, 1u << 20, (1u << 30) - 1, 1u << 30};
  uint64_t seed = 88172645463325252ull;
  for (uint32_t d : ds) {
    const frc::FastDivU32 f(d);
    for (int k = 0; k < 200000; ++k) {
      seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
      uint32_t n = static_cast<uint32_t>(seed) & 0x7fffffffu;
      if (k < 64) n = k < 32 ? static_cast<uint32_t>(k) : 0x7fffffffu - static_cast<uint32_t>(k - 32);
      if (k >= 64 && k < 128) n = d * static_cast<uint32_t>(k - 64) - 1;  // just below multiples
      if (n > 0x7fffffffu) continue;
      if (f.div(n) != n / d) {
        std::fprintf(stderr, "FastDivU32(%u).div(%u) = %u, want %u\n", d, n, f.div(n), n / d);
        return 1;
      }
    }
  }
  std::printf("fastdiv ok\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string mode = argv[1];
  if (mode == "fastdiv") return check_fastdiv();
  if (mode == "philox" && argc == 8) {
    uint32_t ctr[4];
    for (int i = 0; i < 4; ++i) ctr[i] = static_cast<uint32_t>(std::stoul(argv[2 + i], nullptr, 16));
    fusedlab::philox4x32_10(ctr, static_cast<uint32_t>(std::stoul(argv[6], nullptr, 16)),
                            static_cast<uint32_t>(std::stoul(argv[7], nullptr, 16)));
    std::printf("%08x %08x %08x %08x\n", ctr[0], ctr[1], ctr[2], ctr[3]);
    return 0;
  }
  if (argc < 3) return 2;
  const std::string dir = argv[2];
  std::ifstream pf(dir + "/params.txt");
  if (mode == "resample") {
    int64_t B, row_bytes;
    int K, method, elem, shared;
    unsigned grid;
    double thr;
    pf >> B >> K >> method >> thr >> elem >> grid >> shared >> row_bytes;
    fusedlab::PhiloxArgs rng;
    const bool draw = static_cast<bool>(pf >> rng.seed >> rng.offset);
    const fusedlab::PhiloxArgs* r = draw ? &rng : nullptr;
    return elem == 4 ? run_resample<float>(dir, B, K, method, thr, grid, shared, row_bytes, r)
                     : run_resample<double>(dir, B, K, method, thr, grid, shared, row_bytes, r);
  }
  if (mode == "gather") {
    int64_t B, row_bytes;
    int K;
    unsigned grid;
    pf >> B >> K >> row_bytes >> grid;
    return run_gather(dir, B, K, row_bytes, grid);
  }
  return 2;
}
