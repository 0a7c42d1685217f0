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
// on the number of threads.
#include <torch/extension.h>

#include <vector>

#include "twa_cpu_periods.h"
#include "twa_layout.h"

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

inline int64_t program_rows(const Tables& t, int64_t layer, int64_t row0) {
  return std::min<int64_t>(t.rows_per_program, t.sizes[layer] - row0);
}

// Runs fn(p, layer, row0, rows, codes, scratch) for every program, in parallel, with the program's
// codes unpacked to floats in a per-thread buffer and n floats of per-thread scratch.
template <typename Fn>
void for_each_program(const Tables& t, Fn&& fn) {
  const int n = t.n;
#pragma omp parallel
  {
    std::vector<float> codes(static_cast<size_t>(t.rows_per_program) * n);
    std::vector<float> scratch(n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const int64_t layer = t.prog_layer[p];
      const int64_t row0 = t.prog_row[p];
      const int64_t rows = program_rows(t, layer, row0);
      unpack_dispatch(t.bits, t.words + t.word_off[layer], row0 * n, rows * n, codes.data());
      fn(p, layer, row0, rows, codes.data(), scratch.data());
    }
  }
}

void reduce_partials(const Tables& t, const float* part_t, const float* part_g, float* out) {
  const int n = t.n;
#pragma omp parallel for schedule(static)
  for (int64_t l = 0; l < t.num_layers; ++l) {
    std::vector<float> acc(n, 0.f);
    float gsum = 0.f;
    for (int64_t p = t.layer_prog[l]; p < t.layer_prog[l + 1]; ++p) {
      for (int j = 0; j < n; ++j) acc[j] += part_t[p * n + j];
      gsum += part_g[p];
    }
    for (int j = 0; j < n; ++j) out[l * n + j] = t.scale[l * n + j] * acc[j] + t.zero[l * n + j] * gsum;
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

// u[j] = scale·Δβ per column of the layer, and s = Σ zero·Δβ, the constant every row adds.
inline float folded_delta(const Tables& t, int64_t layer, const float* delta, float* u) {
  const int n = t.n;
  float s = 0.f;
  for (int j = 0; j < n; ++j) {
    u[j] = t.scale[layer * n + j] * delta[layer * n + j];
    s += t.zero[layer * n + j] * delta[layer * n + j];
  }
  return s;
}

// ---- portable kernels -------------------------------------------------------------------------

template <typename grad_t>
void project_portable(const Tables& t, const grad_t* grad, float* part_t, float* part_g) {
  const int n = t.n;
  for_each_program(t, [&](int64_t p, int64_t layer, int64_t row0, int64_t rows, const float* q, float* a) {
    const grad_t* g = grad + t.param_off[layer] + row0;
    for (int j = 0; j < n; ++j) a[j] = 0.f;
    float gsum = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float gr = to_float(g[r]);
      const float* qr = q + r * n;
#pragma omp simd
      for (int j = 0; j < n; ++j) a[j] += qr[j] * gr;
      gsum += gr;
    }
    for (int j = 0; j < n; ++j) part_t[p * n + j] = a[j];
    part_g[p] = gsum;
  });
}

template <typename w_t>
void expand_portable(const Tables& t, w_t* weights, c10::BFloat16* comp, const float* delta) {
  const int n = t.n;
  for_each_program(t, [&](int64_t, int64_t layer, int64_t row0, int64_t rows, const float* q, float* u) {
    const float s = folded_delta(t, layer, delta, u);
    const int64_t base = t.param_off[layer] + row0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * n;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int j = 0; j < n; ++j) dot += qr[j] * u[j];
      add_to_weight(weights, comp, base + r, dot + s);
    }
  });
}

// ---- vectorised kernels over whole periods (twa_cpu_periods.h) ---------------------------------

#if TWA_X86_KERNELS
// Programs start on a multiple of R rows, so on a word: row0·n·B bits is a multiple of 32.
inline const uint8_t* run_bytes(const Tables& t, int64_t layer, int64_t row0) {
  return reinterpret_cast<const uint8_t*>(t.words + t.word_off[layer]) + row0 * t.n * t.bits / 8;
}

// The codes of the rows [done, rows) after a program's last whole period (fewer than R rows).
inline const float* unpack_tail(const Tables& t, int64_t layer, int64_t row0, int64_t done, int64_t rows,
                                float* out) {
  unpack_dispatch(t.bits, t.words + t.word_off[layer], (row0 + done) * t.n, (rows - done) * t.n, out);
  return out;
}

template <typename grad_t>
void project_periods(const Tables& t, const grad_t* grad, float* part_t, float* part_g) {
  const int n = t.n;
  const PeriodPlan plan(n, t.bits);
  const int64_t lanes = static_cast<int64_t>(plan.vectors) * 8;
#pragma omp parallel
  {
    std::vector<float> gf(t.rows_per_program + 1);  // + 1: the kernel reads one row past the run
    std::vector<float> A(lanes), tail(static_cast<size_t>(plan.rows) * n);
    std::vector<float> a(n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const int64_t layer = t.prog_layer[p], row0 = t.prog_row[p];
      const int64_t rows = program_rows(t, layer, row0);
      const grad_t* g = grad + t.param_off[layer] + row0;
      float gsum = 0.f;  // lane-wise partial sums: a serial chain here would cost more than the FMAs
#pragma omp simd reduction(+ : gsum)
      for (int64_t r = 0; r < rows; ++r) {
        gf[r] = to_float(g[r]);
        gsum += gf[r];
      }
      gf[rows] = 0.f;
      const int64_t periods = rows / plan.rows;
      std::fill(A.begin(), A.end(), 0.f);
      project_periods_avx2(plan, t.bits, run_bytes(t, layer, row0), gf.data(), periods, A.data());
      std::fill(a.begin(), a.end(), 0.f);
      for (int64_t i = 0; i < lanes; ++i) a[plan.col[i]] += A[i];
      const int64_t done = periods * plan.rows;
      const float* q = unpack_tail(t, layer, row0, done, rows, tail.data());
      for (int64_t r = done; r < rows; ++r)
        for (int j = 0; j < n; ++j) a[j] += q[(r - done) * n + j] * gf[r];
      for (int j = 0; j < n; ++j) part_t[p * n + j] = a[j];
      part_g[p] = gsum;
    }
  }
}

template <typename w_t>
void expand_periods(const Tables& t, w_t* weights, c10::BFloat16* comp, const float* delta) {
  const int n = t.n;
  const PeriodPlan plan(n, t.bits);
  const int64_t lanes = static_cast<int64_t>(plan.vectors) * 8;
#pragma omp parallel
  {
    std::vector<float> u(n), U(lanes), dots(t.rows_per_program), tail(static_cast<size_t>(plan.rows) * n);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < t.num_programs; ++p) {
      const int64_t layer = t.prog_layer[p], row0 = t.prog_row[p];
      const int64_t rows = program_rows(t, layer, row0);
      const float s = folded_delta(t, layer, delta, u.data());
      for (int64_t i = 0; i < lanes; ++i) U[i] = u[plan.col[i]];
      const int64_t periods = rows / plan.rows;
      expand_periods_avx2(plan, t.bits, run_bytes(t, layer, row0), U.data(), periods, dots.data());
      const int64_t done = periods * plan.rows;
      const float* q = unpack_tail(t, layer, row0, done, rows, tail.data());
      for (int64_t r = done; r < rows; ++r) {
        float dot = 0.f;
        for (int j = 0; j < n; ++j) dot += q[(r - done) * n + j] * u[j];
        dots[r] = dot;
      }
      const int64_t base = t.param_off[layer] + row0;
      for (int64_t r = 0; r < rows; ++r) add_to_weight(weights, comp, base + r, dots[r] + s);
    }
  }
}
#endif

template <typename grad_t>
void project_impl(const Tables& t, const grad_t* grad, float* part_t, float* part_g) {
#if TWA_X86_KERNELS
  if (t.vectorized && vector_kernel_fits(t.n, t.bits, t.rows_per_program))
    return project_periods(t, grad, part_t, part_g);
#endif
  project_portable(t, grad, part_t, part_g);
}

template <typename w_t>
void expand_impl(const Tables& t, w_t* weights, c10::BFloat16* comp, const float* delta) {
#if TWA_X86_KERNELS
  if (t.vectorized && vector_kernel_fits(t.n, t.bits, t.rows_per_program))
    return expand_periods(t, weights, comp, delta);
#endif
  expand_portable(t, weights, comp, delta);
}

}  // namespace

bool cpu_vector_kernels_available() {
#if TWA_X86_KERNELS
  return avx2_supported();
#else
  return false;
#endif
}

torch::Tensor project_cpu(const Tables& t, const torch::Tensor& grad) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  auto part_t = torch::empty({t.num_programs, t.n}, opts);
  auto part_g = torch::empty({t.num_programs}, opts);
  auto out = torch::empty({t.num_layers, t.n}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "twa_project_cpu", [&] {
    project_impl<scalar_t>(t, grad.data_ptr<scalar_t>(), part_t.data_ptr<float>(), part_g.data_ptr<float>());
  });
  reduce_partials(t, part_t.data_ptr<float>(), part_g.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

void expand_cpu(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp,
                const torch::Tensor& delta) {
  c10::BFloat16* comp_ptr = comp.has_value() ? comp->data_ptr<c10::BFloat16>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "twa_expand_cpu", [&] {
    expand_impl<scalar_t>(t, weights.data_ptr<scalar_t>(), comp_ptr, delta.data_ptr<float>());
  });
}

}  // namespace twa
