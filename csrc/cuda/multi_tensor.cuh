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
#include <cstring>
#include <vector>

namespace mbfused::cuda {

constexpr int64_t kChunkElements = 64 * 1024;
constexpr int kThreads = 512;
constexpr int kBlocksPerSm = 4;  // 4 x 512 threads fill an SM of A100 / H100
// 96 * (8 + 8 + 8 + 8 + 8) + 8 = 3848 bytes of kernel arguments for the table.
constexpr int kMaxTensors = 96;

// Pointer table of one launch: per tensor a destination (null for pure reductions), a
// source, its size, the inclusive prefix sum of chunk counts and its index in the op's
// lists (stochastic rounding keys its random numbers by it).
struct TensorTable {
  void* dst[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_end[kMaxTensors];
  int64_t index[kMaxTensors];
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

// N elements moved by 128-bit loads and stores when 16-byte aligned: one instruction for
// 16 bytes (fp32 x 4, bf16 x 8), two for 32 (fp32 x 8). Aligned to at most 16 bytes, as
// that is all the vector paths check.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Stores a pack as whole 128-bit words. In finalize's scaling loop nvcc 13.0 splits a
// plain 16-byte store (of a Pack, a float4 or a uint4 alike) into four 32-bit stores on
// sm_80 and sm_90, while the same store in accumulate_kernel stays whole (SASS, tested
// in tests/test_cuda_sass.py); PTX's st.global.v4 is one instruction whatever the loop.
template <typename T, int N>
__device__ inline void store_pack(T* dst, const Pack<T, N>& pack) {
  static_assert(sizeof(pack) % 16 == 0, "a pack is whole 128-bit words");
  constexpr int kWords = sizeof(pack) / 16;
  uint4 words[kWords];
  memcpy(words, &pack, sizeof(pack));
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<uint4*>(dst) + w),
        "r"(words[w].x), "r"(words[w].y), "r"(words[w].z), "r"(words[w].w)
        : "memory");
  }
}

// Elements per vector step over two element types: 16 bytes of the narrower, so that
// both sides move whole 128-bit words (fp32 += bf16: 8 elements, two 128-bit accesses
// of the fp32 side and one of the bf16 side; with 4 the bf16 side would move 64 bits).
template <typename A, typename B>
constexpr int kVecWidth = 16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));

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
      table.index[s] = t;
    }
    const int blocks = grid_size(plan.total_chunks());
    launch(table, blocks, blocks_used);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks_used += blocks;
  }
}

}  // namespace mbfused::cuda
