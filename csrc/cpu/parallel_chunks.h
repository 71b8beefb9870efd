// The CPU backends' one parallel region: all chunks of all tensors of a call, split
// across the intra-op threads (at::parallel_for).
#pragma once

#include "launch_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mbfused::cpu {

// 32K elements: 128-320 KB of traffic per chunk, small enough to balance two to a few
// dozen threads over a Llama-style list, large enough that per-chunk costs vanish.
constexpr int64_t kChunkElements = 32 * 1024;

inline std::vector<Chunk> chunks_of(at::TensorList tensors) {
  std::vector<int64_t> numels(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    numels[i] = tensors[i].numel();
  }
  return split_into_chunks(numels, kChunkElements);
}

// Calls fn(index, chunk) for every chunk, in parallel.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      fn(c, chunks[c]);
    }
  });
}

// Address of element `offset` of a contiguous tensor.
inline void* element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.data_ptr()) + offset * t.element_size();
}

inline const void* const_element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}

}  // namespace mbfused::cpu
