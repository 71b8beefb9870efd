// accumulate_ on CUDA tensors: one multi-tensor-apply launch per (acc, grad) dtype group
// of up to 96 tensors (multi_tensor.cuh). A chunk uses 128-bit loads/stores when its
// tensors are 16-byte aligned and a scalar loop otherwise; the per-element math is
// accumulate_math.h.
#include "checks.h"
#include "cuda/multi_tensor.cuh"
#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

namespace mbfused::cuda {
namespace {

// Where a launch's random words come from under stochastic rounding: the seed (from the
// device when seed_ptr is set: no host synchronisation, capturable in a CUDA graph).
struct StochasticSeed {
  const int64_t* seed_ptr;
  int64_t seed_value;
};

template <typename Acc, typename Grad, bool kStochastic>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(
    TensorTable table, const float* scale_ptr, float scale_value, bool overwrite,
    float* found_inf, float* block_norms, StochasticSeed seed) {
  const float scale = scale_ptr != nullptr ? *scale_ptr : scale_value;
  PhiloxKey key{0u, 0u};
  if constexpr (kStochastic) {
    key = philox_key(static_cast<uint64_t>(seed.seed_ptr != nullptr ? *seed.seed_ptr : seed.seed_value));
  }
  constexpr int kVec = kVecWidth<Acc, Grad>;
  static_assert(!kStochastic || kVec % 8 == 0, "a vector step covers whole Philox blocks");
  bool nonfinite = false;
  // fp32 within a chunk (at most 128 terms per thread), fp64 across the block's chunks,
  // however many chunks a block takes on a GPU with few SMs.
  double block_norm_sq = 0.0;
  const int64_t chunks = total_chunks(table);
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    float norm_sq = 0.0f;
    const ChunkWork work = chunk_work(table, chunk);
    Acc* acc = static_cast<Acc*>(table.dst[work.slot]) + work.start;
    const Grad* grad = static_cast<const Grad*>(table.src[work.slot]) + work.start;
    int64_t vector_end = 0;
    if (aligned16(acc) && aligned16(grad)) {
      vector_end = work.n - work.n % kVec;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vector_end; i += kThreads * kVec) {
        Pack<Acc, kVec> a = *reinterpret_cast<const Pack<Acc, kVec>*>(acc + i);
        const Pack<Grad, kVec> g = *reinterpret_cast<const Pack<Grad, kVec>*>(grad + i);
        if constexpr (kStochastic) {
          // Chunks start at multiples of kChunkElements, so element start + i + k takes
          // stochastic_word(block (start + i) / 8 + k / 8, k % 8).
          const auto first_block = static_cast<uint64_t>(work.start + i) / 8;
#pragma unroll
          for (int b = 0; b < kVec / 8; ++b) {
            const PhiloxBlock words = stochastic_block(key, table.index[work.slot], first_block + b);
#pragma unroll
            for (int w = 0; w < 8; ++w) {
              const float stored = accumulate_element_stochastic(
                  a.v[8 * b + w], g.v[8 * b + w], scale, overwrite, nonfinite, stochastic_word(words, w));
              norm_sq += stored * stored;
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float stored = accumulate_element(a.v[k], g.v[k], scale, overwrite, nonfinite);
            norm_sq += stored * stored;
          }
        }
        *reinterpret_cast<Pack<Acc, kVec>*>(acc + i) = a;
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < work.n; i += kThreads) {
      Acc a = acc[i];
      float stored;
      if constexpr (kStochastic) {
        const auto element = static_cast<uint64_t>(work.start + i);
        const PhiloxBlock words = stochastic_block(key, table.index[work.slot], element / 8);
        stored = accumulate_element_stochastic(a, grad[i], scale, overwrite, nonfinite,
                                               stochastic_word(words, static_cast<int>(element % 8)));
      } else {
        stored = accumulate_element(a, grad[i], scale, overwrite, nonfinite);
      }
      acc[i] = a;
      norm_sq += stored * stored;
    }
    block_norm_sq += norm_sq;
  }

  if (found_inf != nullptr && __syncthreads_or(nonfinite) && threadIdx.x == 0) {
    *found_inf = 1.0f;  // racy but safe: every writer writes the same value
  }
  if (block_norms != nullptr) {
    const float block_total = block_sum(static_cast<float>(block_norm_sq));
    if (threadIdx.x == 0) {
      block_norms[blockIdx.x] = block_total;
    }
  }
}

void accumulate_cuda(
    at::TensorList acc, at::TensorList grads, double scale,
    const std::optional<at::Tensor>& scale_tensor, bool overwrite,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sq,
    bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& seed_tensor) {
  check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq, seed_tensor);
  if (acc.empty()) {
    return;
  }
  TORCH_CHECK_VALUE(acc[0].is_cuda(), "the cuda backend needs CUDA tensors; acc[0] is on ", acc[0].device());
  const c10::cuda::CUDAGuard guard(acc[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t blocks = max_total_blocks(acc);
  at::Tensor partials;
  float* block_norms = nullptr;
  if (norm_sq.has_value() && blocks > 0) {
    partials = at::empty({blocks}, acc[0].options().dtype(at::kFloat));
    block_norms = partials.data_ptr<float>();
  }
  const float* scale_ptr = scale_tensor.has_value() ? scale_tensor->const_data_ptr<float>() : nullptr;
  float* found_inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  const auto scale_value = static_cast<float>(scale);
  const StochasticSeed stochastic_seed{
      seed_tensor.has_value() ? seed_tensor->const_data_ptr<int64_t>() : nullptr, seed};

  const DtypeGroups groups = group_by_dtypes(acc, grads);
  int64_t blocks_used = 0;
  for (int a = 0; a < kNumScalarKinds; ++a) {
    for (int g = 0; g < kNumScalarKinds; ++g) {
      with_kind(a, [&](auto acc_tag) {
        with_kind(g, [&](auto grad_tag) {
          using Acc = decltype(acc_tag);
          using Grad = decltype(grad_tag);
          for_each_launch(groups.members[a][g], acc, grads, blocks_used,
                          [&](const TensorTable& table, int n_blocks, int64_t first_block) {
            float* norms = block_norms != nullptr ? block_norms + first_block : nullptr;
            // fp32 buffers are stored as computed: stochastic rounding leaves them alone.
            bool launched = false;
            if constexpr (!std::is_same_v<Acc, float>) {
              if (stochastic_rounding) {
                accumulate_kernel<Acc, Grad, true><<<n_blocks, kThreads, 0, stream>>>(
                    table, scale_ptr, scale_value, overwrite, found_inf_ptr, norms, stochastic_seed);
                launched = true;
              }
            }
            if (!launched) {
              accumulate_kernel<Acc, Grad, false><<<n_blocks, kThreads, 0, stream>>>(
                  table, scale_ptr, scale_value, overwrite, found_inf_ptr, norms, stochastic_seed);
            }
          });
        });
      });
    }
  }
  if (block_norms != nullptr) {
    sum_partials(block_norms, blocks_used, norm_sq->data_ptr<float>(), /*accumulate=*/true, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CUDA, m) {
  m.impl("_accumulate_native_", &accumulate_cuda);
}

}  // namespace mbfused::cuda
