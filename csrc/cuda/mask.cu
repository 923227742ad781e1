// Random mask on CUDA, sharing csrc/philox.h with the C++ kernels: the same keep bits as csrc/mask.cpp,
// the torch reference and kernels/mask.py. Not built by setup.py on machines without a CUDA torch and
// nvcc; tests/test_mask.py compiles it with `nvcc -c -std=c++17 -Icsrc csrc/cuda/mask.cu`.
//
// One tensor per launch; a tile of kTile = 4096 elements per block (the C++ unit). Each thread calls
// philox::keep per element (one Philox per element, 4x the minimum since a call yields 4 elements'
// words): simple, and compute is cheap next to memory on a GPU; the Triton kernel shares calls. Encode is two
// launches around an exclusive scan of the per-tile counts (done by the caller, e.g. torch.cumsum):
//   mask_count  -> counts[tile]          (kept per tile)
//   mask_compact-> out[offsets[tile] + rank] = x[i] for kept i, in index order
// Decode: mask_count per client, then mask_scatter_mean adds every client (in order) into a tile held
// in registers: out[i] = sum_c float32(v_c * w_c), with __fmul_rn/__fadd_rn so no FMA contraction
// changes the bits relative to the CPU backends.
#include <cuda_runtime.h>
#include <stdint.h>

#include "philox.h"

namespace fc {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;

__device__ __forceinline__ int block_sum(int v, int* scratch) {
  for (int off = 16; off; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Rank of this thread's flag among the block's flags of one round (index order), and the round's
// total. Round k covers elements base + k * kThreads + threadIdx.x: consecutive across the block.
__device__ __forceinline__ int block_rank(bool flag, int* warp_counts, int* total) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  for (unsigned w = 0; w < kWarps; ++w) {
    const int c = warp_counts[w];
    before += (w < warp) ? c : 0;
    all += c;
  }
  __syncthreads();
  *total = all;
  return before + rank_in_warp;
}

__global__ void mask_count_kernel(uint64_t seed, int64_t n, uint32_t thr_m1, int64_t* counts) {
  __shared__ int scratch[kWarps];
  const int64_t base = blockIdx.x * kTile;
  int local = 0;
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = base + k * kThreads + threadIdx.x;
    local += (i < n && philox::keep(static_cast<uint64_t>(i), seed, thr_m1)) ? 1 : 0;
  }
  const int total = block_sum(local, scratch);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

__global__ void mask_compact_kernel(const float* __restrict__ x, int64_t n, uint64_t seed, uint32_t thr_m1,
                                    const int64_t* __restrict__ offsets, float* __restrict__ out) {
  __shared__ int warp_counts[kWarps];
  const int64_t base = blockIdx.x * kTile;
  int64_t pos = offsets[blockIdx.x];
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = base + k * kThreads + threadIdx.x;
    const bool keep = i < n && philox::keep(static_cast<uint64_t>(i), seed, thr_m1);
    int total;
    const int rank = block_rank(keep, warp_counts, &total);
    if (keep) out[pos + rank] = x[i];
    pos += total;
  }
}

// vals: every client's kept values, concatenated; voff[c * n_tiles + tile]: where client c's values for
// that tile start in vals; seeds[c], weights[c] per client.
__global__ void mask_scatter_mean_kernel(const float* __restrict__ vals, const int64_t* __restrict__ voff,
                                         const uint64_t* __restrict__ seeds, const float* __restrict__ weights,
                                         int n_clients, int64_t n, uint32_t thr_m1, float* __restrict__ out) {
  __shared__ int warp_counts[kWarps];
  const int64_t base = blockIdx.x * kTile;
  float acc[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) acc[k] = 0.0f;
  for (int c = 0; c < n_clients; ++c) {
    const uint64_t seed = seeds[c];
    const float w = weights[c];
    int64_t pos = voff[static_cast<int64_t>(c) * gridDim.x + blockIdx.x];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      const bool keep = i < n && philox::keep(static_cast<uint64_t>(i), seed, thr_m1);
      int total;
      const int rank = block_rank(keep, warp_counts, &total);
      if (keep) acc[k] = __fadd_rn(acc[k], __fmul_rn(vals[pos + rank], w));
      pos += total;
    }
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = base + k * kThreads + threadIdx.x;
    if (i < n) out[i] = acc[k];
  }
}

inline unsigned tiles(int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); }

}  // namespace cuda
}  // namespace fc

// Host launchers (C ABI so a loader or a torch extension can bind them). counts/offsets hold
// ceil(n / 4096) entries per tensor (per client for decode).
extern "C" {

cudaError_t fc_mask_count_cuda(uint64_t seed, int64_t n, uint32_t thr_m1, int64_t* counts, cudaStream_t stream) {
  if (n > 0) fc::cuda::mask_count_kernel<<<fc::cuda::tiles(n), fc::cuda::kThreads, 0, stream>>>(seed, n, thr_m1, counts);
  return cudaGetLastError();
}

cudaError_t fc_mask_compact_cuda(const float* x, int64_t n, uint64_t seed, uint32_t thr_m1, const int64_t* offsets,
                                 float* out, cudaStream_t stream) {
  if (n > 0)
    fc::cuda::mask_compact_kernel<<<fc::cuda::tiles(n), fc::cuda::kThreads, 0, stream>>>(x, n, seed, thr_m1, offsets,
                                                                                           out);
  return cudaGetLastError();
}

cudaError_t fc_mask_scatter_mean_cuda(const float* vals, const int64_t* voff, const uint64_t* seeds,
                                      const float* weights, int n_clients, int64_t n, uint32_t thr_m1, float* out,
                                      cudaStream_t stream) {
  if (n > 0)
    fc::cuda::mask_scatter_mean_kernel<<<fc::cuda::tiles(n), fc::cuda::kThreads, 0, stream>>>(
        vals, voff, seeds, weights, n_clients, n, thr_m1, out);
  return cudaGetLastError();
}
}
