// SZ kernels on CPU. Layers: plain functions on pointers -> OpenMP launchers -> bindings at the end.
#include <pybind11/numpy.h>

#include <cmath>
#include <cstdint>

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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) q[i] = prequantize_one(x[i], inv);
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

FC_BIND([](py::module_& m) {
  m.def("prequantize", &prequantize_py, py::arg("x"), py::arg("inv"),
        "int32 codes round_half_even(x * inv) (float32); INT32_MIN where not finite or |x*inv| >= 2^22");
});
}  // namespace fc
