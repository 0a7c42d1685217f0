// Torch-facing wrappers of the rows CUDA kernels in twa_cuda.cu (backend cuda).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "../twa_tables.h"

namespace twa {
cudaError_t launch_project(const Tables& t, DType dt, const int64_t* grad, float* part_t, float* part_g,
                           float* out_t, float* out_g, cudaStream_t stream);
cudaError_t launch_expand(const Tables& t, DType dt, const int64_t* weights, const int64_t* comp, const float* u,
                          const float* s, cudaStream_t stream);

std::tuple<torch::Tensor, torch::Tensor> project_cuda(const Tables& t, const int64_t* grad, at::ScalarType dtype,
                                                      const torch::Device& dev) {
  const c10::cuda::CUDAGuard guard(dev);
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(dev);
  auto part_t = torch::empty({t.num_programs, t.n}, opts);
  auto part_g = torch::empty({t.num_programs}, opts);
  auto out_t = torch::empty({t.num_layers, t.n}, opts);
  auto out_g = torch::empty({t.num_layers}, opts);
  const cudaError_t err = launch_project(t, kernel_dtype(dtype), grad, part_t.data_ptr<float>(),
                                         part_g.data_ptr<float>(), out_t.data_ptr<float>(), out_g.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa project kernel failed: ", cudaGetErrorString(err));
  return {out_t, out_g};
}

void expand_cuda(const Tables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp, const float* u,
                 const float* s, const torch::Device& dev) {
  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = launch_expand(t, kernel_dtype(dtype), weights, comp, u, s, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa expand kernel failed: ", cudaGetErrorString(err));
}

}  // namespace twa
