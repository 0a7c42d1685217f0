// Argument checks shared by the two Python modules (twa_bindings.cpp for the CPU, twa_bindings_cuda.cpp
// for CUDA): the engine's KernelTables are read by field name and every table is checked here, so that
// a wrong call raises a Python error instead of reading out of bounds. Header-only so that each module
// stands alone: one failing to build never takes the other down.
#pragma once
#include <torch/extension.h>

#include <string>

#include "twa_layout.h"

namespace twa {

inline void check_tensor(const torch::Tensor& x, at::ScalarType dtype, const char* what, const torch::Device& dev) {
  TORCH_CHECK(x.scalar_type() == dtype, what, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(x.device() == dev, what, " is on ", x.device(), ", expected ", dev);
}

inline torch::Tensor field(const pybind11::object& tables, const char* name, at::ScalarType dtype,
                           const torch::Device& dev) {
  TORCH_CHECK(pybind11::hasattr(tables, name), "kernel tables lack the field '", name, "'");
  torch::Tensor x = tables.attr(name).cast<torch::Tensor>();
  check_tensor(x, dtype, name, dev);
  return x;
}

// The tables of twa_kernels.backends.contract.KernelTables, checked against each other.
inline Tables make_tables(const pybind11::object& tb, const torch::Device& dev) {
  const torch::Tensor words = field(tb, "words", at::kInt, dev);
  const torch::Tensor word_off = field(tb, "word_off", at::kLong, dev);
  const torch::Tensor seg_layer = field(tb, "seg_layer", at::kLong, dev);
  const torch::Tensor seg_row = field(tb, "seg_row", at::kLong, dev);
  const torch::Tensor seg_size = field(tb, "seg_size", at::kLong, dev);
  const torch::Tensor prog_seg = field(tb, "prog_seg", at::kLong, dev);
  const torch::Tensor prog_row = field(tb, "prog_row", at::kLong, dev);
  const torch::Tensor layer_prog = field(tb, "layer_prog", at::kLong, dev);
  Tables t;
  t.n = tb.attr("n").cast<int>();
  t.bits = tb.attr("bits").cast<int>();
  t.rows_per_program = tb.attr("rows_per_program").cast<int64_t>();
  TORCH_CHECK(t.bits == 1 || t.bits == 2 || t.bits == 4 || t.bits == 8, "unsupported bit width ", t.bits);
  TORCH_CHECK(t.n >= 1 && t.rows_per_program >= 1, "n and rows_per_program must be positive");
  t.num_layers = word_off.numel();
  t.num_segments = seg_size.numel();
  t.num_programs = prog_seg.numel();
  TORCH_CHECK(layer_prog.numel() == t.num_layers + 1, "layer_prog must have L + 1 entries");
  TORCH_CHECK(seg_layer.numel() == t.num_segments && seg_row.numel() == t.num_segments, "segment tables disagree");
  TORCH_CHECK(prog_row.numel() == t.num_programs, "program tables disagree");
  t.words = words.data_ptr<int32_t>();
  t.word_off = word_off.data_ptr<int64_t>();
  t.seg_layer = seg_layer.data_ptr<int64_t>();
  t.seg_row = seg_row.data_ptr<int64_t>();
  t.seg_size = seg_size.data_ptr<int64_t>();
  t.prog_seg = prog_seg.data_ptr<int64_t>();
  t.prog_row = prog_row.data_ptr<int64_t>();
  t.layer_prog = layer_prog.data_ptr<int64_t>();
  return t;
}

// A segment address table: int64 [S] on the tables' device (Tables, or the plane kernels' PlaneTables).
template <typename TablesT>
inline const int64_t* addresses(const torch::Tensor& addr, const TablesT& t, const char* what,
                                const torch::Device& dev) {
  check_tensor(addr, at::kLong, what, dev);
  TORCH_CHECK(addr.numel() == t.num_segments, what, " must hold one address per segment (", t.num_segments, ")");
  return addr.data_ptr<int64_t>();
}

inline DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "twa kernels: unsupported dtype ", s, " (fp32, bf16, fp16)");
  }
}

// [L, n] and [L] float32 operands of expand.
inline void check_fold(const torch::Tensor& u, const torch::Tensor& s, const Tables& t, const torch::Device& dev) {
  check_tensor(u, at::kFloat, "u", dev);
  check_tensor(s, at::kFloat, "s", dev);
  TORCH_CHECK(u.numel() == t.num_layers * t.n && s.numel() == t.num_layers, "u must be [L, n] and s [L]");
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
