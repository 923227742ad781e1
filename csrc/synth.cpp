// FedSynth engine on CPU: convolution + ReLU + max-pool fused, for a convolution with few input
// channels (the FedAvg CNN's first layer: 1 -> 32 channels, 5x5, then 2x2 pooling).
//
// Why: unfused, that layer materialises a [N, 32, 24, 24] map (4.7 MB per 64 images), pools it,
// and in the backward pass zero-fills and scatters a map of the same size before the weight
// gradient; with one input channel mkldnn runs it at a fraction of its speed. Here the map never
// exists: the forward keeps, per pooled output and channel, the max and which window element gave
// it (one byte), and every later pass (tangent forward, weight/input gradient) is a convolution
// evaluated only at those positions. The torch references are in fedcompress/synth/ops.py
// (conv_pool_ref, conv_at_ref, conv_at_bwd_ref); tests/test_synth.py compares them.
//
// Layouts (all float32, C-contiguous): x [N, Hp, Wp, C] (channels_last, already zero-padded), the
// weight w [O, kh, kw, C] (the engine's flat-buffer layout; the bindings build the transposed,
// zero-padded copies the kernels read: wt [K, Op], K = kh*kw*C in (kh, kw, c) order, Op = O rounded
// up to 16), outputs and arg [N, PH, PW, O] with PH = (Hp - kh + 1) / P, PW likewise (floor).
// Window element k = u * P + v (row-major); ties keep the first, NaN wins, as torch's max-pool.
// Also here: channels_last im2col / col2im for the engine's small-batch convolutions.
//
// Threads: images are split over up to `threads` threads of the extension's pool (csrc/pool.h; capped
// by fedcompress.set_num_threads when set). Results do not depend on the count: the
// weight gradient is summed per fixed block of images, then over blocks in order).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "pool.h"
#include "registry.h"

namespace fc {
namespace py = pybind11;

namespace synth_detail {

constexpr int V = 16;           // output channels per register block (one AVX-512 vector)
constexpr int64_t kBlock = 16;  // images per weight-gradient partial sum

struct Geom {
  int64_t N, Hp, Wp, C, kh, kw, O, Op, P, PH, PW, K;
};

// The kernels, once per ISA (GCC vector types: one zmm per V channels in the AVX-512 build).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#pragma GCC optimize("fp-contract=fast")  // FMAs here (the build turns contraction off for SZ's bound)
namespace avx512 {
#include "synth_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
namespace baseline {
#include "synth_kernels.h"
}  // namespace baseline

static bool use_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return yes;
}

static void conv_pool_fwd(const Geom& g, const float* x, const float* wt, const float* bias, float* out,
                          uint8_t* arg, int threads) {
  (use_avx512() ? avx512::conv_pool_fwd : baseline::conv_pool_fwd)(g, x, wt, bias, out, arg, threads);
}
static void conv_at(const Geom& g, const float* x, const float* wt, const float* bias, const uint8_t* arg,
                    float* out, int threads) {
  (use_avx512() ? avx512::conv_at : baseline::conv_at)(g, x, wt, bias, arg, out, threads);
}
static void conv_at_bwd(const Geom& g, const float* gout, const float* x, const float* wk, const uint8_t* arg,
                        float* dwt, float* dx, const float* gout2, const float* wk2, int threads) {
  (use_avx512() ? avx512::conv_at_bwd : baseline::conv_at_bwd)(g, gout, x, wk, arg, dwt, dx, gout2, wk2, threads);
}
static void col2im(const float* cols, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh, int64_t kw, int64_t OH,
                   int64_t OW, const int64_t* st, const int64_t* pad, const int64_t* dil, float* dx, int threads) {
  (use_avx512() ? avx512::col2im : baseline::col2im)(cols, N, H, W, C, kh, kw, OH, OW, st, pad, dil, dx, threads);
}
static void im2col(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh, int64_t kw, int64_t OH,
                   int64_t OW, const int64_t* st, const int64_t* dil, float* cols, int threads) {
  (use_avx512() ? avx512::im2col : baseline::im2col)(x, N, H, W, C, kh, kw, OH, OW, st, dil, cols, threads);
}

// ---- bindings: argument checks name the argument -------------------------------------------
// Python passes x [N, Hp, Wp, C] (padded), the weight w [O, kh, kw, C] (the channels_last layout of
// the engine's flat buffer), bias [O] or empty; the padded, transposed copies the kernels read are
// built here (800 floats for the FedAvg CNN: cheaper than three torch calls).

using F32 = py::array_t<float, py::array::c_style>;
using U8 = py::array_t<uint8_t, py::array::c_style>;

static Geom geom(const F32& x, const F32& w, int64_t P) {
  if (x.ndim() != 4) throw py::value_error("x must be [N, Hp, Wp, C]");
  if (w.ndim() != 4 || w.shape(3) != x.shape(3)) throw py::value_error("w must be [O, kh, kw, C] with x's C");
  Geom g{};
  g.N = x.shape(0), g.Hp = x.shape(1), g.Wp = x.shape(2), g.C = x.shape(3);
  g.O = w.shape(0), g.kh = w.shape(1), g.kw = w.shape(2), g.P = P;
  g.Op = (g.O + V - 1) / V * V, g.K = g.kh * g.kw * g.C;
  if (g.O < 1 || g.kh < 1 || g.kw < 1 || g.kh > g.Hp || g.kw > g.Wp) throw py::value_error("w does not fit x");
  if (P < 1 || P > 15) throw py::value_error("pool must be in [1, 15] (window index is one byte)");
  g.PH = (g.Hp - g.kh + 1) / P, g.PW = (g.Wp - g.kw + 1) / P;
  return g;
}

static void need_out(const py::array& a, const Geom& g, const char* name) {
  if (a.ndim() != 4 || a.shape(0) != g.N || a.shape(1) != g.PH || a.shape(2) != g.PW || a.shape(3) != g.O)
    throw py::value_error(std::string(name) + " must be [N, PH, PW, O]");
}

// [O, K] -> [K, Op], zero columns
static std::vector<float> transpose_padded(const Geom& g, const float* w) {
  std::vector<float> wt(static_cast<size_t>(g.K * g.Op), 0.f);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t k = 0; k < g.K; ++k) wt[k * g.Op + o] = w[o * g.K + k];
  return wt;
}

// [O, K] -> [O, Kp], zero columns
static std::vector<float> rows_padded(const Geom& g, const float* w) {
  const int64_t Kp = (g.K + V - 1) / V * V;
  std::vector<float> wk(static_cast<size_t>(g.O * Kp), 0.f);
  for (int64_t o = 0; o < g.O; ++o) std::memcpy(wk.data() + o * Kp, w + o * g.K, sizeof(float) * g.K);
  return wk;
}

static std::vector<float> bias_padded(const F32& b, const Geom& g) {
  if (b.size() == 0) return {};
  if (b.ndim() != 1 || b.shape(0) != g.O) throw py::value_error("bias must be empty or [O]");
  std::vector<float> bp(static_cast<size_t>(g.Op), 0.f);
  std::memcpy(bp.data(), b.data(), sizeof(float) * g.O);
  return bp;
}

static void need_like(const py::object& o, const py::array& like, const char* name) {
  if (!py::isinstance<F32>(o)) throw py::value_error(std::string(name) + " must be a C-contiguous float32 array");
  const auto a = o.cast<py::array>();
  if (a.ndim() != like.ndim()) throw py::value_error(std::string(name) + " has the wrong shape");
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) != like.shape(i)) throw py::value_error(std::string(name) + " has the wrong shape");
}

}  // namespace synth_detail

FC_BIND([](py::module_& m) {
  using namespace synth_detail;
  m.def("synth_conv_pool", [](const F32& x, const F32& w, const F32& bias, int64_t P, F32 out, U8 arg, int threads) {
    const Geom g = geom(x, w, P);
    need_out(out, g, "out");
    need_out(arg, g, "arg");
    const auto wt = transpose_padded(g, w.data());
    const auto bp = bias_padded(bias, g);
    float* o = out.mutable_data();
    uint8_t* a = arg.mutable_data();
    py::gil_scoped_release nogil;
    conv_pool_fwd(g, x.data(), wt.data(), bp.empty() ? nullptr : bp.data(), o, a, std::max(threads, 1));
  }, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("pool"), py::arg("out").noconvert(),
     py::arg("arg").noconvert(), py::arg("threads"),
     "out = relu(maxpool(conv(x))), arg = window element of each max (see csrc/synth.cpp)");
  m.def("synth_conv_at", [](const F32& x, const F32& w, const F32& bias, int64_t P, const U8& arg, F32 out,
                             int threads) {
    const Geom g = geom(x, w, P);
    need_out(arg, g, "arg");
    need_out(out, g, "out");
    const auto wt = transpose_padded(g, w.data());
    const auto bp = bias_padded(bias, g);
    float* o = out.mutable_data();
    py::gil_scoped_release nogil;
    conv_at(g, x.data(), wt.data(), bp.empty() ? nullptr : bp.data(), arg.data(), o, std::max(threads, 1));
  }, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("pool"), py::arg("arg").noconvert(),
     py::arg("out").noconvert(), py::arg("threads"), "conv(x) at each output's arg position");
  m.def("synth_conv_at_bwd", [](const F32& gout, const F32& x, const F32& w, int64_t P, const U8& arg, F32 dw,
                                 py::object dx, py::object gout2, py::object w2, int threads) {
    const Geom g = geom(x, w, P);
    need_out(gout, g, "gout");
    need_out(arg, g, "arg");
    if (dw.ndim() != 4 || dw.shape(0) != g.O || dw.shape(1) != g.kh || dw.shape(2) != g.kw || dw.shape(3) != g.C)
      throw py::value_error("dw must be like w");
    float* dxp = nullptr;
    const float *g2 = nullptr, *w2p = nullptr;
    F32 dxa, g2a, w2a;
    if (!dx.is_none()) {
      need_like(dx, x, "dx");
      dxa = dx.cast<F32>();
      dxp = dxa.mutable_data();
    }
    if (!gout2.is_none()) {
      if (dx.is_none() || w2.is_none()) throw py::value_error("gout2 needs dx and w2");
      need_like(gout2, gout, "gout2");
      need_like(w2, w, "w2");
      g2a = gout2.cast<F32>(), w2a = w2.cast<F32>();
      g2 = g2a.data(), w2p = w2a.data();
    }
    const auto wk = rows_padded(g, w.data());
    const auto wk2 = w2p ? rows_padded(g, w2p) : std::vector<float>();
    std::vector<float> dwt(static_cast<size_t>(g.K * g.Op));
    {
      py::gil_scoped_release nogil;
      conv_at_bwd(g, gout.data(), x.data(), wk.data(), arg.data(), dwt.data(), dxp, g2, w2p ? wk2.data() : nullptr,
                  std::max(threads, 1));
    }
    float* d = dw.mutable_data();
    for (int64_t o = 0; o < g.O; ++o)
      for (int64_t k = 0; k < g.K; ++k) d[o * g.K + k] = dwt[k * g.Op + o];
  }, py::arg("gout"), py::arg("x"), py::arg("w"), py::arg("pool"), py::arg("arg").noconvert(),
     py::arg("dw").noconvert(), py::arg("dx"), py::arg("gout2"), py::arg("w2"), py::arg("threads"),
     "gradients of synth_conv_at for gout: dw (from x) and, if dx is given, dx = w^T gout (+ w2^T gout2)");
  m.def("synth_col2im", [](const F32& cols, int64_t kh, int64_t kw, std::array<int64_t, 2> stride,
                            std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, F32 dx, int threads) {
    if (dx.ndim() != 4) throw py::value_error("dx must be [N, H, W, C]");
    const int64_t N = dx.shape(0), H = dx.shape(1), W = dx.shape(2), C = dx.shape(3);
    for (int i = 0; i < 2; ++i)
      if (stride[i] < 1 || dilation[i] < 1 || padding[i] < 0) throw py::value_error("bad stride/padding/dilation");
    if (kh < 1 || kw < 1) throw py::value_error("kernel size must be >= 1");
    const int64_t OH = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
    const int64_t OW = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
    if (OH < 1 || OW < 1 || cols.ndim() != 2 || cols.shape(0) != N * OH * OW || cols.shape(1) != kh * kw * C)
      throw py::value_error("cols must be [N*OH*OW, kh*kw*C] for dx's shape");
    float* d = dx.mutable_data();
    py::gil_scoped_release nogil;
    col2im(cols.data(), N, H, W, C, kh, kw, OH, OW, stride.data(), padding.data(), dilation.data(), d,
           std::max(threads, 1));
  }, py::arg("cols"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
     py::arg("dx").noconvert(), py::arg("threads"), "channels_last col2im (overwrites dx)");
  m.def("synth_im2col", [](const F32& x, int64_t kh, int64_t kw, std::array<int64_t, 2> stride,
                            std::array<int64_t, 2> dilation, F32 cols, int threads) {
    if (x.ndim() != 4) throw py::value_error("x must be [N, H, W, C] (zero-padded)");
    const int64_t N = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3);
    for (int i = 0; i < 2; ++i)
      if (stride[i] < 1 || dilation[i] < 1) throw py::value_error("bad stride/dilation");
    if (kh < 1 || kw < 1) throw py::value_error("kernel size must be >= 1");
    const int64_t OH = (H - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
    const int64_t OW = (W - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
    if (H - dilation[0] * (kh - 1) - 1 < 0 || W - dilation[1] * (kw - 1) - 1 < 0)
      throw py::value_error("x is smaller than the kernel");
    if (cols.ndim() != 2 || cols.shape(0) != N * OH * OW || cols.shape(1) != kh * kw * C)
      throw py::value_error("cols must be [N*OH*OW, kh*kw*C] for x's shape");
    float* c = cols.mutable_data();
    py::gil_scoped_release nogil;
    im2col(x.data(), N, H, W, C, kh, kw, OH, OW, stride.data(), dilation.data(), c, std::max(threads, 1));
  }, py::arg("x"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("dilation"), py::arg("cols").noconvert(),
     py::arg("threads"), "channels_last im2col of a zero-padded x (overwrites cols)");
});
}  // namespace fc
