// The "period" view of a layer's packed rows, used by the vectorised CPU kernels (twa_cpu_avx2.cpp).
//
// R consecutive rows (a period) hold exactly V = R·n/8 vectors of 8 codes and start on a 32-bit word
// (on 64 bits for B = 8), so every period is laid out alike: vector v always holds the same 8
// (row, column) pairs. The kernels then run over whole periods with aligned loads and per-vector
// tables, and never compute a code's row or column. A vector's 8 codes are B bytes of the stream.
// Requires n >= 8, so that a vector holds codes of at most two rows.
#pragma once
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

namespace twa {

// Rows per period: the least R with R·n a multiple of 8 and R·n·B a multiple of 32.
inline int period_rows(int n, int bits) {
  const int k = bits >= 4 ? 8 : 32 / bits;  // codes per aligned unit: a vector, or a word for B < 4
  return k / std::gcd(n, k);
}

struct PeriodPlan {
  enum Kind : uint8_t { kInside = 0, kEndsRow = 1, kStraddles = 2 };
  int rows = 0;                  // R
  int vectors = 0;               // V
  std::vector<int32_t> row;      // [V] row (within the period) of the vector's first code
  std::vector<uint8_t> kind;     // [V] inside a row; its last code ends a row; or it crosses into row + 1
  std::vector<int32_t> next_row; // [V, 8] -1 on the lanes that belong to row + 1 (a straddling vector)
  std::vector<int32_t> col;      // [V, 8] column of each lane

  PeriodPlan(int n, int bits) : rows(period_rows(n, bits)), vectors(rows * n / 8) {
    row.resize(vectors);
    kind.resize(vectors);
    next_row.assign(static_cast<size_t>(vectors) * 8, 0);
    col.resize(static_cast<size_t>(vectors) * 8);
    for (int v = 0; v < vectors; ++v) {
      const int first = 8 * v, last = 8 * v + 7;
      row[v] = first / n;
      kind[v] = last / n != first / n ? kStraddles : ((last + 1) % n == 0 ? kEndsRow : kInside);
      for (int e = 0; e < 8; ++e) {
        col[8 * v + e] = (first + e) % n;
        next_row[8 * v + e] = (first + e) / n != first / n ? -1 : 0;
      }
    }
  }
};

#if defined(__x86_64__) || defined(__i386__)
#define TWA_X86_KERNELS 1
// The AVX2 + FMA kernels, compiled for that target whatever the build flags, and used only when the
// CPU reports both (avx2_supported()). `codes`: the first byte of a run of whole periods.
bool avx2_supported();
// A[v·8 + e] += Σ over the run's periods of code · g[row]; `g`: the run's rows as floats, readable
// one period past the run (zeros).
void project_periods_avx2(const PeriodPlan& plan, int bits, const uint8_t* codes, const float* g,
                          int64_t periods, float* A);
// dots[row] = Σ_j code[row, j] · u[j] for every row of the run; `U[v·8 + e]` is u at lane e's column.
void expand_periods_avx2(const PeriodPlan& plan, int bits, const uint8_t* codes, const float* U,
                         int64_t periods, float* dots);
#else
#define TWA_X86_KERNELS 0
#endif

}  // namespace twa
