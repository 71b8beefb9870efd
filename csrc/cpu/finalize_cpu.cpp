// finalize_ on CPU tensors: at most one norm pass and one scaling pass, each one
// parallel region over the chunks of all tensors.
#include "checks.h"
#include "cpu/chunk_kernels.h"
#include "cpu/parallel_chunks.h"

#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <vector>

namespace mbfused::cpu {
namespace {

double sum_of_squares(at::TensorList acc, const KernelTable& table) {
  const std::vector<Chunk> chunks = chunks_of(acc);
  std::vector<double> partial(chunks.size());
  for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
    const at::Tensor& a = acc[chunk.tensor];
    partial[c] = table.sum_squares[kind_index(a.scalar_type())](const_element_ptr(a, chunk.start), chunk.length);
  });
  double total = 0.0;
  for (double p : partial) {  // chunk order: independent of the thread count
    total += p;
  }
  return total;
}

// dst <- src * coef, rounded to nearest, or stochastically into 16-bit dst when `key` is
// given. A stochastic product is accumulate_'s overwrite with coef as the scale (the
// same fp32 product, the same random bits per tensor and element): its kernel runs.
void scale_into(at::TensorList acc, at::TensorList dst, float coef, const KernelTable& table,
                const PhiloxKey* key) {
  const bool streaming = dst.data() != acc.data() && worth_streaming(dst);  // in place: each line was just read
  for_each_chunk(chunks_of(acc), [&](int64_t, const Chunk& chunk) {
    const at::Tensor& src = acc[chunk.tensor];
    const at::Tensor& out = dst[chunk.tensor];
    const int s = kind_index(src.scalar_type());
    const int d = kind_index(out.scalar_type());
    if (key != nullptr && out.scalar_type() != at::kFloat) {
      const RandomStream random{*key, static_cast<uint64_t>(chunk.tensor), chunk.start};
      table.accumulate[d][s](element_ptr(out, chunk.start), const_element_ptr(src, chunk.start), chunk.length,
                             coef, /*overwrite=*/true, /*streaming=*/false, /*want_norm=*/false, &random);
    } else {
      table.scale[s][d](const_element_ptr(src, chunk.start), element_ptr(out, chunk.start), chunk.length, coef,
                        streaming);
    }
  });
}

at::Tensor finalize_cpu(
    at::TensorList acc, double inv_scale, const std::optional<at::Tensor>& inv_scale_tensor,
    std::optional<double> max_norm, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, at::TensorList out, bool stochastic_rounding, int64_t seed,
    const std::optional<at::Tensor>& seed_tensor) {
  check_finalize_args(acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out, seed_tensor);
  TORCH_CHECK_VALUE(acc.empty() || acc[0].is_cpu(), "the cpu backend needs CPU tensors; acc[0] is on ",
                    acc[0].device());
  const KernelTable& table = kernels_for(selected_isa());
  const float inv = inv_scale_tensor.has_value() ? inv_scale_tensor->item<float>() : static_cast<float>(inv_scale);
  const float sum_sq = norm_sq.has_value() ? norm_sq->item<float>() : static_cast<float>(sum_of_squares(acc, table));
  const auto [total_norm, coef] =
      finalize_coefficient(sum_sq, inv, max_norm.has_value(), static_cast<float>(max_norm.value_or(0.0)));
  const bool skip = found_inf.has_value() && found_inf->item<float>() != 0.0f;
  if (!skip) {
    const PhiloxKey key =
        philox_key(static_cast<uint64_t>(seed_tensor.has_value() ? seed_tensor->item<int64_t>() : seed));
    const PhiloxKey* stochastic = stochastic_rounding ? &key : nullptr;
    if (!out.empty()) {
      scale_into(acc, out, coef, table, stochastic);
    } else if (coef != 1.0f) {  // x * 1 == x, whatever the rounding: nothing would change
      scale_into(acc, acc, coef, table, stochastic);
    }
  }
  return at::scalar_tensor(total_norm, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CPU, m) {
  m.impl("_finalize_native_", &finalize_cpu);
}

}  // namespace mbfused::cpu
