// The host build of the cuda_plane kernels (csrc/plane/twa_plane.h), for tests on a machine without a GPU:
// each block's threads run one after another, and the block and layer reductions add in the GPU's
// order (butterfly within a warp, then the warps in order; kReduceLanes program lanes, then the lanes
// in order), so the index arithmetic, the bit tricks and the edge handling are the GPU's own.
// Plain C ABI (loaded with ctypes): no torch headers, so it compiles in seconds.
#include <cstdint>
#include <cstring>
#include <vector>

#include "plane/twa_plane.h"

namespace twa {
namespace plane {

struct Bf16 {
  uint16_t bits;
};

template <>
struct Elem<Bf16> {
  static float load(const Bf16* p) {
    const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static void store(Bf16* p, float v) {  // round to nearest even (the tests hold no NaN)
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    p->bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

namespace {

// The GPU's block sum: a butterfly per warp of kWarp lanes (lanes past `threads` hold 0), then the
// warps in order.
float block_sum(const std::vector<float>& per_thread, int threads) {
  float total = 0.0f;
  for (int w = 0; w * kWarp < threads; ++w) {
    float lanes[kWarp];
    for (int l = 0; l < kWarp; ++l) lanes[l] = w * kWarp + l < threads ? per_thread[w * kWarp + l] : 0.0f;
    butterfly_host(lanes);
    total += lanes[0];
  }
  return total;
}

template <int BITS, int T, typename G, bool ALIGNED, bool WITH_GSUM>
void project_block(const PlaneTables& t, const ProgramTiles& pg, const int64_t* grad, int j0,
                   std::vector<std::vector<float>>& acc, std::vector<float>& gsum) {
  for (int tid = 0; tid < T; ++tid) {
    float a[kColumnBlock] = {};
    float g = 0.0f;
    project_thread<BITS, T, G, ALIGNED, WITH_GSUM>(t, pg, grad, j0, tid, a, g);
    for (int jj = 0; jj < kColumnBlock; ++jj) acc[jj][tid] = a[jj];
    gsum[tid] = g;
  }
}

template <int BITS, int T, typename G>
void project(const PlaneTables& t, const int64_t* grad, const float* scale, const float* zero, float* part_t,
             float* part_g, float* c) {
  for (int64_t p = 0; p < t.num_programs; ++p) {
    const ProgramTiles pg = program_tiles(t, p);
    const bool aligned = aligned_for<G, Geometry<BITS, T>::V>(grad, pg);
    for (int j0 = 0; j0 < t.n; j0 += kColumnBlock) {
      std::vector<std::vector<float>> acc(kColumnBlock, std::vector<float>(T));
      std::vector<float> gsum(T);
      const bool first = j0 == 0;
      if (first && aligned) project_block<BITS, T, G, true, true>(t, pg, grad, j0, acc, gsum);
      else if (first) project_block<BITS, T, G, false, true>(t, pg, grad, j0, acc, gsum);
      else if (aligned) project_block<BITS, T, G, true, false>(t, pg, grad, j0, acc, gsum);
      else project_block<BITS, T, G, false, false>(t, pg, grad, j0, acc, gsum);
      for (int jj = 0; jj < kColumnBlock; ++jj) part_t[p * t.n_pad + j0 + jj] = block_sum(acc[jj], T);
      if (first) part_g[p] = block_sum(gsum, T);
    }
  }
  for (int64_t l = 0; l < t.num_layers; ++l) {  // the reduce kernel, lane by lane
    const int64_t first = t.layer_prog[l], last = t.layer_prog[l + 1];
    float gs = 0.0f;
    for (int pl = 0; pl < kReduceLanes; ++pl) gs += strided_share(part_g, 1, first, last, pl);
    for (int j = 0; j < t.n; ++j) {
      float s = 0.0f;
      for (int pl = 0; pl < kReduceLanes; ++pl) s += strided_share(part_t + j, t.n_pad, first, last, pl);
      const int64_t k = l * t.n + j;
      c[k] = fmaf(scale[k], s, zero[k] * gs);
    }
  }
}

template <int BITS, int T, typename W>
void expand(const PlaneTables& t, const int64_t* w_addr, const int64_t* comp_addr, const float* scale,
            const float* zero, const float* delta) {
  constexpr int V = Geometry<BITS, T>::V;
  std::vector<float> u(t.n);
  for (int64_t p = 0; p < t.num_programs; ++p) {
    const ProgramTiles pg = program_tiles(t, p);
    const float* sc = scale + pg.layer * t.n;
    const float* z = zero + pg.layer * t.n;
    const float* d = delta + pg.layer * t.n;
    for (int j = 0; j < t.n; ++j) u[j] = sc[j] * d[j];
    float lanes[kWarp];
    for (int l = 0; l < kWarp; ++l) lanes[l] = zero_delta_share(z, d, t.n, l);
    butterfly_host(lanes);
    const float s = lanes[0];
    const bool aligned = aligned_for<W, V>(w_addr, pg) && (comp_addr == nullptr || aligned_for<Bf16, V>(comp_addr, pg));
    for (int tid = 0; tid < T; ++tid) {
      if (aligned) expand_thread<BITS, T, W, Bf16, true>(t, pg, w_addr, comp_addr, tid, u.data(), s);
      else expand_thread<BITS, T, W, Bf16, false>(t, pg, w_addr, comp_addr, tid, u.data(), s);
    }
  }
}

// dtype: 0 float32, 1 bfloat16 (DType's numbering); T: 8 (small tiles, many per layer) or 128 (the GPU's).
template <int BITS, int T>
int dispatch(bool is_project, int dtype, const PlaneTables& t, const int64_t* addr, const int64_t* comp,
             const float* scale, const float* zero, const float* delta, float* part_t, float* part_g, float* c) {
  if (dtype == 0) {
    if (is_project) project<BITS, T, float>(t, addr, scale, zero, part_t, part_g, c);
    else expand<BITS, T, float>(t, addr, comp, scale, zero, delta);
  } else if (dtype == 1) {
    if (is_project) project<BITS, T, Bf16>(t, addr, scale, zero, part_t, part_g, c);
    else expand<BITS, T, Bf16>(t, addr, comp, scale, zero, delta);
  } else {
    return 2;
  }
  return 0;
}

template <int T>
int by_bits(bool is_project, int dtype, const PlaneTables& t, const int64_t* addr, const int64_t* comp,
            const float* scale, const float* zero, const float* delta, float* part_t, float* part_g, float* c) {
  switch (t.bits) {
    case 1: return dispatch<1, T>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
    case 2: return dispatch<2, T>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
    case 4: return dispatch<4, T>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
    case 8: return dispatch<8, T>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
  }
  return 1;
}

int run(bool is_project, int dtype, const PlaneTables& t, const int64_t* addr, const int64_t* comp, const float* scale,
        const float* zero, const float* delta, float* part_t, float* part_g, float* c) {
  if (t.threads == 8) return by_bits<8>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
  if (t.threads == 128) return by_bits<128>(is_project, dtype, t, addr, comp, scale, zero, delta, part_t, part_g, c);
  return 3;
}

}  // namespace
}  // namespace plane
}  // namespace twa

extern "C" {

// Returns 0, or 1 (bit width), 2 (dtype), 3 (threads) for what this build does not cover.
int twa_plane_host_project(const twa::plane::PlaneTables* t, const int64_t* grad_addr, int dtype, const float* scale,
                           const float* zero, float* part_t, float* part_g, float* c) {
  return twa::plane::run(true, dtype, *t, grad_addr, nullptr, scale, zero, nullptr, part_t, part_g, c);
}

int twa_plane_host_expand(const twa::plane::PlaneTables* t, const int64_t* w_addr, int dtype,
                          const int64_t* comp_addr, const float* scale, const float* zero, const float* delta) {
  return twa::plane::run(false, dtype, *t, w_addr, comp_addr, scale, zero, delta, nullptr, nullptr, nullptr);
}
}
