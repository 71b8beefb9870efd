// finalize_ on CUDA tensors, decided on the device with no host synchronisation:
//   1. without norm_sq, a norm pass (multi-tensor apply, per-block partials, fixed-order sum);
//   2. one thread computes total_norm and the coefficient (accumulate_math.h) and reads
//      found_inf;
//   3. a scaling pass (multi-tensor apply) that every block skips when found_inf is set.
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

// Layout of the small device buffer the three steps share.
enum Scratch : int { kCoef = 0, kSkip = 1, kSumSq = 2, kScratchSize = 3 };

template <typename Src>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(TensorTable table, float* block_sums) {
  constexpr int kVec = kVecWidth<Src, Src>;
  // fp32 within a chunk (at most 128 terms per thread), fp64 across the block's chunks,
  // however many chunks a block takes on a GPU with few SMs.
  double total = 0.0;
  const int64_t chunks = total_chunks(table);
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    float sum = 0.0f;
    const ChunkWork work = chunk_work(table, chunk);
    const Src* src = static_cast<const Src*>(table.src[work.slot]) + work.start;
    int64_t vector_end = 0;
    if (aligned16(src)) {
      vector_end = work.n - work.n % kVec;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vector_end; i += kThreads * kVec) {
        const Pack<Src, kVec> s = *reinterpret_cast<const Pack<Src, kVec>*>(src + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float value = to_float(s.v[k]);
          sum += value * value;
        }
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < work.n; i += kThreads) {
      const float value = to_float(src[i]);
      sum += value * value;
    }
    total += sum;
  }
  const float block_total = block_sum(static_cast<float>(total));
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = block_total;
  }
}

__global__ void coefficient_kernel(
    const float* sum_sq, const float* inv_scale_ptr, float inv_scale_value, bool has_max_norm,
    float max_norm, const float* found_inf, float* total_norm, float* scratch) {
  const float inv_scale = inv_scale_ptr != nullptr ? *inv_scale_ptr : inv_scale_value;
  const FinalizeCoefficient result = finalize_coefficient(*sum_sq, inv_scale, has_max_norm, max_norm);
  *total_norm = result.total_norm;
  scratch[kCoef] = result.coef;
  scratch[kSkip] = found_inf != nullptr && *found_inf != 0.0f ? 1.0f : 0.0f;
}

// The seed of a stochastic scaling pass: read on the device when seed_ptr is set (no
// host synchronisation, capturable in a CUDA graph).
struct ScaleSeed {
  const int64_t* seed_ptr;
  int64_t seed_value;
};

// dst <- cast(src * coef), rounded to nearest, or with kStochastic (16-bit Dst) by the
// random bits of (seed, tensor index, element index), as accumulate_ rounds.
template <typename Src, typename Dst, bool kStochastic>
__global__ void __launch_bounds__(kThreads) scale_kernel(
    TensorTable table, const float* scratch, bool in_place, ScaleSeed seed) {
  const float coef = scratch[kCoef];
  if (scratch[kSkip] != 0.0f || (in_place && coef == 1.0f)) {
    return;  // found_inf: write nothing; x * 1 == x: nothing to write
  }
  PhiloxKey key{0u, 0u};
  if constexpr (kStochastic) {
    key = philox_key(static_cast<uint64_t>(seed.seed_ptr != nullptr ? *seed.seed_ptr : seed.seed_value));
  }
  constexpr int kVec = kVecWidth<Src, Dst>;
  static_assert(!kStochastic || kVec % 8 == 0, "a vector step covers whole Philox blocks");
  const int64_t chunks = total_chunks(table);
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const ChunkWork work = chunk_work(table, chunk);
    const Src* src = static_cast<const Src*>(table.src[work.slot]) + work.start;
    Dst* dst = static_cast<Dst*>(table.dst[work.slot]) + work.start;
    int64_t vector_end = 0;
    if (aligned16(src) && aligned16(dst)) {
      vector_end = work.n - work.n % kVec;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vector_end; i += kThreads * kVec) {
        const Pack<Src, kVec> s = *reinterpret_cast<const Pack<Src, kVec>*>(src + i);
        Pack<Dst, kVec> d;
        if constexpr (kStochastic) {
          // Chunks start at multiples of kChunkElements: element start + i + k takes
          // stochastic_word(block (start + i) / 8 + k / 8, k % 8).
          const auto first_block = static_cast<uint64_t>(work.start + i) / 8;
#pragma unroll
          for (int b = 0; b < kVec / 8; ++b) {
            const PhiloxBlock words = stochastic_block(key, table.index[work.slot], first_block + b);
#pragma unroll
            for (int w = 0; w < 8; ++w) {
              d.v[8 * b + w] = stochastic_from_float<Dst>(to_float(s.v[8 * b + w]) * coef, stochastic_word(words, w));
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            d.v[k] = scaled_element<Dst>(s.v[k], coef);
          }
        }
        store_pack(dst + i, d);
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < work.n; i += kThreads) {
      if constexpr (kStochastic) {
        const auto element = static_cast<uint64_t>(work.start + i);
        const PhiloxBlock words = stochastic_block(key, table.index[work.slot], element / 8);
        dst[i] = stochastic_from_float<Dst>(to_float(src[i]) * coef, stochastic_word(words, static_cast<int>(element % 8)));
      } else {
        dst[i] = scaled_element<Dst>(src[i], coef);
      }
    }
  }
}

at::Tensor finalize_cuda(
    at::TensorList acc, double inv_scale, const std::optional<at::Tensor>& inv_scale_tensor,
    std::optional<double> max_norm, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& norm_sq, at::TensorList out, bool stochastic_rounding, int64_t seed,
    const std::optional<at::Tensor>& seed_tensor) {
  check_finalize_args(acc, inv_scale_tensor, max_norm, found_inf, norm_sq, out, seed_tensor);
  TORCH_CHECK_VALUE(!acc.empty() && acc[0].is_cuda(), "the cuda backend needs CUDA tensors in acc");
  const c10::cuda::CUDAGuard guard(acc[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions fp32 = acc[0].options().dtype(at::kFloat);
  at::Tensor scratch = at::empty({kScratchSize}, fp32);
  at::Tensor total_norm = at::empty({}, fp32);
  float* scratch_ptr = scratch.data_ptr<float>();

  const float* sum_sq = nullptr;
  if (norm_sq.has_value()) {
    sum_sq = norm_sq->const_data_ptr<float>();
  } else {
    at::Tensor partials = at::empty({std::max<int64_t>(max_total_blocks(acc), 1)}, fp32);
    float* block_sums = partials.data_ptr<float>();
    const DtypeGroups groups = group_by_dtypes(acc, acc);
    int64_t blocks_used = 0;
    for (int k = 0; k < kNumScalarKinds; ++k) {
      with_kind(k, [&](auto src_tag) {
        using Src = decltype(src_tag);
        for_each_launch(groups.members[k][k], {}, acc, blocks_used,
                        [&](const TensorTable& table, int n_blocks, int64_t first_block) {
          sum_squares_kernel<Src><<<n_blocks, kThreads, 0, stream>>>(table, block_sums + first_block);
        });
      });
    }
    sum_partials(block_sums, blocks_used, scratch_ptr + kSumSq, /*accumulate=*/false, stream);
    sum_sq = scratch_ptr + kSumSq;
  }

  coefficient_kernel<<<1, 1, 0, stream>>>(
      sum_sq, inv_scale_tensor.has_value() ? inv_scale_tensor->const_data_ptr<float>() : nullptr,
      static_cast<float>(inv_scale), max_norm.has_value(), static_cast<float>(max_norm.value_or(0.0)),
      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr,
      total_norm.data_ptr<float>(), scratch_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool in_place = out.empty();
  const at::TensorList dst = in_place ? acc : out;
  const ScaleSeed scale_seed{seed_tensor.has_value() ? seed_tensor->const_data_ptr<int64_t>() : nullptr, seed};
  const DtypeGroups groups = group_by_dtypes(acc, dst);
  int64_t blocks_used = 0;
  for (int s = 0; s < kNumScalarKinds; ++s) {
    for (int d = 0; d < kNumScalarKinds; ++d) {
      with_kind(s, [&](auto src_tag) {
        with_kind(d, [&](auto dst_tag) {
          using Src = decltype(src_tag);
          using Dst = decltype(dst_tag);
          for_each_launch(groups.members[s][d], dst, acc, blocks_used,
                          [&](const TensorTable& table, int n_blocks, int64_t) {
            // fp32 results are stored as computed: stochastic rounding leaves them alone.
            if constexpr (!std::is_same_v<Dst, float>) {
              if (stochastic_rounding) {
                scale_kernel<Src, Dst, true><<<n_blocks, kThreads, 0, stream>>>(table, scratch_ptr, in_place,
                                                                                scale_seed);
                return;
              }
            }
            scale_kernel<Src, Dst, false><<<n_blocks, kThreads, 0, stream>>>(table, scratch_ptr, in_place,
                                                                             scale_seed);
          });
        });
      });
    }
  }
  return total_norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CUDA, m) {
  m.impl("_finalize_native_", &finalize_cuda);
}

}  // namespace mbfused::cuda
