// The v2 CUDA kernels on the plane layout of P̃ (backend cuda_plane): the per-thread work is
// twa_plane.h's, shared with the host build the tests run; this file adds what only a GPU has — the
// block reductions (xor shuffles, then the warps in order through shared memory) and the launches.
// Plain CUDA (no torch headers) so that nvcc alone compiles it; twa_cuda_plane_launch.cpp binds it.
//
// project: block p = program p (≤ k tiles of one segment), T threads; for each block of kColumnBlock
//   columns the threads accumulate over the program's tiles (codes through L2 only, gradients re-read
//   from L1 per column block), then the block sums its threads in a fixed order into one partial row.
// reduce: one block per layer sums the layer's partial rows, kReduceLanes programs apart per lane and
//   the lanes in order, and folds c = scale·t + zero·Σg: the same bits every run, no atomics.
// expand: block p computes u = scale∘Δβ (shared memory) and s = Σ zero∘Δβ of its layer, then each
//   thread adds q·u + s to its rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "twa_plane.h"

namespace twa {
namespace plane {

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

namespace {

// Threads per block = per tile (PlaneLayout's `threads`): four warps, as the Triton plane kernels.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;

// The sum of the warp's values in butterfly_host's order; every lane gets it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int BITS, typename G>
__global__ void plane_project(PlaneTables t, const int64_t* __restrict__ grad_addr, float* __restrict__ part_t,
                              float* __restrict__ part_g) {
  __shared__ float warp_part[kColumnBlock][kWarps];
  __shared__ float warp_gsum[kWarps];
  const int64_t p = blockIdx.x;
  const ProgramTiles pg = program_tiles(t, p);
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const bool aligned = aligned_for<G, Geometry<BITS, kThreads>::V>(grad_addr, pg);
  for (int j0 = 0; j0 < t.n; j0 += kColumnBlock) {
    float acc[kColumnBlock];
#pragma unroll
    for (int jj = 0; jj < kColumnBlock; ++jj) acc[jj] = 0.0f;
    float gsum = 0.0f;
    const bool with_gsum = j0 == 0;  // the first pass also sums g
    if (with_gsum && aligned)
      project_thread<BITS, kThreads, G, true, true>(t, pg, grad_addr, j0, tid, acc, gsum);
    else if (with_gsum)
      project_thread<BITS, kThreads, G, false, true>(t, pg, grad_addr, j0, tid, acc, gsum);
    else if (aligned)
      project_thread<BITS, kThreads, G, true, false>(t, pg, grad_addr, j0, tid, acc, gsum);
    else
      project_thread<BITS, kThreads, G, false, false>(t, pg, grad_addr, j0, tid, acc, gsum);
#pragma unroll
    for (int jj = 0; jj < kColumnBlock; ++jj) {
      const float v = warp_sum(acc[jj]);
      if (lane == 0) warp_part[jj][warp] = v;
    }
    if (with_gsum) {
      const float v = warp_sum(gsum);
      if (lane == 0) warp_gsum[warp] = v;
    }
    __syncthreads();
    if (tid < kColumnBlock) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += warp_part[tid][w];
      part_t[p * t.n_pad + j0 + tid] = s;
    }
    if (with_gsum && tid == 0) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += warp_gsum[w];
      part_g[p] = s;
    }
    __syncthreads();
  }
}

// Block (kWarp, kReduceLanes): x = column lane, y = program lane.
__global__ void plane_reduce(PlaneTables t, const float* __restrict__ part_t, const float* __restrict__ part_g,
                             const float* __restrict__ scale, const float* __restrict__ zero, float* __restrict__ c) {
  __shared__ float share[kReduceLanes][kWarp];
  __shared__ float gsum;
  const int64_t l = blockIdx.x;
  const int lane = threadIdx.x, pl = threadIdx.y;
  const int64_t first = t.layer_prog[l], last = t.layer_prog[l + 1];
  if (lane == 0) share[pl][0] = strided_share(part_g, 1, first, last, pl);
  __syncthreads();
  if (lane == 0 && pl == 0) {
    float g = 0.0f;
    for (int i = 0; i < kReduceLanes; ++i) g += share[i][0];
    gsum = g;
  }
  __syncthreads();
  for (int j0 = 0; j0 < t.n; j0 += kWarp) {
    const int j = j0 + lane;
    share[pl][lane] = j < t.n ? strided_share(part_t + j, t.n_pad, first, last, pl) : 0.0f;
    __syncthreads();
    if (pl == 0 && j < t.n) {
      float s = 0.0f;
      for (int i = 0; i < kReduceLanes; ++i) s += share[i][lane];
      const int64_t k = l * t.n + j;
      c[k] = fmaf(scale[k], s, zero[k] * gsum);
    }
    __syncthreads();
  }
}

template <int BITS, typename W>
__global__ void plane_expand(PlaneTables t, const int64_t* __restrict__ w_addr, const int64_t* __restrict__ comp_addr,
                             const float* __restrict__ scale, const float* __restrict__ zero,
                             const float* __restrict__ delta) {
  extern __shared__ float u[];  // [n]: scale ∘ Δβ of the program's layer
  __shared__ float s_shared;
  const int64_t p = blockIdx.x;
  const ProgramTiles pg = program_tiles(t, p);
  const int tid = threadIdx.x;
  const float* sc = scale + pg.layer * t.n;
  const float* z = zero + pg.layer * t.n;
  const float* d = delta + pg.layer * t.n;
  for (int j = tid; j < t.n; j += blockDim.x) u[j] = sc[j] * d[j];
  if (tid < kWarp) {
    const float s = warp_sum(zero_delta_share(z, d, t.n, tid));
    if (tid == 0) s_shared = s;
  }
  __syncthreads();
  const float s = s_shared;
  constexpr int V = Geometry<BITS, kThreads>::V;
  const bool aligned = aligned_for<W, V>(w_addr, pg) &&
                       (comp_addr == nullptr || aligned_for<__nv_bfloat16, V>(comp_addr, pg));
  if (aligned)
    expand_thread<BITS, kThreads, W, __nv_bfloat16, true>(t, pg, w_addr, comp_addr, tid, u, s);
  else
    expand_thread<BITS, kThreads, W, __nv_bfloat16, false>(t, pg, w_addr, comp_addr, tid, u, s);
}

template <int BITS, typename G>
void project_bits(const PlaneTables& t, const int64_t* grad, float* part_t, float* part_g, cudaStream_t stream) {
  plane_project<BITS, G><<<static_cast<unsigned>(t.num_programs), kThreads, 0, stream>>>(t, grad, part_t, part_g);
}

template <typename G>
void project_dtype(const PlaneTables& t, const int64_t* grad, float* part_t, float* part_g, cudaStream_t stream) {
  switch (t.bits) {
    case 1: return project_bits<1, G>(t, grad, part_t, part_g, stream);
    case 2: return project_bits<2, G>(t, grad, part_t, part_g, stream);
    case 4: return project_bits<4, G>(t, grad, part_t, part_g, stream);
    case 8: return project_bits<8, G>(t, grad, part_t, part_g, stream);
  }
}

template <int BITS, typename W>
void expand_bits(const PlaneTables& t, const int64_t* w, const int64_t* comp, const float* scale, const float* zero,
                 const float* delta, cudaStream_t stream) {
  plane_expand<BITS, W><<<static_cast<unsigned>(t.num_programs), kThreads, sizeof(float) * t.n, stream>>>(
      t, w, comp, scale, zero, delta);
}

template <typename W>
void expand_dtype(const PlaneTables& t, const int64_t* w, const int64_t* comp, const float* scale, const float* zero,
                  const float* delta, cudaStream_t stream) {
  switch (t.bits) {
    case 1: return expand_bits<1, W>(t, w, comp, scale, zero, delta, stream);
    case 2: return expand_bits<2, W>(t, w, comp, scale, zero, delta, stream);
    case 4: return expand_bits<4, W>(t, w, comp, scale, zero, delta, stream);
    case 8: return expand_bits<8, W>(t, w, comp, scale, zero, delta, stream);
  }
}

bool valid(const PlaneTables& t) {
  return (t.bits == 1 || t.bits == 2 || t.bits == 4 || t.bits == 8) && t.threads == kThreads && t.n >= 1 &&
         t.n_pad % kColumnBlock == 0 && t.n_pad >= t.n;
}

}  // namespace

// c [L, n] = scale·(qᵀg) + zero·Σg per layer: project (when this rank holds rows), then reduce.
cudaError_t launch_plane_project(const PlaneTables& t, DType dt, const int64_t* grad, const float* scale,
                                 const float* zero, float* part_t, float* part_g, float* c, cudaStream_t stream) {
  if (!valid(t)) return cudaErrorInvalidValue;
  if (t.num_programs > 0) {
    switch (dt) {
      case DType::kFloat32: project_dtype<float>(t, grad, part_t, part_g, stream); break;
      case DType::kBFloat16: project_dtype<__nv_bfloat16>(t, grad, part_t, part_g, stream); break;
      case DType::kFloat16: project_dtype<__half>(t, grad, part_t, part_g, stream); break;
    }
  }
  if (t.num_layers > 0)
    plane_reduce<<<static_cast<unsigned>(t.num_layers), dim3(kWarp, kReduceLanes), 0, stream>>>(t, part_t, part_g,
                                                                                             scale, zero, c);
  return cudaGetLastError();
}

// w += P̃Δβ (u and s formed inside), Kahan-compensated when comp is not null.
cudaError_t launch_plane_expand(const PlaneTables& t, DType dt, const int64_t* weights, const int64_t* comp,
                                const float* scale, const float* zero, const float* delta, cudaStream_t stream) {
  if (!valid(t)) return cudaErrorInvalidValue;
  if (t.num_programs == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32: expand_dtype<float>(t, weights, comp, scale, zero, delta, stream); break;
    case DType::kBFloat16: expand_dtype<__nv_bfloat16>(t, weights, comp, scale, zero, delta, stream); break;
    case DType::kFloat16: expand_dtype<__half>(t, weights, comp, scale, zero, delta, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace plane
}  // namespace twa
