// CPU backend (C++/OpenMP): P̃ᵀg and w += P̃Δβ over the packed codes, all layers per call.
//
// Two kernels per operation, over the same programs (runs of rows of one layer):
// * vectorised (x86 with AVX2 + FMA, n >= 8, programs that start on a period: twa_cpu_periods.h):
//   codes go from the packed bytes straight into FMAs, whole periods at a time; the few rows after
//   the last whole period of a layer take the scalar path;
// * portable (any CPU, any n): a program's codes are first unpacked word by word into a float buffer,
//   a loop over the E = 32/B codes of a word with a compile-time E that the compiler unrolls and
//   vectorises, then a contiguous multiply-add runs over each row.
// Partials are written per program and reduced per layer in program order, so results do not depend
// on the number of threads. Programs read and write the segments through their address tables
// (../twa_layout.h); the affine fold is the engine's, so these kernels see codes only.
#include <torch/extension.h>

#include <vector>

#include "twa_cpu_periods.h"
#include "../twa_layout.h"

namespace twa {

// Whether the vectorised kernels run this shape (twa_cpu_periods.h): an AVX2 + FMA CPU, n >= 8, and
// programs that start on a period. The engine asks this too, so the rule lives here only.
bool vector_kernel_fits(int64_t n, int64_t bits, int64_t rows_per_program) {
#if TWA_X86_KERNELS
  return n >= 8 && avx2_supported() && rows_per_program % period_rows(static_cast<int>(n), static_cast<int>(bits)) == 0;
#else
  return false;
#endif
}

namespace {

template <int BITS>
void unpack_run(const int32_t* layer_words, int64_t first_code, int64_t count, float* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  int64_t k = first_code, done = 0;
  for (; done < count && k % kPerWord != 0; ++done, ++k) out[done] = static_cast<float>(code_at<BITS>(layer_words, k));
  // Whole words: a fixed-length inner loop the compiler turns into broadcast, per-lane shift, mask
  // and convert.
  const int64_t whole = (count - done) / kPerWord;
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(layer_words) + k / kPerWord;
  float* o = out + done;
  for (int64_t w = 0; w < whole; ++w) {
    const uint32_t word = wp[w];
#pragma omp simd
    for (int e = 0; e < kPerWord; ++e) o[w * kPerWord + e] = static_cast<float>((word >> (e * BITS)) & kMask);
  }
  done += whole * kPerWord;
  k += whole * kPerWord;
  for (; done < count; ++done, ++k) out[done] = static_cast<float>(code_at<BITS>(layer_words, k));
}

void unpack_dispatch(int bits, const int32_t* layer_words, int64_t first, int64_t count, float* out) {
  switch (bits) {
    case 1: unpack_run<1>(layer_words, first, count, out); break;
    case 2: unpack_run<2>(layer_words, first, count, out); break;
    case 4: unpack_run<4>(layer_words, first, count, out); break;
    case 8: unpack_run<8>(layer_words, first, count, out); break;
    default: TORCH_CHECK(false, "unsupported bit width ", bits);
  }
}

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// The layer's words of a program's first code row.
inline const int32_t* layer_words(const Tables& t, const Program& g) { return t.words + t.word_off[g.layer]; }

// Runs fn(p, program, codes) for every program, in parallel, with the program's codes unpacked to
// floats in a per-thread buffer.
template <typename Fn>
void for_each_program(const Tables& t, Fn&& fn) {
  const int n = t.n;
#pragma omp parallel
  {
    std::vector<float> codes(static_cast<size_t>(t.rows_per_program) * n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const Program g = program_at(t, p);
      unpack_dispatch(t.bits, layer_words(t, g), g.layer_row0 * n, g.rows * n, codes.data());
      fn(p, g, codes.data());
    }
  }
}

// Per layer, in program order: qᵀg into out_t [L, n] and Σg into out_g [L].
void reduce_partials(const Tables& t, const float* part_t, const float* part_g, float* out_t, float* out_g) {
  const int n = t.n;
#pragma omp parallel for schedule(static)
  for (int64_t l = 0; l < t.num_layers; ++l) {
    std::vector<float> acc(n, 0.f);
    float gsum = 0.f;
    for (int64_t p = t.layer_prog[l]; p < t.layer_prog[l + 1]; ++p) {
      for (int j = 0; j < n; ++j) acc[j] += part_t[p * n + j];
      gsum += part_g[p];
    }
    for (int j = 0; j < n; ++j) out_t[l * n + j] = acc[j];
    out_g[l] = gsum;
  }
}

// w[i] += dw, rounded once; with a bf16 compensation buffer, Kahan-compensated in the same operation
// order as the torch reference.
template <typename w_t>
inline void add_to_weight(w_t* weights, c10::BFloat16* comp, int64_t i, float dw) {
  w_t& w = weights[i];
  if (comp != nullptr) {
    const float y = to_float(w) + (dw + static_cast<float>(comp[i]));
    const w_t rounded = static_cast<w_t>(y);
    comp[i] = static_cast<c10::BFloat16>(y - to_float(rounded));
    w = rounded;
  } else {
    w = static_cast<w_t>(to_float(w) + dw);
  }
}

// The segments one expand call updates: weights, and the bf16 compensation when there is one.
struct ExpandTargets {
  const int64_t* weights;
  const int64_t* comp;  // nullptr: no compensation
  const float* u;       // [L, n] scale ∘ Δβ
  const float* s;       // [L] Σ zero ∘ Δβ

  template <typename w_t>
  w_t* weight_row(const Program& g) const { return segment_row<w_t>(weights, g.seg, g.row0); }
  c10::BFloat16* comp_row(const Program& g) const {
    return comp == nullptr ? nullptr : segment_row<c10::BFloat16>(comp, g.seg, g.row0);
  }
};

// ---- portable kernels -------------------------------------------------------------------------

template <typename grad_t>
void project_portable(const Tables& t, const int64_t* grad, float* part_t, float* part_g) {
  const int n = t.n;
  for_each_program(t, [&](int64_t p, const Program& pg, const float* q) {
    const grad_t* g = segment_row<const grad_t>(grad, pg.seg, pg.row0);
    float* a = part_t + p * n;
    for (int j = 0; j < n; ++j) a[j] = 0.f;
    float gsum = 0.f;
    for (int64_t r = 0; r < pg.rows; ++r) {
      const float gr = to_float(g[r]);
      const float* qr = q + r * n;
#pragma omp simd
      for (int j = 0; j < n; ++j) a[j] += qr[j] * gr;
      gsum += gr;
    }
    part_g[p] = gsum;
  });
}

template <typename w_t>
void expand_portable(const Tables& t, const ExpandTargets& x) {
  const int n = t.n;
  for_each_program(t, [&](int64_t, const Program& pg, const float* q) {
    const float* u = x.u + pg.layer * n;
    const float s = x.s[pg.layer];
    w_t* w = x.weight_row<w_t>(pg);
    c10::BFloat16* comp = x.comp_row(pg);
    for (int64_t r = 0; r < pg.rows; ++r) {
      const float* qr = q + r * n;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int j = 0; j < n; ++j) dot += qr[j] * u[j];
      add_to_weight(w, comp, r, dot + s);
    }
  });
}

// ---- vectorised kernels over whole periods (twa_cpu_periods.h) ---------------------------------

#if TWA_X86_KERNELS
// A program whose first code row is a multiple of R rows starts on a word (row·n·B bits is a multiple
// of 32) and runs whole periods; one that starts elsewhere (a segment starting inside its layer, with
// layers="model") takes the scalar path for all its rows.
inline int64_t whole_periods(const Program& g, const PeriodPlan& plan) {
  return g.layer_row0 % plan.rows == 0 ? g.rows / plan.rows : 0;
}

inline const uint8_t* run_bytes(const Tables& t, const Program& g) {
  return reinterpret_cast<const uint8_t*>(layer_words(t, g)) + g.layer_row0 * t.n * t.bits / 8;
}

// The codes of the rows [done, rows) of a program that are not in one of its whole periods.
inline const float* unpack_tail(const Tables& t, const Program& g, int64_t done, float* out) {
  unpack_dispatch(t.bits, layer_words(t, g), (g.layer_row0 + done) * t.n, (g.rows - done) * t.n, out);
  return out;
}

template <typename grad_t>
void project_periods(const Tables& t, const int64_t* grad, float* part_t, float* part_g) {
  const int n = t.n;
  const PeriodPlan plan(n, t.bits);
  const int64_t lanes = static_cast<int64_t>(plan.vectors) * 8;
#pragma omp parallel
  {
    std::vector<float> gf(t.rows_per_program + 1);  // + 1: the kernel reads one row past the run
    std::vector<float> A(lanes), tail(static_cast<size_t>(t.rows_per_program) * n);
    std::vector<float> a(n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const Program pg = program_at(t, p);
      const int64_t rows = pg.rows;
      const grad_t* g = segment_row<const grad_t>(grad, pg.seg, pg.row0);
      float gsum = 0.f;  // lane-wise partial sums: a serial chain here would cost more than the FMAs
#pragma omp simd reduction(+ : gsum)
      for (int64_t r = 0; r < rows; ++r) {
        gf[r] = to_float(g[r]);
        gsum += gf[r];
      }
      gf[rows] = 0.f;
      const int64_t periods = whole_periods(pg, plan);
      std::fill(A.begin(), A.end(), 0.f);
      if (periods > 0) project_periods_avx2(plan, t.bits, run_bytes(t, pg), gf.data(), periods, A.data());
      std::fill(a.begin(), a.end(), 0.f);
      for (int64_t i = 0; i < lanes; ++i) a[plan.col[i]] += A[i];
      const int64_t done = periods * plan.rows;
      const float* q = unpack_tail(t, pg, done, tail.data());
      for (int64_t r = done; r < rows; ++r)
        for (int j = 0; j < n; ++j) a[j] += q[(r - done) * n + j] * gf[r];
      for (int j = 0; j < n; ++j) part_t[p * n + j] = a[j];
      part_g[p] = gsum;
    }
  }
}

template <typename w_t>
void expand_periods(const Tables& t, const ExpandTargets& x) {
  const int n = t.n;
  const PeriodPlan plan(n, t.bits);
  const int64_t lanes = static_cast<int64_t>(plan.vectors) * 8;
#pragma omp parallel
  {
    std::vector<float> U(lanes), dots(t.rows_per_program), tail(static_cast<size_t>(t.rows_per_program) * n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const Program pg = program_at(t, p);
      const int64_t rows = pg.rows;
      const float* u = x.u + pg.layer * n;
      const float s = x.s[pg.layer];
      for (int64_t i = 0; i < lanes; ++i) U[i] = u[plan.col[i]];
      const int64_t periods = whole_periods(pg, plan);
      if (periods > 0) expand_periods_avx2(plan, t.bits, run_bytes(t, pg), U.data(), periods, dots.data());
      const int64_t done = periods * plan.rows;
      const float* q = unpack_tail(t, pg, done, tail.data());
      for (int64_t r = done; r < rows; ++r) {
        float dot = 0.f;
        for (int j = 0; j < n; ++j) dot += q[(r - done) * n + j] * u[j];
        dots[r] = dot;
      }
      w_t* w = x.weight_row<w_t>(pg);
      c10::BFloat16* comp = x.comp_row(pg);
      for (int64_t r = 0; r < rows; ++r) add_to_weight(w, comp, r, dots[r] + s);
    }
  }
}
#endif

template <typename grad_t>
void project_impl(const Tables& t, const int64_t* grad, float* part_t, float* part_g) {
#if TWA_X86_KERNELS
  if (t.vectorized && vector_kernel_fits(t.n, t.bits, t.rows_per_program))
    return project_periods<grad_t>(t, grad, part_t, part_g);
#endif
  project_portable<grad_t>(t, grad, part_t, part_g);
}

template <typename w_t>
void expand_impl(const Tables& t, const ExpandTargets& x) {
#if TWA_X86_KERNELS
  if (t.vectorized && vector_kernel_fits(t.n, t.bits, t.rows_per_program)) return expand_periods<w_t>(t, x);
#endif
  expand_portable<w_t>(t, x);
}

}  // namespace

bool cpu_vector_kernels_available() {
#if TWA_X86_KERNELS
  return avx2_supported();
#else
  return false;
#endif
}

std::tuple<torch::Tensor, torch::Tensor> project_cpu(const Tables& t, const int64_t* grad, at::ScalarType dtype) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  auto part_t = torch::empty({t.num_programs, t.n}, opts);
  auto part_g = torch::empty({t.num_programs}, opts);
  auto out_t = torch::empty({t.num_layers, t.n}, opts);
  auto out_g = torch::empty({t.num_layers}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "twa_project_cpu", [&] {
    project_impl<scalar_t>(t, grad, part_t.data_ptr<float>(), part_g.data_ptr<float>());
  });
  reduce_partials(t, part_t.data_ptr<float>(), part_g.data_ptr<float>(), out_t.data_ptr<float>(),
                  out_g.data_ptr<float>());
  return {out_t, out_g};
}

void expand_cpu(const Tables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp, const float* u,
                const float* s) {
  const ExpandTargets x{weights, comp, u, s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "twa_expand_cpu", [&] { expand_impl<scalar_t>(t, x); });
}

}  // namespace twa
