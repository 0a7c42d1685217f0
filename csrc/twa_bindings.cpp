// Python bindings of the C++ (and, when built with TWA_WITH_CUDA, CUDA) backends.
// Every argument is checked here so that a wrong call raises a Python error instead of reading
// out of bounds.
#include <torch/extension.h>

#include "twa_cpu_periods.h"
#include "twa_layout.h"

namespace twa {

bool cpu_vector_kernels_available();
bool vector_kernel_fits(int64_t n, int64_t bits, int64_t rows_per_program);
torch::Tensor project_cpu(const Tables& t, const torch::Tensor& grad);
void expand_cpu(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta);
#ifdef TWA_WITH_CUDA
torch::Tensor project_cuda(const Tables& t, const torch::Tensor& grad);
void expand_cuda(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta);
#endif

namespace {

void check(const torch::Tensor& x, at::ScalarType dtype, const char* what, const torch::Device& dev) {
  TORCH_CHECK(x.scalar_type() == dtype, what, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(x.device() == dev, what, " is on ", x.device(), ", expected ", dev);
}

// words, word_off, param_off, sizes, prog_layer, prog_row, layer_prog, scale, zero
Tables make_tables(const std::vector<torch::Tensor>& tb, int64_t rows_per_program, int64_t n, int64_t bits,
                   const torch::Device& dev) {
  TORCH_CHECK(tb.size() == 9, "expected 9 table tensors");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "unsupported bit width ", bits);
  check(tb[0], at::kInt, "words", dev);
  const char* names[] = {"word_off", "param_off", "sizes", "prog_layer", "prog_row", "layer_prog"};
  for (int i = 1; i <= 6; ++i) check(tb[i], at::kLong, names[i - 1], dev);
  check(tb[7], at::kFloat, "scale", dev);
  check(tb[8], at::kFloat, "zero", dev);
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

torch::Tensor project(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
                      const torch::Tensor& grad, int64_t numel, bool vectorized) {
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == numel, "grad must be a contiguous vector of ", numel);
  Tables t = make_tables(tables, rows_per_program, n, bits, grad.device());
  t.vectorized = vectorized;
  if (grad.is_cuda()) {
#ifdef TWA_WITH_CUDA
    return project_cuda(t, grad);
#else
    TORCH_CHECK(false, "twa_kernels._C was built without CUDA");
#endif
  }
  return project_cpu(t, grad);
}

void expand(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
            torch::Tensor weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta, int64_t numel,
            bool vectorized) {
  TORCH_CHECK(weights.is_contiguous() && weights.numel() == numel, "weights must be a contiguous vector of ", numel);
  Tables t = make_tables(tables, rows_per_program, n, bits, weights.device());
  t.vectorized = vectorized;
  check(delta, at::kFloat, "delta", weights.device());
  TORCH_CHECK(delta.numel() == t.num_layers * n, "delta must be [L, n]");
  if (comp.has_value()) {
    check(*comp, at::kBFloat16, "compensation", weights.device());
    TORCH_CHECK(comp->numel() == numel, "compensation must match the weights");
  }
  if (weights.is_cuda()) {
#ifdef TWA_WITH_CUDA
    expand_cuda(t, weights, comp, delta);
    return;
#else
    TORCH_CHECK(false, "twa_kernels._C was built without CUDA");
#endif
  }
  expand_cpu(t, weights, comp, delta);
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels C++/CUDA backends: fused dequantize + P^T g and w += P dbeta";
  m.def("project", &twa::project, "c = P^T g for all layers");
  m.def("expand", &twa::expand, "w += P delta for all layers, in place");
  m.def("cpu_vector_kernels_available", &twa::cpu_vector_kernels_available,
        "whether this CPU runs the AVX2 + FMA kernels of the cpp backend");
  m.def("period_rows", &twa::period_rows, "rows per period: cpp programs that start on a multiple run vectorised");
  m.def("cpu_vector_kernel_fits", &twa::vector_kernel_fits,
        "whether the cpp backend runs its AVX2 kernels for (n, bits, rows_per_program) on this CPU");
#ifdef TWA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
