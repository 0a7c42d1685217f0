// CUDA backend: P̃ᵀg and w += P̃Δβ over the packed codes, all layers in one launch each.
// Plain CUDA (no torch headers) so that nvcc alone can compile it; twa_cuda_launch.cpp binds it.
//
// Gradients and weights are found through segment address tables (../twa_layout.h); the affine fold is
// the engine's, so the kernels see codes only.
//
// project: block p owns rows [row0, row0 + R) of one segment. Threads form a 32 × 8 grid: a warp spans
// 32 consecutive columns of one row (consecutive codes, so coalesced word loads), the 8 warps take
// every 8th row. Each (row lane, column) owns one shared-memory accumulator, summed in a fixed order
// at the end: no float atomics, the result is the same bits every run.
// expand: one warp per row computes Σ_j q_j u_j with a fixed shuffle tree, then updates the weight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../twa_layout.h"

namespace twa {
namespace {

constexpr int kLanes = 32;
constexpr int kRowLanes = 8;

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }

template <int BITS, typename grad_t>
__global__ void project_partials(Tables t, const int64_t* __restrict__ grad, float* __restrict__ part_t,
                                 float* __restrict__ part_g) {
  extern __shared__ float smem[];  // [kRowLanes][n] accumulators, then [kRowLanes] gradient sums
  const int n = t.n;
  const int64_t p = blockIdx.x;
  const Program pg = program_at(t, p);
  const int64_t rows = pg.rows;
  const int32_t* words = t.words + t.word_off[pg.layer];
  const grad_t* g = segment_row<const grad_t>(grad, pg.seg, pg.row0);
  const int lane = threadIdx.x, rl = threadIdx.y;
  float* acc = smem + rl * n;
  for (int j = lane; j < n; j += kLanes) acc[j] = 0.f;
  float gsum = 0.f;
  for (int64_t r = rl; r < rows; r += kRowLanes) {
    const float gr = load_float(g + r);
    const int64_t k0 = (pg.layer_row0 + r) * n;
    for (int j = lane; j < n; j += kLanes) acc[j] += static_cast<float>(code_at<BITS>(words, k0 + j)) * gr;
    gsum += gr;
  }
  if (lane == 0) smem[kRowLanes * n + rl] = gsum;
  __syncthreads();
  const int tid = rl * kLanes + lane;
  for (int j = tid; j < n; j += kLanes * kRowLanes) {
    float s = 0.f;
    for (int i = 0; i < kRowLanes; ++i) s += smem[i * n + j];
    part_t[p * n + j] = s;
  }
  if (tid == 0) {
    float s = 0.f;
    for (int i = 0; i < kRowLanes; ++i) s += smem[kRowLanes * n + i];
    part_g[p] = s;
  }
}

__global__ void project_reduce(Tables t, const float* __restrict__ part_t, const float* __restrict__ part_g,
                               float* __restrict__ out_t, float* __restrict__ out_g) {
  const int64_t l = blockIdx.x;
  const int n = t.n;
  if (threadIdx.x == 0) {
    float gsum = 0.f;
    for (int64_t p = t.layer_prog[l]; p < t.layer_prog[l + 1]; ++p) gsum += part_g[p];
    out_g[l] = gsum;
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float s = 0.f;
    for (int64_t p = t.layer_prog[l]; p < t.layer_prog[l + 1]; ++p) s += part_t[p * n + j];
    out_t[l * n + j] = s;
  }
}

template <int BITS, typename w_t>
__global__ void expand_rows(Tables t, const int64_t* __restrict__ weights, const int64_t* __restrict__ comp_addr,
                            const float* __restrict__ u_all, const float* __restrict__ s_all) {
  extern __shared__ float u[];  // [n] scale ∘ Δβ of the layer
  const int n = t.n;
  const int64_t p = blockIdx.x;
  const Program pg = program_at(t, p);
  const int64_t rows = pg.rows;
  const int lane = threadIdx.x, rl = threadIdx.y;
  const int tid = rl * kLanes + lane;
  for (int j = tid; j < n; j += kLanes * kRowLanes) u[j] = u_all[pg.layer * n + j];
  const float s = s_all[pg.layer];
  __syncthreads();
  const int32_t* words = t.words + t.word_off[pg.layer];
  w_t* w_seg = segment_row<w_t>(weights, pg.seg, pg.row0);
  __nv_bfloat16* comp = comp_addr == nullptr ? nullptr : segment_row<__nv_bfloat16>(comp_addr, pg.seg, pg.row0);
  for (int64_t r = rl; r < rows; r += kRowLanes) {
    const int64_t k0 = (pg.layer_row0 + r) * n;
    float dot = 0.f;
    for (int j = lane; j < n; j += kLanes) dot += static_cast<float>(code_at<BITS>(words, k0 + j)) * u[j];
    for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_down_sync(0xffffffffu, dot, off);
    if (lane == 0) {
      const float dw = dot + s;
      w_t* w = w_seg + r;
      if (comp != nullptr) {  // Kahan: the same operation order as the torch reference
        const float y = load_float(w) + (dw + __bfloat162float(comp[r]));
        store_float(w, y);
        comp[r] = __float2bfloat16_rn(y - load_float(w));
      } else {
        store_float(w, load_float(w) + dw);
      }
    }
  }
}

template <int BITS>
cudaError_t launch_project_bits(const Tables& t, DType dt, const int64_t* grad, float* part_t, float* part_g,
                                float* out_t, float* out_g, cudaStream_t stream) {
  const dim3 block(kLanes, kRowLanes);
  const size_t smem = sizeof(float) * (kRowLanes * t.n + kRowLanes);
  const dim3 grid(static_cast<unsigned>(t.num_programs));
  switch (dt) {
    case DType::kFloat32:
      project_partials<BITS, float><<<grid, block, smem, stream>>>(t, grad, part_t, part_g);
      break;
    case DType::kBFloat16:
      project_partials<BITS, __nv_bfloat16><<<grid, block, smem, stream>>>(t, grad, part_t, part_g);
      break;
    case DType::kFloat16:
      project_partials<BITS, __half><<<grid, block, smem, stream>>>(t, grad, part_t, part_g);
      break;
  }
  project_reduce<<<static_cast<unsigned>(t.num_layers), 128, 0, stream>>>(t, part_t, part_g, out_t, out_g);
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_expand_bits(const Tables& t, DType dt, const int64_t* weights, const int64_t* comp,
                               const float* u, const float* s, cudaStream_t stream) {
  const dim3 block(kLanes, kRowLanes);
  const size_t smem = sizeof(float) * t.n;
  const dim3 grid(static_cast<unsigned>(t.num_programs));
  switch (dt) {
    case DType::kFloat32:
      expand_rows<BITS, float><<<grid, block, smem, stream>>>(t, weights, comp, u, s);
      break;
    case DType::kBFloat16:
      expand_rows<BITS, __nv_bfloat16><<<grid, block, smem, stream>>>(t, weights, comp, u, s);
      break;
    case DType::kFloat16:
      expand_rows<BITS, __half><<<grid, block, smem, stream>>>(t, weights, comp, u, s);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_project(const Tables& t, DType dt, const int64_t* grad, float* part_t, float* part_g,
                           float* out_t, float* out_g, cudaStream_t stream) {
  switch (t.bits) {
    case 1: return launch_project_bits<1>(t, dt, grad, part_t, part_g, out_t, out_g, stream);
    case 2: return launch_project_bits<2>(t, dt, grad, part_t, part_g, out_t, out_g, stream);
    case 4: return launch_project_bits<4>(t, dt, grad, part_t, part_g, out_t, out_g, stream);
    case 8: return launch_project_bits<8>(t, dt, grad, part_t, part_g, out_t, out_g, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_expand(const Tables& t, DType dt, const int64_t* weights, const int64_t* comp, const float* u,
                          const float* s, cudaStream_t stream) {
  switch (t.bits) {
    case 1: return launch_expand_bits<1>(t, dt, weights, comp, u, s, stream);
    case 2: return launch_expand_bits<2>(t, dt, weights, comp, u, s, stream);
    case 4: return launch_expand_bits<4>(t, dt, weights, comp, u, s, stream);
    case 8: return launch_expand_bits<8>(t, dt, weights, comp, u, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace twa
