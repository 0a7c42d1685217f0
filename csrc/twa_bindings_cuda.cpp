// Python module twa_kernels._C_cuda: the cuda backend. Built apart from the CPU module so that a CUDA
// toolchain problem never takes the cpp backend down.
#include <torch/extension.h>

#include "twa_tables.h"

namespace twa {

torch::Tensor project_cuda(const Tables& t, const torch::Tensor& grad);
void expand_cuda(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta);

namespace {

torch::Tensor project(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
                      const torch::Tensor& grad, int64_t numel) {
  TORCH_CHECK(grad.is_cuda(), "twa_kernels._C_cuda is the CUDA backend; grad is on ", grad.device());
  return project_cuda(project_tables(tables, rows_per_program, n, bits, grad, numel), grad);
}

void expand(const std::vector<torch::Tensor>& tables, int64_t rows_per_program, int64_t n, int64_t bits,
            torch::Tensor weights, c10::optional<torch::Tensor> comp, const torch::Tensor& delta, int64_t numel) {
  TORCH_CHECK(weights.is_cuda(), "twa_kernels._C_cuda is the CUDA backend; weights are on ", weights.device());
  expand_cuda(expand_tables(tables, rows_per_program, n, bits, weights, comp, delta, numel), weights, comp, delta);
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels cuda backend: fused dequantize + P^T g and w += P dbeta on CUDA devices";
  m.def("project", &twa::project, "c = P^T g for all layers");
  m.def("expand", &twa::expand, "w += P delta for all layers, in place");
  m.attr("torch_version") = twa::compiled_torch_version();
}
