// Argument checks shared by the two Python modules (twa_bindings.cpp for the CPU, twa_bindings_cuda.cpp
// for CUDA): every table is checked here so that a wrong call raises a Python error instead of reading
// out of bounds. Header-only so that each module stands alone: one failing to build never takes the
// other down.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

#include "twa_layout.h"

namespace twa {

inline void check_tensor(const torch::Tensor& x, at::ScalarType dtype, const char* what, const torch::Device& dev) {
  TORCH_CHECK(x.scalar_type() == dtype, what, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(x.device() == dev, what, " is on ", x.device(), ", expected ", dev);
}

// words, word_off, param_off, sizes, prog_layer, prog_row, layer_prog, scale, zero
inline Tables make_tables(const std::vector<torch::Tensor>& tb, int64_t rows_per_program, int64_t n, int64_t bits,
                          const torch::Device& dev) {
  TORCH_CHECK(tb.size() == 9, "expected 9 table tensors");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "unsupported bit width ", bits);
  check_tensor(tb[0], at::kInt, "words", dev);
  const char* names[] = {"word_off", "param_off", "sizes", "prog_layer", "prog_row", "layer_prog"};
  for (int i = 1; i <= 6; ++i) check_tensor(tb[i], at::kLong, names[i - 1], dev);
  check_tensor(tb[7], at::kFloat, "scale", dev);
  check_tensor(tb[8], at::kFloat, "zero", dev);
  const int64_t L = tb[3].numel();
  TORCH_CHECK(tb[1].numel() == L && tb[2].numel() == L && tb[6].numel() == L + 1, "layer tables disagree");
  TORCH_CHECK(tb[7].numel() == L * n && tb[8].numel() == L * n, "scale/zero must be [L, n]");
  Tables t;
  t.words = tb[0].data_ptr<int32_t>();
  t.word_off = tb[1].data_ptr<int64_t>();
  t.param_off = tb[2].data_ptr<int64_t>();
  t.sizes = tb[3].data_ptr<int64_t>();
  t.prog_layer = tb[4].data_ptr<int64_t>();
  t.prog_row = tb[5].data_ptr<int64_t>();
  t.layer_prog = tb[6].data_ptr<int64_t>();
  t.scale = tb[7].data_ptr<float>();
  t.zero = tb[8].data_ptr<float>();
  t.num_programs = tb[4].numel();
  t.num_layers = L;
  t.rows_per_program = rows_per_program;
  t.n = static_cast<int>(n);
  t.bits = static_cast<int>(bits);
  return t;
}

inline Tables project_tables(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n,
                             int64_t bits, const torch::Tensor& grad, int64_t numel) {
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == numel, "grad must be a contiguous vector of ", numel);
  return make_tables(tables, rows_per_program, n, bits, grad.device());
}

inline Tables expand_tables(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n,
                            int64_t bits, const torch::Tensor& weights, const c10::optional<torch::Tensor>& comp,
                            const torch::Tensor& delta, int64_t numel) {
  TORCH_CHECK(weights.is_contiguous() && weights.numel() == numel, "weights must be a contiguous vector of ", numel);
  Tables t = make_tables(tables, rows_per_program, n, bits, weights.device());
  check_tensor(delta, at::kFloat, "delta", weights.device());
  TORCH_CHECK(delta.numel() == t.num_layers * n, "delta must be [L, n]");
  if (comp.has_value()) {
    check_tensor(*comp, at::kBFloat16, "compensation", weights.device());
    TORCH_CHECK(comp->numel() == numel, "compensation must match the weights");
  }
  return t;
}

// The torch a module was compiled against (set by extension_sources.py), so that the loader can tell a
// module built for another torch, whose C++ ABI may differ, from a current one.
inline std::string compiled_torch_version() {
#if defined(TWA_TORCH_MAJOR) && defined(TWA_TORCH_MINOR)
  return std::to_string(TWA_TORCH_MAJOR) + "." + std::to_string(TWA_TORCH_MINOR);
#else
  return "unknown";
#endif
}

}  // namespace twa
