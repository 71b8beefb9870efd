// accumulate_ on CPU tensors: one parallel region over the chunks of all tensors.
#include "checks.h"
#include "cpu/chunk_kernels.h"
#include "launch_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

namespace mbfused::cpu {
namespace {

// 32K elements: 128-320 KB of traffic per chunk, small enough to balance two to a few
// dozen threads over a Llama-style list, large enough that per-chunk costs vanish.
constexpr int64_t kChunkElements = 32 * 1024;

int kind_index(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return static_cast<int>(ScalarKind::kBFloat16);
    case at::kHalf: return static_cast<int>(ScalarKind::kHalf);
    default: return static_cast<int>(ScalarKind::kFloat);
  }
}

void accumulate_cpu(
    at::TensorList acc, at::TensorList grads, double scale,
    const std::optional<at::Tensor>& scale_tensor, bool overwrite,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sq) {
  check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq);
  if (acc.empty()) {
    return;
  }
  TORCH_CHECK_VALUE(acc[0].is_cpu(), "the cpu backend needs CPU tensors; acc[0] is on ", acc[0].device());
  const float s = scale_tensor.has_value() ? scale_tensor->item<float>() : static_cast<float>(scale);
  const ChunkKernelTable& table = kernels_for(selected_isa());

  std::vector<int64_t> numels(acc.size());
  std::vector<ChunkKernel> kernel(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    numels[i] = acc[i].numel();
    kernel[i] = table.kernels[kind_index(acc[i].scalar_type())][kind_index(grads[i].scalar_type())];
  }
  const std::vector<Chunk> chunks = split_into_chunks(numels, kChunkElements);
  const bool want_norm = norm_sq.has_value();
  // Per-chunk results, combined below in chunk order: the norm does not depend on the
  // number of threads.
  std::vector<ChunkResult> results(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& a = acc[chunk.tensor];
      const at::Tensor& g = grads[chunk.tensor];
      auto* acc_ptr = static_cast<char*>(a.data_ptr()) + chunk.start * a.element_size();
      const auto* grad_ptr = static_cast<const char*>(g.const_data_ptr()) + chunk.start * g.element_size();
      results[c] = kernel[chunk.tensor](acc_ptr, grad_ptr, chunk.length, s, overwrite, want_norm);
    }
  });

  bool nonfinite = false;
  double total = 0.0;
  for (const ChunkResult& r : results) {
    nonfinite |= r.nonfinite;
    total += r.norm_sq;
  }
  if (nonfinite && found_inf.has_value()) {
    found_inf->fill_(1.0);
  }
  if (want_norm) {
    norm_sq->add_(static_cast<float>(total));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CPU, m) {
  m.impl("_accumulate_native_", &accumulate_cpu);
}

}  // namespace mbfused::cpu
