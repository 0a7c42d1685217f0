// AVX2 + FMA kernels of the cpp backend, over whole periods of rows (twa_cpu_periods.h).
//
// Per vector of 8 codes: one broadcast load of its B bytes, a per-lane shift and mask (or a zero
// extension for B = 8), a conversion and one FMA; nothing is unpacked to memory. K = 4 periods run
// side by side so that expand's per-row sums are four independent FMA chains rather than one chain
// bound by the FMA latency. Sums run in a fixed order: results do not depend on the thread count.
#include "twa_cpu_periods.h"

#if TWA_X86_KERNELS
#include <immintrin.h>

#include <cstring>

#define TWA_AVX2 __attribute__((target("avx2,fma")))

namespace twa {
namespace {

template <int BITS>
TWA_AVX2 inline __m256 load_codes(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    // Broadcast the vector's B bytes to every lane, then shift lane e right by e·B.
    __m256i x;
    if constexpr (BITS == 1) {
      x = _mm256_set1_epi8(static_cast<char>(*p));
    } else if constexpr (BITS == 2) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      x = _mm256_set1_epi16(static_cast<short>(h));
    } else {
      uint32_t w;
      std::memcpy(&w, p, 4);
      x = _mm256_set1_epi32(static_cast<int>(w));
    }
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(x, shifts), mask));
  }
}

TWA_AVX2 inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Periods per group (K): enough independent FMA chains to cover the FMA latency; 8 measured no faster.
constexpr int kGroup = 4;

// dots[k·stride] = the sum of acc[k]'s lanes for each k; four at once take 3 horizontal adds instead of 12.
template <int K>
TWA_AVX2 inline void store_row_sums(const __m256* acc, float* dots, int stride) {
  if constexpr (K == 4) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    for (int k = 0; k < 4; ++k) dots[k * stride] = out[k];
  } else {
    for (int k = 0; k < K; ++k) dots[k * stride] = hsum(acc[k]);
  }
}

template <int BITS, int K>
TWA_AVX2 void project_group(const PeriodPlan& pl, const uint8_t* codes, const float* g, float* A) {
  const int64_t period_bytes = static_cast<int64_t>(pl.vectors) * BITS;
  __m256 g_row[K];  // g of the row the next vector starts in, broadcast; reloaded when a row ends
  for (int k = 0; k < K; ++k) g_row[k] = _mm256_broadcast_ss(g + k * pl.rows);
  for (int v = 0; v < pl.vectors; ++v) {
    __m256 a = _mm256_loadu_ps(A + 8 * v);
    const int r = pl.row[v];
    switch (pl.kind[v]) {
      case PeriodPlan::kInside:
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) a = _mm256_fmadd_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), g_row[k], a);
        break;
      case PeriodPlan::kEndsRow:
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
          a = _mm256_fmadd_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), g_row[k], a);
          g_row[k] = _mm256_broadcast_ss(g + k * pl.rows + r + 1);
        }
        break;
      default: {  // the lanes flagged in next_row take g of row r + 1
        const __m256 next = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&pl.next_row[8 * v])));
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
          const __m256 g_next = _mm256_broadcast_ss(g + k * pl.rows + r + 1);
          a = _mm256_fmadd_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), _mm256_blendv_ps(g_row[k], g_next, next), a);
          g_row[k] = g_next;
        }
      }
    }
    _mm256_storeu_ps(A + 8 * v, a);
  }
}

template <int BITS, int K>
TWA_AVX2 void expand_group(const PeriodPlan& pl, const uint8_t* codes, const float* U, float* dots) {
  const int64_t period_bytes = static_cast<int64_t>(pl.vectors) * BITS;
  __m256 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
  for (int v = 0; v < pl.vectors; ++v) {
    const __m256 u = _mm256_loadu_ps(U + 8 * v);
    const int r = pl.row[v];
    switch (pl.kind[v]) {
      case PeriodPlan::kInside:
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) acc[k] = _mm256_fmadd_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), u, acc[k]);
        break;
      case PeriodPlan::kEndsRow:
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) acc[k] = _mm256_fmadd_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), u, acc[k]);
        store_row_sums<K>(acc, dots + r, pl.rows);
        for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
        break;
      default: {  // the lanes flagged in next_row start row r + 1
        const __m256 next = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&pl.next_row[8 * v])));
        __m256 ended[K];
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
          const __m256 prod = _mm256_mul_ps(load_codes<BITS>(codes + k * period_bytes + v * BITS), u);
          ended[k] = _mm256_add_ps(acc[k], _mm256_andnot_ps(next, prod));
          acc[k] = _mm256_and_ps(next, prod);
        }
        store_row_sums<K>(ended, dots + r, pl.rows);
      }
    }
  }
}

template <int BITS>
TWA_AVX2 void project_run(const PeriodPlan& pl, const uint8_t* codes, const float* g, int64_t periods, float* A) {
  const int64_t period_bytes = static_cast<int64_t>(pl.vectors) * BITS;
  int64_t p = 0;
  for (; p + kGroup <= periods; p += kGroup) project_group<BITS, kGroup>(pl, codes + p * period_bytes, g + p * pl.rows, A);
  for (; p < periods; ++p) project_group<BITS, 1>(pl, codes + p * period_bytes, g + p * pl.rows, A);
}

template <int BITS>
TWA_AVX2 void expand_run(const PeriodPlan& pl, const uint8_t* codes, const float* U, int64_t periods, float* dots) {
  const int64_t period_bytes = static_cast<int64_t>(pl.vectors) * BITS;
  int64_t p = 0;
  for (; p + kGroup <= periods; p += kGroup) expand_group<BITS, kGroup>(pl, codes + p * period_bytes, U, dots + p * pl.rows);
  for (; p < periods; ++p) expand_group<BITS, 1>(pl, codes + p * period_bytes, U, dots + p * pl.rows);
}

}  // namespace

bool avx2_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void project_periods_avx2(const PeriodPlan& plan, int bits, const uint8_t* codes, const float* g,
                          int64_t periods, float* A) {
  switch (bits) {
    case 1: project_run<1>(plan, codes, g, periods, A); break;
    case 2: project_run<2>(plan, codes, g, periods, A); break;
    case 4: project_run<4>(plan, codes, g, periods, A); break;
    default: project_run<8>(plan, codes, g, periods, A); break;
  }
}

void expand_periods_avx2(const PeriodPlan& plan, int bits, const uint8_t* codes, const float* U,
                         int64_t periods, float* dots) {
  switch (bits) {
    case 1: expand_run<1>(plan, codes, U, periods, dots); break;
    case 2: expand_run<2>(plan, codes, U, periods, dots); break;
    case 4: expand_run<4>(plan, codes, U, periods, dots); break;
    default: expand_run<8>(plan, codes, U, periods, dots); break;
  }
}

}  // namespace twa

#endif  // x86: elsewhere TWA_X86_KERNELS is 0 and twa_cpu.cpp runs its portable kernels only
