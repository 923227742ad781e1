// Philox4x32-10 (Salmon et al., SC'11; the Random123 generator), as pure functions shared by the
// C++ kernels (csrc/mask.cpp) and the CUDA kernel (csrc/cuda/mask.cu).
//
// Convention (the one Triton's tl.randint uses, so a Triton kernel can call it directly):
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (index & 0xFFFFFFFF, index >> 32, 0, 0)
//   element `index` gets word 0 of the output.
// Known answer (Random123 kat_vectors): key 0, counter 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
// A coordinate is kept iff that word <= thr_m1 (an integer decision, so every backend agrees).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD static inline __attribute__((always_inline))
#endif

namespace fc {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kBump0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kBump1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// One round on (c0, c1, c2, c3) with key (k0, k1).
FC_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// The full generator: ctr is overwritten by the 4 output words (used by the known-answer tests).
FC_HD void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  for (int r = 0; r < kRounds; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kBump0;
    k1 += kBump1;
  }
  ctr[0] = c0;
  ctr[1] = c1;
  ctr[2] = c2;
  ctr[3] = c3;
}

// Word 0 of Philox4x32-10 for counter (index_lo, index_hi, 0, 0), key = seed. Written out with
// constants so a compiler can fold round 1 (c2 = c3 = 0) and drop the unused words of round 10.
FC_HD uint32_t first_word(uint64_t index, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kBump0;
    k1 += kBump1;
  }
  return c0;
}

// Keep decision for one coordinate.
FC_HD bool keep(uint64_t index, uint64_t seed, uint32_t thr_m1) { return first_word(index, seed) <= thr_m1; }

}  // namespace philox
}  // namespace fc
