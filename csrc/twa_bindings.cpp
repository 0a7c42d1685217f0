// Python module twa_kernels._C: the cpp backend (CPU, OpenMP, AVX2 + FMA where the CPU has it).
#include <torch/extension.h>

#include "twa_cpu_periods.h"
#include "twa_tables.h"

namespace twa {

bool cpu_vector_kernels_available();
bool vector_kernel_fits(int64_t n, int64_t bits, int64_t rows_per_program);
torch::Tensor project_cpu(const Tables& t, const torch::Tensor& grad);
void expand_cpu(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta);

namespace {

torch::Tensor project(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
                      const torch::Tensor& grad, int64_t numel, bool vectorized) {
  TORCH_CHECK(grad.device().is_cpu(), "twa_kernels._C is the CPU backend; grad is on ", grad.device());
  Tables t = project_tables(tables, rows_per_program, n, bits, grad, numel);
  t.vectorized = vectorized;
  return project_cpu(t, grad);
}

void expand(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
            torch::Tensor weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta, int64_t numel,
            bool vectorized) {
  TORCH_CHECK(weights.device().is_cpu(), "twa_kernels._C is the CPU backend; weights are on ", weights.device());
  Tables t = expand_tables(tables, rows_per_program, n, bits, weights, comp, delta, numel);
  t.vectorized = vectorized;
  expand_cpu(t, weights, comp, delta);
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels cpp backend: fused dequantize + P^T g and w += P dbeta on the CPU";
  m.def("project", &twa::project, "c = P^T g for all layers");
  m.def("expand", &twa::expand, "w += P delta for all layers, in place");
  m.def("cpu_vector_kernels_available", &twa::cpu_vector_kernels_available,
        "whether this CPU runs the AVX2 + FMA kernels of the cpp backend");
  m.def("period_rows", &twa::period_rows, "rows per period: cpp programs that start on a multiple run vectorised");
  m.def("cpu_vector_kernel_fits", &twa::vector_kernel_fits,
        "whether the cpp backend runs its AVX2 kernels for (n, bits, rows_per_program) on this CPU");
  m.attr("torch_version") = twa::compiled_torch_version();
}
