// CRC-32 (the zlib/gzip polynomial, same values as zlib.crc32) with carry-less multiplication.
// The wire format checksums every payload, twice per round trip; zlib's table-driven CRC was a
// visible share of decoding a large SZ tensor. Folding 64 bytes per step with PCLMULQDQ is 7-8x
// faster (python -m pytest bench/bench_wire.py --benchmark-only).
//
// Method (bit-reflected throughout, as the polynomial is): keep four 128-bit lanes of data, fold
// each forward by 512 bits (multiply its halves by x^(512+-32) mod P), XOR the next 64 bytes in;
// then fold the lanes into one (x^(128+-32) mod P), reduce 128 -> 64 -> 32 bits, and finish with
// a Barrett reduction. Constants: reflect32(x^e mod P) << 1 for e = 544, 480, 160, 96, 64, and
// floor(x^64 / P) reflected to 33 bits; derived with a few lines of polynomial arithmetic.
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "buffers.h"
#include "registry.h"

namespace fc {
namespace crc {

static const std::array<uint32_t, 256> kTable = [] {  // byte-at-a-time table for heads and tails
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    t[i] = c;
  }
  return t;
}();

static uint32_t bytes_le(uint32_t c, const uint8_t* p, size_t n) {  // no pre/post inversion
  for (size_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c;
}

#define FC_CRC_TARGET __attribute__((target("pclmul,sse4.1")))
FC_CRC_TARGET static inline __m128i load(const uint8_t* q) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
}
FC_CRC_TARGET static inline __m128i fold(__m128i x, __m128i k) {  // x's halves times k's, summed
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

// n >= 64 and a multiple of 16; no pre/post inversion
FC_CRC_TARGET static uint32_t fold_le(uint32_t c, const uint8_t* p, size_t n) {
  const __m128i k512 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);  // hi: x^480, lo: x^544
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);  // hi: x^96, lo: x^160
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(int(c))), x1 = load(p + 16), x2 = load(p + 32),
          x3 = load(p + 48);
  size_t i = 64;
  for (; i + 64 <= n; i += 64) {
    x0 = _mm_xor_si128(fold(x0, k512), load(p + i));
    x1 = _mm_xor_si128(fold(x1, k512), load(p + i + 16));
    x2 = _mm_xor_si128(fold(x2, k512), load(p + i + 32));
    x3 = _mm_xor_si128(fold(x3, k512), load(p + i + 48));
  }
  __m128i a = _mm_xor_si128(fold(x0, k128), x1);
  a = _mm_xor_si128(fold(a, k128), x2);
  a = _mm_xor_si128(fold(a, k128), x3);
  for (; i < n; i += 16) a = _mm_xor_si128(fold(a, k128), load(p + i));
  // 128 -> 64 bits: low half times x^96, plus the high half
  a = _mm_xor_si128(_mm_clmulepi64_si128(a, k128, 0x10), _mm_srli_si128(a, 8));
  // 64 -> 32: low 32 bits times x^64, plus the rest
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  a = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(a, mask32), _mm_set_epi64x(0, 0x163cd6124), 0x00),
                    _mm_srli_si128(a, 4));
  // Barrett: t = (a mod x^32) * mu mod x^32; a ^= t * P; the CRC is bits 32..63
  const __m128i pmu = _mm_set_epi64x(0x1F7011641, 0x1DB710641);  // hi: mu, lo: P
  __m128i t = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(a, mask32), pmu, 0x10), mask32);
  t = _mm_clmulepi64_si128(t, pmu, 0x00);
  return uint32_t(_mm_extract_epi32(_mm_xor_si128(a, t), 1));
}

static const bool kHasPclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");

// zlib.crc32(data, value) for any length
uint32_t crc32(const uint8_t* p, size_t n, uint32_t value) {
  uint32_t c = ~value;
  if (kHasPclmul && n >= 64) {
    const size_t m = n & ~size_t(15);
    c = fold_le(c, p, m);
    p += m, n -= m;
  }
  return ~bytes_le(c, p, n);
}

}  // namespace crc

FC_BIND([](py::module_& m) {
  m.def(
      "crc32",
      [](py::buffer b, uint32_t value) {
        py::buffer_info info = b.request();
        if (info.ndim != 1 || info.itemsize != 1 || (info.ndim == 1 && info.strides[0] != 1))
          throw py::value_error("crc32 needs a contiguous buffer of bytes");
        const auto* p = static_cast<const uint8_t*>(info.ptr);
        const size_t n = size_t(info.size);
        py::gil_scoped_release nogil;
        return crc::crc32(p, n, value);
      },
      py::arg("data"), py::arg("value") = 0, "zlib.crc32(data, value), folded with PCLMULQDQ where the CPU has it");
  m.def("crc32_fast", []() { return crc::kHasPclmul; }, "whether crc32 runs the PCLMULQDQ path");
  // wire.pack's last step: the parts joined, then the CRC-32 of all of them (u32 LE), into one new
  // bytes object. A crc32 call per part was 3 per record plus 5 Python -> C++ round trips.
  m.def(
      "join_crc32",
      [](py::list parts) {
        const Buffers bufs(parts);
        size_t total = 0;
        for (const auto& b : bufs.v) total += size_t(b.len);
        PyObject* obj = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(total + 4));
        if (!obj) throw py::error_already_set();
        py::bytes out = py::reinterpret_steal<py::bytes>(obj);
        auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(obj));
        size_t at = 0;
        for (const auto& b : bufs.v) {
          if (b.len) std::memcpy(dst + at, b.buf, size_t(b.len));
          at += size_t(b.len);
        }
        const uint32_t c = crc::crc32(dst, total, 0);
        std::memcpy(dst + total, &c, 4);  // little-endian: the build is x86-64 only
        return out;
      },
      py::arg("parts"), "b''.join(parts) + the CRC-32 of it as u32 little-endian (wire.pack)");
});
}  // namespace fc
