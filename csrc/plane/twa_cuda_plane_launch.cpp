// Torch-facing wrappers of the plane CUDA kernels in twa_cuda_plane.cu (backend cuda_plane).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../twa_tables.h"
#include "twa_plane.h"

namespace twa {
namespace plane {
cudaError_t launch_plane_project(const PlaneTables& t, DType dt, const int64_t* grad, const float* scale,
                                 const float* zero, float* part_t, float* part_g, float* c, cudaStream_t stream);
cudaError_t launch_plane_expand(const PlaneTables& t, DType dt, const int64_t* weights, const int64_t* comp,
                                const float* scale, const float* zero, const float* delta, cudaStream_t stream);
}  // namespace plane

torch::Tensor plane_project_cuda(const plane::PlaneTables& t, const int64_t* grad, at::ScalarType dtype,
                                const torch::Tensor& scale, const torch::Tensor& zero, torch::Tensor& part_t,
                                torch::Tensor& part_g, const torch::Device& dev) {
  const c10::cuda::CUDAGuard guard(dev);
  auto c = torch::empty({t.num_layers, t.n}, torch::TensorOptions().dtype(torch::kFloat32).device(dev));
  const cudaError_t err = plane::launch_plane_project(
      t, kernel_dtype(dtype), grad, scale.data_ptr<float>(), zero.data_ptr<float>(), part_t.data_ptr<float>(),
      part_g.data_ptr<float>(), c.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa plane project kernel failed: ", cudaGetErrorString(err));
  return c;
}

void plane_expand_cuda(const plane::PlaneTables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp,
                       const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& delta,
                       const torch::Device& dev) {
  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err =
      plane::launch_plane_expand(t, kernel_dtype(dtype), weights, comp, scale.data_ptr<float>(),
                                 zero.data_ptr<float>(), delta.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "twa plane expand kernel failed: ", cudaGetErrorString(err));
}

}  // namespace twa
