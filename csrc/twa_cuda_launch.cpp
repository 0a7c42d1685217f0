// Torch-facing wrappers of the CUDA kernels in twa_cuda.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "twa_layout.h"

namespace twa {

cudaError_t launch_project(const Tables& t, DType dt, const void* grad, float* part_t, float* part_g, float* out,
                           cudaStream_t stream);
cudaError_t launch_expand(const Tables& t, DType dt, void* weights, void* comp, const float* delta,
                          cudaStream_t stream);

DType dtype_of(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "twa cuda backend: unsupported dtype ", x.scalar_type(), " (fp32, bf16, fp16)");
  }
}

torch::Tensor project_cuda(const Tables& t, const torch::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto opts = grad.options().dtype(torch::kFloat32);
  auto part_t = torch::empty({t.num_programs, t.n}, opts);
  auto part_g = torch::empty({t.num_programs}, opts);
  auto out = torch::empty({t.num_layers, t.n}, opts);
  const cudaError_t err = launch_project(t, dtype_of(grad), grad.data_ptr(), part_t.data_ptr<float>(),
                                         part_g.data_ptr<float>(), out.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa project kernel failed: ", cudaGetErrorString(err));
  return out;
}

void expand_cuda(const Tables& t, torch::Tensor& weights, c10::optional<torch::Tensor> comp,
                 const torch::Tensor& delta) {
  const c10::cuda::CUDAGuard guard(weights.device());
  void* comp_ptr = comp.has_value() ? comp->data_ptr() : nullptr;
  const cudaError_t err = launch_expand(t, dtype_of(weights), weights.data_ptr(), comp_ptr,
                                        delta.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa expand kernel failed: ", cudaGetErrorString(err));
}

}  // namespace twa
