// Python module twa_kernels._C_cuda: the cuda backend. Built apart from the CPU module so that a CUDA
// toolchain problem never takes the cpp backend down.
#include <torch/extension.h>

#include <tuple>

#include "twa_tables.h"

namespace twa {

std::tuple<torch::Tensor, torch::Tensor> project_cuda(const Tables& t, const int64_t* grad, at::ScalarType dtype,
                                                      const torch::Device& dev);
void expand_cuda(const Tables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp, const float* u,
                 const float* s, const torch::Device& dev);

namespace {

torch::Device tables_device(const pybind11::object& tables) {
  const torch::Device dev = tables.attr("words").cast<torch::Tensor>().device();
  TORCH_CHECK(dev.is_cuda(), "twa_kernels._C_cuda is the CUDA backend; its tables are on ", dev);
  return dev;
}

std::tuple<torch::Tensor, torch::Tensor> project(const pybind11::object& tables, const torch::Tensor& grad_addr,
                                                 at::ScalarType dtype) {
  const torch::Device dev = tables_device(tables);
  const Tables t = make_tables(tables, dev);
  kernel_dtype(dtype);
  return project_cuda(t, addresses(grad_addr, t, "gradient addresses", dev), dtype, dev);
}

void expand(const pybind11::object& tables, const torch::Tensor& weight_addr, at::ScalarType dtype,
            const c10::optional<torch::Tensor>& comp_addr, const torch::Tensor& u, const torch::Tensor& s) {
  const torch::Device dev = tables_device(tables);
  const Tables t = make_tables(tables, dev);
  kernel_dtype(dtype);
  check_fold(u, s, t, dev);
  const int64_t* comp = comp_addr.has_value() ? addresses(*comp_addr, t, "compensation addresses", dev) : nullptr;
  expand_cuda(t, addresses(weight_addr, t, "weight addresses", dev), dtype, comp, u.data_ptr<float>(),
              s.data_ptr<float>(), dev);
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels cuda backend: fused dequantize + q^T g and w += q u + s on CUDA devices";
  m.def("project", &twa::project, "(q^T g, sum g) per layer, for all layers");
  m.def("expand", &twa::expand, "w += q u + s for all layers, in place");
  m.attr("torch_version") = twa::compiled_torch_version();
}
