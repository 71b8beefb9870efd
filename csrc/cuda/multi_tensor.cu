#include "cuda/multi_tensor.cuh"

#include <atomic>

namespace mbfused::cuda {
namespace {

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const float* partials, int64_t count, float* result, bool accumulate) {
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
    const auto total = static_cast<float>(sums[0]);
    *result = accumulate ? *result + total : total;
  }
}

}  // namespace

void sum_partials(const float* partials, int64_t count, float* result, bool accumulate,
                  cudaStream_t stream) {
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials, count, result, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int kind_index(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return static_cast<int>(ScalarKind::kBFloat16);
    case at::kHalf: return static_cast<int>(ScalarKind::kHalf);
    default: return static_cast<int>(ScalarKind::kFloat);
  }
}

DtypeGroups group_by_dtypes(at::TensorList a, at::TensorList b) {
  DtypeGroups groups;
  for (size_t i = 0; i < a.size(); ++i) {
    groups.members[kind_index(a[i].scalar_type())][kind_index(b[i].scalar_type())].push_back(i);
  }
  return groups;
}

int grid_size(int64_t chunks) {
  // One cached SM count per device (cudaDeviceGetAttribute is cheap but not free);
  // atomic, as threads driving different devices may fill it at once.
  static std::atomic<int> sm_count[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < 64 ? sm_count[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) {
      sm_count[device].store(sms, std::memory_order_relaxed);
    }
  }
  const int64_t fill = static_cast<int64_t>(kBlocksPerSm) * sms;
  return static_cast<int>(chunks < fill ? chunks : fill);
}

int64_t max_total_blocks(at::TensorList tensors) {
  // Each launch has at most grid_size(its chunks) <= its chunks blocks.
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    chunks += (t.numel() + kChunkElements - 1) / kChunkElements;
  }
  return chunks;
}

}  // namespace mbfused::cuda
