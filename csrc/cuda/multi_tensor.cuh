// Multi-tensor apply for the CUDA backends, after Apex's and ATen's MultiTensorApply.
//
// The host groups tensors by dtype pair and packs each group's chunks into launches
// (launch_plan.h). A launch carries its pointer table and block -> (tensor, chunk) map in
// the kernel arguments, so a dtype group costs one launch (more only when a table fills).
// Reductions write one partial per block and are summed by one more block in a fixed
// order: no float atomics, so two runs give bit-identical results.
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
// Table sizes keep the kernel arguments under the classic 4 KB limit:
// 96 * (8 + 8 + 8) + 320 * (1 + 4) = 3904 bytes, plus a few scalars.
constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;

// Pointer table of one launch: per tensor a destination (may be null for pure
// reductions) and a source, and per block its tensor slot and chunk number.
struct TensorTable {
  void* dst[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint8_t block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorTable) + 64 <= 4096, "kernel arguments exceed 4 KB");

// The chunk this block works on.
struct BlockWork {
  int slot;
  int64_t start;  // first element of the chunk within its tensor
  int64_t n;      // elements in the chunk
};

__device__ inline BlockWork block_work(const TensorTable& table) {
  const int slot = table.block_slot[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkElements;
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

// Number of blocks all launches over `tensors` use (one per chunk).
int64_t total_blocks(at::TensorList tensors);

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
// launch(table, number_of_blocks, index_of_first_block_over_all_launches).
template <typename LaunchFn>
void for_each_launch(const std::vector<int64_t>& members, at::TensorList dst, at::TensorList src,
                     int64_t& blocks_used, LaunchFn&& launch) {
  std::vector<int64_t> numels;
  numels.reserve(members.size());
  for (int64_t t : members) {
    numels.push_back(src[t].numel());
  }
  for (const Launch& plan : plan_launches(numels, kChunkElements, kMaxTensors, kMaxBlocks)) {
    TensorTable table;
    for (size_t s = 0; s < plan.tensors.size(); ++s) {
      const int64_t t = members[plan.tensors[s]];
      table.dst[s] = dst.empty() ? nullptr : dst[t].data_ptr();
      table.src[s] = src[t].const_data_ptr();
      table.numel[s] = src[t].numel();
    }
    const auto blocks = static_cast<int>(plan.block_slot.size());
    for (int b = 0; b < blocks; ++b) {
      table.block_slot[b] = static_cast<uint8_t>(plan.block_slot[b]);
      table.block_chunk[b] = static_cast<int32_t>(plan.block_chunk[b]);
    }
    launch(table, blocks, blocks_used);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks_used += blocks;
  }
}

}  // namespace mbfused::cuda
