// Runs block-level CUDA kernels as host C++: one std::thread per CUDA thread, std::barrier for
// __syncthreads, function-local statics for __shared__ (blocks run one after another), and a minimal cub
// (BlockReduce / BlockScan with the same barrier structure as cub's, and no trailing barrier, so a missing
// __syncthreads before temp-storage reuse shows up as a data race under -fsanitize=thread).
// __shfl_xor_sync over whole warps: each lane posts its value, the warp meets at a per-warp barrier, reads its
// partner's, and meets again before the slots are reused (a lane that skips a shuffle its warp runs deadlocks,
// which the tests' timeouts catch; on a GPU that would be undefined behaviour).
// Only what the kernel headers under test use (resample, newton_schulz, cat, symile). Include this before the kernel
// header; compile with g++ -std=c++20.
#pragma once

#define FL_HOST_SIM 1

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct fl_sim_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local fl_sim_dim3 threadIdx;
inline thread_local fl_sim_dim3 blockIdx;
inline fl_sim_dim3 gridDim;
inline fl_sim_dim3 blockDim;

struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
struct float2 {
  float x, y;
};

namespace fl_sim {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<unsigned char>* dynamic_smem_buffer = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers = nullptr;  // one per warp
inline std::vector<uint64_t>* shuffle_slots = nullptr;                          // one per thread
}  // namespace fl_sim

inline void __syncthreads() { fl_sim::block_barrier->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  assert(mask == 0xffffffffu && "the simulation only runs full-warp shuffles");
  assert(width == 32 && lane_mask > 0 && lane_mask < 32);
  assert(fl_sim::warp_barriers != nullptr && "shuffles need a block of whole warps");
  (void)mask;
  (void)width;
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  (*fl_sim::shuffle_slots)[tid] = bits;
  (*fl_sim::warp_barriers)[warp]->arrive_and_wait();
  bits = (*fl_sim::shuffle_slots)[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  (*fl_sim::warp_barriers)[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed); }

namespace fusedlab {
namespace resample {
namespace cuda {
inline unsigned char* dynamic_smem() { return fl_sim::dynamic_smem_buffer->data(); }
}  // namespace cuda
}  // namespace resample
}  // namespace fusedlab

namespace cub {
enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };

template <typename T, int N>
struct BlockReduce {
  struct TempStorage {
    T vals[N];
  };
  TempStorage& t;
  explicit BlockReduce(TempStorage& s) : t(s) {}
  // Like cub: the result is valid in thread 0 only.
  template <typename Op>
  T Reduce(T v, Op op) {
    t.vals[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x != 0) return v;
    T r = t.vals[0];
    for (int i = 1; i < N; ++i) r = op(r, t.vals[i]);
    return r;
  }
};

template <typename T, int N, BlockScanAlgorithm = BLOCK_SCAN_RAKING>
struct BlockScan {
  struct TempStorage {
    T vals[N];
    T prefix;
  };
  TempStorage& t;
  explicit BlockScan(TempStorage& s) : t(s) {}
  // Like cub: warp 0 calls the prefix functor with the block aggregate; lane 0's result is the tile prefix.
  template <typename Prefix>
  void InclusiveSum(T in, T& out, Prefix& prefix_op) {
    const int tid = threadIdx.x;
    t.vals[tid] = in;
    __syncthreads();
    if (tid < 32) {
      T agg = T(0);
      for (int i = 0; i < N; ++i) agg += t.vals[i];
      const T p = prefix_op(agg);
      if (tid == 0) t.prefix = p;
    }
    __syncthreads();
    T acc = t.prefix;
    for (int i = 0; i <= tid; ++i) acc += t.vals[i];
    out = acc;
  }
};
}  // namespace cub

namespace fl_sim {
// Runs `kernel` for blocks 0..grid-1 in turn on one pool of `threads` host threads (a barrier between blocks).
inline void launch(unsigned grid, unsigned threads, size_t smem, const std::function<void()>& kernel) {
  gridDim = {grid, 1, 1};
  blockDim = {threads, 1, 1};
  std::vector<unsigned char> buf(smem + 16, 0xA5);  // arbitrary bytes, as a fresh block finds them
  dynamic_smem_buffer = &buf;
  std::barrier<> bar(threads);
  block_barrier = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots(threads, 0);
  if (threads % 32 == 0)
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  warp_barriers = threads % 32 == 0 ? &warps : nullptr;
  shuffle_slots = &slots;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        kernel();
        bar.arrive_and_wait();
        if (t == 0)
          for (auto& c : buf) c = static_cast<unsigned char>(0x5A + b);
        bar.arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
}
}  // namespace fl_sim
