// Python module twa_kernels._C_cuda: the cuda backend. Built apart from the CPU module so that a CUDA
// toolchain problem never takes the cpp backend down.
#include <torch/extension.h>

#include <tuple>

#include "plane/twa_plane.h"
#include "twa_tables.h"

namespace twa {

std::tuple<torch::Tensor, torch::Tensor> project_cuda(const Tables& t, const int64_t* grad, at::ScalarType dtype,
                                                      const torch::Device& dev);
void expand_cuda(const Tables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp, const float* u,
                 const float* s, const torch::Device& dev);
torch::Tensor plane_project_cuda(const plane::PlaneTables& t, const int64_t* grad, at::ScalarType dtype,
                                const torch::Tensor& scale, const torch::Tensor& zero, torch::Tensor& part_t,
                                torch::Tensor& part_g, const torch::Device& dev);
void plane_expand_cuda(const plane::PlaneTables& t, const int64_t* weights, at::ScalarType dtype, const int64_t* comp,
                       const torch::Tensor& scale, const torch::Tensor& zero, const torch::Tensor& delta,
                       const torch::Device& dev);

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

// The tables of twa_kernels.backends.plane.layout.PlaneTables, checked against each other; n_pad, the row
// length of project's partial buffers, is n rounded up to the kernels' column block.
plane::PlaneTables make_plane_tables(const pybind11::object& tb, const torch::Device& dev) {
  const pybind11::object plane = tb.attr("plane");
  const torch::Tensor words = field(tb, "words", at::kInt, dev);
  const torch::Tensor word_off = field(tb, "word_off", at::kLong, dev);
  const torch::Tensor full_tiles = field(tb, "full_tiles", at::kLong, dev);
  const torch::Tensor tail_words = field(tb, "tail_words", at::kLong, dev);
  const torch::Tensor seg_layer = field(tb, "seg_layer", at::kLong, dev);
  const torch::Tensor seg_row = field(tb, "seg_row", at::kLong, dev);
  const torch::Tensor seg_size = field(tb, "seg_size", at::kLong, dev);
  const torch::Tensor prog_seg = field(tb, "prog_seg", at::kLong, dev);
  const torch::Tensor prog_tile = field(tb, "prog_tile", at::kLong, dev);
  const torch::Tensor prog_end = field(tb, "prog_end", at::kLong, dev);
  const torch::Tensor layer_prog = field(tb, "layer_prog", at::kLong, dev);
  plane::PlaneTables t;
  t.n = plane.attr("n").cast<int>();
  t.bits = plane.attr("bits").cast<int>();
  t.threads = plane.attr("threads").cast<int>();
  t.n_pad = ((t.n + plane::kColumnBlock - 1) / plane::kColumnBlock) * plane::kColumnBlock;
  TORCH_CHECK(t.bits == 1 || t.bits == 2 || t.bits == 4 || t.bits == 8, "unsupported bit width ", t.bits);
  TORCH_CHECK(t.n >= 1, "n must be positive");
  t.num_layers = word_off.numel();
  t.num_segments = seg_size.numel();
  t.num_programs = prog_seg.numel();
  TORCH_CHECK(full_tiles.numel() == t.num_layers && tail_words.numel() == t.num_layers &&
                  layer_prog.numel() == t.num_layers + 1, "plane layer tables disagree");
  TORCH_CHECK(seg_layer.numel() == t.num_segments && seg_row.numel() == t.num_segments, "segment tables disagree");
  TORCH_CHECK(prog_tile.numel() == t.num_programs && prog_end.numel() == t.num_programs, "program tables disagree");
  t.words = words.data_ptr<int32_t>();
  t.word_off = word_off.data_ptr<int64_t>();
  t.full_tiles = full_tiles.data_ptr<int64_t>();
  t.tail_words = tail_words.data_ptr<int64_t>();
  t.seg_layer = seg_layer.data_ptr<int64_t>();
  t.seg_row = seg_row.data_ptr<int64_t>();
  t.seg_size = seg_size.data_ptr<int64_t>();
  t.prog_seg = prog_seg.data_ptr<int64_t>();
  t.prog_tile = prog_tile.data_ptr<int64_t>();
  t.prog_end = prog_end.data_ptr<int64_t>();
  t.layer_prog = layer_prog.data_ptr<int64_t>();
  return t;
}

void check_layer_vector(const torch::Tensor& x, const plane::PlaneTables& t, const char* what,
                        const torch::Device& dev) {
  check_tensor(x, at::kFloat, what, dev);
  TORCH_CHECK(x.numel() == t.num_layers * t.n, what, " must be [L, n] = [", t.num_layers, ", ", t.n, "]");
}

torch::Tensor plane_project(const pybind11::object& tables, const torch::Tensor& grad_addr, at::ScalarType dtype,
                            const torch::Tensor& scale, const torch::Tensor& zero, torch::Tensor part_t,
                            torch::Tensor part_g) {
  const torch::Device dev = tables_device(tables);
  const plane::PlaneTables t = make_plane_tables(tables, dev);
  kernel_dtype(dtype);
  check_layer_vector(scale, t, "scale", dev);
  check_layer_vector(zero, t, "zero", dev);
  check_tensor(part_t, at::kFloat, "project partials", dev);
  check_tensor(part_g, at::kFloat, "project gradient sums", dev);
  TORCH_CHECK(part_t.numel() == t.num_programs * t.n_pad && part_g.numel() == t.num_programs,
              "project partials must be [programs, ", t.n_pad, "] and [programs]");
  return plane_project_cuda(t, addresses(grad_addr, t, "gradient addresses", dev), dtype, scale, zero, part_t,
                            part_g, dev);
}

void plane_expand(const pybind11::object& tables, const torch::Tensor& weight_addr, at::ScalarType dtype,
                  const c10::optional<torch::Tensor>& comp_addr, const torch::Tensor& scale, const torch::Tensor& zero,
                  const torch::Tensor& delta) {
  const torch::Device dev = tables_device(tables);
  const plane::PlaneTables t = make_plane_tables(tables, dev);
  kernel_dtype(dtype);
  check_layer_vector(scale, t, "scale", dev);
  check_layer_vector(zero, t, "zero", dev);
  check_layer_vector(delta, t, "delta", dev);
  const int64_t* comp =
      comp_addr.has_value() ? addresses(*comp_addr, t, "compensation addresses", dev) : nullptr;
  plane_expand_cuda(t, addresses(weight_addr, t, "weight addresses", dev), dtype, comp, scale, zero, delta,
                    dev);
}

}  // namespace
}  // namespace twa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "twa_kernels cuda backend: fused dequantize + q^T g and w += q u + s on CUDA devices";
  m.def("project", &twa::project, "(q^T g, sum g) per layer, for all layers");
  m.def("expand", &twa::expand, "w += q u + s for all layers, in place");
  m.def("plane_project", &twa::plane_project,
        "c = scale (q^T g) + zero (sum g) per layer on the plane layout (cuda_plane backend)");
  m.def("plane_expand", &twa::plane_expand, "w += P~ delta for all layers on the plane layout, in place");
  m.attr("torch_version") = twa::compiled_torch_version();
}
