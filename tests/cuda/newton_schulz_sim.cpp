// Host run of the CUDA newton_schulz kernels (tests/test_newton_schulz_cuda_sim.py drives it).
//   newton_schulz_sim prologue DIR   DIR/cases.txt, one case a line:
//                                    in out batch rows cols transpose sm_count min_chunk norm_scale eps
//                                    (dtype codes 0 bf16, 1 fp16, 2 float32, 3 float64); input src_I.bin;
//                                    outputs dst_I.bin, partials_I.bin, plan_I.txt (chunks chunk_len groups)
//   newton_schulz_sim transpose DIR  DIR/cases.txt: elem_bytes batch rows cols sm_count; src_I.bin -> dst_I.bin
//   newton_schulz_sim convert DIR    floats.bin (float32) -> bf16.bin, fp16.bin (the host conversions);
//                                    every half pattern -> fp16_widened.bin (float32)
#include "host_sim.h"
#include "sim_io.h"

#include "fusedlab/newton_schulz_cuda.cuh"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

namespace fnc = fusedlab::newton_schulz::cuda;

struct Case {
  int in, out;
  int64_t batch, rows, cols;
  int transpose, sms;
  int64_t min_chunk;
  double norm_scale, eps;
};

template <typename TIn, typename TOut>
static void run_prologue(const std::string& dir, int i, const Case& c) {
  const std::string tag = "_" + std::to_string(i);
  const auto src = read_file(dir + "/src" + tag + ".bin");
  const int64_t numel = c.batch * c.rows * c.cols;
  if (static_cast<int64_t>(src.size()) != numel * static_cast<int64_t>(sizeof(TIn))) {
    std::fprintf(stderr, "case %d: src has %zu bytes, want %lld\n", i, src.size(),
                 static_cast<long long>(numel * sizeof(TIn)));
    std::exit(2);
  }
  const fnc::ProloguePlan p = fnc::plan_prologue(c.batch, c.rows, c.cols, c.transpose != 0, c.sms, c.min_chunk);
  // poisoned: all-ones bytes are NaN in every output dtype, so a missed write shows
  std::vector<unsigned char> dst(numel * sizeof(TOut), 0xff);
  std::vector<double> partials(c.batch * p.chunks, std::numeric_limits<double>::quiet_NaN());
  const TIn* s = reinterpret_cast<const TIn*>(src.data());
  TOut* d = reinterpret_cast<TOut*>(dst.data());
  fl_sim::launch(static_cast<unsigned>(c.batch * p.chunks), fnc::kThreads, 0,
                 [&] { fnc::sumsq_kernel<TIn>(s, partials.data(), p); });
  const unsigned grid = static_cast<unsigned>(c.batch * p.groups);
  if (p.transpose)
    fl_sim::launch(grid, fnc::kThreads, 0,
                   [&] { fnc::scale_cast_kernel<TIn, TOut, true>(s, d, partials.data(), p, c.norm_scale, c.eps); });
  else
    fl_sim::launch(grid, fnc::kThreads, 0,
                   [&] { fnc::scale_cast_kernel<TIn, TOut, false>(s, d, partials.data(), p, c.norm_scale, c.eps); });
  write_file(dir + "/dst" + tag + ".bin", dst.data(), dst.size());
  write_file(dir + "/partials" + tag + ".bin", partials.data(), partials.size() * sizeof(double));
  std::ofstream(dir + "/plan" + tag + ".txt") << p.chunks << " " << p.chunk_len << " " << p.groups << "\n";
}

template <typename TIn>
static void run_prologue_from(const std::string& dir, int i, const Case& c) {
  switch (c.out) {
    case 0: run_prologue<TIn, fnc::bf16_t>(dir, i, c); break;
    case 1: run_prologue<TIn, fnc::fp16_t>(dir, i, c); break;
    case 2: run_prologue<TIn, float>(dir, i, c); break;
    default: run_prologue<TIn, double>(dir, i, c); break;
  }
}

static int prologue(const std::string& dir) {
  std::ifstream f(dir + "/cases.txt");
  Case c;
  int i = 0;
  while (f >> c.in >> c.out >> c.batch >> c.rows >> c.cols >> c.transpose >> c.sms >> c.min_chunk >> c.norm_scale >>
         c.eps) {
    switch (c.in) {
      case 0: run_prologue_from<fnc::bf16_t>(dir, i, c); break;
      case 1: run_prologue_from<fnc::fp16_t>(dir, i, c); break;
      case 2: run_prologue_from<float>(dir, i, c); break;
      default: run_prologue_from<double>(dir, i, c); break;
    }
    ++i;
  }
  std::printf("prologue: %d cases\n", i);
  return i > 0 ? 0 : 3;
}

template <typename T>
static void run_transpose(const std::string& dir, int i, int64_t batch, int64_t rows, int64_t cols, int sms) {
  const std::string tag = "_" + std::to_string(i);
  const auto src = read_file(dir + "/src" + tag + ".bin");
  std::vector<unsigned char> dst(src.size(), 0xee);
  // the launcher's plan (nvcc-only code): groups from the transposed prologue plan
  const int groups = fnc::plan_prologue(batch, rows, cols, true, sms).groups;
  fl_sim::launch(static_cast<unsigned>(batch * groups), fnc::kThreads, 0, [&] {
    fnc::transpose_kernel<T>(reinterpret_cast<const T*>(src.data()), reinterpret_cast<T*>(dst.data()), rows, cols,
                             groups);
  });
  write_file(dir + "/dst" + tag + ".bin", dst.data(), dst.size());
}

static int transpose(const std::string& dir) {
  std::ifstream f(dir + "/cases.txt");
  int elem, sms, i = 0;
  int64_t batch, rows, cols;
  while (f >> elem >> batch >> rows >> cols >> sms) {
    if (elem == 2) run_transpose<uint16_t>(dir, i, batch, rows, cols, sms);
    else if (elem == 4) run_transpose<uint32_t>(dir, i, batch, rows, cols, sms);
    else run_transpose<uint64_t>(dir, i, batch, rows, cols, sms);
    ++i;
  }
  std::printf("transpose: %d cases\n", i);
  return i > 0 ? 0 : 3;
}

static int convert(const std::string& dir) {
  const auto raw = read_file(dir + "/floats.bin");
  const size_t n = raw.size() / sizeof(float);
  std::vector<float> x(n);
  std::memcpy(x.data(), raw.data(), n * sizeof(float));
  std::vector<uint16_t> b(n), h(n);
  for (size_t k = 0; k < n; ++k) {
    b[k] = fnc::Narrow<fnc::bf16_t>::from(x[k]).bits;
    h[k] = fnc::Narrow<fnc::fp16_t>::from(x[k]).bits;
  }
  write_file(dir + "/bf16.bin", b.data(), n * 2);
  write_file(dir + "/fp16.bin", h.data(), n * 2);
  std::vector<float> w(65536);
  for (uint32_t k = 0; k < 65536; ++k) w[k] = fnc::widen(fnc::fp16_t{static_cast<uint16_t>(k)});
  write_file(dir + "/fp16_widened.bin", w.data(), w.size() * sizeof(float));
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1], dir = argv[2];
  if (mode == "prologue") return prologue(dir);
  if (mode == "transpose") return transpose(dir);
  if (mode == "convert") return convert(dir);
  return 2;
}
