// Multi-tensor apply for the CUDA backends, after Apex's and ATen's MultiTensorApply.
//
// The host groups tensors by dtype pair and packs each group into launches of up to
// kMaxTensors whole tensors (launch_plan.h). A launch carries its pointer table and the
// per-tensor chunk prefix sums in the kernel arguments (under the classic 4 KB limit);
// a fixed grid of blocks strides over the launch's chunks and finds each chunk's tensor
// by a binary search over the prefix sums. So a dtype group of up to 96 tensors is one
// launch whatever their sizes (ATen's per-block map needs a launch per 320 chunks:
// nine for a 168M-element list). Reductions write one partial per block and are summed
// by one more block in a fixed order: no float atomics, so two runs give bit-identical
// results.
#pragma once

#include "accumulate_math.h"
#include "launch_plan.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace mbfused::cuda {

constexpr int64_t kChunkElements = 64 * 1024;
constexpr int kThreads = 512;
constexpr int kBlocksPerSm = 4;  // 4 x 512 threads fill an SM of A100 / H100
// 96 * (8 + 8 + 8 + 8) + 8 = 3080 bytes of kernel arguments for the table.
constexpr int kMaxTensors = 96;

// Pointer table of one launch: per tensor a destination (null for pure reductions), a
// source, its size and the inclusive prefix sum of chunk counts.
struct TensorTable {
  void* dst[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_end[kMaxTensors];
  int64_t slots;
};
static_assert(sizeof(TensorTable) + 128 <= 4096, "kernel arguments exceed 4 KB");

// One chunk of a launch: its table slot and element range within that tensor.
struct ChunkWork {
  int slot;
  int64_t start;
  int64_t n;
};

__device__ inline int64_t total_chunks(const TensorTable& table) {
  return table.chunk_end[table.slots - 1];
}

__device__ inline ChunkWork chunk_work(const TensorTable& table, int64_t chunk) {
  const auto slot = static_cast<int>(find_slot(table.chunk_end, table.slots, chunk));
  const int64_t first = slot == 0 ? 0 : table.chunk_end[slot - 1];
  const int64_t start = (chunk - first) * kChunkElements;
  const int64_t remaining = table.numel[slot] - start;
  return {slot, start, remaining < kChunkElements ? remaining : kChunkElements};
}

// N elements loaded or stored with one instruction when aligned (16 bytes for fp32 x 4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 128-bit access of the wider of two element types.
template <typename A, typename B>
constexpr int kVecWidth = 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));

__device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Block-wide sum of one float per thread (kThreads threads); valid in thread 0.
__device__ inline float block_sum(float value) {
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

// Sums `count` per-block partials in a fixed order (fp64) on `stream`; adds the sum to
// *result, or stores it there when `accumulate` is false.
void sum_partials(const float* partials, int64_t count, float* result, bool accumulate,
                  cudaStream_t stream);

// Tensor indices grouped by (kind of a[i], kind of b[i]), each group in list order.
struct DtypeGroups {
  std::vector<int64_t> members[kNumScalarKinds][kNumScalarKinds];
};
DtypeGroups group_by_dtypes(at::TensorList a, at::TensorList b);

int kind_index(at::ScalarType dtype);

// Blocks per launch: enough to fill the current device, never more than its chunks.
int grid_size(int64_t chunks);

// Upper bound on the blocks all launches over `tensors` use (for partials buffers).
int64_t max_total_blocks(at::TensorList tensors);

// Calls f(T{}) with T the C++ type of scalar kind `kind` (float, BFloat16, Half).
template <typename F>
void with_kind(int kind, F&& f) {
  switch (static_cast<ScalarKind>(kind)) {
    case ScalarKind::kFloat: return f(float{});
    case ScalarKind::kBFloat16: return f(c10::BFloat16{});
    case ScalarKind::kHalf: return f(c10::Half{});
  }
}

// Plans the launches over tensors `members` (indices into the lists), fills each
// launch's table (dst may be empty: no destination) and calls
// launch(table, blocks, index of the launch's first block over all launches).
template <typename LaunchFn>
void for_each_launch(const std::vector<int64_t>& members, at::TensorList dst, at::TensorList src,
                     int64_t& blocks_used, LaunchFn&& launch) {
  std::vector<int64_t> numels;
  numels.reserve(members.size());
  for (int64_t t : members) {
    numels.push_back(src[t].numel());
  }
  for (const Launch& plan : plan_launches(numels, kChunkElements, kMaxTensors)) {
    TensorTable table;
    table.slots = static_cast<int64_t>(plan.tensors.size());
    for (size_t s = 0; s < plan.tensors.size(); ++s) {
      const int64_t t = members[plan.tensors[s]];
      table.dst[s] = dst.empty() ? nullptr : dst[t].data_ptr();
      table.src[s] = src[t].const_data_ptr();
      table.numel[s] = src[t].numel();
      table.chunk_end[s] = plan.chunk_end[s];
    }
    const int blocks = grid_size(plan.total_chunks());
    launch(table, blocks, blocks_used);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks_used += blocks;
  }
}

}  // namespace mbfused::cuda
