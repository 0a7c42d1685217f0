// Python module twa_kernels._C: the cpp backend (CPU, OpenMP, AVX2 + FMA where the CPU has it).
#include <torch/extension.h>

#include <tuple>

#include "rows/twa_cpu_periods.h"
#include "twa_tables.h"

namespace twa {

bool cpu_vector_kernels_available();
bool vector_kernel_fits(int64_t n, int64_t bits, int64_t rows_per_program);
std::tuple<torch::Tensor, torch::Tensor> project_cpu(const Tables& t, const int64_t* grad, at::ScalarType dtype);
void expand_cpu(const Tables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp, const float* u,
                const float* s);

namespace {

const torch::Device kCpu(torch::kCPU);

std::tuple<torch::Tensor, torch::Tensor> project(const pybind11::object& tables, const torch::Tensor& grad_addr,
                                                 at::ScalarType dtype, bool vectorized) {
  Tables t = make_tables(tables, kCpu);
  t.vectorized = vectorized;
  kernel_dtype(dtype);
  return project_cpu(t, addresses(grad_addr, t, "gradient addresses", kCpu), dtype);
}

void expand(const pybind11::object& tables, const torch::Tensor& weight_addr, at::ScalarType dtype,
            const c10::optional<torch::Tensor>& comp_addr, const torch::Tensor& u, const torch::Tensor& s,
            bool vectorized) {
  Tables t = make_tables(tables, kCpu);
  t.vectorized = vectorized;
  kernel_dtype(dtype);
  check_fold(u, s, t, kCpu);
  const int64_t* comp = comp_addr.has_value() ? addresses(*comp_addr, t, "compensation addresses", kCpu) : nullptr;
  expand_cpu(t, addresses(weight_addr, t, "weight addresses", kCpu), dtype, comp, u.data_ptr<float>(),
             s.data_ptr<float>());
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels cpp backend: fused dequantize + q^T g and w += q u + s on the CPU";
  m.def("project", &twa::project, "(q^T g, sum g) per layer, for all layers");
  m.def("expand", &twa::expand, "w += q u + s for all layers, in place");
  m.def("cpu_vector_kernels_available", &twa::cpu_vector_kernels_available,
        "whether this CPU runs the AVX2 + FMA kernels of the cpp backend");
  m.def("period_rows", &twa::period_rows, "rows per period: cpp programs that start on a multiple run vectorised");
  m.def("cpu_vector_kernel_fits", &twa::vector_kernel_fits,
        "whether the cpp backend runs its AVX2 kernels for (n, bits, rows_per_program) on this CPU");
  m.attr("torch_version") = twa::compiled_torch_version();
}
