// Philox4x32-10 (Salmon et al., SC'11; the Random123 generator), as pure functions shared by the
// C++ kernels (csrc/mask.cpp); kernels/mask.py follows the same convention in Triton.
//
// Convention (Triton's tl.randint4x, so a Triton kernel can call it directly):
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (j & 0xFFFFFFFF, j >> 32, 0, 0) with j = index / 4
//   element `index` gets output word index % 4: one Philox call serves 4 consecutive elements (4x
//   less work than one call per element: the mask kernels are bound by these multiplies).
// Known answer (Random123 kat_vectors): key 0, counter 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8,
// so with seed 0 elements 0..3 draw those four words.
// A coordinate is kept iff its word <= thr_m1 (an integer decision, so every backend agrees).
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

// The full generator: ctr is overwritten by the 4 output words.
FC_HD void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
#if defined(__CUDACC__)
#pragma unroll
#endif
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

// The 32-bit word element `index` draws.
FC_HD uint32_t mask_word(uint64_t index, uint64_t seed) {
  const uint64_t j = index >> 2;
  uint32_t ctr[4] = {static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), 0u, 0u};
  philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return ctr[index & 3];
}

// Keep decision for one coordinate.
FC_HD bool keep(uint64_t index, uint64_t seed, uint32_t thr_m1) { return mask_word(index, seed) <= thr_m1; }

}  // namespace philox
}  // namespace fc
