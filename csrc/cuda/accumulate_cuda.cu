// accumulate_ on CUDA tensors: multi-tensor apply.
//
// The host groups tensors by (acc dtype, grad dtype) and packs each group's chunks into
// launches (launch_plan.h). A launch carries its pointer table and block -> (tensor,
// chunk) map in the kernel arguments, so a whole dtype group costs one launch (more only
// when a table fills up). Blocks use 128-bit loads/stores when their tensors are 16-byte
// aligned, a scalar loop otherwise. The squared norm is reduced per block into a
// partials buffer and summed by one more block in a fixed order: no float atomics, so
// two runs give bit-identical norms.
#include "accumulate_math.h"
#include "checks.h"
#include "launch_plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace mbfused::cuda {
namespace {

constexpr int64_t kChunkElements = 64 * 1024;
constexpr int kThreads = 512;
// Table sizes keep the kernel arguments under the classic 4 KB limit:
// 96 * (8 + 8 + 8) + 320 * (1 + 4) + scalars = 3904 + 40 bytes.
constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;

struct TensorTable {
  void* acc[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint8_t block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorTable) + 64 <= 4096, "kernel arguments exceed 4 KB");

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Block-wide sum of one float per thread (kThreads threads); valid in thread 0.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

template <typename Acc, typename Grad>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(
    TensorTable table, const float* scale_ptr, float scale_value, bool overwrite,
    float* found_inf, float* block_norms) {
  const int slot = table.block_slot[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t remaining = table.numel[slot] - start;
  const int64_t n = remaining < kChunkElements ? remaining : kChunkElements;
  Acc* acc = static_cast<Acc*>(table.acc[slot]) + start;
  const Grad* grad = static_cast<const Grad*>(table.grad[slot]) + start;
  const float scale = scale_ptr != nullptr ? *scale_ptr : scale_value;

  bool nonfinite = false;
  float norm_sq = 0.0f;
  constexpr int kVec = 16 / (sizeof(Acc) > sizeof(Grad) ? sizeof(Acc) : sizeof(Grad));
  const bool aligned = reinterpret_cast<uintptr_t>(acc) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  int64_t vector_end = 0;
  if (aligned) {
    vector_end = n - n % kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vector_end; i += kThreads * kVec) {
      Pack<Acc, kVec> a = *reinterpret_cast<const Pack<Acc, kVec>*>(acc + i);
      const Pack<Grad, kVec> g = *reinterpret_cast<const Pack<Grad, kVec>*>(grad + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float stored = accumulate_element(a.v[k], g.v[k], scale, overwrite, nonfinite);
        norm_sq += stored * stored;
      }
      *reinterpret_cast<Pack<Acc, kVec>*>(acc + i) = a;
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
    Acc a = acc[i];
    const float stored = accumulate_element(a, grad[i], scale, overwrite, nonfinite);
    acc[i] = a;
    norm_sq += stored * stored;
  }

  if (found_inf != nullptr && __syncthreads_or(nonfinite) && threadIdx.x == 0) {
    *found_inf = 1.0f;  // racy but safe: every writer writes the same value
  }
  if (block_norms != nullptr) {
    const float block_total = block_sum(norm_sq);
    if (threadIdx.x == 0) {
      block_norms[blockIdx.x] = block_total;
    }
  }
}

// Sums the per-block partials in a fixed order (fp64) and adds the result to norm_sq.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const float* partials, int64_t count, float* norm_sq) {
  __shared__ double sums[kThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    sum += partials[i];
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      sums[threadIdx.x] += sums[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *norm_sq += static_cast<float>(sums[0]);
  }
}

template <typename Acc, typename Grad>
void launch_group(
    const std::vector<int64_t>& members, at::TensorList acc, at::TensorList grads,
    const float* scale_ptr, float scale_value, bool overwrite, float* found_inf,
    float* block_norms, int64_t& blocks_used, cudaStream_t stream) {
  std::vector<int64_t> numels;
  numels.reserve(members.size());
  for (int64_t t : members) {
    numels.push_back(acc[t].numel());
  }
  for (const Launch& launch : plan_launches(numels, kChunkElements, kMaxTensors, kMaxBlocks)) {
    TensorTable table;
    for (size_t s = 0; s < launch.tensors.size(); ++s) {
      const int64_t t = members[launch.tensors[s]];
      table.acc[s] = acc[t].data_ptr();
      table.grad[s] = grads[t].const_data_ptr();
      table.numel[s] = acc[t].numel();
    }
    const auto blocks = static_cast<int>(launch.block_slot.size());
    for (int b = 0; b < blocks; ++b) {
      table.block_slot[b] = static_cast<uint8_t>(launch.block_slot[b]);
      table.block_chunk[b] = static_cast<int32_t>(launch.block_chunk[b]);
    }
    accumulate_kernel<Acc, Grad><<<blocks, kThreads, 0, stream>>>(
        table, scale_ptr, scale_value, overwrite, found_inf,
        block_norms != nullptr ? block_norms + blocks_used : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks_used += blocks;
  }
}

int kind_index(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return static_cast<int>(ScalarKind::kBFloat16);
    case at::kHalf: return static_cast<int>(ScalarKind::kHalf);
    default: return static_cast<int>(ScalarKind::kFloat);
  }
}

template <typename Acc>
void launch_for_acc(int grad_kind, const std::vector<int64_t>& members, at::TensorList acc,
                    at::TensorList grads, const float* scale_ptr, float scale_value, bool overwrite,
                    float* found_inf, float* block_norms, int64_t& blocks_used, cudaStream_t stream) {
  switch (static_cast<ScalarKind>(grad_kind)) {
    case ScalarKind::kFloat:
      return launch_group<Acc, float>(members, acc, grads, scale_ptr, scale_value, overwrite,
                                      found_inf, block_norms, blocks_used, stream);
    case ScalarKind::kBFloat16:
      return launch_group<Acc, c10::BFloat16>(members, acc, grads, scale_ptr, scale_value,
                                              overwrite, found_inf, block_norms, blocks_used, stream);
    case ScalarKind::kHalf:
      return launch_group<Acc, c10::Half>(members, acc, grads, scale_ptr, scale_value, overwrite,
                                          found_inf, block_norms, blocks_used, stream);
  }
}

void accumulate_cuda(
    at::TensorList acc, at::TensorList grads, double scale,
    const std::optional<at::Tensor>& scale_tensor, bool overwrite,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sq) {
  check_accumulate_args(acc, grads, scale_tensor, found_inf, norm_sq);
  if (acc.empty()) {
    return;
  }
  TORCH_CHECK_VALUE(acc[0].is_cuda(), "the cuda backend needs CUDA tensors; acc[0] is on ", acc[0].device());
  const c10::cuda::CUDAGuard guard(acc[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Tensors grouped by (acc dtype, grad dtype), each group in list order.
  std::vector<int64_t> groups[kNumScalarKinds][kNumScalarKinds];
  int64_t total_blocks = 0;
  for (size_t i = 0; i < acc.size(); ++i) {
    groups[kind_index(acc[i].scalar_type())][kind_index(grads[i].scalar_type())].push_back(i);
    total_blocks += (acc[i].numel() + kChunkElements - 1) / kChunkElements;
  }
  at::Tensor partials;
  float* block_norms = nullptr;
  if (norm_sq.has_value() && total_blocks > 0) {
    partials = at::empty({total_blocks}, acc[0].options().dtype(at::kFloat));
    block_norms = partials.data_ptr<float>();
  }
  const float* scale_ptr = scale_tensor.has_value() ? scale_tensor->const_data_ptr<float>() : nullptr;
  float* found_inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;

  int64_t blocks_used = 0;
  for (int a = 0; a < kNumScalarKinds; ++a) {
    for (int g = 0; g < kNumScalarKinds; ++g) {
      const std::vector<int64_t>& members = groups[a][g];
      if (members.empty()) {
        continue;
      }
      const auto fs = static_cast<float>(scale);
      switch (static_cast<ScalarKind>(a)) {
        case ScalarKind::kFloat:
          launch_for_acc<float>(g, members, acc, grads, scale_ptr, fs, overwrite, found_inf_ptr,
                                block_norms, blocks_used, stream);
          break;
        case ScalarKind::kBFloat16:
          launch_for_acc<c10::BFloat16>(g, members, acc, grads, scale_ptr, fs, overwrite,
                                        found_inf_ptr, block_norms, blocks_used, stream);
          break;
        case ScalarKind::kHalf:
          launch_for_acc<c10::Half>(g, members, acc, grads, scale_ptr, fs, overwrite, found_inf_ptr,
                                    block_norms, blocks_used, stream);
          break;
      }
    }
  }
  if (block_norms != nullptr) {
    sum_partials_kernel<<<1, kThreads, 0, stream>>>(block_norms, blocks_used, norm_sq->data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mbfused, CUDA, m) {
  m.impl("_accumulate_native_", &accumulate_cuda);
}

}  // namespace mbfused::cuda
