// The CPU backends' one parallel region: all chunks of all tensors of a call, split
// across the intra-op threads (at::parallel_for).
#pragma once

#include "launch_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
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

// How many chunks a thread takes at least: about kChunkElements elements' worth (torch's
// own grain, at::internal::GRAIN_SIZE), so that a call of fewer elements runs on the
// calling thread alone. A list of a few small tensors is a few microseconds of work;
// waking a second thread for it costs more, and a scheduler slice (milliseconds) when
// that thread's core is busy with other work (a data loader's, another process's).
inline int64_t chunks_per_thread(const std::vector<Chunk>& chunks) {
  int64_t elements = 0;
  for (const Chunk& chunk : chunks) {
    elements += chunk.length;
  }
  const auto count = static_cast<int64_t>(chunks.size());
  if (elements <= kChunkElements) {
    return count;  // at::parallel_for runs a range no longer than its grain serially
  }
  return std::max<int64_t>(1, count * kChunkElements / elements);
}

// Calls fn(index, chunk) for every chunk, in parallel when there is enough work.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunks_per_thread(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      fn(c, chunks[c]);
    }
  });
}

// Whether a call that writes `written` without reading them first (accumulate_'s
// overwrite, finalize_'s out=) stores them with non-temporal stores: from 4 MiB on, more
// than a core's L2 holds, so most would have left the cache before they are read again,
// and an ordinary store reads each line from memory before writing it (10 bytes per
// element of a bf16 gradient into fp32 instead of 6).
inline bool worth_streaming(at::TensorList written) {
  constexpr int64_t kStreamingBytes = 4 << 20;
  int64_t bytes = 0;
  for (const at::Tensor& t : written) {
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes >= kStreamingBytes;
}

// Address of element `offset` of a contiguous tensor.
inline void* element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.data_ptr()) + offset * t.element_size();
}

inline const void* const_element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}

}  // namespace mbfused::cpu
