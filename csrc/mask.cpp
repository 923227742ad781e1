// Random masking on CPU: keep coordinate i of a tensor iff word i % 4 of Philox4x32-10(counter = i / 4,
// key = seed) <= thr_m1 (csrc/philox.h). Layers: mask bits (SIMD, one version per ISA) -> encode (compaction) /
// decode (scatter, many clients fused) on contiguous work units over csrc/pool.h -> bindings at the end.
//
// Work is cut into units of kUnit elements of one tensor ("segment"); threads of the extension's pool
// (csrc/pool.h) claim runs of kTaskUnits units. Pass 1 writes each unit's mask bits (kUnit / 64 words) and its kept
// count; a serial prefix over the counts gives each unit its place in the packed values; pass 2
// compacts (encode) or scatters (decode) using the stored bits, so Philox runs once per element.
#include <immintrin.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "philox.h"
#include "pool.h"
#include "registry.h"

namespace fc {
namespace py = pybind11;

namespace mask_detail {

constexpr int64_t kUnit = 4096;           // elements per work unit (64 mask words, 16 KiB of float32)
constexpr int64_t kWords = kUnit / 64;

// ---- Mask bits ------------------------------------------------------------------------------
// mask_words(seed, start, nwords, thr_m1, bits): bits[w] bit b = keep(start + 64 w + b); start is a
// multiple of 64, so a word covers 16 whole Philox counters that share the counter's high word.
//
// Why intrinsics and function multiversioning rather than target_clones on plain C++: GCC 12
// vectorises the 32x32->64 multiply of plain code as a full 64x64 multiply (3 vpmuludq + shifts) or
// with lane shuffles, measured at 120-170 Melem/s per core for one call per element; holding each
// 32-bit word in a 64-bit lane lets one vpmuludq do the whole product with no masking (it reads only
// the low halves): 6 ops per 8 counters per round. One build still runs everywhere: GCC picks the
// version for the CPU once, at first use (set_isa below can force a lower one, for tests).

// Element 4j + q of a group draws word q of counter j: spread the per-word compare masks (bit j)
// to bit 4j + q.
#define FC_PHILOX_KEYS(SET1, VEC)                                                             \
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);   \
  const uint32_t chi = static_cast<uint32_t>((start >> 2) >> 32);                            \
  VEC rk0[philox::kRounds], rk1[philox::kRounds];                                            \
  for (int r = 0; r < philox::kRounds; ++r) {                                                \
    rk0[r] = SET1(static_cast<uint32_t>(k0 + r * philox::kBump0));                           \
    rk1[r] = SET1(static_cast<uint32_t>(k1 + r * philox::kBump1));                           \
  }                                                                                          \
  /* round 1 has c1 = chi, c2 = c3 = 0, so c0' = chi ^ k0 for every lane and round 2's first \
     product is a scalar constant */                                                         \
  const uint64_t p0r2 = static_cast<uint64_t>(philox::kMul0) * (chi ^ k0);                   \
  const VEC c3r2 = SET1(static_cast<uint32_t>(p0r2));                                        \
  const VEC hi0r2 = SET1((p0r2 >> 32) ^ static_cast<uint32_t>(k1 + philox::kBump1));

// One word at a time (2 dependency chains): the tail of mask_words_avx512.
__attribute__((target("avx512f,bmi2"))) static void mask_words_avx512_one(uint64_t seed, uint64_t start, int64_t nwords,
                                                                      uint32_t thr_m1, uint64_t* bits) {
  FC_PHILOX_KEYS(_mm512_set1_epi64, __m512i)
  const __m512i m0 = _mm512_set1_epi64(philox::kMul0), m1 = _mm512_set1_epi64(philox::kMul1);
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFull), thr = _mm512_set1_epi64(thr_m1);
  const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t w = 0; w < nwords; ++w) {
    const uint32_t ctr_lo = static_cast<uint32_t>((start >> 2) + w * 16);
    uint64_t word = 0;
    for (int v = 0; v < 2; ++v) {  // 2 x 8 counters = 64 elements
      __m512i c0 = _mm512_add_epi64(_mm512_set1_epi64(ctr_lo + v * 8), step);  // low 32 bits matter
      __m512i p0 = _mm512_mul_epu32(c0, m0);                                    // round 1
      __m512i c2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), rk1[0]);
      __m512i c3 = p0;
      __m512i p1 = _mm512_mul_epu32(c2, m1);  // round 2: c0 = chi ^ k0, c1 = 0
      c0 = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), rk0[1]);
      __m512i c1 = p1;
      c2 = _mm512_xor_si512(hi0r2, c3);
      c3 = c3r2;
      for (int r = 2; r < philox::kRounds; ++r) {
        p0 = _mm512_mul_epu32(c0, m0);
        p1 = _mm512_mul_epu32(c2, m1);
        c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1, rk0[r], 0x96);  // a ^ b ^ c
        c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3, rk1[r], 0x96);
        c1 = p1;
        c3 = p0;
      }
      const uint64_t q0 = _mm512_cmple_epu64_mask(_mm512_and_si512(c0, lo32), thr);
      const uint64_t q1 = _mm512_cmple_epu64_mask(_mm512_and_si512(c1, lo32), thr);
      const uint64_t q2 = _mm512_cmple_epu64_mask(_mm512_and_si512(c2, lo32), thr);
      const uint64_t q3 = _mm512_cmple_epu64_mask(_mm512_and_si512(c3, lo32), thr);
      const uint64_t g = _pdep_u64(q0, 0x11111111ull) | _pdep_u64(q1, 0x22222222ull) |
                         _pdep_u64(q2, 0x44444444ull) | _pdep_u64(q3, 0x88888888ull);
      word |= g << (v * 32);
    }
    bits[w] = word;
  }
}

__attribute__((target("avx512f,bmi2"))) void mask_words_avx512(uint64_t seed, uint64_t start, int64_t nwords,
                                                         uint32_t thr_m1, uint64_t* bits) {
  FC_PHILOX_KEYS(_mm512_set1_epi64, __m512i)
  const __m512i m0 = _mm512_set1_epi64(philox::kMul0), m1 = _mm512_set1_epi64(philox::kMul1);
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFull), thr = _mm512_set1_epi64(thr_m1);
  const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  // Two words at a time: 4 independent multiply chains keep the multiplier busy (measured 1.1 vs
  // 0.85 Gelem/s per core with 2 chains).
  constexpr int V = 4;
  int64_t w = 0;
  for (; w + 2 <= nwords; w += 2) {
    const uint32_t ctr_lo = static_cast<uint32_t>((start >> 2) + w * 16);
    __m512i c0[V], c1[V], c2[V], c3[V], p0[V], p1[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      c0[v] = _mm512_add_epi64(_mm512_set1_epi64(ctr_lo + v * 8), step);
      p0[v] = _mm512_mul_epu32(c0[v], m0);
      c2[v] = _mm512_xor_si512(_mm512_srli_epi64(p0[v], 32), rk1[0]);
      c3[v] = p0[v];
      p1[v] = _mm512_mul_epu32(c2[v], m1);
      c0[v] = _mm512_xor_si512(_mm512_srli_epi64(p1[v], 32), rk0[1]);
      c1[v] = p1[v];
      c2[v] = _mm512_xor_si512(hi0r2, c3[v]);
      c3[v] = c3r2;
    }
#pragma GCC unroll 8
    for (int r = 2; r < philox::kRounds; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        p0[v] = _mm512_mul_epu32(c0[v], m0);
        p1[v] = _mm512_mul_epu32(c2[v], m1);
        c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1[v], 32), c1[v], rk0[r], 0x96);
        c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0[v], 32), c3[v], rk1[r], 0x96);
        c1[v] = p1[v];
        c3[v] = p0[v];
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const uint64_t q0 = _mm512_cmple_epu64_mask(_mm512_and_si512(c0[v], lo32), thr);
      const uint64_t q1 = _mm512_cmple_epu64_mask(_mm512_and_si512(c1[v], lo32), thr);
      const uint64_t q2 = _mm512_cmple_epu64_mask(_mm512_and_si512(c2[v], lo32), thr);
      const uint64_t q3 = _mm512_cmple_epu64_mask(_mm512_and_si512(c3[v], lo32), thr);
      const uint64_t g = _pdep_u64(q0, 0x11111111ull) | _pdep_u64(q1, 0x22222222ull) |
                         _pdep_u64(q2, 0x44444444ull) | _pdep_u64(q3, 0x88888888ull);
      if (v & 1) bits[w + v / 2] |= g << 32; else bits[w + v / 2] = g;
    }
  }
  if (w < nwords) mask_words_avx512_one(seed, start + w * 64, nwords - w, thr_m1, bits + w);
}

__attribute__((target("avx2,bmi2"))) void mask_words_avx2(uint64_t seed, uint64_t start, int64_t nwords,
                                                      uint32_t thr_m1, uint64_t* bits) {
  FC_PHILOX_KEYS(_mm256_set1_epi64x, __m256i)
  const __m256i m0 = _mm256_set1_epi64x(philox::kMul0), m1 = _mm256_set1_epi64x(philox::kMul1);
  const __m256i lo32 = _mm256_set1_epi64x(0xFFFFFFFFll), thr = _mm256_set1_epi64x(thr_m1);
  const __m256i step = _mm256_set_epi64x(3, 2, 1, 0);
  // words are < 2^32 after masking, so the signed 64-bit compare is exact
#define FC_KEEP4(c)                                                                                      \
  (~static_cast<uint64_t>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_and_si256(c, lo32), thr)))) & \
   0xFull)
  for (int64_t w = 0; w < nwords; ++w) {
    const uint32_t ctr_lo = static_cast<uint32_t>((start >> 2) + w * 16);
    uint64_t word = 0;
    for (int v = 0; v < 4; ++v) {  // 4 x 4 counters = 64 elements
      __m256i c0 = _mm256_add_epi64(_mm256_set1_epi64x(ctr_lo + v * 4), step);
      __m256i p0 = _mm256_mul_epu32(c0, m0);
      __m256i c2 = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), rk1[0]);
      __m256i c3 = p0;
      __m256i p1 = _mm256_mul_epu32(c2, m1);
      c0 = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), rk0[1]);
      __m256i c1 = p1;
      c2 = _mm256_xor_si256(hi0r2, c3);
      c3 = c3r2;
      for (int r = 2; r < philox::kRounds; ++r) {
        p0 = _mm256_mul_epu32(c0, m0);
        p1 = _mm256_mul_epu32(c2, m1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), rk0[r]);
        c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), rk1[r]);
        c1 = p1;
        c3 = p0;
      }
      const uint64_t g = _pdep_u64(FC_KEEP4(c0), 0x1111ull) | _pdep_u64(FC_KEEP4(c1), 0x2222ull) |
                         _pdep_u64(FC_KEEP4(c2), 0x4444ull) | _pdep_u64(FC_KEEP4(c3), 0x8888ull);
      word |= g << (v * 16);
    }
    bits[w] = word;
  }
}

void mask_words_scalar(uint64_t seed, uint64_t start, int64_t nwords,
                                                    uint32_t thr_m1, uint64_t* bits) {
  for (int64_t w = 0; w < nwords; ++w) {
    uint64_t word = 0;
    for (int j = 0; j < 16; ++j) {
      const uint64_t ctr = (start >> 2) + w * 16 + j;
      uint32_t c[4] = {static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u};
      philox::philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      for (int q = 0; q < 4; ++q) word |= static_cast<uint64_t>(c[q] <= thr_m1) << (4 * j + q);
    }
    bits[w] = word;
  }
}
#undef FC_KEEP4
#undef FC_PHILOX_KEYS

// ---- Compaction and scatter (per unit) ------------------------------------------------------
// AVX-512 has the two instructions this wants: vcompressps (encode: kept values packed in order) and
// vexpandps (decode: packed values spread to the kept lanes); elsewhere a ctz loop over the set bits.

__attribute__((target("avx512f"))) void compact_unit_avx512(const uint64_t* bits, int64_t n, const float* x, float* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = static_cast<__mmask16>(bits[j >> 6] >> (j & 63));
    if (!m) continue;
    _mm512_mask_compressstoreu_ps(out, m, _mm512_maskz_loadu_ps(m, x + j));  // masked: no read past n
    out += __builtin_popcount(m);
  }
}

void compact_unit_scalar(const uint64_t* bits, int64_t n, const float* x, float* out) {
  const int64_t nw = (n + 63) / 64;
  for (int64_t w = 0; w < nw; ++w) {
    uint64_t b = bits[w];
    const float* xw = x + w * 64;
    while (b) {
      *out++ = xw[__builtin_ctzll(b)];
      b &= b - 1;
    }
  }
}

// accumulate=false: out[0, n) = v * wgt at kept positions, 0 elsewhere (every element written).
// accumulate=true:  out[i] += v * wgt at kept positions only (float32 multiply, then add; no FMA).
__attribute__((target("avx512f"))) void scatter_unit_avx512(const uint64_t* bits, int64_t n, const float* v, float wgt,
                                                     float* out, bool accumulate) {
  const __m512 w = _mm512_set1_ps(wgt);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = static_cast<__mmask16>(bits[j >> 6] >> (j & 63));
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    if (accumulate) {
      if (!m) continue;
      const __m512 add = _mm512_mul_ps(_mm512_maskz_expandloadu_ps(m, v), w);
      const __m512 o = _mm512_maskz_loadu_ps(valid, out + j);
      _mm512_mask_storeu_ps(out + j, valid, _mm512_mask_add_ps(o, m, o, add));
    } else {
      _mm512_mask_storeu_ps(out + j, valid, _mm512_maskz_mul_ps(m, _mm512_maskz_expandloadu_ps(m, v), w));
    }
    v += __builtin_popcount(m);
  }
}

void scatter_unit_scalar(const uint64_t* bits, int64_t n, const float* v, float wgt,
                                                     float* out, bool accumulate) {
  if (!accumulate) std::memset(out, 0, sizeof(float) * n);
  const int64_t nw = (n + 63) / 64;
  for (int64_t w = 0; w < nw; ++w) {
    uint64_t b = bits[w];
    float* ow = out + w * 64;
    while (b) {
      const int j = __builtin_ctzll(b);
      const float add = *v++ * wgt;
      if (accumulate)
        ow[j] += add;
      else
        ow[j] = add;
      b &= b - 1;
    }
  }
}

// ---- Dispatch ---------------------------------------------------------------------------------
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

static int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return kAvx2;
  return kScalar;
}

static int& isa() {
  static int level = best_isa();
  return level;
}

static inline void mask_words(uint64_t seed, uint64_t start, int64_t nwords, uint32_t thr_m1, uint64_t* bits) {
  switch (isa()) {
    case kAvx512: return mask_words_avx512(seed, start, nwords, thr_m1, bits);
    case kAvx2: return mask_words_avx2(seed, start, nwords, thr_m1, bits);
    default: return mask_words_scalar(seed, start, nwords, thr_m1, bits);
  }
}

static inline void compact_unit(const uint64_t* bits, int64_t n, const float* x, float* out) {
  if (isa() == kAvx512) return compact_unit_avx512(bits, n, x, out);
  compact_unit_scalar(bits, n, x, out);
}

static inline void scatter_unit(const uint64_t* bits, int64_t n, const float* v, float wgt, float* out,
                                bool accumulate) {
  if (isa() == kAvx512) return scatter_unit_avx512(bits, n, v, wgt, out, accumulate);
  scatter_unit_scalar(bits, n, v, wgt, out, accumulate);
}

// Bits of elements [start, start + n) of one unit; bits past n cleared. Returns the kept count.
static inline int64_t unit_bits(uint64_t seed, uint64_t start, int64_t n, uint32_t thr_m1, uint64_t* bits) {
  const int64_t nw = (n + 63) / 64;
  mask_words(seed, start, nw, thr_m1, bits);
  if (n % 64) bits[nw - 1] &= (uint64_t{1} << (n % 64)) - 1;
  int64_t c = 0;
  for (int64_t w = 0; w < nw; ++w) c += __builtin_popcountll(bits[w]);
  return c;
}

// fn(u) for every unit u < nu, kTaskUnits units per pool task; threads only when `elems` (elements
// touched, all clients) reach 2 x 2^17: below that (~0.1 ms of work) a helper's wake-up costs as
// much as it saves.
constexpr int64_t kTaskUnits = 16;
template <class F>
static void for_units(int64_t nu, int64_t elems, F&& fn) {
  const int64_t nt = (nu + kTaskUnits - 1) / kTaskUnits;
  pool::parallel_for(nt, pool::threads_for(elems, int64_t(1) << 17), [&](int64_t t) {
    for (int64_t u = t * kTaskUnits, e = std::min(nu, u + kTaskUnits); u < e; ++u) fn(u);
  });
}

struct Unit {
  int64_t seg, start, len;  // segment, first element (within the segment), element count
};

static int64_t unit_elems(const std::vector<Unit>& units) {
  int64_t e = 0;
  for (const auto& u : units) e += u.len;
  return e;
}

static std::vector<Unit> make_units(const std::vector<int64_t>& lens) {
  std::vector<Unit> units;
  for (size_t s = 0; s < lens.size(); ++s)
    for (int64_t a = 0; a < lens[s]; a += kUnit) units.push_back({static_cast<int64_t>(s), a, std::min(kUnit, lens[s] - a)});
  return units;
}

}  // namespace mask_detail

// ---- Launchers --------------------------------------------------------------------------------

// Pass 1 of encode: bits and kept count of every unit. Returns per-unit counts.
static void mask_count_units(const std::vector<mask_detail::Unit>& units, const uint64_t* seeds, uint32_t thr_m1,
                             uint64_t* bits, int64_t* counts) {
  using namespace mask_detail;
  const int64_t nu = static_cast<int64_t>(units.size());
  for_units(nu, unit_elems(units), [&](int64_t u) {
    counts[u] = unit_bits(seeds[units[u].seg], units[u].start, units[u].len, thr_m1, bits + u * kWords);
  });
}

// encode: xs[s] (float32, lens[s] elements) -> kept values of every segment, in order; counts[s].
static py::tuple mask_encode_py(const std::vector<py::array_t<float, py::array::c_style>>& xs,
                                py::array_t<uint64_t, py::array::c_style> seeds, uint32_t thr_m1) {
  using namespace mask_detail;
  const int64_t S = static_cast<int64_t>(xs.size());
  if (seeds.size() != S) throw py::value_error("seeds must have one entry per tensor");
  std::vector<const float*> ptrs(S);
  std::vector<int64_t> lens(S);
  for (int64_t s = 0; s < S; ++s) {
    ptrs[s] = xs[s].data();
    lens[s] = xs[s].size();
  }
  const uint64_t* sp = seeds.data();
  const auto units = make_units(lens);
  const int64_t nu = static_cast<int64_t>(units.size());
  std::vector<uint64_t> bits(static_cast<size_t>(nu) * kWords);
  std::vector<int64_t> counts(nu), offs(nu + 1, 0);
  {
    py::gil_scoped_release nogil;
    mask_count_units(units, sp, thr_m1, bits.data(), counts.data());
    for (int64_t u = 0; u < nu; ++u) offs[u + 1] = offs[u] + counts[u];
  }
  py::array_t<float> values(offs[nu]);
  py::array_t<int64_t> seg_counts(S);
  float* vp = values.mutable_data();
  int64_t* scp = seg_counts.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::fill(scp, scp + S, 0);
    for (int64_t u = 0; u < nu; ++u) scp[units[u].seg] += counts[u];
    for_units(nu, unit_elems(units), [&](int64_t u) {
      compact_unit(bits.data() + u * kWords, units[u].len, ptrs[units[u].seg] + units[u].start, vp + offs[u]);
    });
  }
  return py::make_tuple(values, seg_counts);
}

// decode: C clients' packed values (vals[c], segments in order) -> out (sum(lens) float32).
// accumulate=false: out = v * weights[0] where kept, 0 elsewhere (C must be 1).
// accumulate=true:  out = sum over c (in order) of v_c * weights[c], in float32, +0 start.
// Returns (-1, 0) on success, or (c * S + s, regenerated count) for the first (client, segment) whose
// expected count disagrees with the regenerated mask (out is then left unspecified).
static py::tuple mask_decode_py(const std::vector<py::array_t<float, py::array::c_style>>& vals,
                                py::array_t<int64_t, py::array::c_style> expected,
                                py::array_t<uint64_t, py::array::c_style> seeds,
                                py::array_t<int64_t, py::array::c_style> lens_arr,
                                py::array_t<float, py::array::c_style> weights, uint32_t thr_m1, bool accumulate,
                                py::array_t<float, py::array::c_style> out) {
  using namespace mask_detail;
  const int64_t C = static_cast<int64_t>(vals.size());
  const int64_t S = lens_arr.size();
  if (expected.size() != C * S || seeds.size() != C * S) throw py::value_error("expected/seeds must be C * S long");
  if (weights.size() != C) throw py::value_error("weights must have one entry per client");
  if (!accumulate && C != 1) throw py::value_error("assign mode takes exactly one client");
  std::vector<int64_t> lens(lens_arr.data(), lens_arr.data() + S);
  std::vector<int64_t> seg_off(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    if (lens[s] < 0) throw py::value_error("lens must be >= 0");
    seg_off[s + 1] = seg_off[s] + lens[s];
  }
  if (out.size() != seg_off[S]) throw py::value_error("out must have sum(lens) elements");
  std::vector<const float*> vptr(C);
  std::vector<int64_t> vlen(C);
  for (int64_t c = 0; c < C; ++c) {
    vptr[c] = vals[c].data();
    vlen[c] = vals[c].size();
  }
  const int64_t* ep = expected.data();
  const uint64_t* sp = seeds.data();
  const float* wp = weights.data();
  float* op = out.mutable_data();
  const auto units = make_units(lens);
  const int64_t nu = static_cast<int64_t>(units.size());
  int64_t bad = -1, bad_count = 0;
  {
    py::gil_scoped_release nogil;
    std::vector<uint64_t> bits(static_cast<size_t>(C) * nu * kWords);
    std::vector<int64_t> counts(static_cast<size_t>(C) * nu);
    // pass 1: every (client, unit) pair
    for_units(C * nu, C * unit_elems(units), [&](int64_t cu) {
      const int64_t c = cu / nu, u = cu % nu;
      counts[cu] = unit_bits(sp[c * S + units[u].seg], units[u].start, units[u].len, thr_m1,
                             bits.data() + cu * kWords);
    });
    // check counts per (client, segment), then each (client, unit)'s offset into the client's values
    std::vector<int64_t> offs(static_cast<size_t>(C) * nu);
    for (int64_t c = 0; c < C && bad < 0; ++c) {
      std::vector<int64_t> seg_count(S, 0);
      int64_t acc = 0;
      for (int64_t u = 0; u < nu; ++u) {
        offs[c * nu + u] = acc;
        acc += counts[c * nu + u];
        seg_count[units[u].seg] += counts[c * nu + u];
      }
      for (int64_t s = 0; s < S; ++s)
        if (seg_count[s] != ep[c * S + s]) {
          bad = c * S + s;
          bad_count = seg_count[s];
          break;
        }
      if (bad < 0 && acc != vlen[c]) {
        bad = c * S + (S ? S - 1 : 0);
        bad_count = acc;
      }
    }
    if (bad < 0) {
      // pass 2: each unit's output stays in L1 while every client is added in order
      for_units(nu, C * unit_elems(units), [&](int64_t u) {
        float* o = op + seg_off[units[u].seg] + units[u].start;
        if (accumulate) std::memset(o, 0, sizeof(float) * units[u].len);
        for (int64_t c = 0; c < C; ++c)
          scatter_unit(bits.data() + (c * nu + u) * kWords, units[u].len, vptr[c] + offs[c * nu + u], wp[c], o,
                       accumulate);
      });
    }
  }
  return py::make_tuple(bad, bad_count);
}

// Known-answer hook: the 4 output words of Philox4x32-10 for a counter and a 64-bit key.
static py::tuple philox4x32_py(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t key) {
  uint32_t ctr[4] = {c0, c1, c2, c3};
  philox::philox4x32_10(ctr, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  return py::make_tuple(ctr[0], ctr[1], ctr[2], ctr[3]);
}

FC_BIND([](py::module_& m) {
  m.def("mask_encode", &mask_encode_py, py::arg("xs"), py::arg("seeds"), py::arg("thr_m1"),
        "Random mask encode: (kept float32 values of every tensor in order, kept count per tensor)");
  m.def("mask_decode", &mask_decode_py, py::arg("vals"), py::arg("expected"), py::arg("seeds"), py::arg("lens"),
        py::arg("weights"), py::arg("thr_m1"), py::arg("accumulate"), py::arg("out"),
        "Random mask decode / fused weighted sum over clients; returns (bad index or -1, regenerated count)");
  m.def("mask_isa", []() { return std::string(mask_detail::isa() == 2 ? "avx512" : mask_detail::isa() == 1 ? "avx2" : "scalar"); },
        "SIMD level the mask kernels use");
  m.def("mask_set_isa", [](const std::string& name) {
    const int want = name == "avx512" ? 2 : name == "avx2" ? 1 : name == "scalar" ? 0 : -1;
    if (want < 0) throw py::value_error("isa must be one of avx512, avx2, scalar");
    if (want > mask_detail::best_isa()) throw py::value_error("this CPU does not support isa " + name);
    mask_detail::isa() = want;
  }, py::arg("isa"), "Force the mask kernels' SIMD level (tests); at most what the CPU supports");
  m.def("philox4x32", &philox4x32_py, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("key"),
        "Philox4x32-10 output words for counter (c0..c3) and key (lo, hi) = (key & 0xFFFFFFFF, key >> 32)");
});
}  // namespace fc
