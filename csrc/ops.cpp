// Schemas of the compiled kernels.
//
// The public ops (mbfused::accumulate_, ...) are defined in mbfused/ops.py, which picks
// a backend at run time; the ops below are the compiled backends it calls. Their
// device implementations live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL), so PyTorch's
// dispatcher routes CPU tensors to the CPU kernels and CUDA tensors to the CUDA ones.
#include "cpu/chunk_kernels.h"
#include "launch_plan.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace mbfused {
namespace {

int64_t cpu_isa() { return static_cast<int64_t>(cpu::selected_isa()); }

// Test hook for the CUDA launch planning: one row per chunk, located the way the
// kernels locate it: (launch, chunk, table slot, tensor index, first element, length).
at::Tensor plan_launches_table(std::vector<int64_t> numels, int64_t chunk_size, int64_t max_tensors) {
  const std::vector<Launch> launches = plan_launches(numels, chunk_size, max_tensors);
  std::vector<int64_t> rows;
  for (size_t l = 0; l < launches.size(); ++l) {
    const Launch& launch = launches[l];
    for (int64_t c = 0; c < launch.total_chunks(); ++c) {
      const LocatedChunk located = locate_chunk(launch, numels, chunk_size, c);
      rows.insert(rows.end(), {static_cast<int64_t>(l), c, located.slot, launch.tensors[located.slot],
                               located.start, located.length});
    }
  }
  at::Tensor table = at::empty({static_cast<int64_t>(rows.size() / 6), 6}, at::kLong);
  std::copy(rows.begin(), rows.end(), table.data_ptr<int64_t>());
  return table;
}

}  // namespace

TORCH_LIBRARY(mbfused, m) {
  m.def(
      "_accumulate_native_(Tensor(a!)[] acc, Tensor[] grads, float scale, Tensor? scale_tensor, "
      "bool overwrite, Tensor(b!)? found_inf, Tensor(c!)? norm_sq, bool stochastic_rounding, int seed, "
      "Tensor? seed_tensor) -> ()");
  m.def(
      "_finalize_native_(Tensor(a!)[] acc, float inv_scale, Tensor? inv_scale_tensor, float? max_norm, "
      "Tensor? found_inf, Tensor? norm_sq, Tensor(b!)[] out, bool stochastic_rounding, int seed, "
      "Tensor? seed_tensor) -> Tensor");
  m.def(
      "_wgrad_accumulate_native_(Tensor(a!) main_grad, Tensor grad_output, Tensor input, float scale, "
      "Tensor? scale_tensor, bool overwrite) -> ()");
  m.def("_cpu_isa() -> int", &cpu_isa);
  m.def("_plan_launches(int[] numels, int chunk_size, int max_tensors) -> Tensor",
        &plan_launches_table);
}

}  // namespace mbfused
