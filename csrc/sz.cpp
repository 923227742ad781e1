// SZ kernels on CPU. Layers: plain functions on pointers -> OpenMP launchers -> bindings at the end.
// FP comparisons must if-convert for the quantize kernel to vectorise; we never rely on FP traps.
#pragma GCC optimize("no-trapping-math")
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffers.h"
#include "pool.h"
#include "registry.h"

namespace fc {
namespace py = pybind11;

// Sentinel code for values that cannot be quantized (non-finite, or |x * inv| >= 2^22).
constexpr int32_t kUnquantized = INT32_MIN;
constexpr float kMaxQuant = 4194304.0f;  // 2^22: below it the float32 round-to-nearest-even is exact

// q = round_half_even(x * inv) in float32, as the torch reference and the Triton kernel compute it.
static inline int32_t prequantize_one(float x, float inv) {
  float y = x * inv;
  if (!(std::fabs(y) < kMaxQuant)) return kUnquantized;  // NaN fails the comparison too
  return static_cast<int32_t>(std::nearbyint(y));
}

void prequantize(const float* x, int32_t* q, int64_t n, float inv) {
  constexpr int64_t kChunk = 1 << 16;
  pool::parallel_for((n + kChunk - 1) / kChunk, pool::threads_for(n, int64_t(1) << 18), [&](int64_t k) {
    for (int64_t i = k * kChunk, e = std::min(n, i + kChunk); i < e; ++i) q[i] = prequantize_one(x[i], inv);
  });
}

static py::array_t<int32_t> prequantize_py(py::array_t<float, py::array::c_style> x, float inv) {
  py::array_t<int32_t> q(x.size());
  const float* xp = x.data();
  int32_t* qp = q.mutable_data();
  int64_t n = x.size();
  {
    py::gil_scoped_release nogil;
    prequantize(xp, qp, n, inv);
  }
  return q;
}


// =============================================================================================
// SZ codec blocks section (spec: fedcompress/codecs/sz/codec.py; same bytes as the reference).
// Layers: value/dtype helpers -> block encoder/decoder on pointers -> OpenMP over blocks -> bindings.

namespace sz {

constexpr int kLanes = 32;         // entropy.LANES
constexpr int64_t kDecChunk = 4096;  // tokens per decode chunk: pass 1 (rANS) then pass 2 (values), in L1
constexpr int64_t kRunSlack = 64;    // > 16 speculative run values + 1
constexpr uint32_t kRansL = 1u << 15;
constexpr int kMinPb = 12, kMaxPb = 15;
constexpr int kMaxSymbols = 8192;
constexpr int kTokens = 65536;
constexpr uint32_t kEscVal = 0, kEscWide = 1, kRunA = 2, kRunB = 3, kTokenBase = 4;
// a quiet NaN (no decoded ordinary value is NaN); | token marks an escape in a fused decode pass
constexpr uint32_t kEscSentinel = 0x7FC00000u;
constexpr uint64_t kMaxZigzag = 65535 - kTokenBase;
constexpr uint8_t kBlkLorenzo = 1, kBlkRun = 2, kBlkRaw = 4;
constexpr int64_t kEstStride = 8;     // the predictor estimate samples every 8th value
constexpr uint64_t kRunConsider = 8;  // run mode is considered when token 4 is >= 1/8 of a block
constexpr uint32_t kSubRange = 1024;  // tokens below this get 4 sub-histograms (no store-forwarding stalls)

// 256 * log2(1 + i/256), rounded (same table as entropy._LOG_FRAC)
static const int16_t kLogFrac[256] = {0,1,3,4,6,7,9,10,11,13,14,16,17,18,20,21,22,24,25,26,28,29,30,32,33,34,36,37,38,40,41,42,44,45,46,47,49,50,51,52,54,55,56,57,59,60,61,62,63,65,66,67,68,69,71,72,73,74,75,77,78,79,80,81,82,84,85,86,87,88,89,90,92,93,94,95,96,97,98,99,100,102,103,104,105,106,107,108,109,110,111,112,113,114,116,117,118,119,120,121,122,123,124,125,126,127,128,129,130,131,132,133,134,135,136,137,138,139,140,141,142,143,144,145,146,147,148,149,150,151,152,153,154,155,155,156,157,158,159,160,161,162,163,164,165,166,167,168,169,169,170,171,172,173,174,175,176,177,178,178,179,180,181,182,183,184,185,185,186,187,188,189,190,191,192,192,193,194,195,196,197,198,198,199,200,201,202,203,203,204,205,206,207,208,208,209,210,211,212,212,213,214,215,216,216,217,218,219,220,220,221,222,223,224,224,225,226,227,228,228,229,230,231,231,232,233,234,234,235,236,237,238,238,239,240,241,241,242,243,244,244,245,246,247,247,248,249,249,250,251,252,252,253,254,255,255};

struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- dtype helpers: F32 / F64 / F16 / BF16 storage, conversions with round-to-nearest-even ----
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
  if (e == 0) {
    float v = float(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00 : 0x7c00));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                                // below 2^-14: subnormal half; the FPU rounds
    float a;
    std::memcpy(&a, &ax, 4);
    a += 0.5f;
    uint32_t b;
    std::memcpy(&b, &a, 4);
    return uint16_t(sign | (b - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1);  // rebias exponent, round half to even
  return uint16_t(sign | (ax >> 13));
}
static inline float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {  // finite inputs only (reconstructions)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

struct F32 {
  using T = float;
  static constexpr double tiny = 1.1754943508222875e-38;
  static float to_f(T v) { return v; }
  static double to_d(T v) { return v; }
  static T recon(int32_t q, double step) { return float(double(q) * step); }
};
struct F64 {
  using T = double;
  static constexpr double tiny = 2.2250738585072014e-308;
  static float to_f(T v) { return float(v); }
  static double to_d(T v) { return v; }
  static T recon(int32_t q, double step) { return double(q) * step; }
};
struct F16 {
  using T = uint16_t;
  static constexpr double tiny = 6.103515625e-05;
  static float to_f(T v) { return f16_to_f32(v); }
  static double to_d(T v) { return f16_to_f32(v); }
  static T recon(int32_t q, double step) { return f32_to_f16(float(double(q) * step)); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr double tiny = 1.1754943508222875e-38;
  static float to_f(T v) { return bf16_to_f32(v); }
  static double to_d(T v) { return bf16_to_f32(v); }
  static T recon(int32_t q, double step) { return f32_to_bf16(float(double(q) * step)); }
};

static inline uint64_t zigzag(int64_t d) { return (uint64_t(d) << 1) ^ uint64_t(d >> 63); }  // branch-free
static inline int64_t unzigzag(uint64_t z) { return (z & 1) ? -int64_t((z + 1) >> 1) : int64_t(z >> 1); }
static inline int bit_length(uint64_t v) { return 63 - __builtin_clzll(v | 1) + (v != 0); }  // no branch

static inline int64_t fixed_log2(uint64_t v) {
  int e = bit_length(v) - 1;
  uint64_t frac = (e >= 8 ? (v >> (e - 8)) : (v << (8 - e))) & 255;
  return int64_t(e) * 256 + kLogFrac[frac];
}

static int64_t estimate_cost(const std::vector<uint32_t>& hist, const std::vector<uint16_t>& present) {
  uint64_t n = 0;
  for (uint16_t t : present) n += hist[t];
  if (!n) return 0;
  int64_t ln = fixed_log2(n), cost = 0;
  for (uint16_t t : present) cost += int64_t(hist[t]) * (ln - fixed_log2(hist[t]));
  return cost + 256 * 16 * int64_t(present.size());
}

// counts -> frequencies summing to 2^pb (entropy.normalize_ref, integer-only, deterministic);
// freq[k] belongs to present[k] (ascending tokens); `order` = present indices by (count desc, index)
static void normalize(const std::vector<uint32_t>& hist, const std::vector<uint16_t>& present,
                      const std::vector<uint32_t>& order, uint64_t n, int pb, std::vector<uint32_t>& freq) {
  const int64_t m = int64_t(1) << pb;
  const size_t ns = present.size();
  int64_t sum = 0;
  freq.assign(ns, 0);
  for (size_t k = 0; k < ns; ++k) {
    int64_t f = int64_t((2 * uint64_t(hist[present[k]]) * uint64_t(m) + n) / (2 * n));  // rounded
    freq[k] = uint32_t(std::max<int64_t>(1, f));
    sum += freq[k];
  }
  int64_t diff = m - sum;
  while (diff > 0) {  // spread a shortfall one count at a time, most frequent first
    for (uint32_t k : order) {
      if (diff == 0) break;
      ++freq[k];
      --diff;
    }
  }
  while (diff < 0) {
    for (uint32_t k : order) {
      if (diff == 0) break;
      if (freq[k] > 1) {
        --freq[k];
        ++diff;
      }
    }
  }
}

// Frequency table entry k's head: zigzag(f_k - f_(k-1)) << 1 | (gap != 0) (entropy.write_table)
static inline uint32_t table_head(const std::vector<uint16_t>& present, const std::vector<uint32_t>& f, size_t k) {
  const int64_t d = int64_t(f[k]) - (k ? int64_t(f[k - 1]) : 0);
  const bool gap = present[k] != (k ? present[k - 1] + 1 : 0);
  return uint32_t(zigzag(d) << 1) | uint32_t(gap);
}
static inline int64_t varint_len(uint32_t v) { return v < (1u << 7) ? 1 : v < (1u << 14) ? 2 : v < (1u << 21) ? 3 : 4; }

// Model precision 12..15 with the smallest estimated block (entropy.choose_pb): coded bits from
// the integer log table plus the frequency table's bytes. Returns pb; freq holds its frequencies.
static int choose_model(const std::vector<uint32_t>& hist, const std::vector<uint16_t>& present,
                        std::vector<uint32_t>& freq) {
  const size_t ns = present.size();
  uint64_t n = 0;
  for (uint16_t t : present) n += hist[t];
  std::vector<uint32_t> order(ns);
  for (size_t k = 0; k < ns; ++k) order[k] = uint32_t(k);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    const uint32_t ca = hist[present[a]], cb = hist[present[b]];
    return ca != cb ? ca > cb : a < b;
  });
  std::vector<uint32_t> f;
  int best_pb = -1;
  int64_t best = 0;
  // entropy.max_pb: 2^pb <= n / 2, at least kMinPb and a slot per symbol (the decoder builds a
  // 2^pb-slot table per block)
  const int top = std::max({kMinPb, bit_length(uint64_t(ns) - 1), std::min(kMaxPb, bit_length(n) - 2)});
  for (int pb = kMinPb; pb <= top; ++pb) {
    if (ns > (size_t(1) << pb)) continue;
    normalize(hist, present, order, n, pb, f);
    int64_t cost = 0;
    for (size_t k = 0; k < ns; ++k)
      cost += int64_t(hist[present[k]]) * (256 * pb - fixed_log2(f[k])) +
              8 * 256 * varint_len(table_head(present, f, k));
    if (best_pb < 0 || cost < best) {
      best = cost, best_pb = pb;
      freq.swap(f);
    }
  }
  return best_pb;
}

struct Out {
  std::string& s;
  void u8(uint8_t v) { s.push_back(char(v)); }
  void u16(uint16_t v) { s.append(reinterpret_cast<const char*>(&v), 2); }
  void u32(uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
  void raw(const void* p, size_t n) { s.append(static_cast<const char*>(p), n); }
  void varint(uint32_t v) {
    while (v >= 0x80) {
      s.push_back(char((v & 0x7f) | 0x80));
      v >>= 7;
    }
    s.push_back(char(v));
  }
};

// Per-thread scratch, reused across blocks (the 64K-entry arrays are cleared via `present` only).
// rANS encode of full steps s = full-1 .. 0 with AVX-512, the same words as the scalar loop. The
// scalar loop takes lanes 31..0 and appends a word for each lane that must renormalise; here the
// states sit in two vectors in reversed lane order (element k = lane 31-k, then lane 15-k), so a
// compress of each vector appends in that same order. Symbol fields (EncScratch's sx, sr, sc) of
// tokens below 64 come from registers by two-table permutes; three gathers only for a vector with
// a token above (none at REL 1e-2 on an FL update). The three 16-lane gathers per vector were the
// loop's largest cost.
#define FC_SZ_ENC_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
struct EncFields {  // entries 0..63 of sx, sr, sc: four vectors each
  __m512i x[4], r[4], c[4];
};
// one 16-lane vector of states (reversed lane order) encodes its 16 tokens; REG: fields from F
// (and gathers for tokens >= 64), else three gathers
template <bool REG>
FC_SZ_ENC_TARGET static inline __m512i rans_encode_vec(__m512i x, __m256i t16, const EncFields& F, const int* ix,
                                                      const int* ir, const int* ic, uint16_t* wp, int64_t& nw) {
  const __m512i rev = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i t = _mm512_permutexvar_epi32(rev, _mm512_cvtepu16_epi32(t16));
  __m512i xs, rcp, cc;
  if constexpr (!REG) {
    xs = _mm512_i32gather_epi32(t, ix, 4);
    rcp = _mm512_i32gather_epi32(t, ir, 4);
    cc = _mm512_i32gather_epi32(t, ic, 4);
  } else {
  const __mmask16 up = _mm512_test_epi32_mask(t, _mm512_set1_epi32(32));  // entries 32..63: the upper pair
  xs = _mm512_mask_blend_epi32(up, _mm512_permutex2var_epi32(F.x[0], t, F.x[1]),
                               _mm512_permutex2var_epi32(F.x[2], t, F.x[3]));
  rcp = _mm512_mask_blend_epi32(up, _mm512_permutex2var_epi32(F.r[0], t, F.r[1]),
                                _mm512_permutex2var_epi32(F.r[2], t, F.r[3]));
  cc = _mm512_mask_blend_epi32(up, _mm512_permutex2var_epi32(F.c[0], t, F.c[1]),
                               _mm512_permutex2var_epi32(F.c[2], t, F.c[3]));
  const __mmask16 big = _mm512_cmpge_epu32_mask(t, _mm512_set1_epi32(64));
  if (big) {
    xs = _mm512_mask_i32gather_epi32(xs, big, t, ix, 4);
    rcp = _mm512_mask_i32gather_epi32(rcp, big, t, ir, 4);
    cc = _mm512_mask_i32gather_epi32(cc, big, t, ic, 4);
  }
  }
  const __mmask16 emit = _mm512_cmpge_epu32_mask(x, _mm512_and_si512(xs, _mm512_set1_epi32(int(0xFFFF0000u))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wp + nw), _mm256_maskz_compress_epi16(emit, _mm512_cvtepi32_epi16(x)));
  nw += _mm_popcnt_u32(emit);
  x = _mm512_mask_srli_epi32(x, emit, x, 16);
  const __m512i sh = _mm512_and_si512(xs, _mm512_set1_epi32(0xFF));
  const __m512i pe = _mm512_srlv_epi64(_mm512_mul_epu32(x, rcp), _mm512_and_si512(sh, _mm512_set1_epi64(0xFFFFFFFFll)));
  const __m512i po = _mm512_srlv_epi64(_mm512_mul_epu32(_mm512_srli_epi64(x, 32), _mm512_srli_epi64(rcp, 32)),
                                       _mm512_srli_epi64(sh, 32));
  const __m512i q = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  return _mm512_add_epi32(_mm512_add_epi32(x, _mm512_and_si512(cc, _mm512_set1_epi32(0xFFFF))),
                          _mm512_mullo_epi32(q, _mm512_srli_epi32(cc, 16)));
}
template <bool REG>
FC_SZ_ENC_TARGET static int64_t rans_encode_loop(uint32_t* st, const uint16_t* tok, int64_t full, const uint32_t* sx,
                                                 const uint32_t* sr, const uint32_t* sc, uint16_t* wp, int64_t nw) {
  const __m512i rev = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int* ix = reinterpret_cast<const int*>(sx);
  const int* ir = reinterpret_cast<const int*>(sr);
  const int* ic = reinterpret_cast<const int*>(sc);
  EncFields F;  // (entries of tokens absent from the block are stale and never selected)
  if constexpr (REG)
    for (int k = 0; k < 4; ++k) {
      F.x[k] = _mm512_loadu_si512(sx + 16 * k);
      F.r[k] = _mm512_loadu_si512(sr + 16 * k);
      F.c[k] = _mm512_loadu_si512(sc + 16 * k);
    }
  __m512i x0 = _mm512_permutexvar_epi32(rev, _mm512_loadu_si512(st + 16));
  __m512i x1 = _mm512_permutexvar_epi32(rev, _mm512_loadu_si512(st));
  for (int64_t s = full - 1; s >= 0; --s) {
    const uint16_t* tp = tok + s * kLanes;
    x0 = rans_encode_vec<REG>(x0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp + 16)), F, ix, ir, ic, wp, nw);
    x1 = rans_encode_vec<REG>(x1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp)), F, ix, ir, ic, wp, nw);
  }
  _mm512_storeu_si512(st + 16, _mm512_permutexvar_epi32(rev, x0));
  _mm512_storeu_si512(st, _mm512_permutexvar_epi32(rev, x1));
  return nw;
}
// `big`: how many of the block's tokens are >= 64. Registers when at most 1 in 16 is: a vector
// holding one pays the permutes and the gathers. (bench/sz_build_ab.py, encode, one thread, on
// uncommitted variants: 1 in 32 left the update at REL 1e-3 on gathers in some blocks, 0.84x of the
// gathers-only build against 0.80x; 1 in 8 read the same as 1 in 16; Kaiming at 1e-3 stays on
// gathers with either)
FC_SZ_ENC_TARGET static int64_t rans_encode_avx512(uint32_t* st, const uint16_t* tok, int64_t full, int64_t ntok,
                                                   int64_t big, const uint32_t* sx, const uint32_t* sr,
                                                   const uint32_t* sc, uint16_t* wp, int64_t nw) {
  if (big * 16 <= ntok) return rans_encode_loop<true>(st, tok, full, sx, sr, sc, wp, nw);
  return rans_encode_loop<false>(st, tok, full, sx, sr, sc, wp, nw);
}

struct EncScratch {
  std::vector<int32_t> qeff;
  std::vector<uint8_t> outlier;
  std::vector<uint16_t> tok, tok_r, words;
  std::vector<int32_t> wide;
  std::vector<uint32_t> hist;
  std::vector<uint64_t> zmask;  // bit per token: is it token 4 (a zero residual)
  std::vector<uint32_t> sub;  // 4 interleaved sub-histograms of the tokens < kSubRange
  // per token, the rANS encoder's symbol: sx = xmax | shift (xmax = f << (31 - pb) has 16 zero low
  // bits), sr = floor(2^shift / f) + 1 with shift = 31 + ceil(log2 f) (Granlund-Montgomery: exact
  // x / f for x < 2^31; < 2^32 since f > 2^(shift-32)), sc = cum | (M - f) << 16
  std::vector<uint32_t> sx, sr, sc;
  EncScratch() : hist(kTokens), sub(4 * kSubRange), sx(kTokens), sr(kTokens), sc(kTokens) {}
};

// Stage 1 for one block, branch-free so it vectorises: codes, the outlier test, reconstructions
// checked in the tensor's own dtype. Returns the number of outliers.
template <class D>
__attribute__((always_inline)) inline int64_t quantize_kernel(const typename D::T* __restrict x, int64_t n, float inv,
                                                              double step, double bound, int32_t* __restrict q,
                                                              uint8_t* __restrict bad) {
  int64_t nbad = 0;
  if constexpr (std::is_same_v<D, F32>) {
    // float32 input: the checks in float, 16 lanes a vector where double took 8. The error
    // |x - recon| rounded to float decides unless it lands within one float of the bound: err_f < bf
    // (bf = the largest float <= bound) means err < bound, err_f > the next float above bf means err
    // > bound (rounding is monotone); in between, the exact double check runs in a second pass.
    float bf = float(bound);
    if (double(bf) > bound) bf = std::nextafter(bf, 0.0f);
    const float bn = std::nextafter(bf, INFINITY);
    int64_t namb = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i];
      const float y = v * inv;
      const float ay = __builtin_fabsf(y);
      const float ys = ay < kMaxQuant ? y : 0.0f;         // NaN compares false
      const float rr = (ys + 12582912.0f) - 12582912.0f;  // round half to even (|ys| < 2^22)
      const int32_t qi = int32_t(rr);
      const float err = __builtin_fabsf(v - D::recon(qi, step));
      const float ax = __builtin_fabsf(v);
      int32_t good = ay < kMaxQuant ? 1 : 0;
      good &= ax <= 3.4028234663852886e38f ? 1 : 0;                      // finite
      good &= (ax >= 1.1754943508222875e-38f ? 1 : 0) | (v == 0.0f ? 1 : 0);  // not subnormal
      const int32_t amb = good & (err >= bf ? 1 : 0) & (err <= bn ? 1 : 0);
      good &= err < bf ? 1 : 0;
      q[i] = qi;
      bad[i] = uint8_t((1 - good) + amb);  // 2: decided below
      nbad += 1 - good;
      namb += amb;
    }
    if (namb) {
      for (int64_t i = 0; i < n; ++i) {
        if (bad[i] != 2) continue;
        const bool ok = __builtin_fabs(double(x[i]) - double(D::recon(q[i], step))) <= bound;
        bad[i] = uint8_t(!ok);
        nbad -= ok;
      }
    }
    return nbad;
  }
  for (int64_t i = 0; i < n; ++i) {
    const typename D::T v = x[i];
    const float y = D::to_f(v) * inv;
    const float ay = __builtin_fabsf(y);
    const float ys = ay < kMaxQuant ? y : 0.0f;                // NaN compares false
    const float rr = (ys + 12582912.0f) - 12582912.0f;         // round half to even (|ys| < 2^22)
    const int32_t qi = int32_t(rr);
    const double xd = D::to_d(v);
    const double xh = D::to_d(D::recon(qi, step));
    const double ax = __builtin_fabs(xd);
    const double err = __builtin_fabs(xd - xh);
    int32_t good = ay < kMaxQuant ? 1 : 0;
    good &= ax <= 1.7976931348623157e308 ? 1 : 0;             // finite
    good &= (ax >= D::tiny ? 1 : 0) | (xd == 0.0 ? 1 : 0);     // not subnormal
    good &= err <= bound ? 1 : 0;                              // the promise, re-checked in the dtype
    q[i] = qi;
    bad[i] = uint8_t(1 - good);
    nbad += 1 - good;
  }
  return nbad;
}

// The quantize kernel vectorises; AVX2 and AVX-512 clones (chosen at run time) run it 4-16
// values wide while the default build stays portable (no -march=native).
template <class D>
__attribute__((target("avx2"))) int64_t quantize_avx2(const typename D::T* x, int64_t n, float inv, double step,
                                                      double bound, int32_t* q, uint8_t* bad) {
  return quantize_kernel<D>(x, n, inv, step, bound, q, bad);
}
template <class D>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"))) int64_t quantize_avx512(
    const typename D::T* x, int64_t n, float inv, double step, double bound, int32_t* q, uint8_t* bad) {
  return quantize_kernel<D>(x, n, inv, step, bound, q, bad);
}
template <class D>
int64_t quantize_default(const typename D::T* x, int64_t n, float inv, double step, double bound, int32_t* q,
                         uint8_t* bad) {
  return quantize_kernel<D>(x, n, inv, step, bound, q, bad);
}
static const bool kHasAvx2 = __builtin_cpu_supports("avx2");
static const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                               __builtin_cpu_supports("popcnt");
static const bool kHasVbmi2 = kHasAvx512 && __builtin_cpu_supports("avx512vbmi2");  // the encoder's compress
static const bool kHasAvx512Cd = kHasAvx512 && __builtin_cpu_supports("avx512cd");  // the estimate's lzcnt
// tests force the portable loops (AVX2 at most) to check them against the AVX-512 ones (set between calls)
static std::atomic<bool> g_portable{false};
static bool use_avx512() { return kHasAvx512 && !g_portable.load(std::memory_order_relaxed); }
template <class D>
static int64_t quantize_block(const typename D::T* x, int64_t n, float inv, double step, double bound, int32_t* q,
                              uint8_t* bad) {
  if (use_avx512()) return quantize_avx512<D>(x, n, inv, step, bound, q, bad);
  return kHasAvx2 ? quantize_avx2<D>(x, n, inv, step, bound, q, bad)
                  : quantize_default<D>(x, n, inv, step, bound, q, bad);
}

static inline int popcount64(uint64_t v) {  // SWAR: the portable build has no popcnt instruction
  v = v - ((v >> 1) & 0x5555555555555555ull);
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return int((v * 0x0101010101010101ull) >> 56);
}

// Plain-mode tokens: 4 + zigzag(d) within the radius, ESC_WIDE beyond it, ESC_VAL for outliers.
// Written so it vectorises (int32 lanes; |d| < 2^23 since |q| <= 2^22).
__attribute__((always_inline)) inline void tokens_kernel(const int32_t* __restrict q, const uint8_t* __restrict bad,
                                                         int64_t n, bool lor, uint16_t* __restrict tok) {
  if (n <= 0) return;
  auto one = [&](int32_t d, uint8_t b) {
    const uint32_t z = (uint32_t(d) << 1) ^ uint32_t(d >> 31);
    uint32_t t = z <= uint32_t(kMaxZigzag) ? z + kTokenBase : kEscWide;
    return uint16_t(b ? kEscVal : t);
  };
  if (lor) {
    tok[0] = one(q[0], bad[0]);
    for (int64_t i = 1; i < n; ++i) tok[i] = one(q[i] - q[i - 1], bad[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) tok[i] = one(q[i], bad[i]);
  }
}
__attribute__((target("avx2"))) void tokens_avx2(const int32_t* q, const uint8_t* bad, int64_t n, bool lor,
                                                 uint16_t* tok) {
  tokens_kernel(q, bad, n, lor, tok);
}
void tokens_default(const int32_t* q, const uint8_t* bad, int64_t n, bool lor, uint16_t* tok) {
  tokens_kernel(q, bad, n, lor, tok);
}
static void tokens_block(const int32_t* q, const uint8_t* bad, int64_t n, bool lor, uint16_t* tok) {
  kHasAvx2 ? tokens_avx2(q, bad, n, lor, tok) : tokens_default(q, bad, n, lor, tok);
}

// zm[j] bit k = (tok[64 j + k] == token 4, the zero residual); bits past n are 0.
__attribute__((always_inline)) inline void zero_masks_kernel(const uint16_t* __restrict tok, int64_t n,
                                                             uint64_t* __restrict zm) {
  const int64_t full = n / 64;
  for (int64_t j = 0; j < full; ++j) {
    uint64_t m = 0;
    const uint16_t* t = tok + 64 * j;
    for (int k = 0; k < 64; ++k) m |= uint64_t(t[k] == kTokenBase) << k;
    zm[j] = m;
  }
  if (n % 64) {
    uint64_t m = 0;
    for (int64_t k = 0; k < n % 64; ++k) m |= uint64_t(tok[64 * full + k] == kTokenBase) << k;
    zm[full] = m;
  }
}
__attribute__((target("avx2"))) void zero_masks_avx2(const uint16_t* tok, int64_t n, uint64_t* zm) {
  const int64_t full = n / 64;
  const __m256i four = _mm256_set1_epi16(short(kTokenBase));
  for (int64_t j = 0; j < full; ++j) {
    const __m256i* t = reinterpret_cast<const __m256i*>(tok + 64 * j);
    uint64_t m = 0;
    for (int h = 0; h < 2; ++h) {  // 32 tokens -> 32 mask bits: compare, pack to bytes, fix lane order
      const __m256i a = _mm256_cmpeq_epi16(_mm256_loadu_si256(t + 2 * h), four);
      const __m256i b = _mm256_cmpeq_epi16(_mm256_loadu_si256(t + 2 * h + 1), four);
      const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
      m |= uint64_t(uint32_t(_mm256_movemask_epi8(p))) << (32 * h);
    }
    zm[j] = m;
  }
  if (n % 64) zero_masks_kernel(tok + 64 * full, n % 64, zm + full);
}
static void zero_masks(const uint16_t* tok, int64_t n, uint64_t* zm) {
  kHasAvx2 ? zero_masks_avx2(tok, n, zm) : zero_masks_kernel(tok, n, zm);
}

// Calls f(zero, start, len) for the maximal segments of zero / non-zero tokens, in order, from the
// masks: the work is per segment, so there is no mispredicted branch per token.
template <class F>
static inline void for_each_segment(const uint64_t* zm, int64_t n, F&& f) {
  int64_t start = 0;
  bool zero = n > 0 && (zm[0] & 1);
  int64_t i = 0;
  while (i < n) {
    const int64_t j = i >> 6, b = i & 63;
    const int64_t lim = std::min<int64_t>(64, n - (j << 6));
    // bits of the current kind, from position b on; find the first bit of the other kind
    const uint64_t w = (zero ? ~zm[j] : zm[j]) >> b;
    const int64_t len = w ? __builtin_ctzll(w) : 64 - b;
    if (b + len < lim) {
      i += len;
      f(zero, start, i - start);
      start = i;
      zero = !zero;
    } else {
      i = (j << 6) + lim;
    }
  }
  if (n > start) f(zero, start, n - start);
}

// The digits of a 16-token step's interior zero runs (those that neither touch lane 0 nor lane 15,
// so begin and end inside the step), by the step's zero mask z: `keep` holds the lanes that carry a
// digit (a run's last nd zeros, as the scalar writer places them), `ones` those whose digit is 1
// (token kRunB). A run that touches lane 0 or 15 depends on the steps around it: the AVX-512 writer
// places those itself.
// Runs bounded inside one byte of z come from a 256-entry table (512 bytes); the one run that may
// cross lanes 7/8 is computed. A 65,536-entry table by the whole mask (256 KiB) was as fast on a warm
// cache, but right after local training it missed on most steps: it cost ~0.4 ms of a 1.7 ms encode.
static const uint16_t* byte_interior_digits() {  // bits 0-7: keep, 8-15: ones
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> t(256);
    for (uint32_t z = 0; z < 256; ++z) {
      uint32_t keep = 0, ones = 0;
      int k = 0;
      while (k < 8 && ((z >> k) & 1)) ++k;  // the leading run: not bounded inside the byte
      while (k < 8) {
        if (!((z >> k) & 1)) {
          ++k;
          continue;
        }
        const int a = k;
        while (k < 8 && ((z >> k) & 1)) ++k;
        if (k == 8) break;  // the trailing run: not bounded inside the byte
        const uint64_t v = uint64_t(k - a) + 1;
        const int nd = bit_length(v) - 1;
        for (int d = 0; d < nd; ++d) {
          keep |= 1u << (k - nd + d);
          ones |= uint32_t((v >> d) & 1) << (k - nd + d);
        }
      }
      t[z] = uint16_t(keep | (ones << 8));
    }
    return t;
  }();
  return table.data();
}

static inline void interior_digits(const uint16_t* byte_table, uint32_t z, uint32_t& keep, uint32_t& ones) {
  const uint32_t zl = z & 0xFF, zu = z >> 8, tl = byte_table[zl], tu = byte_table[zu];
  // the run through lanes 7/8: a zeros from lane 7 down, b from lane 8 up (8: the whole byte, so the
  // run touches lane 0 or 15 and is not interior); a + b = 0 gives nd = 0, no digits
  const int a = __builtin_clz(((~zl & 0xFF) << 24) | 0x800000u), b = __builtin_ctz((~zu & 0xFF) | 0x100u);
  const uint32_t v = uint32_t(a + b) + 1;
  const int nd = 31 - __builtin_clz(v);  // bit_length(v) - 1 digits
  const uint32_t low = (1u << nd) - 1, valid = 0u - uint32_t((a < 8) & (b < 8));
  const int at = 8 + b - nd;  // the run's last nd lanes
  keep = (tl & 0xFF) | ((tu & 0xFF) << 8) | ((low << at) & valid);
  ones = (tl >> 8) | (tu & 0xFF00) | (((v & low) << at) & valid);
}

// Run-mode tokens from the plain ones, 16 at a time with AVX-512, for the whole 64-token words of
// the zero masks: writes out[o...], advances o, and leaves in r the zero run still pending at the
// end; returns the tokens consumed (a multiple of 64; the caller's scalar pass does the rest).
// A zero run becomes its nd digits (bijective base 2 of its length: the bits of length + 1 below the
// top one, least significant first), written where the run's zeros were. Per step, with no branch on
// the data (a mispredicted branch per step cost more than all the vector work):
//   1. the leading run (the zeros carried from earlier steps plus this step's leading zeros; it ends
//      here) writes its digits as one 16-token vector store, o advancing by nd (0 for no run);
//   2. the step's tokens without the leading and trailing zeros go out by one compress, each interior
//      run (one that begins and ends inside the step) replaced by its digits in the places of its last
//      nd zeros (interior_digits, by the step's zero mask);
//   3. the trailing zeros are carried on.
// Same tokens as the per-segment loop (kept for tails and CPUs without AVX-512).
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) static int64_t run_tokens_encode_avx512(
    const uint16_t* tok, const uint64_t* zm, int64_t n, uint16_t* out, int64_t& o_io, uint64_t& r_io) {
  const __m512i run_a = _mm512_set1_epi32(int(kRunA)), run_b = _mm512_set1_epi32(int(kRunB));
  const __m256i lane16 = _mm256_set_epi16(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i one16 = _mm256_set1_epi16(1), run_a16 = _mm256_set1_epi16(short(kRunA));
  const uint16_t* byte_table = byte_interior_digits();
  int64_t o = o_io;
  uint64_t r = r_io;
  const int64_t end = n & ~int64_t(63);
  for (int64_t i = 0; i < end; i += 16) {
    const uint32_t z = uint32_t(zm[i >> 6] >> (i & 63)) & 0xFFFF;
    if (z == 0xFFFF) {  // inside a run (predictable: long runs take many steps in a row)
      r += 16;
      continue;
    }
    const uint32_t nz = ~z & 0xFFFF;
    const uint64_t v = r + uint64_t(__builtin_ctz(nz)) + 1;  // the leading run's length + 1
    const int nd = bit_length(v) - 1;
    if (nd < 16) {
      const __m256i d = _mm256_add_epi16(run_a16, _mm256_and_si256(_mm256_srlv_epi16(_mm256_set1_epi16(short(v)),
                                                                                      lane16), one16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o), d);
    } else {  // a run of 2^16 - 1 zeros or more
      for (int k = 0; k < nd; ++k) out[o + k] = uint16_t(kRunA + ((v >> k) & 1));
    }
    o += nd;
    uint32_t keepz, ones;
    interior_digits(byte_table, z, keepz, ones);
    const __m512i t = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tok + i)));
    const __m512i vals = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(t, __mmask16(keepz), run_a), __mmask16(ones),
                                               run_b);
    const __mmask16 keep = __mmask16(nz | keepz);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o),
                        _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(keep, vals)));
    o += _mm_popcnt_u32(keep);
    r = uint64_t(__builtin_clz(nz) - 16);  // the trailing zeros (0: none)
  }
  o_io = o, r_io = r;
  return end;
}

// Stage 2's estimate: over i = 0, 8, 16, ... < n with !bad[i], the summed bit lengths of zigzag(q[i])
// (est_none) and of zigzag(q[i] - q[i-1]) (est_lor, q[-1] = 0). The AVX-512 loop gathers 16 samples
// (128 values) a step where the strided scalar loop (kept for other CPUs and the tail) takes one
// sample at a time. The sums are the scalar loop's exactly: |q| <= 2^22, so zigzag fits 32 bits.
__attribute__((target("avx512f,avx512cd,avx512bw,avx512vl"))) static void predictor_estimate_avx512(
    const int32_t* q, const uint8_t* bad, int64_t n, int64_t& est_none, int64_t& est_lor) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(int(kEstStride)));
  const __m512i c32 = _mm512_set1_epi32(32), ff = _mm512_set1_epi32(0xFF);
  __m512i sn = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
  auto bitlen = [&](__m512i d) {  // bit_length(zigzag(d)) = 32 - lzcnt
    const __m512i z = _mm512_xor_si512(_mm512_slli_epi32(d, 1), _mm512_srai_epi32(d, 31));
    return _mm512_sub_epi32(c32, _mm512_lzcnt_epi32(z));
  };
  // i = 0 (q[-1] = 0) in the scalar tail's way; vectors from i = 8 while the 16 samples and the
  // 4-byte reads of their flags stay inside [0, n)
  int64_t i = kEstStride;
  for (; i + 15 * kEstStride + 4 <= n; i += 16 * kEstStride) {
    const __m512i qi = _mm512_i32gather_epi32(idx, q + i, 4);
    const __m512i qp = _mm512_i32gather_epi32(idx, q + i - 1, 4);
    const __m512i b = _mm512_and_si512(_mm512_i32gather_epi32(idx, reinterpret_cast<const int*>(bad + i), 1), ff);
    const __mmask16 keep = _mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512());
    sn = _mm512_mask_add_epi32(sn, keep, sn, bitlen(qi));
    sl = _mm512_mask_add_epi32(sl, keep, sl, bitlen(_mm512_sub_epi32(qi, qp)));
  }
  // lanes hold at most n / 128 + 1 samples of <= 24 bits each: no 32-bit overflow below 2^24 values
  // per block (codec.MAX_BLOCK)
  est_none = _mm512_reduce_add_epi32(sn), est_lor = _mm512_reduce_add_epi32(sl);
  for (int64_t k = 0; k < n; k += (k == 0 ? i : kEstStride)) {  // i = 0, then the tail
    const int32_t qk = q[k];
    const int64_t keep = !bad[k];
    est_none += keep * bit_length(zigzag(qk));
    est_lor += keep * bit_length(zigzag(int64_t(qk) - (k ? q[k - 1] : 0)));
  }
}
static void predictor_estimate(const int32_t* q, const uint8_t* bad, int64_t n, int64_t& est_none, int64_t& est_lor) {
  if (use_avx512() && kHasAvx512Cd) return predictor_estimate_avx512(q, bad, n, est_none, est_lor);
  est_none = est_lor = 0;
  for (int64_t i = 0; i < n; i += kEstStride) {
    const int32_t qi = q[i];
    const int64_t keep = !bad[i];
    est_none += keep * bit_length(zigzag(qi));
    est_lor += keep * bit_length(zigzag(int64_t(qi) - (i ? q[i - 1] : 0)));
  }
}

// word k of dst = src[nw - 1 - k]: the rANS words go out in the order the decoder reads them. dst
// is a byte position in the block's output (any alignment): unaligned vector stores, memcpy words.
__attribute__((target("avx512f,avx512bw"))) static void reverse_words_avx512(const uint16_t* src, int64_t nw,
                                                                             char* dst) {
  const __m512i rev = _mm512_set_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                       21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  int64_t k = 0;
  for (; k + 32 <= nw; k += 32)
    _mm512_storeu_si512(dst + 2 * k, _mm512_permutexvar_epi16(rev, _mm512_loadu_si512(src + nw - k - 32)));
  for (; k < nw; ++k) std::memcpy(dst + 2 * k, src + nw - 1 - k, 2);
}
static void reverse_words(const uint16_t* src, int64_t nw, char* dst) {
  if (use_avx512()) return reverse_words_avx512(src, nw, dst);
  for (int64_t k = 0; k < nw; ++k) std::memcpy(dst + 2 * k, src + nw - 1 - k, 2);
}

// Histogram of tok[0, n) into S.hist (which is all zeros on entry); returns the largest token, at
// least kSubRange - 1 (the presence scan stops there). Tokens below kSubRange go to 4 interleaved
// sub-histograms, so runs of one token do not wait on their own increments (store forwarding).
static uint32_t histogram(const uint16_t* tok, int64_t n, EncScratch& S) {
  uint32_t* sub = S.sub.data();
  uint32_t top = kSubRange - 1;
  for (int64_t i = 0; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t t = tok[i + k];
      if (t < kSubRange) {
        ++sub[k * kSubRange + t];
      } else {
        ++S.hist[t];
        top = std::max(top, t);
      }
    }
  }
  for (int64_t i = n & ~int64_t(3); i < n; ++i) ++S.hist[tok[i]], top = std::max<uint32_t>(top, tok[i]);
  for (uint32_t t = 0; t < kSubRange; ++t) {
    S.hist[t] += sub[t] + sub[kSubRange + t] + sub[2 * kSubRange + t] + sub[3 * kSubRange + t];
    sub[t] = sub[kSubRange + t] = sub[2 * kSubRange + t] = sub[3 * kSubRange + t] = 0;
  }
  return top;
}

template <class D>
static void encode_block(const typename D::T* x, int64_t n, float inv, double step, double bound, EncScratch& S,
                         std::string& result) {
  using T = typename D::T;
  const size_t isz = sizeof(T);
  S.qeff.resize(n);
  S.outlier.resize(n);
  int32_t* q = S.qeff.data();
  const uint8_t* bad = S.outlier.data();
  const int64_t n_out = quantize_block<D>(x, n, inv, step, bound, q, S.outlier.data());
  std::string outl;
  if (n_out) {  // outliers hold the previous code (q_eff); their values go verbatim, in order
    outl.reserve(size_t(n_out) * isz);
    // 8 flags a step: a branch per value mispredicts wherever outliers are not rare (Kaiming
    // weights at REL 1e-3 have a few per block, from the bound's re-check)
    for (int64_t j = 0; j < n; j += 8) {
      uint64_t w = 0;
      std::memcpy(&w, bad + j, size_t(std::min<int64_t>(8, n - j)));
      for (; w; w &= w - 1) {
        const int64_t i = j + (__builtin_ctzll(w) >> 3);
        q[i] = i ? q[i - 1] : 0;
        outl.append(reinterpret_cast<const char*>(x + i), isz);
      }
    }
  }
  // Stage 2: predictor chosen from the summed bit length of zigzag residuals over the non-outliers
  // at every kEstStride-th position (a sample: the estimate costs ~1/8 of a pass)
  int64_t est_none = 0, est_lor = 0;
  predictor_estimate(q, bad, n, est_none, est_lor);
  const bool lor = est_lor < est_none;
  // Stage 3: plain-mode tokens (a vectorised pass) and the zero-token masks; then, where zero
  // residuals are common, the run-mode tokens; then one histogram
  S.tok.resize(n + 64);
  S.wide.clear();
  uint16_t* tok = S.tok.data();
  tokens_block(q, bad, n, lor, tok);
  const int64_t nmask = (n + 63) / 64;
  S.zmask.resize(nmask);
  uint64_t* zm = S.zmask.data();
  zero_masks(tok, n, zm);
  uint64_t h4 = 0;  // zero residuals (token 4)
  for (int64_t j = 0; j < nmask; ++j) h4 += uint64_t(popcount64(zm[j]));
  std::vector<uint32_t>& hist = S.hist;
  std::vector<uint16_t> pres_p, pres_r;
  uint64_t runs_a = 0, runs_b = 0;
  int64_t ntok_r = 0;
  // Run mode is considered only when zeros are common (>= 1/8 of the tokens), so noise-like blocks
  // skip the extra pass.
  const bool consider_run = h4 * kRunConsider >= uint64_t(n);
  if (consider_run) {
    // Run-mode tokens into a second buffer (if plain mode wins after all, it is simply not used).
    // A run of token 4 becomes its bijective base-2 digits, least significant first.
    S.tok_r.resize(n + 64);
    uint16_t* out = S.tok_r.data();
    int64_t o = 0, done = 0;
    uint64_t r = 0;
    if (use_avx512()) done = run_tokens_encode_avx512(tok, zm, n, out, o, r);
    auto digits = [&]() {
      const uint64_t v = r + 1;
      const int nd = bit_length(v) - 1;
      // 8 digits unconditionally (runs < 511 have fewer; the slack absorbs the rest and later
      // writes overwrite it): a loop of nd iterations mispredicts its exit on every run
      for (int k = 0; k < 8; ++k) out[o + k] = uint16_t(kRunA + ((v >> k) & 1));
      for (int k = 8; k < nd; ++k) out[o + k] = uint16_t(kRunA + ((v >> k) & 1));
      o += nd;
      r = 0;
    };
    // the rest (all of it without AVX-512): one pass over the zero masks, a segment at a time
    for_each_segment(zm + done / 64, n - done, [&](bool zero, int64_t at, int64_t len) {
      if (zero) {
        r += uint64_t(len);
        return;
      }
      if (r) digits();
      // 16-token copies may run past the segment: both buffers have 64 tokens of slack, and the
      // next segment overwrites what ran over
      const uint16_t* src = tok + done + at;
      for (int64_t k = 0; k < len; k += 16) std::memcpy(out + o + k, src + k, 32);
      o += len;
    });
    if (r) digits();
    ntok_r = o;
  }
  // The histogram of the run-mode tokens where they exist, else of the plain ones. The run-mode
  // stream is the plain one without token 4 and with digits (2, 3), which plain tokens never are,
  // so each histogram follows from the other. Counting the shorter stream also keeps the bulk of
  // zero residuals out of the counters: at REL 1e-2 most tokens are 4, and even 4 interleaved
  // sub-histograms then wait on their own increments.
  const uint32_t top = consider_run ? histogram(S.tok_r.data(), ntok_r, S) : histogram(tok, n, S);
  if (hist[kEscWide]) {  // rare: residuals beyond the radius, kept as int32 in order
    int32_t prev = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t d = lor ? q[i] - prev : q[i];
      prev = q[i];
      if (tok[i] == kEscWide) S.wide.push_back(d);
    }
  }
  // ascending presence lists: run mode's straight from the histogram; plain's drops the digits and
  // puts token 4 (if any) after the escapes 0, 1
  for (uint32_t t = 0; t <= top; ++t)
    if (hist[t]) (consider_run ? pres_r : pres_p).push_back(uint16_t(t));
  bool use_run = false;
  if (consider_run) {
    for (uint16_t t : pres_r)
      if (t < kRunA) pres_p.push_back(t);
    if (h4) pres_p.push_back(uint16_t(kTokenBase));
    for (uint16_t t : pres_r)
      if (t > kRunB) pres_p.push_back(t);
    const int64_t cost_r = estimate_cost(hist, pres_r);
    runs_a = hist[kRunA], runs_b = hist[kRunB];  // the digits: plain tokens are never 2 or 3
    hist[kRunA] = hist[kRunB] = 0;
    hist[kTokenBase] = uint32_t(h4);
    const int64_t cost_p = estimate_cost(hist, pres_p);
    use_run = cost_r < cost_p;
    if (use_run) {
      hist[kRunA] = uint32_t(runs_a);
      hist[kRunB] = uint32_t(runs_b);
      hist[kTokenBase] = 0;
    }
  }
  std::vector<uint16_t>& present = use_run ? pres_r : pres_p;
  int64_t ntok = n;
  if (use_run) {
    tok = S.tok_r.data();
    ntok = ntok_r;
  }

  auto make_raw = [&]() {
    result.assign(1, char(kBlkRaw));
    result.append(reinterpret_cast<const char*>(x), size_t(n) * isz);
  };
  result.clear();
  std::vector<uint32_t> freq(present.size());
  if (present.size() > size_t(kMaxSymbols)) {
    make_raw();
  } else {
    const int pb = choose_model(hist, present, freq);
    const uint32_t M = 1u << pb;
    uint32_t c = 0;
    for (size_t k = 0; k < present.size(); ++k) {
      const uint32_t f = freq[k], shift = 31 + uint32_t(bit_length(f - 1));  // 31 + ceil(log2 f)
      S.sx[present[k]] = (f << (31 - pb)) | shift;
      S.sr[present[k]] = uint32_t(((uint64_t(1) << shift) / f) + 1);
      S.sc[present[k]] = c | ((M - f) << 16);
      c += f;
    }
    // rANS: encode backwards, lanes W-1..0 within a step; words come out reversed
    uint32_t st[kLanes];
    for (int l = 0; l < kLanes; ++l) st[l] = kRansL;
    S.words.resize(ntok + kLanes);
    uint16_t* wp = S.words.data();
    int64_t nw = 0;
    const uint32_t *sx = S.sx.data(), *sr = S.sr.data(), *sc = S.sc.data();
    auto enc = [&](int l, uint32_t t) {
      uint32_t xs = st[l];
      const uint32_t emit = xs >= (sx[t] & 0xFFFF0000u);  // branch-free: emitted ~1/3 of the time
      wp[nw] = uint16_t(xs);
      nw += emit;
      xs >>= emit << 4;
      const uint32_t qq = uint32_t((uint64_t(xs) * sr[t]) >> (sx[t] & 0xFF));
      st[l] = xs + (sc[t] & 0xFFFF) + qq * (sc[t] >> 16);
    };
    const int64_t full = ntok / kLanes;
    for (int64_t i = ntok - 1; i >= full * kLanes; --i) enc(int(i % kLanes), tok[i]);
    if (use_avx512() && kHasVbmi2) {
      int64_t small = 0;  // tokens below 64 (present is ascending)
      for (size_t k = 0; k < present.size() && present[k] < 64; ++k) small += hist[present[k]];
      nw = rans_encode_avx512(st, tok, full, ntok, ntok - small, sx, sr, sc, wp, nw);
    } else {
      for (int64_t s = full - 1; s >= 0; --s) {  // full steps: a fixed-count loop the compiler unrolls
        const uint16_t* tp = tok + s * kLanes;
        for (int l = kLanes - 1; l >= 0; --l) enc(l, tp[l]);
      }
    }
    Out o{result};
    o.s.reserve(32 + 3 * present.size() + 2 * size_t(nw) + 4 * S.wide.size() + outl.size());
    o.u8(uint8_t((lor ? kBlkLorenzo : 0) | (use_run ? kBlkRun : 0)));
    o.u8(uint8_t(pb));
    o.u32(uint32_t(ntok));
    o.u32(uint32_t(S.wide.size()));
    o.u32(uint32_t(n_out));
    o.u16(uint16_t(present.size()));
    int prev_t = -1;
    for (size_t k = 0; k < present.size(); ++k) {
      o.varint(table_head(present, freq, k));
      if (present[k] - prev_t - 1) o.varint(uint32_t(present[k] - prev_t - 2));
      prev_t = present[k];
    }
    for (int l = 0; l < kLanes; ++l) o.varint(st[l] - kRansL);
    o.u32(uint32_t(nw));
    const size_t at = o.s.size();  // the words, last first (rANS ran backwards)
    o.s.resize(at + 2 * size_t(nw));
    reverse_words(wp, nw, &o.s[at]);
    o.raw(S.wide.data(), 4 * S.wide.size());
    o.raw(outl.data(), outl.size());
    if (o.s.size() >= 1 + size_t(n) * isz) make_raw();
  }
  for (uint16_t t : pres_p) hist[t] = 0;
  for (uint16_t t : pres_r) hist[t] = 0;
}

// ---- decoder: every read bounds-checked; tables validated; loops bounded by the header counts ----
struct In {
  const uint8_t* p;
  size_t n, pos = 0;
  In(const uint8_t* p_, size_t n_) : p(p_), n(n_) {}
  const uint8_t* take(size_t k) {
    if (k > n - pos) throw FormatError("sz block: truncated");
    const uint8_t* r = p + pos;
    pos += k;
    return r;
  }
  template <class V>
  V get() {
    V v;
    std::memcpy(&v, take(sizeof(V)), sizeof(V));
    return v;
  }
  uint32_t varint() {
    uint32_t v = 0;
    for (int shift = 0; shift < 21; shift += 7) {
      uint8_t b = get<uint8_t>();
      v |= uint32_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    throw FormatError("sz block: varint too long in the frequency table");
  }
  uint32_t varint_state() {  // x - L of a final rANS state (entropy.write_states): 5 bytes at most
    uint64_t v = 0;
    for (int shift = 0; shift < 35; shift += 7) {
      uint8_t b = get<uint8_t>();
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) {
        if (v >= (uint64_t(kRansL) << 16) - kRansL) throw FormatError("sz block: rANS state out of range");
        return uint32_t(v) + kRansL;
      }
    }
    throw FormatError("sz block: varint too long in the rANS states");
  }
};

// Decoding a block runs in chunks of kDecChunk tokens, each in two passes over an L1-resident
// token buffer: pass 1 runs the 32 rANS lanes (AVX-512 when the CPU has it: two 16-lane vectors,
// gathers for the slot table, a masked expand for the renormalisation words); pass 2 turns tokens
// into values (residual table, predictor inverse, zero runs, escapes). Splitting them lets pass 1
// be pure SIMD; the buffer is 8 KB, so the second read of it is from L1.
template <class T>
struct DecScratch {
  std::vector<uint32_t> ent;   // slot -> freq | bias << 16 (freq <= 2^15, bias < freq)
  std::vector<uint16_t> stok;  // slot -> token; one padding entry for the 32-bit gather of the last slot
  std::vector<T> lut;          // token -> reconstructed value (predictor none)
  std::vector<int32_t> dlut;   // token -> residual (lorenzo); 0 for tokens 0-3
  std::vector<T> buf;          // run-mode Lorenzo blocks decode here first (slack for speculative writes)
  std::vector<uint16_t> tk;    // one chunk of tokens
  std::vector<uint64_t> ent64;  // slot -> ent | token << 32, or | value bits << 32 in the fused pass (AVX-512)
  DecScratch() : lut(kTokens), dlut(kTokens), tk(kDecChunk) {}
};

struct RansDec {  // pass 1's inputs and state
  uint32_t st[kLanes];
  const uint8_t* words;
  size_t nwords, ptr = 0;
  const uint32_t* ent;
  const uint16_t* stok;
  const uint64_t* ent64;  // ent | (token, or the value's bits in the fused pass) << 32
  int pb;
};

// Pass 1, portable and fully checked: tokens [0, cnt) of a chunk that starts at a step boundary.
// From ent and stok, or (AVX-512 builds no others) from ent64: its high half's low 16 bits are the
// token, or, in a fused block, VALUES writes the high half itself (a value's bits, or an escape's
// sentinel) to `dst` as float32, as the vector pass does.
template <bool VALUES = false>
static void rans_tokens_scalar(RansDec& R, void* dst, int64_t cnt) {
  const uint32_t mask = (1u << R.pb) - 1;
  uint16_t* tk = static_cast<uint16_t*>(dst);
  uint32_t* vals = static_cast<uint32_t*>(dst);
  for (int64_t j = 0; j < cnt; ++j) {
    const int l = int(j % kLanes);
    uint32_t x = R.st[l];
    uint32_t e;
    if (R.ent) {
      e = R.ent[x & mask];
      tk[j] = R.stok[x & mask];
    } else {
      const uint64_t q = R.ent64[x & mask];
      e = uint32_t(q);
      if (VALUES) vals[j] = uint32_t(q >> 32);
      else tk[j] = uint16_t(q >> 32);
    }
    x = (e & 0xFFFF) * (x >> R.pb) + (e >> 16);
    if (x < kRansL) {
      if (R.ptr >= R.nwords) throw FormatError("sz block: rANS stream truncated");
      uint16_t w;
      std::memcpy(&w, R.words + 2 * R.ptr++, 2);
      x = (x << 16) | w;
    }
    R.st[l] = x;
  }
}

// Pass 1 with AVX-512: up to `steps` full steps while 32 words are left (so the two 16-word loads
// stay inside the stream); returns the steps done. Same arithmetic and word order as the scalar
// pass: lanes in order 0..31, each needing lane takes the next word. A slot's entry is 64 bits,
// ent | token << 32 (DecScratch::ent64), so 16 lanes take two 8-lane gathers instead of one 16-lane
// gather for ent and one for the token (fewer gathered elements: the gathers bound this loop). VALUES:
// the high half is the value's float32 bits, stored to `dst` (float*) instead of tokens, so a plain
// block without a predictor or escapes needs no pass 2 (see decode_block).
template <bool VALUES>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) static int64_t rans_avx512(RansDec& R, void* dst,
                                                                                       int64_t steps) {
  __m512i x0 = _mm512_loadu_si512(R.st), x1 = _mm512_loadu_si512(R.st + 16);
  const __m512i mask = _mm512_set1_epi32(int((1u << R.pb) - 1)), lo16 = _mm512_set1_epi32(0xFFFF);
  const __m512i L = _mm512_set1_epi32(int(kRansL));
  const __m128i sh = _mm_cvtsi32_si128(R.pb);
  size_t ptr = R.ptr;
  int64_t s = 0;
  const long long* q = reinterpret_cast<const long long*>(R.ent64);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (; s < steps && ptr + kLanes <= R.nwords; ++s) {
    const __m512i sl0 = _mm512_and_si512(x0, mask), sl1 = _mm512_and_si512(x1, mask);
    // one 64-bit entry per slot (ent | token or value << 32): two 8-lane gathers per 16 lanes
    const __m512i g00 = _mm512_i32gather_epi64(_mm512_castsi512_si256(sl0), q, 8);
    const __m512i g01 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(sl0, 1), q, 8);
    const __m512i g10 = _mm512_i32gather_epi64(_mm512_castsi512_si256(sl1), q, 8);
    const __m512i g11 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(sl1, 1), q, 8);
    const __m512i e0 = _mm512_permutex2var_epi32(g00, even, g01), e1 = _mm512_permutex2var_epi32(g10, even, g11);
    const __m512i h0 = _mm512_permutex2var_epi32(g00, odd, g01), h1 = _mm512_permutex2var_epi32(g10, odd, g11);
    if (VALUES) {
      float* o = static_cast<float*>(dst) + s * kLanes;
      _mm512_storeu_si512(o, h0);
      _mm512_storeu_si512(o + 16, h1);
    } else {
      uint16_t* tk = static_cast<uint16_t*>(dst) + s * kLanes;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tk), _mm512_cvtepi32_epi16(h0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tk + 16), _mm512_cvtepi32_epi16(h1));
    }
    x0 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(e0, lo16), _mm512_srl_epi32(x0, sh)),
                          _mm512_srli_epi32(e0, 16));
    x1 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(e1, lo16), _mm512_srl_epi32(x1, sh)),
                          _mm512_srli_epi32(e1, 16));
    const __mmask16 n0 = _mm512_cmplt_epu32_mask(x0, L);
    const __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(R.words + 2 * ptr)));
    x0 = _mm512_mask_or_epi32(x0, n0, _mm512_slli_epi32(x0, 16), _mm512_maskz_expand_epi32(n0, w0));
    ptr += _mm_popcnt_u32(n0);
    const __mmask16 n1 = _mm512_cmplt_epu32_mask(x1, L);
    const __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(R.words + 2 * ptr)));
    x1 = _mm512_mask_or_epi32(x1, n1, _mm512_slli_epi32(x1, 16), _mm512_maskz_expand_epi32(n1, w1));
    ptr += _mm_popcnt_u32(n1);
  }
  _mm512_storeu_si512(R.st, x0);
  _mm512_storeu_si512(R.st + 16, x1);
  R.ptr = ptr;
  return s;
}


static void rans_tokens(RansDec& R, uint16_t* tk, int64_t cnt) {
  int64_t done = 0;
  if (use_avx512()) done = rans_avx512<false>(R, tk, cnt / kLanes) * kLanes;
  rans_tokens_scalar(R, tk + done, cnt - done);
}

// Pass 2 for run-mode blocks. A zero run arrives as digits (bijective base 2, least significant
// first) and its length is known only at the next ordinary token, so tokens are handled without a
// data-dependent branch: digits add to the pending run, an ordinary token moves the position past
// the pending run and writes its value. Without the predictor the block was first filled with the
// zero value and lut[RUN_A] = lut[RUN_B] = that value, so runs need no writes and a digit's own
// write is harmless. With Lorenzo a run repeats the previous value, which changes from run to run:
// an ordinary token writes that value at 16 positions speculatively (dst has kRunSlack values of
// slack; later writes overwrite what was not part of the run) and branches only for longer runs.
// Stops at the first escape token (returns its index; the caller takes the checked path for it)
// or at cnt. The state lives in locals: captured by the decoder's lambdas it would sit in memory.
struct RunState {
  int64_t pos = 0;
  uint64_t runlen = 0;
  int runk = 0;
  uint32_t q = 0;  // the predictor's last code
};
template <class D, bool LOR>
static inline __attribute__((always_inline)) int64_t run_tokens_kernel(const uint16_t* tk, int64_t cnt,
                                                                        typename D::T* dst, int64_t n, RunState& rs,
                                                                        const typename D::T* lut, const int32_t* dlut,
                                                                        double step) {
  using T = typename D::T;
  int64_t pos = rs.pos;
  uint64_t runlen = rs.runlen;
  int runk = rs.runk;
  uint32_t q = rs.q;
  int64_t j = 0;
  for (; j < cnt; ++j) {  // invariant at the top: pos <= n
    const uint32_t tv = tk[j];
    if (tv < kRunA) break;  // escape (rare)
    if (runk > 31) throw FormatError("sz block: zero run longer than 2^32");
    // masks, not branches: the compiler would branch on `isr`, which mispredicts
    const uint64_t isr = uint32_t(tv - kRunA) < 2u, keep = 0 - isr, take = ~keep;
    runlen += (uint64_t(tv - 1) << runk) & keep;
    runk += int(isr);
    const uint64_t adv = runlen & take;  // the run ends here: its length; a digit: 0
    if (LOR) {
      const T zv = D::recon(int32_t(q), step);
      for (int k = 0; k < 16; ++k) dst[pos + k] = zv;
      if (adv > 16) {
        if (adv > uint64_t(n - pos)) throw FormatError("sz block: zero run past the block end");
        std::fill(dst + pos + 16, dst + pos + adv, zv);
      }
      q += uint32_t(dlut[tv]);
    }
    if (adv > uint64_t(n - pos)) throw FormatError("sz block: zero run past the block end");
    pos += int64_t(adv);
    // a run's digits and an ordinary value both need a position left (a run is >= 1 long)
    if (pos >= n) throw FormatError("sz block: more values than the block holds");
    runlen &= keep;
    runk &= int(keep);
    dst[pos] = LOR ? D::recon(int32_t(q), step) : lut[tv];
    pos += int64_t(1 - isr);
  }
  rs.pos = pos, rs.runlen = runlen, rs.runk = runk, rs.q = q;
  return j;
}
// AVX2 clone (with Lorenzo, the 16 speculative values are one or two vector stores) and the portable one
template <class D, bool LOR>
__attribute__((target("avx2"))) int64_t run_tokens_avx2(const uint16_t* tk, int64_t cnt, typename D::T* dst,
                                                        int64_t n, RunState& rs, const typename D::T* lut,
                                                        const int32_t* dlut, double step) {
  return run_tokens_kernel<D, LOR>(tk, cnt, dst, n, rs, lut, dlut, step);
}
template <class D, bool LOR>
int64_t run_tokens_default(const uint16_t* tk, int64_t cnt, typename D::T* dst, int64_t n, RunState& rs,
                           const typename D::T* lut, const int32_t* dlut, double step) {
  return run_tokens_kernel<D, LOR>(tk, cnt, dst, n, rs, lut, dlut, step);
}
// Pass 2 for float32 run-mode blocks without a predictor, 16 tokens at a time with AVX-512. Token
// j lands at pos + pending run + the sum of c_i over the tokens before it, where c = 1 for an
// ordinary token and (t - 1) << k for the k-th digit of a run (k from a prefix max of the last
// ordinary token's lane); ordinary values are gathered from lut and stored there (the block holds
// the zero value already). Digits before the vector's first ordinary token continue the pending
// run: their k counts on from runk. The carried state stays in vectors: with p0 = pos + pending
// run, the next vector's p0 is this one's plus the sum of its 16 weights, one vector add a step.
// (Keeping p0 as a scalar took the weights' prefix sums through a store and scalar reloads every
// step, a store-forwarding round trip on the loop's critical path.) Returns the tokens done; leaves
// the rest (from an escape, a run of 2^10 or more values, a position past the block) to the scalar
// kernel, which checks everything.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,popcnt"))) static int64_t run_tokens_f32_avx512(
    const uint16_t* tk, int64_t cnt, float* dst, int64_t n, RunState& rs, const float* lut) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lane_m32 = _mm512_sub_epi32(lane, _mm512_set1_epi32(32));
  const __m512i below = _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_set1_epi32(1), lane), _mm512_set1_epi32(1));
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
  const __m512i nv = _mm512_set1_epi32(int32_t(n));
  const __m512i thirty2 = _mm512_set1_epi32(32);
  const __m512i i15 = _mm512_set1_epi32(15);
  if (rs.pos + int64_t(rs.runlen) >= (int64_t(1) << 30) || rs.runk > 9) return 0;
  const __m512i c64 = _mm512_set1_epi32(64);
  const __m512 lut0 = _mm512_loadu_ps(lut), lut1 = _mm512_loadu_ps(lut + 16), lut2 = _mm512_loadu_ps(lut + 32),
               lut3 = _mm512_loadu_ps(lut + 48);
  // P: p0 = pos + pending run, broadcast; POS: pos (where the last ordinary value went, + 1)
  __m512i P = _mm512_set1_epi32(int32_t(rs.pos + int64_t(rs.runlen))), POS = _mm512_set1_epi32(int32_t(rs.pos));
  int runk = rs.runk;
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    const __m512i t = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tk + j)));
    if (_mm512_cmplt_epu32_mask(t, two)) break;  // an escape
    const __mmask16 isr = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(t, two), two), ord = __mmask16(~isr);
    const __mmask16 lead = __mmask16(ord ? (ord & (0u - ord)) - 1 : 0xFFFF);  // lanes before the first ordinary
    // k = a digit's index in its run, counted from this vector for the leading digits (which then
    // shift on by runk): lane - L - 1 with L the last ordinary lane before it (-1 if none), i.e.
    // 31 - lzcnt(ord & (2^lane - 1)); one lzcnt where a max-scan took 9 instructions. (A run of
    // >= 2^16 zeros spans a vector of 16 digits: lzcnt(0) = 32 gives lane 15 its k = 15 too;
    // tests/test_sz.py::test_long_zero_runs_decode_on_every_backend)
    const __m512i k = _mm512_add_epi32(_mm512_lzcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(int(ord)), below)),
                                       lane_m32);
    __m512i c = _mm512_mask_sllv_epi32(one, isr, _mm512_sub_epi32(t, one), k);
    c = _mm512_mask_sll_epi32(c, lead, c, _mm_cvtsi32_si128(runk));  // < 2^25: runk <= 9, k <= 15
    __m512i S = _mm512_add_epi32(c, _mm512_alignr_epi32(c, zero, 15));  // inclusive prefix sums
    S = _mm512_add_epi32(S, _mm512_alignr_epi32(S, zero, 14));
    S = _mm512_add_epi32(S, _mm512_alignr_epi32(S, zero, 12));
    S = _mm512_add_epi32(S, _mm512_alignr_epi32(S, zero, 8));
    const __m512i excl = _mm512_sub_epi32(S, c);
    const __m512i at = _mm512_add_epi32(P, excl);
    if (_mm512_mask_cmpge_epi32_mask(ord, at, nv)) break;  // past the block: the scalar kernel throws
    const int32_t p0 = _mm_cvtsi128_si32(_mm512_castsi512_si128(P));
    // values of tokens below 64 by two-table permutes from registers; a gather only for the lanes
    // above (none at REL 1e-2 on an FL update, ~1.5 % of its values at 1e-3). The 16-lane gather for
    // every step was a fifth of this decode; four tables (tokens below 128) measured slower.
    const __mmask16 big = _mm512_mask_cmpge_epu32_mask(ord, t, c64);
    __m512 v = _mm512_mask_blend_ps(_mm512_cmpge_epu32_mask(t, thirty2), _mm512_permutex2var_ps(lut0, t, lut1),
                                    _mm512_permutex2var_ps(lut2, t, lut3));
    if (big) v = _mm512_mask_i32gather_ps(v, big, t, lut, 4);
    if (!_mm512_mask_cmpge_epi32_mask(ord, excl, thirty2)) {
      // every value lands in [p0, p0 + 32): two masked stores of the values expanded to their
      // positions (a 16-lane scatter costs more); bit r of `bits` = a value at p0 + r
      const uint32_t bits = uint32_t(_mm512_reduce_or_epi32(_mm512_maskz_sllv_epi32(ord, one, excl)));
      const __m512 vc = _mm512_maskz_compress_ps(ord, v);
      const __mmask16 lo = __mmask16(bits), hi = __mmask16(bits >> 16);
      _mm512_mask_storeu_ps(dst + p0, lo, _mm512_maskz_expand_ps(lo, vc));
      const __m512 vh = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(_mm_popcnt_u32(lo))), vc);
      _mm512_mask_storeu_ps(dst + p0 + 16, hi, _mm512_maskz_expand_ps(hi, vh));
    } else {
      _mm512_mask_i32scatter_ps(dst, ord, at, v, 4);
    }
    if (ord) {
      const int last = 31 - __builtin_clz(uint32_t(ord));
      POS = _mm512_add_epi32(P, _mm512_permutexvar_epi32(_mm512_set1_epi32(last), S));
      runk = 15 - last;
    } else {
      runk += 16;
    }
    P = _mm512_add_epi32(P, _mm512_permutexvar_epi32(i15, S));
    if (runk > 9 || _mm_cvtsi128_si32(_mm512_castsi512_si128(P)) >= (1 << 30)) {  // weights stay < 2^25
      j += 16;
      break;
    }
  }
  const int64_t p0 = _mm_cvtsi128_si32(_mm512_castsi512_si128(P));
  rs.pos = _mm_cvtsi128_si32(_mm512_castsi512_si128(POS));
  rs.runlen = uint64_t(p0 - rs.pos), rs.runk = runk;
  return j;
}

template <class D>
static int64_t run_tokens(bool lor, const uint16_t* tk, int64_t cnt, typename D::T* dst, int64_t n, RunState& rs,
                          const typename D::T* lut, const int32_t* dlut, double step) {
  if constexpr (std::is_same<D, F32>::value) {
    if (!lor && use_avx512() && kHasAvx512Cd) {  // vectors where they can, 16 scalar tokens where they stop
      int64_t j = 0;
      while (j < cnt) {
        j += run_tokens_f32_avx512(tk + j, cnt - j, dst, n, rs, lut);
        const int64_t m = std::min<int64_t>(16, cnt - j);
        const int64_t done = run_tokens_avx2<D, false>(tk + j, m, dst, n, rs, lut, dlut, step);
        j += done;
        if (done < m) break;  // an escape: the caller's checked path
      }
      return j;
    }
  }
  if (kHasAvx2)
    return lor ? run_tokens_avx2<D, true>(tk, cnt, dst, n, rs, lut, dlut, step)
               : run_tokens_avx2<D, false>(tk, cnt, dst, n, rs, lut, dlut, step);
  return lor ? run_tokens_default<D, true>(tk, cnt, dst, n, rs, lut, dlut, step)
             : run_tokens_default<D, false>(tk, cnt, dst, n, rs, lut, dlut, step);
}

// Calls f(j) in increasing j for every v[j] whose bits are kEscSentinel | (0 or 1): the escapes a
// fused pass 1 left in a float32 block (decode_block). A decoded ordinary value is never NaN.
template <class F>
__attribute__((target("avx512f"))) static void for_each_sentinel(const float* v, int64_t n, F&& f) {
  const __m512i keep = _mm512_set1_epi32(int(~1u)), sent = _mm512_set1_epi32(int(kEscSentinel));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(v + i), keep), sent);
    for (; m; m &= __mmask16(m - 1)) f(i + __builtin_ctz(m));
  }
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, v + i, 4);
    if ((b & ~1u) == kEscSentinel) f(i);
  }
}

template <class D>
static void decode_block(const uint8_t* buf, size_t len, typename D::T* out, int64_t n, double step,
                         DecScratch<typename D::T>& S) {
  using T = typename D::T;
  const size_t isz = sizeof(T);
  In r(buf, len);
  const uint8_t flags = r.get<uint8_t>();
  if ((flags & ~(kBlkLorenzo | kBlkRun | kBlkRaw)) || ((flags & kBlkRaw) && flags != kBlkRaw))
    throw FormatError("sz block: unknown flags");
  if (flags & kBlkRaw) {
    std::memcpy(out, r.take(size_t(n) * isz), size_t(n) * isz);
    if (r.pos != len) throw FormatError("sz block: trailing bytes");
    return;
  }
  const int pb = r.get<uint8_t>();
  if (pb < kMinPb || pb > kMaxPb) throw FormatError("sz block: model precision out of range");
  const uint32_t ntok = r.get<uint32_t>(), nwide = r.get<uint32_t>(), nout = r.get<uint32_t>();
  const bool runmode = flags & kBlkRun, lor = flags & kBlkLorenzo;
  if (ntok == 0 || ntok > uint64_t(n) || nwide > uint64_t(n) || nout > uint64_t(n) || (!runmode && ntok != uint64_t(n)))
    throw FormatError("sz block: counts impossible for the block size");
  const uint32_t m = 1u << pb;
  const uint32_t nsym = r.get<uint16_t>();
  if (nsym == 0 || nsym > m) throw FormatError("sz block: bad symbol count");
  const bool wide = use_avx512();  // the slot table as ent64 alone (see rans_tokens_scalar)
  if (!wide) {
    S.ent.resize(m);
    S.stok.resize(m + 1);
  }
  // Fused pass 1 (plain float32 blocks without a predictor, with AVX-512): the slot table (ent64)
  // holds the value itself, and pass 1 writes values, not tokens, so the block needs no pass 2 (a
  // gather and a store per value). Escape tokens (0, 1) hold a NaN sentinel whose low 16 bits are
  // the token, and a scan afterwards puts the outliers and wide codes in their places (Kaiming
  // weights at REL 1e-3 have an outlier or two per block: without this the whole block took both
  // passes). Run tokens (2, 3) cannot occur in a plain block and end the fused case: the checked
  // path reports them.
  bool fused = std::is_same<D, F32>::value && !runmode && !lor && use_avx512();
  bool escapes = false;  // the table has token 0 or 1
  if (wide) S.ent64.resize(m);
  int64_t t = -1, fs = 0;
  uint32_t total = 0;
  for (uint32_t k = 0; k < nsym; ++k) {
    const uint32_t h = r.varint();
    t += 1;
    if (h & 1) t += int64_t(r.varint()) + 1;
    fs += unzigzag(h >> 1);
    if (t >= kTokens) throw FormatError("sz block: token out of range in the frequency table");
    if (fs < 1 || fs > int64_t(m - total)) throw FormatError("sz block: frequency out of range in the frequency table");
    const uint32_t f = uint32_t(fs);
    if (!wide) {  // two plain loops (one store stream each) vectorise; one over both stored 16 bits a step
      uint32_t* ep = S.ent.data() + total;
      for (uint32_t j = 0; j < f; ++j) ep[j] = f | (j << 16);
      std::fill(S.stok.data() + total, S.stok.data() + total + f, uint16_t(t));
    } else {
      uint32_t hi = uint32_t(t);  // tokens 0-3: their sentinel (fused) is the token in the low 16 bits too
      if (fused && t >= int64_t(kTokenBase)) {
        const T v = D::recon(int32_t(unzigzag(uint64_t(t - kTokenBase))), step);
        std::memcpy(&hi, &v, std::min<size_t>(sizeof(T), 4));  // float32 only (the fused case)
      } else if (t < int64_t(kTokenBase)) {
        hi = kEscSentinel | uint32_t(t);
      }
      uint64_t* qp = S.ent64.data() + total;
      for (uint32_t j = 0; j < f; ++j) qp[j] = (f | (j << 16)) | (uint64_t(hi) << 32);
    }
    if (t >= int64_t(kTokenBase)) {
      const int64_t d = unzigzag(uint64_t(t - kTokenBase));
      S.dlut[t] = int32_t(d);
      S.lut[t] = D::recon(int32_t(d), step);
    } else if (t >= int64_t(kRunA)) {
      fused = false;
    } else {
      escapes = true;
    }
    total += f;
  }
  if (total != m) throw FormatError("sz block: frequencies do not sum to the model total");
  if (!wide) S.stok[m] = 0;
  RansDec R;
  for (int l = 0; l < kLanes; ++l) R.st[l] = r.varint_state();
  const uint32_t nwords = r.get<uint32_t>();
  R.words = r.take(size_t(nwords) * 2);
  R.nwords = nwords;
  R.ent = wide ? nullptr : S.ent.data();
  R.stok = wide ? nullptr : S.stok.data();
  R.ent64 = S.ent64.data();
  R.pb = pb;
  const uint8_t* widep = r.take(size_t(nwide) * 4);
  const uint8_t* outp = r.take(size_t(nout) * isz);
  if (r.pos != len) throw FormatError("sz block: trailing bytes");

  const T* lut = S.lut.data();
  const int32_t* dlut = S.dlut.data();
  // Run-mode blocks with Lorenzo decode into a scratch buffer with kRunSlack values of slack, so
  // pass 2 can write a pending run speculatively; the others go straight to `out`, which run-mode
  // blocks without a predictor first fill with the zero value (run_tokens_kernel).
  T* dst = out;
  if (runmode && lor) {
    S.buf.resize(size_t(n) + kRunSlack);
    dst = S.buf.data();
  } else if (runmode) {
    const T zv = D::recon(0, step);
    T zero{};
    if (std::memcmp(&zv, &zero, isz) == 0) std::memset(out, 0, size_t(n) * isz);  // +0.0: libc's wide stores
    else std::fill(out, out + n, zv);
    S.lut[kRunA] = S.lut[kRunB] = zv;
  }
  RunState rs;
  int64_t& pos = rs.pos;
  uint32_t& qprev = rs.q;
  uint64_t& runlen = rs.runlen;
  int& runk = rs.runk;
  uint32_t iw = 0, io = 0;
  auto flush = [&]() {
    if (pos > n || runlen > uint64_t(n - pos)) throw FormatError("sz block: zero run past the block end");
    const T v = D::recon(lor ? int32_t(qprev) : 0, step);
    std::fill(dst + pos, dst + pos + runlen, v);
    pos += int64_t(runlen);
    runlen = 0;
    runk = 0;
  };
  // one token, any kind (the checked path: escapes, and chunks of plain blocks that hold them)
  auto handle = [&](uint32_t tv) {
    if (tv == kRunA || tv == kRunB) {
      if (!runmode) throw FormatError("sz block: run token in a plain-mode block");
      if (runk > 31) throw FormatError("sz block: zero run longer than 2^32");
      runlen += uint64_t(tv - 1) << runk;
      ++runk;
      return;
    }
    if (runk) flush();
    if (pos >= n) throw FormatError("sz block: more values than the block holds");
    if (tv == kEscVal) {
      if (io >= nout) throw FormatError("sz block: outlier count mismatch");
      std::memcpy(dst + pos, outp + size_t(io) * isz, isz);
      ++io;
      ++pos;
      return;
    }
    int64_t d;
    if (tv == kEscWide) {
      if (iw >= nwide) throw FormatError("sz block: wide-code count mismatch");
      int32_t wv;
      std::memcpy(&wv, widep + size_t(iw) * 4, 4);
      ++iw;
      d = wv;
    } else {
      d = dlut[tv];
    }
    const uint32_t q = lor ? qprev + uint32_t(d) : uint32_t(d);
    qprev = q;
    dst[pos++] = (!lor && tv >= kTokenBase) ? lut[tv] : D::recon(int32_t(q), step);
  };
  uint16_t* tk = S.tk.data();
  if (fused) {  // ntok == n: values straight to `out`; the rest (< 32 words left) through the scalar pass
    int64_t i = 0;
    if constexpr (std::is_same<D, F32>::value)
      i = rans_avx512<true>(R, out, int64_t(ntok) / kLanes) * kLanes;
    for (; i < int64_t(ntok); i += kDecChunk)  // ent64 holds the values (fused implies wide)
      rans_tokens_scalar<true>(R, out + i, std::min<int64_t>(kDecChunk, int64_t(ntok) - i));
    if constexpr (std::is_same<D, F32>::value) {
      if (escapes) {  // in position order: the outliers and wide codes are stored in that order
        for_each_sentinel(out, n, [&](int64_t j) {
          uint32_t b;
          std::memcpy(&b, out + j, 4);
          if ((b & 0xFFFF) == kEscVal) {
            if (io >= nout) throw FormatError("sz block: outlier count mismatch");
            std::memcpy(out + j, outp + size_t(io) * isz, isz);
            ++io;
          } else {
            if (iw >= nwide) throw FormatError("sz block: wide-code count mismatch");
            int32_t wv;
            std::memcpy(&wv, widep + size_t(iw) * 4, 4);
            ++iw;
            out[j] = D::recon(wv, step);
          }
        });
      }
    }
    pos = n;
  }
  for (int64_t i = fused ? int64_t(ntok) : 0; i < int64_t(ntok); i += kDecChunk) {
    const int64_t cnt = std::min<int64_t>(kDecChunk, int64_t(ntok) - i);
    rans_tokens(R, tk, cnt);  // pass 1
    // pass 2
    if (!runmode) {  // one token per value: pos == i, and i + cnt <= n (ntok == n)
      uint32_t special = 0;
      for (int64_t j = 0; j < cnt; ++j) special |= uint32_t(tk[j] < kTokenBase);
      if (special) {
        for (int64_t j = 0; j < cnt; ++j) handle(tk[j]);
      } else if (lor) {
        uint32_t q = qprev;
        T* o = dst + pos;
        for (int64_t j = 0; j < cnt; ++j) {
          q += uint32_t(dlut[tk[j]]);
          o[j] = D::recon(int32_t(q), step);
        }
        qprev = q;
        pos += cnt;
      } else {
        T* o = dst + pos;
        for (int64_t j = 0; j < cnt; ++j) o[j] = lut[tk[j]];
        pos += cnt;
      }
      continue;
    }
    for (int64_t j = 0; j < cnt; ++j) {  // run mode (pass 2 above); escapes through `handle`
      j += run_tokens<D>(lor, tk + j, cnt - j, dst, n, rs, lut, dlut, step);
      if (j < cnt) handle(tk[j]);
    }
  }
  if (runk) flush();
  if (R.ptr != nwords) throw FormatError("sz block: rANS stream length mismatch");
  for (int l = 0; l < kLanes; ++l)
    if (R.st[l] != kRansL) throw FormatError("sz block: rANS final state mismatch (corrupt stream)");
  if (pos != n) throw FormatError("sz block: run lengths do not add up to the value count");
  if (io != nout) throw FormatError("sz block: outlier count mismatch");
  if (iw != nwide) throw FormatError("sz block: wide-code count mismatch");
  if (dst != out) std::memcpy(out, dst, size_t(n) * isz);
}


// ---- launchers: blocks over the extension's pool (csrc/pool.h) ----
// Below 2 x 2^16 values one thread: a block there takes ~0.1 ms, the order of a helper's wake-up.
constexpr int64_t kMinThreadValues = int64_t(1) << 16;
// Encoded blocks wait in buffers kept from call to call (their capacity stays), and the section is
// written once, straight into the Python bytes object (sz_encode_py). A fresh string per block, a
// joined string and then the bytes copy were three writes of the payload into new memory.
class BlockBuffers {
 public:
  std::vector<std::string*> take(int64_t nb) {
    std::lock_guard<std::mutex> g(m_);
    std::vector<std::string*> out(size_t(nb), nullptr);
    for (auto& b : out) {
      if (free_.empty()) {
        b = new std::string();
      } else {
        b = free_.back().release();
        free_.pop_back();
        kept_ -= b->capacity();
      }
    }
    return out;
  }
  void give(std::vector<std::string*>& bufs) {
    std::lock_guard<std::mutex> g(m_);
    for (auto* b : bufs) {
      // keep at most 64 MB in all (a block's encoding is at most its raw bytes + 1; the default
      // blocks of a float32 tensor are <= 2 MB raw, so that is 32 or more of them)
      if (kept_ + b->capacity() <= (size_t(64) << 20)) {
        kept_ += b->capacity();
        free_.emplace_back(b);
      } else {
        delete b;
      }
    }
    bufs.clear();
  }
  static BlockBuffers& get() {
    static BlockBuffers* inst = new BlockBuffers();  // leaked on purpose: used until exit
    return *inst;
  }

 private:
  std::mutex m_;
  std::vector<std::unique_ptr<std::string>> free_;
  size_t kept_ = 0;  // the capacity held in free_
};

struct Section {  // the encoded blocks of one call; returns its buffers when done
  std::vector<std::string*> blocks;
  explicit Section(int64_t nb) : blocks(BlockBuffers::get().take(nb)) {}
  ~Section() { BlockBuffers::get().give(blocks); }
  Section(const Section&) = delete;
  Section& operator=(const Section&) = delete;
  size_t size() const {
    size_t total = 8 * blocks.size();
    for (auto* b : blocks) total += b->size();
    return total;
  }
  void write(char* dst) const {  // u64 block lengths, then the blocks
    for (auto* b : blocks) {
      const uint64_t l = b->size();
      std::memcpy(dst, &l, 8);
      dst += 8;
    }
    for (auto* b : blocks) {
      std::memcpy(dst, b->data(), b->size());
      dst += b->size();
    }
  }
};

template <class D>
static void encode_section(const typename D::T* x, int64_t n, double step, double bound, int64_t bs, Section& sec) {
  double r = 1.0 / step;
  float inv = float(r);
  if (!std::isfinite(inv)) inv = 0.0f;
  const int64_t nb = int64_t(sec.blocks.size());
  // small tensors get >= 4 blocks (codec.default_block_size); threads only from 2 x kMinThreadValues
  pool::parallel_for(nb, pool::threads_for(n, kMinThreadValues), [&](int64_t b) {
    static thread_local EncScratch S;  // kept across calls: no page faults on every encode
    int64_t lo = b * bs, len = std::min(bs, n - lo);
    encode_block<D>(x + lo, len, inv, step, bound, S, *sec.blocks[b]);
  });
}

template <class D>
static void decode_section(const uint8_t* sec, size_t len, typename D::T* out, int64_t n, int64_t bs, double step) {
  const int64_t nb = (n + bs - 1) / bs;
  if (len / 8 < size_t(nb)) throw FormatError("sz section: truncated block table");
  std::vector<size_t> off(nb + 1);
  off[0] = 8 * size_t(nb);
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t l;
    std::memcpy(&l, sec + 8 * b, 8);
    if (l > len - off[b]) throw FormatError("sz section: block length past the end");
    off[b + 1] = off[b] + l;
  }
  if (off[nb] != len) throw FormatError("sz section: trailing bytes");
  std::vector<std::string> errors(nb);
  pool::parallel_for(nb, pool::threads_for(n, kMinThreadValues), [&](int64_t b) {
    static thread_local DecScratch<typename D::T> S;
    int64_t lo = b * bs, cnt = std::min(bs, n - lo);
    try {
      decode_block<D>(sec + off[b], off[b + 1] - off[b], out + lo, cnt, step, S);
    } catch (const std::exception& e) {
      errors[b] = e.what();
    }
  });
  for (auto& e : errors)  // the first block's error, whatever the thread count
    if (!e.empty()) throw FormatError(e);
}


// min and max of the finite values (REL mode's range), OpenMP; count = how many were finite.
// float32 (the common case) runs in float, exact for min/max. The AVX2 loop is written with
// intrinsics: GCC does not vectorise a float min/max reduction without -ffast-math.
__attribute__((always_inline)) inline void minmax_f32_kernel(const float* __restrict x, int64_t n, float& lo,
                                                             float& hi, int64_t& cnt) {
  float l = INFINITY, h = -INFINITY;
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const bool f = __builtin_fabsf(v) <= 3.4028234663852886e38f;
    l = std::min(l, f ? v : INFINITY);
    h = std::max(h, f ? v : -INFINITY);
    c += f;
  }
  lo = l, hi = h, cnt = c;
}
__attribute__((target("avx2"))) void minmax_f32_avx2(const float* x, int64_t n, float& lo, float& hi, int64_t& c) {
  const __m256 inf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), fmax = _mm256_set1_ps(3.4028234663852886e38f);
  __m256 l0 = inf, l1 = inf, h0 = ninf, h1 = ninf;
  __m256i c0 = _mm256_setzero_si256(), c1 = _mm256_setzero_si256();  // per-lane counts (n <= 2^16 per call)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256 f0 = _mm256_cmp_ps(_mm256_and_ps(v0, absm), fmax, _CMP_LE_OQ);  // false for NaN and Inf
    const __m256 f1 = _mm256_cmp_ps(_mm256_and_ps(v1, absm), fmax, _CMP_LE_OQ);
    l0 = _mm256_min_ps(l0, _mm256_blendv_ps(inf, v0, f0)), l1 = _mm256_min_ps(l1, _mm256_blendv_ps(inf, v1, f1));
    h0 = _mm256_max_ps(h0, _mm256_blendv_ps(ninf, v0, f0)), h1 = _mm256_max_ps(h1, _mm256_blendv_ps(ninf, v1, f1));
    c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(f0)), c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(f1));
  }
  alignas(32) float la[8], ha[8];
  alignas(32) int32_t ca[8];
  _mm256_store_ps(la, _mm256_min_ps(l0, l1));
  _mm256_store_ps(ha, _mm256_max_ps(h0, h1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(ca), _mm256_add_epi32(c0, c1));
  float l, h;
  int64_t cnt;
  minmax_f32_kernel(x + i, n - i, l, h, cnt);
  for (int k = 0; k < 8; ++k) l = std::min(l, la[k]), h = std::max(h, ha[k]), cnt += ca[k];
  lo = l, hi = h, c = cnt;
}
void minmax_f32_default(const float* x, int64_t n, float& lo, float& hi, int64_t& c) {
  minmax_f32_kernel(x, n, lo, hi, c);
}
static void finite_minmax_f32(const float* x, int64_t n, double& lo, double& hi, int64_t& cnt) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  float l = INFINITY, h = -INFINITY;
  int64_t c = 0;
  // threads from 2 x 2^18 values: below that one thread finishes before a second one would start
  // per-chunk results, joined in chunk order (min/max/count do not depend on the order anyway)
  std::vector<float> cl(nc), ch(nc);
  std::vector<int64_t> cc(nc);
  pool::parallel_for(nc, pool::threads_for(n, int64_t(1) << 18), [&](int64_t k) {
    const int64_t len = std::min(kChunk, n - k * kChunk);
    if (kHasAvx2) minmax_f32_avx2(x + k * kChunk, len, cl[k], ch[k], cc[k]);
    else minmax_f32_default(x + k * kChunk, len, cl[k], ch[k], cc[k]);
  });
  for (int64_t k = 0; k < nc; ++k) l = std::min(l, cl[k]), h = std::max(h, ch[k]), c += cc[k];
  lo = l, hi = h, cnt = c;
}
template <class D>
static void finite_minmax(const typename D::T* x, int64_t n, double& lo, double& hi, int64_t& cnt) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  std::vector<double> cl(nc, INFINITY), ch(nc, -INFINITY);
  std::vector<int64_t> cc(nc, 0);
  pool::parallel_for(nc, pool::threads_for(n, int64_t(1) << 19), [&](int64_t k) {
    double l = INFINITY, h = -INFINITY;
    int64_t c = 0;
    for (int64_t i = k * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
      const double v = D::to_d(x[i]);
      const bool f = __builtin_fabs(v) <= 1.7976931348623157e308;
      l = f && v < l ? v : l;
      h = f && v > h ? v : h;
      c += f;
    }
    cl[k] = l, ch[k] = h, cc[k] = c;
  });
  double l = INFINITY, h = -INFINITY;
  int64_t c = 0;
  for (int64_t k = 0; k < nc; ++k) l = std::min(l, cl[k]), h = std::max(h, ch[k]), c += cc[k];
  lo = l, hi = h, cnt = c;
}

// Mean |x| of n >= 1 values (NaN or Inf among them: not finite), for the sz:ratio search's first
// guess (statedict._spread): float sums per 4096 values, so the loop vectorizes, then double.
template <class D>
static double mean_abs(const typename D::T* x, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += 4096) {
    float acc = 0;
    const int64_t e = std::min(n, i + 4096);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = i; j < e; ++j) acc += __builtin_fabsf(D::to_f(x[j]));
    total += acc;
  }
  return total / double(n);
}

// ---- the stream's parameters (codec.quant_params, default_block_size, is_sparse and
// choose_block_size natively, the same arithmetic): one native call per tensor for encode_stream
// instead of a range call, a numpy sample and the section call with Python between them ----
constexpr double kMaxEb = 1e300;  // codec.MAX_EB
constexpr int64_t kSparseSample = 4096, kSparseNonzero = 64, kSparseBlock = int64_t(1) << 21;

// float32(v) for the sparsity sample as torch's .to(float32) rounds it (to nearest; past the
// largest float's rounding midpoint, Inf), without a float-cast overflow
static inline float sample_f32(double v) {
  if (std::fabs(v) >= 0x1.ffffffp127) return v > 0 ? INFINITY : v < 0 ? -INFINITY : NAN;
  return float(v);
}
template <class D>
static inline float sample_value(const typename D::T* x, int64_t i) {
  if constexpr (std::is_same_v<D, F64>) return sample_f32(x[i]);
  else return D::to_f(x[i]);
}

// codec.is_sparse: at most 1 in kSparseNonzero of the strided sample quantizes to a nonzero code
template <class D>
static bool is_sparse(const typename D::T* x, int64_t n, double step) {
  const int64_t stride = std::max<int64_t>(1, n / kSparseSample);
  float inv = float(1.0 / step);  // quantize.inverse_of_step
  if (!std::isfinite(inv)) inv = 0.0f;
  int64_t nz = 0, cnt = 0;
  for (int64_t i = 0; i < n; i += stride, ++cnt) nz += !(std::fabs(sample_value<D>(x, i) * inv) <= 0.5f);
  return nz * kSparseNonzero <= cnt;
}

static int64_t default_block_size(int64_t n) {  // codec.default_block_size
  const int64_t target = n < (int64_t(1) << 21) ? int64_t(1) << 17 : int64_t(1) << 19;
  int64_t nb = (n + target - 1) / target;
  if (nb <= 1) return std::max<int64_t>(n, 1);
  nb = (nb + 3) / 4 * 4;
  return (n + nb - 1) / nb;
}

template <class D>
static int64_t choose_block_size(const typename D::T* x, int64_t n, double step) {  // codec.choose_block_size
  const int64_t bs = default_block_size(n);
  if (bs >= n || !is_sparse<D>(x, n, step)) return bs;
  const int64_t nb = (n + kSparseBlock - 1) / kSparseBlock;
  return (n + nb - 1) / nb;
}

// codec.quant_params: (step, bound) from the bound and, for REL, the finite range (count = how many
// values were finite)
static void quant_params(double error_bound, bool rel, double lo, double hi, int64_t count, double& step,
                         double& bound) {
  if (rel) {
    bound = count == 0 ? 0.0 : error_bound * (hi - lo);
    if (!std::isfinite(bound)) bound = kMaxEb;
    if (bound == 0.0) {
      const double c = count == 0 ? 0.0 : std::max(std::fabs(lo), std::fabs(hi));
      step = 2 * (c / 2 > 0 ? c / 2 : 1.0);
      return;
    }
  } else {
    bound = error_bound;
  }
  step = 2 * std::min(bound, kMaxEb);
}
}  // namespace sz

static size_t dtype_size(int code) {
  const size_t isz = code == 1 ? 4 : code == 2 ? 8 : (code == 3 || code == 4) ? 2 : 0;
  if (!isz) throw py::value_error("dtype code must be 1 (f32), 2 (f64), 3 (f16) or 4 (bf16)");
  return isz;
}

// How many values of dtype `code` buffer i (of a records call) holds: n >= 1 whole values, else ValueError
static int64_t value_count(const Py_buffer& b, int code, size_t i) {
  const size_t isz = dtype_size(code), len = size_t(b.len);
  if (len == 0 || len % isz) throw py::value_error("array " + std::to_string(i) + " must hold n >= 1 values of its dtype");
  return int64_t(len / isz);
}
// (min, max, count) of the finite values and mean |x| of n values of a valid dtype code at p
static void finite_range_any(int code, const void* p, int64_t n, double& lo, double& hi, int64_t& cnt) {
  if (code == 1) sz::finite_minmax_f32(static_cast<const float*>(p), n, lo, hi, cnt);
  else if (code == 2) sz::finite_minmax<sz::F64>(static_cast<const double*>(p), n, lo, hi, cnt);
  else if (code == 3) sz::finite_minmax<sz::F16>(static_cast<const uint16_t*>(p), n, lo, hi, cnt);
  else sz::finite_minmax<sz::BF16>(static_cast<const uint16_t*>(p), n, lo, hi, cnt);
}
static double mean_abs_any(int code, const void* p, int64_t n) {
  if (code == 1) return sz::mean_abs<sz::F32>(static_cast<const float*>(p), n);
  if (code == 2) return sz::mean_abs<sz::F64>(static_cast<const double*>(p), n);
  if (code == 3) return sz::mean_abs<sz::F16>(static_cast<const uint16_t*>(p), n);
  return sz::mean_abs<sz::BF16>(static_cast<const uint16_t*>(p), n);
}

static py::tuple sz_finite_range_py(py::array_t<uint8_t, py::array::c_style> x, int code, int64_t n) {
  const size_t isz = dtype_size(code);
  if (n < 0 || size_t(x.size()) != size_t(n) * isz) throw py::value_error("x must hold n values of the dtype");
  const void* p = x.data();
  double lo, hi;
  int64_t cnt;
  {
    py::gil_scoped_release nogil;
    finite_range_any(code, p, n, lo, hi, cnt);
  }
  return py::make_tuple(lo, hi, cnt);
}

// prefix + section (+ `head`, written between them: the stream header) into one new bytes object:
// the one copy of the payload, before anything else can see it
static py::bytes section_bytes(const char* pre, size_t npre, const char* head, size_t nhead, const sz::Section& sec) {
  PyObject* obj = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(npre + nhead + sec.size()));
  if (!obj) throw py::error_already_set();
  py::bytes out = py::reinterpret_steal<py::bytes>(obj);
  char* dst = PyBytes_AS_STRING(obj);
  if (npre) std::memcpy(dst, pre, npre);
  if (nhead) std::memcpy(dst + npre, head, nhead);
  sec.write(dst + npre + nhead);
  return out;
}
static py::bytes section_bytes(py::bytes prefix, const char* head, size_t nhead, const sz::Section& sec) {
  char* pre = nullptr;
  Py_ssize_t npre = 0;
  if (PyBytes_AsStringAndSize(prefix.ptr(), &pre, &npre) != 0) throw py::error_already_set();
  return section_bytes(pre, size_t(npre), head, nhead, sec);
}

static void encode_section_any(int code, const void* p, int64_t n, double step, double bound, int64_t bs,
                               sz::Section& sec) {
  if (code == 1) sz::encode_section<sz::F32>(static_cast<const float*>(p), n, step, bound, bs, sec);
  else if (code == 2) sz::encode_section<sz::F64>(static_cast<const double*>(p), n, step, bound, bs, sec);
  else if (code == 3) sz::encode_section<sz::F16>(static_cast<const uint16_t*>(p), n, step, bound, bs, sec);
  else sz::encode_section<sz::BF16>(static_cast<const uint16_t*>(p), n, step, bound, bs, sec);
}

static void decode_section_any(int code, const uint8_t* sec, size_t len, void* out, int64_t n, int64_t bs,
                               double step) {
  if (code == 1) sz::decode_section<sz::F32>(sec, len, static_cast<float*>(out), n, bs, step);
  else if (code == 2) sz::decode_section<sz::F64>(sec, len, static_cast<double*>(out), n, bs, step);
  else if (code == 3) sz::decode_section<sz::F16>(sec, len, static_cast<uint16_t*>(out), n, bs, step);
  else sz::decode_section<sz::BF16>(sec, len, static_cast<uint16_t*>(out), n, bs, step);
}

static py::bytes sz_encode_py(py::array_t<uint8_t, py::array::c_style> x, int code, int64_t n, double step,
                              double bound, int64_t block_size, py::bytes prefix) {
  if (block_size < 1) throw py::value_error("block_size must be >= 1");
  if (!(std::isfinite(step) && step > 0)) throw py::value_error("step must be finite and > 0");
  const size_t isz = dtype_size(code);
  if (n < 0 || size_t(x.size()) != size_t(n) * isz) throw py::value_error("x must hold n values of the dtype");
  const void* p = x.data();
  sz::Section sec((n + block_size - 1) / block_size);
  {
    py::gil_scoped_release nogil;
    encode_section_any(code, p, n, step, bound, block_size, sec);
  }
  // after `prefix` (the stream header, which then needs no concatenation in Python)
  return section_bytes(prefix, nullptr, 0, sec);
}

// codec._HDR "<BBddII" (26 bytes): version, lossless stage, step, bound, block size, block count
constexpr size_t kStreamHdr = 26;
constexpr uint8_t kStreamVersion = 2;  // codec.VERSION
constexpr int64_t kMaxBlock = int64_t(1) << 24;  // codec.MAX_BLOCK

// A whole stream (codec.encode_stream without a lossless stage) of n >= 1 values at p: the range
// (unless given: range_count >= 0), step and bound, block size (bs 0: chosen as the codec chooses
// it), the header into hdr and the section. No Python objects: callers release the GIL around it.
static std::unique_ptr<sz::Section> encode_stream_native(int code, const void* p, int64_t n, double error_bound,
                                                         bool rel, int64_t bs, double range_lo, double range_hi,
                                                         int64_t range_count, char* hdr) {
  if (rel && range_count < 0) finite_range_any(code, p, n, range_lo, range_hi, range_count);
  double step = 0, bound = 0;
  sz::quant_params(error_bound, rel, range_lo, range_hi, range_count, step, bound);
  if (!bs) {
    if (code == 1) bs = sz::choose_block_size<sz::F32>(static_cast<const float*>(p), n, step);
    else if (code == 2) bs = sz::choose_block_size<sz::F64>(static_cast<const double*>(p), n, step);
    else if (code == 3) bs = sz::choose_block_size<sz::F16>(static_cast<const uint16_t*>(p), n, step);
    else bs = sz::choose_block_size<sz::BF16>(static_cast<const uint16_t*>(p), n, step);
  }
  auto sec = std::make_unique<sz::Section>((n + bs - 1) / bs);
  encode_section_any(code, p, n, step, bound, bs, *sec);
  hdr[0] = char(kStreamVersion), hdr[1] = 0;
  const uint32_t bs32 = uint32_t(bs), nb32 = uint32_t((n + bs - 1) / bs);
  std::memcpy(hdr + 2, &step, 8);
  std::memcpy(hdr + 10, &bound, 8);
  std::memcpy(hdr + 18, &bs32, 4);
  std::memcpy(hdr + 22, &nb32, 4);
  return sec;
}

// prefix + codec.encode_stream's stream (no lossless stage) in one bytes object; see
// encode_stream_native for the arguments
static py::bytes sz_encode_stream_py(py::array_t<uint8_t, py::array::c_style> x, int code, int64_t n,
                                     double error_bound, bool rel, int64_t block_size, py::bytes prefix,
                                     double range_lo, double range_hi, int64_t range_count) {
  if (!(std::isfinite(error_bound) && error_bound > 0)) throw py::value_error("error_bound must be finite and > 0");
  if (block_size < 0 || block_size > kMaxBlock) throw py::value_error("block_size must be in [0, 2^24]");
  const size_t isz = dtype_size(code);
  if (n < 1 || size_t(x.size()) != size_t(n) * isz) throw py::value_error("x must hold n >= 1 values of the dtype");
  const void* p = x.data();
  char hdr[kStreamHdr];
  std::unique_ptr<sz::Section> sec;
  {
    py::gil_scoped_release nogil;
    sec = encode_stream_native(code, p, n, error_bound, rel, block_size, range_lo, range_hi, range_count, hdr);
  }
  return section_bytes(prefix, hdr, sizeof(hdr), *sec);
}

// The record data of an `sz` state-dict payload (codecs/sz/statedict.py) for every tensor at once:
// arrays[i] (any C-contiguous buffer) with codes[i] = its float dtype code goes out as kind byte 1
// + its stream at the bound; with codes[i] = 0, as kind byte 0 + its bytes. One native call per
// update instead of a Python round trip per tensor: right after local training that glue cost
// about a quarter of the codec's time (docs/sz.md, "Codec time in FedAvg").
// ranges (optional): per array, the REL range as codec.value_range gives it, (lo, hi, count), so a
// caller encoding at several bounds (the ratio=R search) finds it once.
static py::list sz_encode_records_py(py::list arrays, std::vector<int> codes, double error_bound, bool rel,
                                     py::object ranges) {
  if (!(std::isfinite(error_bound) && error_bound > 0)) throw py::value_error("error_bound must be finite and > 0");
  if (codes.size() != arrays.size()) throw py::value_error("one code per array");
  Buffers bufs(arrays);
  const size_t m = codes.size();
  std::vector<std::tuple<double, double, int64_t>> rng(m, {0.0, 0.0, -1});
  if (!ranges.is_none()) {
    const auto given = ranges.cast<std::vector<std::tuple<double, double, int64_t>>>();
    if (given.size() != m) throw py::value_error("one range per array");
    rng = given;
  }
  std::vector<int64_t> ns(m, 0);
  for (size_t i = 0; i < m; ++i) {
    if (codes[i]) ns[i] = value_count(bufs.v[i], codes[i], i);
  }
  std::vector<std::unique_ptr<sz::Section>> secs(m);
  std::vector<std::array<char, kStreamHdr>> hdrs(m);
  {
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < m; ++i)
      if (codes[i])
        secs[i] = encode_stream_native(codes[i], bufs.v[i].buf, ns[i], error_bound, rel, 0, std::get<0>(rng[i]),
                                       std::get<1>(rng[i]), std::get<2>(rng[i]), hdrs[i].data());
  }
  py::list out(m);
  static const char kKindRaw = 0, kKindSz = 1;
  for (size_t i = 0; i < m; ++i) {
    if (codes[i]) {
      out[i] = section_bytes(&kKindSz, 1, hdrs[i].data(), kStreamHdr, *secs[i]);
      secs[i].reset();
      continue;
    }
    const size_t len = size_t(bufs.v[i].len);
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(1 + len));
    if (!obj) throw py::error_already_set();
    char* dst = PyBytes_AS_STRING(obj);
    dst[0] = kKindRaw;
    if (len) std::memcpy(dst + 1, bufs.v[i].buf, len);
    out[i] = py::reinterpret_steal<py::bytes>(obj);
  }
  return out;
}

// Per array (codes[i]: its float dtype code): (min, max, count) of the finite values, as
// sz_finite_range, and mean |x|, in one call: the sz:ratio search's per-update pass (statedict.py).
static py::list sz_value_stats_py(py::list arrays, std::vector<int> codes) {
  if (codes.size() != arrays.size()) throw py::value_error("one code per array");
  Buffers bufs(arrays);
  const size_t m = codes.size();
  std::vector<int64_t> ns(m);
  for (size_t i = 0; i < m; ++i) ns[i] = value_count(bufs.v[i], codes[i], i);
  std::vector<std::tuple<double, double, int64_t, double>> st(m);
  {
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < m; ++i) {
      double lo, hi;
      int64_t cnt;
      finite_range_any(codes[i], bufs.v[i].buf, ns[i], lo, hi, cnt);
      st[i] = {lo, hi, cnt, mean_abs_any(codes[i], bufs.v[i].buf, ns[i])};
    }
  }
  py::list out(m);
  for (size_t i = 0; i < m; ++i)
    out[i] = py::make_tuple(std::get<0>(st[i]), std::get<1>(st[i]), std::get<2>(st[i]), std::get<3>(st[i]));
  return out;
}

static void sz_decode_py(py::array_t<uint8_t, py::array::c_style> sec, py::array_t<uint8_t, py::array::c_style> out,
                         int code, int64_t n, int64_t block_size, double step) {
  if (block_size < 1) throw py::value_error("block_size must be >= 1");
  const size_t isz = dtype_size(code);
  if (n < 0 || size_t(out.size()) != size_t(n) * isz) throw py::value_error("out must hold n values of the dtype");
  const uint8_t* sp = sec.data();
  size_t len = sec.size();
  void* op = out.mutable_data();
  std::string err;
  {
    py::gil_scoped_release nogil;
    try {
      decode_section_any(code, sp, len, op, n, block_size, step);
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  if (!err.empty()) throw py::value_error(err);
}

// The tensors of an `sz` state-dict payload's records (codecs/sz/statedict.py) in one call, each
// into a new numpy array of dtypes[i] and shapes[i]: kind byte 0 + its raw bytes, or kind byte 1 +
// a stream (codes[i] its float dtype code), checked as codec.decode_stream checks it; with kinds
// false, bare streams (fc.SZ's one record). A stream with
// a lossless stage comes back as None (the Python path decodes it). Records are hostile: any defect
// raises ValueError((index, message)). wire.unpack has bounded the shapes' total bytes already.
static py::list sz_decode_records_py(py::list datas, std::vector<int> codes, py::list dtypes, py::list shapes,
                                     bool kinds) {
  const size_t m = codes.size();
  if (datas.size() != m || dtypes.size() != m || shapes.size() != m) throw py::value_error("one entry per record");
  Buffers bufs(datas);
  struct Job {
    const uint8_t* src = nullptr;
    size_t len = 0;   // bytes at src: the raw bytes or the blocks section
    void* dst = nullptr;
    int64_t n = 0;
    int code = 0;     // 0: raw copy, else decode a section of this float dtype
    int64_t bs = 0;
    double step = 0;
  };
  std::vector<Job> jobs(m);
  py::list out(m);
  size_t bad = m;
  std::string err;
  auto fail = [&](size_t i, std::string msg) {
    PyErr_SetObject(PyExc_ValueError, py::make_tuple(i, msg).ptr());
    throw py::error_already_set();
  };
  for (size_t i = 0; i < m; ++i) {
    const auto dt = py::reinterpret_borrow<py::dtype>(dtypes[i]);
    const auto shape = shapes[i].cast<std::vector<py::ssize_t>>();
    int64_t n = 1;
    for (auto d : shape)
      if (d < 0 || __builtin_mul_overflow(n, int64_t(d), &n)) fail(i, "impossible shape");
    // with kinds: the kind byte, then the raw bytes or the stream; else the stream alone (fc.SZ)
    const uint8_t* p = static_cast<const uint8_t*>(bufs.v[i].buf);
    const size_t len = size_t(bufs.v[i].len);
    if (kinds && len < 1) fail(i, "empty");
    const int kind = kinds ? p[0] : 1;
    const size_t at = kinds ? 1 : 0;
    Job& J = jobs[i];
    J.n = n;
    const size_t nbytes = size_t(n) * size_t(dt.itemsize());
    if (kind == 0) {
      if (len - 1 != nbytes)
        fail(i, std::to_string(len - 1) + " data bytes for " + std::to_string(n) + " values (expected " +
                    std::to_string(nbytes) + ")");
      J.src = p + 1, J.len = nbytes;
    } else if (kind == 1) {
      const int code = codes[i];
      if (code < 1 || code > 4) fail(i, "sz stream for a non-float dtype");
      if (size_t(dt.itemsize()) != dtype_size(code)) fail(i, "dtype does not match its code");
      if (len - at < kStreamHdr)
        fail(i, "truncated sz stream: need " + std::to_string(kStreamHdr) + " bytes, have " + std::to_string(len - at));
      const uint8_t* h = p + at;
      uint32_t bs32, nb32;
      double step;
      std::memcpy(&step, h + 2, 8);
      std::memcpy(&bs32, h + 18, 4);
      std::memcpy(&nb32, h + 22, 4);
      if (h[0] != kStreamVersion)
        fail(i, "sz stream version " + std::to_string(h[0]) + ", this build reads " + std::to_string(kStreamVersion));
      if (h[1] == 1) {  // a lossless stage (zstd): left to the Python path
        out[i] = py::none();
        continue;
      }
      if (h[1] != 0) fail(i, "sz stream: unknown lossless stage " + std::to_string(h[1]));
      if (!(std::isfinite(step) && step > 0)) fail(i, "sz stream: quantization step is not finite and positive");
      if (bs32 < 1 || int64_t(bs32) > kMaxBlock || int64_t(nb32) != (n + int64_t(bs32) - 1) / int64_t(bs32))
        fail(i, "sz stream: block layout does not match the tensor size");
      J.src = h + kStreamHdr, J.len = len - at - kStreamHdr;
      if (n == 0 && J.len) fail(i, "sz stream: data for an empty tensor");
      J.code = code, J.bs = int64_t(bs32), J.step = step;
    } else {
      fail(i, "unknown kind " + std::to_string(kind));
    }
    py::array a(dt, shape);
    J.dst = a.mutable_data();
    out[i] = a;
  }
  {
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < m && bad == m; ++i) {
      const Job& J = jobs[i];
      if (!J.dst || !J.n) continue;
      try {
        if (!J.code) std::memcpy(J.dst, J.src, J.len);
        else decode_section_any(J.code, J.src, J.len, J.dst, J.n, J.bs, J.step);
      } catch (const std::exception& e) {
        bad = i, err = e.what();
      }
    }
  }
  if (bad != m) fail(bad, err);
  return out;
}

FC_BIND([](py::module_& m) {
  m.def("sz_finite_range", &sz_finite_range_py, py::arg("x"), py::arg("dtype_code"), py::arg("n"),
        "(min, max, count) of the finite values");
  m.def("sz_value_stats", &sz_value_stats_py, py::arg("arrays"), py::arg("codes"),
        "per array: (min, max, count) of its finite values and mean |x| (codes[i]: its float dtype code)");
  m.def("sz_encode_stream", &sz_encode_stream_py, py::arg("x"), py::arg("dtype_code"), py::arg("n"),
        py::arg("error_bound"), py::arg("rel"), py::arg("block_size"), py::arg("prefix"), py::arg("range_lo") = 0.0,
        py::arg("range_hi") = 0.0, py::arg("range_count") = -1,
        "prefix + a whole SZ stream (codec.encode_stream, no lossless stage) of n >= 1 values; block_size 0: "
        "the codec's choice; range_count >= 0: (range_lo, range_hi, range_count) is the finite range, not recomputed");
  m.def("sz_encode_records", &sz_encode_records_py, py::arg("arrays"), py::arg("codes"), py::arg("error_bound"),
        py::arg("rel"), py::arg("ranges") = py::none(),
        "the record data of an sz state-dict payload: per array, kind 1 + its stream (codes[i]: float dtype code) "
        "or kind 0 + its bytes (codes[i] = 0)");
  m.def("sz_decode_records", &sz_decode_records_py, py::arg("datas"), py::arg("codes"), py::arg("dtypes"),
        py::arg("shapes"), py::arg("kinds") = true,
        "the arrays of an sz state-dict payload's records (kinds: each starts with its kind byte; else each is a "
        "bare stream, as fc.SZ writes it); None: a stream with a lossless stage; ValueError((index, message)) on a defect");
  m.def("sz_encode", &sz_encode_py, py::arg("x"), py::arg("dtype_code"), py::arg("n"), py::arg("step"),
        py::arg("bound"), py::arg("block_size"), py::arg("prefix") = py::bytes(),
        "prefix + the SZ blocks section of n values (raw bytes of dtype_code)");
  m.def("sz_decode", &sz_decode_py, py::arg("section"), py::arg("out"), py::arg("dtype_code"), py::arg("n"),
        py::arg("block_size"), py::arg("step"), "decode an SZ blocks section into out; ValueError if corrupt");
  m.def(
      "sz_simd",
      [](py::object portable) {
        if (!portable.is_none()) sz::g_portable = portable.cast<bool>();
        return sz::use_avx512();
      },
      py::arg("portable") = py::none(),
      "whether the rANS loops run with AVX-512; portable=True forces the portable ones (tests)");
  m.def("prequantize", &prequantize_py, py::arg("x"), py::arg("inv"),
        "int32 codes round_half_even(x * inv) (float32); INT32_MIN where not finite or |x*inv| >= 2^22");
});
}  // namespace fc
