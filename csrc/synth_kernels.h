// Kernels of csrc/synth.cpp, included there twice: compiled for AVX-512 and for the baseline ISA
// (no -march in the portable build); synth.cpp picks one at run time. Needs <algorithm>,
// <cstdint>, <cstring>, <vector>, pool.h and Geom, V, kBlock from the including file.
// (no include guard on purpose)

// One register block of V output channels, as a GCC vector (one zmm in the AVX-512 clone, four
// xmm in the default one): the compiler left the plain-array version scalar.
typedef float vf __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
typedef uint8_t vb __attribute__((vector_size(V)));
// nv <= V values, the rest zero (full blocks take the vector path: a scalar loop here cost ~1 ms per
// 64 images in the backward pass)
static inline vi load_arg(const uint8_t* p, int64_t nv) {
  vb b = {};
  if (nv == V)
    std::memcpy(&b, p, V);
  else
    for (int64_t q = 0; q < nv; ++q) b[q] = p[q];
  return __builtin_convertvector(b, vi);
}
static inline vf load_n(const float* p, int64_t nv) {
  if (nv == V) return load(p);
  vf v = {};
  for (int64_t q = 0; q < nv; ++q) v[q] = p[q];
  return v;
}

// bias + sum over taps of x(patch with top-left (h, w)) * wt[tap, ob..ob+V)
static inline vf conv_point(const Geom& g, const float* xn, const float* wt,
                                                           const float* bias, int64_t ob, int64_t h, int64_t w) {
  vf acc = bias ? load(bias + ob) : vf{};
  const int64_t row = g.kw * g.C;
  for (int64_t i = 0; i < g.kh; ++i) {
    const float* xr = xn + ((h + i) * g.Wp + w) * g.C;  // kw * C contiguous values
    const float* wr = wt + i * row * g.Op + ob;
    for (int64_t t = 0; t < row; ++t) acc += xr[t] * load(wr + t * g.Op);
  }
  return acc;
}

static inline void store_n(float* dst, vf v, int64_t nv) {
  float tmp[V];
  store(tmp, v);
  std::memcpy(dst, tmp, sizeof(float) * nv);
}

// Forward: out = relu(max over the window of conv), arg = window element of the max.
void conv_pool_fwd(const Geom& g, const float* x, const float* wt, const float* bias, float* out,
                          uint8_t* arg, int threads) {
  pool::parallel_for(g.N, threads > 1 && g.N > 1 ? pool::cap(threads) : 1, [&](int64_t n) {
    const float* xn = x + n * g.Hp * g.Wp * g.C;
    for (int64_t ph = 0; ph < g.PH; ++ph)
      for (int64_t pw = 0; pw < g.PW; ++pw) {
        const int64_t o_off = ((n * g.PH + ph) * g.PW + pw) * g.O;
        for (int64_t ob = 0; ob < g.O; ob += V) {
          vf best = conv_point(g, xn, wt, bias, ob, ph * g.P, pw * g.P);
          vi barg = vi{};
          for (int64_t k = 1; k < g.P * g.P; ++k) {
            const vf acc = conv_point(g, xn, wt, bias, ob, ph * g.P + k / g.P, pw * g.P + k % g.P);
            const vi take = (acc > best) | (acc != acc);  // first max wins; NaN wins (torch)
            best = take ? acc : best;
            barg = take ? static_cast<int32_t>(k) : barg;
          }
          const vf relu = (best > 0.f) | (best != best) ? best : vf{};  // relu keeps NaN (torch)
          const int64_t nv = std::min<int64_t>(V, g.O - ob);
          store_n(out + o_off + ob, relu, nv);
          for (int64_t q = 0; q < nv; ++q) arg[o_off + ob + q] = static_cast<uint8_t>(barg[q]);
        }
      }
  });
}

// The convolution evaluated at each output's arg position (no relu): the tangent forward.
void conv_at(const Geom& g, const float* x, const float* wt, const float* bias, const uint8_t* arg,
                    float* out, int threads) {
  pool::parallel_for(g.N, threads > 1 && g.N > 1 ? pool::cap(threads) : 1, [&](int64_t n) {
    const float* xn = x + n * g.Hp * g.Wp * g.C;
    for (int64_t ph = 0; ph < g.PH; ++ph)
      for (int64_t pw = 0; pw < g.PW; ++pw) {
        const int64_t o_off = ((n * g.PH + ph) * g.PW + pw) * g.O;
        for (int64_t ob = 0; ob < g.O; ob += V) {
          const int64_t nv = std::min<int64_t>(V, g.O - ob);
          const vi a = load_arg(arg + o_off + ob, nv);
          vf sel = vf{};
          // every window element is evaluated and the right one selected per channel: the channels
          // of one vector usually disagree on the arg, and P*P vector passes beat V scalar ones
          for (int64_t k = 0; k < g.P * g.P; ++k) {
            const vi hit = a == static_cast<int32_t>(k);
            sel = hit ? conv_point(g, xn, wt, bias, ob, ph * g.P + k / g.P, pw * g.P + k % g.P) : sel;
          }
          store_n(out + o_off + ob, sel, nv);
        }
      }
  });
}

// Gradients of conv_at for an output cotangent gout [N, PH, PW, O]: dwt [K, Op] (overwritten) and,
// if dx is given, dx [N, Hp, Wp, C] = W^T gout (+ W2^T gout2 when gout2 is given; the reverse pass
// needs both), overwritten. wk, wk2: the weights as [O, Kp], K padded to V.
void conv_at_bwd(const Geom& g, const float* gout, const float* x, const float* wk, const uint8_t* arg, float* dwt,
                 float* dx, const float* gout2, const float* wk2, int threads) {
  const int64_t KO = g.K * g.Op, row = g.kw * g.C, npos = g.PH * g.PW, Kp = (g.K + V - 1) / V * V;
  const int64_t nblk = (g.N + kBlock - 1) / kBlock;
  std::vector<float> part(static_cast<size_t>(std::max<int64_t>(nblk, 1) * KO), 0.f);
  pool::parallel_for(nblk, threads > 1 && nblk > 1 ? pool::cap(threads) : 1, [&](int64_t blk) {
    float* dw = part.data() + blk * KO;
    std::vector<float> gk(static_cast<size_t>(npos * g.Op));  // gout of the channels whose arg is k
    for (int64_t n = blk * kBlock; n < std::min(g.N, (blk + 1) * kBlock); ++n) {
      const float* xn = x + n * g.Hp * g.Wp * g.C;
      for (int64_t k = 0; k < g.P * g.P; ++k) {
        for (int64_t pos = 0; pos < npos; ++pos)
          for (int64_t ob = 0; ob < g.O; ob += V) {
            const int64_t nv = std::min<int64_t>(V, g.O - ob), off = (n * npos + pos) * g.O + ob;
            store(gk.data() + pos * g.Op + ob, load_arg(arg + off, nv) == static_cast<int32_t>(k) ? load_n(gout + off, nv) : vf{});
          }
        // dw[tap] += sum over positions of x(tap at the position's window element k) * gk, four
        // taps of a kernel row at a time: one gk load feeds four FMAs and the four accumulators
        // are independent chains (one tap at a time was load- and latency-bound: 2.7 ms -> 2.1 ms
        // for 64 images of the FedAvg CNN, measured on the loaded shared machine)
        const int64_t xs = g.P * g.C;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t t0 = 0; t0 < row; t0 += 4)
            for (int64_t ob = 0; ob < g.O; ob += V) {
              const int64_t nt = std::min<int64_t>(4, row - t0);
              float* d = dw + (i * row + t0) * g.Op + ob;
              vf a0 = load(d), a1 = nt > 1 ? load(d + g.Op) : vf{}, a2 = nt > 2 ? load(d + 2 * g.Op) : vf{},
                 a3 = nt > 3 ? load(d + 3 * g.Op) : vf{};
              for (int64_t ph = 0; ph < g.PH; ++ph) {
                const float* xr = xn + ((ph * g.P + k / g.P + i) * g.Wp + k % g.P) * g.C + t0;
                const float* gr = gk.data() + ph * g.PW * g.Op + ob;
                if (nt == 4) {
                  for (int64_t pw = 0; pw < g.PW; ++pw) {
                    const vf gv = load(gr + pw * g.Op);
                    const float* xp = xr + pw * xs;
                    a0 += xp[0] * gv;
                    a1 += xp[1] * gv;
                    a2 += xp[2] * gv;
                    a3 += xp[3] * gv;
                  }
                } else {
                  for (int64_t pw = 0; pw < g.PW; ++pw) {
                    const vf gv = load(gr + pw * g.Op);
                    const float* xp = xr + pw * xs;
                    a0 += xp[0] * gv;
                    if (nt > 1) a1 += xp[1] * gv;
                    if (nt > 2) a2 += xp[2] * gv;
                  }
                }
              }
              store(d, a0);
              if (nt > 1) store(d + g.Op, a1);
              if (nt > 2) store(d + 2 * g.Op, a2);
              if (nt > 3) store(d + 3 * g.Op, a3);
            }
      }
    }
  });
  std::memcpy(dwt, part.data(), sizeof(float) * KO);
  for (int64_t blk = 1; blk < nblk; ++blk) {
    const float* p = part.data() + blk * KO;
    for (int64_t i = 0; i < KO; ++i) dwt[i] += p[i];
  }
  if (!dx) return;
  pool::parallel_for(g.N, threads > 1 && g.N > 1 ? pool::cap(threads) : 1, [&](int64_t n) {
    float* dxn = dx + n * g.Hp * g.Wp * g.C;
    std::fill(dxn, dxn + g.Hp * g.Wp * g.C, 0.f);
    std::vector<float> dc(static_cast<size_t>(g.P * g.P * Kp));  // per window element: W^T gout
    for (int64_t ph = 0; ph < g.PH; ++ph)
      for (int64_t pw = 0; pw < g.PW; ++pw) {
        std::fill(dc.begin(), dc.end(), 0.f);
        const int64_t off = ((n * g.PH + ph) * g.PW + pw) * g.O;
        for (int64_t o = 0; o < g.O; ++o) {
          const float gv = gout[off + o], gv2 = gout2 ? gout2[off + o] : 0.f;
          if (gv == 0.f && gv2 == 0.f) continue;
          float* d = dc.data() + arg[off + o] * Kp;
          for (int64_t kb = 0; kb < Kp; kb += V) {
            vf acc = load(d + kb) + gv * load(wk + o * Kp + kb);
            if (gout2) acc += gv2 * load(wk2 + o * Kp + kb);
            store(d + kb, acc);
          }
        }
        for (int64_t k = 0; k < g.P * g.P; ++k) {
          const float* d = dc.data() + k * Kp;
          for (int64_t i = 0; i < g.kh; ++i) {
            float* dr = dxn + ((ph * g.P + k / g.P + i) * g.Wp + pw * g.P + k % g.P) * g.C;
            for (int64_t t = 0; t < row; ++t) dr[t] += d[i * row + t];
          }
        }
      }
  });
}

// col2im for channels_last: dx [N, H, W, C] = sum over output positions (n, oh, ow) and taps (i, j)
// of cols[(n, oh, ow), (i, j, c)] at (oh*sh - ph + i*dh, ow*sw - pw + j*dw) (the input gradient of
// a convolution whose weight gradient / forward ran as im2col + GEMM; overwritten).
void col2im(const float* cols, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh, int64_t kw, int64_t OH,
            int64_t OW, const int64_t* st, const int64_t* pad, const int64_t* dil, float* dx, int threads) {
  pool::parallel_for(N, threads > 1 && N > 1 ? pool::cap(threads) : 1, [&](int64_t n) {
    float* dxn = dx + n * H * W * C;
    std::fill(dxn, dxn + H * W * C, 0.f);
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        const float* cr = cols + ((n * OH + oh) * OW + ow) * kh * kw * C;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = oh * st[0] - pad[0] + i * dil[0];
          if (h < 0 || h >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = ow * st[1] - pad[1] + j * dil[1];
            if (w < 0 || w >= W) continue;
            float* d = dxn + (h * W + w) * C;
            const float* c = cr + (i * kw + j) * C;
            for (int64_t q = 0; q < C; ++q) d[q] += c[q];
          }
        }
      }
  });
}

// im2col for channels_last: cols[(n, oh, ow), (i, j, c)] = x[n, oh*sh + i*dh, ow*sw + j*dw, c] for an
// already zero-padded x [N, H, W, C] (a C-float memcpy per tap; torch's strided copy of the same
// 6-d view ran at ~2 GB/s: 0.19 ms for conv2's 410 KB of columns on 2 images).
void im2col(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh, int64_t kw, int64_t OH,
            int64_t OW, const int64_t* st, const int64_t* dil, float* cols, int threads) {
  pool::parallel_for(N, threads > 1 && N > 1 ? pool::cap(threads) : 1, [&](int64_t n) {
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        float* cr = cols + ((n * OH + oh) * OW + ow) * kh * kw * C;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j)
            std::memcpy(cr + (i * kw + j) * C, x + ((n * H + oh * st[0] + i * dil[0]) * W + ow * st[1] + j * dil[1]) * C,
                        sizeof(float) * C);
      }
  });
}
