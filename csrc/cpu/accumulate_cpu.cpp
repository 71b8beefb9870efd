// accumulate_ on CPU tensors: one parallel region over the chunks of all tensors.
#include "checks.h"
#include "cpu/chunk_kernels.h"
#include "cpu/parallel_chunks.h"

#include <torch/library.h>

#include <vector>

namespace mbfused::cpu {
namespace {

void accumulate_cpu(
    at::TensorList acc, at::TensorList grads, double scale,
    const std::optional<at::Tensor>& scale_tensor, bool overwrite,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sq,
    bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& seed_tensor) {
  check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, seed_tensor);
  if (acc.empty()) {
    return;
  }
  TORCH_CHECK_VALUE(acc[0].is_cpu(), "the cpu backend needs CPU tensors; acc[0] is on ", acc[0].device());
  const float s = scale_tensor.has_value() ? scale_tensor->item<float>() : static_cast<float>(scale);
  const PhiloxKey key =
      philox_key(static_cast<uint64_t>(seed_tensor.has_value() ? seed_tensor->item<int64_t>() : seed));
  const KernelTable& table = kernels_for(selected_isa());
  std::vector<AccumulateKernel> kernel(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    kernel[i] = table.accumulate[kind_index(acc[i].scalar_type())][kind_index(grads[i].scalar_type())];
  }
  const std::vector<Chunk> chunks = chunks_of(acc);
  const bool want_norm = norm_sq.has_value();
  const bool streaming = overwrite && worth_streaming(acc);
  // Per-chunk results, combined below in chunk order: the norm does not depend on the
  // number of threads.
  std::vector<ChunkResult> results(chunks.size());
  for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
    // fp32 buffers are stored as computed: stochastic rounding leaves them alone.
    const bool stochastic = stochastic_rounding && acc[chunk.tensor].scalar_type() != at::kFloat;
    const RandomStream random{key, static_cast<uint64_t>(chunk.tensor), chunk.start};
    results[c] = kernel[chunk.tensor](
        element_ptr(acc[chunk.tensor], chunk.start), const_element_ptr(grads[chunk.tensor], chunk.start),
        chunk.length, s, overwrite, streaming, want_norm, stochastic ? &random : nullptr);
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
