// Counter-based uniforms for kernels that draw their own randomness (the CUDA resample kernels): Philox4x32-10
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator torch's CUDA kernels
// use, with the seed and offset torch's CUDA generator hands out. Torch-free, host and device.
//
// Stream layout (python/fusedlab/reference/resample.py, philox_uniforms, is the same in Python): uniform i of
// group b is made of the 32-bit words 2i and 2i + 1 of the group's stream, where block n of the stream is
// Philox4x32-10 with key (seed low, seed high) and counter (n low, n high, b low, b high), and the call's
// offset (in words, a multiple of 4) skips its first offset / 4 blocks. The double is the top 53 bits of
// (word 2i << 32 | word 2i + 1) times 2^-53: in [0, 1), as torch.rand's doubles.
#pragma once

#include <cstdint>

#include "fusedlab/macros.h"

namespace fusedlab {

// What a kernel needs to find its seed and offset, the same whether or not a CUDA graph is being captured
// (mirrors at::PhiloxCudaState, which a torch-free header cannot name): outside capture the values, inside
// capture pointers the graph's replays update plus this launch's own offset within the graph.
struct PhiloxArgs {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

FL_HD FL_INLINE void philox_seed_offset(const PhiloxArgs& a, uint64_t& seed, uint64_t& offset) {
  if (a.captured) {
    seed = static_cast<uint64_t>(*a.seed_ptr);
    offset = static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph;
  } else {
    seed = a.seed;
    offset = a.offset;
  }
}

FL_HD FL_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32 with 10 rounds: ctr is replaced by the block's four words.
FL_HD FL_INLINE void philox4x32_10(uint32_t (&ctr)[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi32(kM0, ctr[0]), lo0 = kM0 * ctr[0];
    const uint32_t hi1 = mulhi32(kM1, ctr[2]), lo1 = kM1 * ctr[2];
    const uint32_t c1 = ctr[1], c3 = ctr[3];
    ctr[0] = hi1 ^ c1 ^ k0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ c3 ^ k1;
    ctr[3] = lo0;
  }
}

// Uniform i of group b in [0, 1), for a call with this seed and offset (see the layout above).
FL_HD FL_INLINE double philox_uniform(uint64_t seed, uint64_t offset, int64_t b, int64_t i) {
  const uint64_t n = offset / 4 + static_cast<uint64_t>(i) / 2;
  uint32_t ctr[4] = {static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), static_cast<uint32_t>(b),
                     static_cast<uint32_t>(static_cast<uint64_t>(b) >> 32)};
  philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const int w = static_cast<int>(i & 1) * 2;
  const uint64_t bits = (static_cast<uint64_t>(ctr[w]) << 32) | ctr[w + 1];
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// Words of the generator's offset one call takes: two per uniform per group, rounded up to whole blocks.
FL_HD FL_INLINE uint64_t philox_increment(int64_t uniforms_per_group) {
  return (static_cast<uint64_t>(uniforms_per_group) * 2 + 3) / 4 * 4;
}

}  // namespace fusedlab
