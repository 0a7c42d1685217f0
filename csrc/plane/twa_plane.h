// The v2 CUDA kernels' per-thread work on the plane layout of P̃ (twa_kernels/backends/plane/layout.py
// defines it), written once for the GPU (twa_cuda_plane.cu) and for the host. The host build runs a
// block's threads one after another and its reductions in the GPU's order, so that the index arithmetic
// and the bit tricks below can be tested against the torch reference on a machine without a GPU
// (tests/csrc/plane_host.cpp); nothing here uses shared memory or synchronisation.
//
// Plane tiles: E = 32 / BITS codes per word, V = min(4, BITS) words per thread load, T threads; a tile
// holds R = E·V·T rows, PW = V·T words per column, and word q of column j holds rows tile0 + i·PW + q in
// field i. A thread owns words [V·t, V·t + V) of every column, so per field it sees V consecutive rows:
// one V-word load per column, and gradients and weights V elements at a time. A layer's last tile is
// narrowed to pw words per column (a multiple of V, so a thread's words are all in it or all out).
//
// A field becomes a float in three instructions: y = (x & mask_i) | 0x4B000000 is one LOP3, and
// bits(y) − 2^23 = q·2^pos_i exactly (one FADD); the FFMA follows. The factor 2^pos_i is undone exactly:
// project scales the gradient by 2^-pos_i once per tile, expand scales each field's accumulator once.
// Fields whose top bit would pass bit 22 are read from x >> kHighShift (one shift per word).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../twa_layout.h"

namespace twa {
namespace plane {

// Columns one project pass accumulates per thread (the Python engine pads its partials to a multiple).
constexpr int kColumnBlock = 8;
// Lanes of the reductions (a warp), and the program lanes of the per-layer reduction.
constexpr int kWarp = 32;
constexpr int kReduceLanes = 8;

// The tables of twa_kernels.backends.plane.layout.PlaneTables (same field names).
struct PlaneTables {
  const int32_t* words;
  const int64_t* word_off;    // [L] first plane word of each layer
  const int64_t* full_tiles;  // [L]
  const int64_t* tail_words;  // [L] pw of the layer's partial tile, 0 when none
  const int64_t* seg_layer;   // [S]
  const int64_t* seg_row;     // [S]
  const int64_t* seg_size;    // [S]
  const int64_t* prog_seg;    // [P]
  const int64_t* prog_tile;   // [P] first tile of the program (inside its layer)
  const int64_t* prog_end;    // [P] one past its last tile
  const int64_t* layer_prog;  // [L + 1]
  int64_t num_programs;
  int64_t num_layers;
  int64_t num_segments;
  int n;
  int n_pad;  // the partials' row length: n rounded up to kColumnBlock
  int bits;
  int threads;  // T: the kernels are compiled for one T (the GPU's kThreads; the host tests' own)
};

#if defined(__CUDACC__)
#define TWA_CONSTEXPR_HD __host__ __device__
#else
#define TWA_CONSTEXPR_HD
#endif

template <int BITS, int T>
struct Geometry {
  static constexpr int E = 32 / BITS;
  static constexpr int V = BITS < 4 ? BITS : 4;
  static constexpr int PW = V * T;      // words per column of a whole tile
  static constexpr int64_t R = E * PW;  // rows of a whole tile
  // The smallest multiple of BITS ≥ 9: fields read from x >> kHighShift end at bit 22 or below.
  static constexpr int kHighShift = BITS * ((9 + BITS - 1) / BITS);
  static constexpr TWA_CONSTEXPR_HD bool high(int i) { return BITS * (i + 1) > 23; }
  static constexpr TWA_CONSTEXPR_HD int pos(int i) { return high(i) ? BITS * i - kHighShift : BITS * i; }
  static constexpr TWA_CONSTEXPR_HD float inv_scale(int i) { return 1.0f / static_cast<float>(1u << pos(i)); }
};

TWA_HOST_DEVICE float bits_to_float(uint32_t y) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(y);
#else
  float f;
  std::memcpy(&f, &y, sizeof f);
  return f;
#endif
}

// Field i of the word (x, its high part xh = x >> kHighShift) as the exact float q·2^pos(i). Called
// from fully unrolled loops: i is a constant there, and so are the mask and the choice of x or xh.
template <int BITS>
TWA_HOST_DEVICE float field(uint32_t x, uint32_t xh, int i) {
  using G = Geometry<BITS, 1>;
  const uint32_t mask = ((1u << BITS) - 1u) << G::pos(i);
  const uint32_t src = G::high(i) ? xh : x;
#if defined(__CUDA_ARCH__)
  uint32_t y;
  // Register operands: one LOP3 (a & b | c); with the immediates spelled in C, ptxas may split it in two.
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(y) : "r"(src), "r"(mask), "r"(0x4B000000u));
#else
  const uint32_t y = (src & mask) | 0x4B000000u;
#endif
  return bits_to_float(y) - 8388608.0f;
}

// Element types: float here; bf16/fp16 are specialised by the file that includes this one.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static TWA_HOST_DEVICE float load(const float* p) { return *p; }
  static TWA_HOST_DEVICE void store(float* p, float v) { *p = v; }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// V words of one column, bypassing L1 on the GPU (the gradients a program re-reads stay there).
template <int V>
TWA_HOST_DEVICE void load_words(const int32_t* p, uint32_t (&x)[V]) {
#if defined(__CUDA_ARCH__)
  if constexpr (V == 4) {
    const uint4 w = __ldcg(reinterpret_cast<const uint4*>(p));
    x[0] = w.x, x[1] = w.y, x[2] = w.z, x[3] = w.w;
  } else if constexpr (V == 2) {
    const uint2 w = __ldcg(reinterpret_cast<const uint2*>(p));
    x[0] = w.x, x[1] = w.y;
  } else {
    x[0] = __ldcg(reinterpret_cast<const unsigned int*>(p));
  }
#else
  for (int v = 0; v < V; ++v) x[v] = static_cast<uint32_t>(p[v]);
#endif
}

// A Pack read through the GPU's read-only path (gradients: the kernel never writes them).
template <typename P>
TWA_HOST_DEVICE P load_readonly(const P* p) {
#if defined(__CUDA_ARCH__)
  P out;
  if constexpr (sizeof(P) == 16) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &w, 16);
  } else if constexpr (sizeof(P) == 8) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(&out, &w, 8);
  } else if constexpr (sizeof(P) == 4) {
    const unsigned int w = __ldg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&out, &w, 4);
  } else {
    const unsigned short w = __ldg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&out, &w, 2);
  }
  return out;
#else
  return *p;
#endif
}

// V consecutive elements at p (V-aligned when ALIGNED: one vector load).
template <typename T, int V, bool ALIGNED>
TWA_HOST_DEVICE void load_elems(const T* p, float (&out)[V]) {
  if constexpr (ALIGNED) {
    const Pack<T, V> pk = load_readonly(reinterpret_cast<const Pack<T, V>*>(p));
    for (int v = 0; v < V; ++v) out[v] = Elem<T>::load(&pk.v[v]);
  } else {
    for (int v = 0; v < V; ++v) {
      const T x = load_readonly(p + v);
      out[v] = Elem<T>::load(&x);
    }
  }
}

// What a program works on: its segment's rows [lo, hi) inside the layer and its tiles [t0, t1).
struct ProgramTiles {
  int64_t seg, layer, t0, t1, lo, hi, word_base, full_tiles;
  int tail_pw;
};

TWA_HOST_DEVICE ProgramTiles program_tiles(const PlaneTables& t, int64_t p) {
  ProgramTiles pg;
  pg.seg = t.prog_seg[p];
  pg.layer = t.seg_layer[pg.seg];
  pg.t0 = t.prog_tile[p];
  pg.t1 = t.prog_end[p];
  pg.lo = t.seg_row[pg.seg];
  pg.hi = pg.lo + t.seg_size[pg.seg];
  pg.word_base = t.word_off[pg.layer];
  pg.full_tiles = t.full_tiles[pg.layer];
  pg.tail_pw = static_cast<int>(t.tail_words[pg.layer]);
  return pg;
}

// A pointer to row 0 of the segment's layer (the segment itself starts at row lo).
template <typename T>
TWA_HOST_DEVICE const T* layer_base(const int64_t* addr, const ProgramTiles& pg) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(addr[pg.seg])) - pg.lo;
}

template <typename T, int V>
TWA_HOST_DEVICE bool aligned_for(const int64_t* addr, const ProgramTiles& pg) {
  return ((static_cast<uintptr_t>(addr[pg.seg]) - static_cast<uintptr_t>(pg.lo) * sizeof(T)) %
          (sizeof(T) * V)) == 0;
}

// The tiles of [t0, t1) that are whole and inside the segment's rows: [a, b).
struct TileRange {
  int64_t a, b;
};

TWA_HOST_DEVICE TileRange whole_tiles(const ProgramTiles& pg, int64_t R) {
  const int64_t a = pg.t0 > (pg.lo + R - 1) / R ? pg.t0 : (pg.lo + R - 1) / R;
  int64_t b = pg.t1 < pg.full_tiles ? pg.t1 : pg.full_tiles;
  b = b < pg.hi / R ? b : pg.hi / R;
  return {a, b > a ? b : a};
}

// Calls whole(tile) for the program's whole tiles inside its segment, then edge(tile) for the (at most
// two) tiles a layer's end or a segment boundary cuts.
template <typename Whole, typename Edge>
TWA_HOST_DEVICE void visit_tiles(const ProgramTiles& pg, int64_t R, Whole&& whole, Edge&& edge) {
  const TileRange range = whole_tiles(pg, R);
  for (int64_t tile = range.a; tile < range.b; ++tile) whole(tile);
  for (int64_t tile = pg.t0; tile < pg.t1; ++tile)
    if (tile < range.a || tile >= range.b) edge(tile);
}

// One tile of project for thread `tid` and the columns `cols` (a column block, clamped to n − 1).
// WHOLE: the tile is whole and inside the segment (no row tests); WITH_GSUM: also Σg.
template <int BITS, int T, typename G, bool ALIGNED, bool WHOLE, bool WITH_GSUM>
TWA_HOST_DEVICE void project_tile(const PlaneTables& t, const ProgramTiles& pg, const G* g_layer, int64_t tile,
                                  const int (&cols)[kColumnBlock], int tid, float (&acc)[kColumnBlock],
                                  float& gsum) {
  using Geo = Geometry<BITS, T>;
  constexpr int E = Geo::E, V = Geo::V;
  const int pw = WHOLE || tile < pg.full_tiles ? Geo::PW : pg.tail_pw;
  const int q0 = tid * V;
  if (!WHOLE && q0 >= pw) return;
  const int64_t r0 = tile * Geo::R + q0;
  float g[E][V];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int64_t row = r0 + static_cast<int64_t>(i) * pw;
    if constexpr (WHOLE) {
      load_elems<G, V, ALIGNED>(g_layer + row, g[i]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        g[i][v] = row + v >= pg.lo && row + v < pg.hi ? Elem<G>::load(g_layer + row + v) : 0.0f;
    }
  }
  if constexpr (WITH_GSUM) {
#pragma unroll
    for (int i = 0; i < E; ++i)
#pragma unroll
      for (int v = 0; v < V; ++v) gsum += g[i][v];
  }
#pragma unroll
  for (int i = 0; i < E; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) g[i][v] *= Geo::inv_scale(i);
  const int32_t* words = t.words + pg.word_base + tile * static_cast<int64_t>(t.n) * Geo::PW + q0;
#pragma unroll
  for (int jj = 0; jj < kColumnBlock; ++jj) {
    uint32_t x[V];
    load_words<V>(words + cols[jj] * pw, x);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint32_t xh = x[v] >> Geo::kHighShift;
#pragma unroll
      for (int i = 0; i < E; ++i) acc[jj] = fmaf(field<BITS>(x[v], xh, i), g[i][v], acc[jj]);
    }
  }
}

// Thread `tid`'s partials of program p for the columns [j0, j0 + kColumnBlock): qᵀg over the program's
// tiles, and (WITH_GSUM) Σg.
template <int BITS, int T, typename G, bool ALIGNED, bool WITH_GSUM>
TWA_HOST_DEVICE void project_thread(const PlaneTables& t, const ProgramTiles& pg, const int64_t* grad_addr, int j0,
                                    int tid, float (&acc)[kColumnBlock], float& gsum) {
  using Geo = Geometry<BITS, T>;
  const G* g_layer = layer_base<G>(grad_addr, pg);
  int cols[kColumnBlock];
#pragma unroll
  for (int jj = 0; jj < kColumnBlock; ++jj) cols[jj] = j0 + jj < t.n ? j0 + jj : t.n - 1;
  visit_tiles(
      pg, Geo::R,
      [&](int64_t tile) {
        project_tile<BITS, T, G, ALIGNED, true, WITH_GSUM>(t, pg, g_layer, tile, cols, tid, acc, gsum);
      },
      [&](int64_t tile) {
        project_tile<BITS, T, G, false, false, WITH_GSUM>(t, pg, g_layer, tile, cols, tid, acc, gsum);
      });
}

// w += dw in place; with a compensation buffer, Kahan in the torch reference's order.
template <typename W, typename C>
TWA_HOST_DEVICE void update_weight(W* w, C* comp, float dw) {
  if (comp != nullptr) {
    const float y = Elem<W>::load(w) + (dw + Elem<C>::load(comp));
    Elem<W>::store(w, y);
    Elem<C>::store(comp, y - Elem<W>::load(w));
  } else {
    Elem<W>::store(w, Elem<W>::load(w) + dw);
  }
}

// w[0, V) += dw[0, V) for V consecutive, V-aligned weights (and compensations): vector loads and stores.
template <typename W, typename C, int V>
TWA_HOST_DEVICE void update_weights(W* w, C* comp, const float (&dw)[V]) {
  Pack<W, V> wv = *reinterpret_cast<Pack<W, V>*>(w);
  if (comp != nullptr) {
    Pack<C, V> cv = *reinterpret_cast<Pack<C, V>*>(comp);
#pragma unroll
    for (int v = 0; v < V; ++v) update_weight(&wv.v[v], &cv.v[v], dw[v]);
    *reinterpret_cast<Pack<C, V>*>(comp) = cv;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) update_weight<W, C>(&wv.v[v], nullptr, dw[v]);
  }
  *reinterpret_cast<Pack<W, V>*>(w) = wv;
}

// One tile of expand for thread `tid`: w[rows] += q·u + s, u = scale∘Δβ of the layer (n floats).
// WHOLE: the tile is whole and inside the segment; ALIGNED: the weights (and compensations) of the
// layer start V-aligned, so each field's V rows are one vector load and store.
template <int BITS, int T, typename W, typename C, bool ALIGNED, bool WHOLE>
TWA_HOST_DEVICE void expand_tile(const PlaneTables& t, const ProgramTiles& pg, W* w_layer, C* c_layer, int64_t tile,
                                 int tid, const float* u, float s) {
  using Geo = Geometry<BITS, T>;
  constexpr int E = Geo::E, V = Geo::V;
  const int pw = WHOLE || tile < pg.full_tiles ? Geo::PW : pg.tail_pw;
  const int q0 = tid * V;
  if (!WHOLE && q0 >= pw) return;
  float acc[E][V];
#pragma unroll
  for (int i = 0; i < E; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i][v] = 0.0f;
  const int32_t* words = t.words + pg.word_base + tile * static_cast<int64_t>(t.n) * Geo::PW + q0;
#pragma unroll 4
  for (int j = 0; j < t.n; ++j) {
    uint32_t x[V];
    load_words<V>(words + static_cast<int64_t>(j) * pw, x);
    const float uj = u[j];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint32_t xh = x[v] >> Geo::kHighShift;
#pragma unroll
      for (int i = 0; i < E; ++i) acc[i][v] = fmaf(field<BITS>(x[v], xh, i), uj, acc[i][v]);
    }
  }
  const int64_t r0 = tile * Geo::R + q0;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int64_t row = r0 + static_cast<int64_t>(i) * pw;
    float dw[V];
#pragma unroll
    for (int v = 0; v < V; ++v) dw[v] = fmaf(acc[i][v], Geo::inv_scale(i), s);
    if constexpr (WHOLE && ALIGNED) {
      update_weights<W, C, V>(w_layer + row, c_layer == nullptr ? nullptr : c_layer + row, dw);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (WHOLE || (row + v >= pg.lo && row + v < pg.hi))
          update_weight(w_layer + row + v, c_layer == nullptr ? nullptr : c_layer + row + v, dw[v]);
    }
  }
}

template <int BITS, int T, typename W, typename C, bool ALIGNED>
TWA_HOST_DEVICE void expand_thread(const PlaneTables& t, const ProgramTiles& pg, const int64_t* w_addr,
                                   const int64_t* comp_addr, int tid, const float* u, float s) {
  using Geo = Geometry<BITS, T>;
  W* w_layer = const_cast<W*>(layer_base<W>(w_addr, pg));
  C* c_layer = comp_addr == nullptr ? nullptr : const_cast<C*>(layer_base<C>(comp_addr, pg));
  visit_tiles(
      pg, Geo::R,
      [&](int64_t tile) { expand_tile<BITS, T, W, C, ALIGNED, true>(t, pg, w_layer, c_layer, tile, tid, u, s); },
      [&](int64_t tile) { expand_tile<BITS, T, W, C, false, false>(t, pg, w_layer, c_layer, tile, tid, u, s); });
}

// Lane `lane`'s share of a layer's per-program partials x[p·stride], p ∈ [first, last): every
// kReduceLanes-th program; the lanes' shares are then added in lane order.
TWA_HOST_DEVICE float strided_share(const float* x, int64_t stride, int64_t first, int64_t last, int lane) {
  float s = 0.0f;
  for (int64_t p = first + lane; p < last; p += kReduceLanes) s += x[p * stride];
  return s;
}

// Lane `lane`'s share of Σ_j zero_j·Δβ_j (every kWarp-th column); the warp then adds the shares in
// the butterfly order of warp_sum.
TWA_HOST_DEVICE float zero_delta_share(const float* zero, const float* delta, int n, int lane) {
  float s = 0.0f;
  for (int j = lane; j < n; j += kWarp) s = fmaf(zero[j], delta[j], s);
  return s;
}

// The butterfly (xor-shuffle) sum of kWarp values, in the order the GPU's __shfl_xor_sync tree adds
// them: every lane ends with the same bits.
TWA_HOST_DEVICE void butterfly_host(float (&v)[kWarp]) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    float next[kWarp];
    for (int l = 0; l < kWarp; ++l) next[l] = v[l] + v[l ^ off];
    for (int l = 0; l < kWarp; ++l) v[l] = next[l];
  }
}

}  // namespace plane
}  // namespace twa
