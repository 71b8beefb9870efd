// Host-side planning of multi-tensor work: how tensors are cut into chunks and how
// chunks are packed into kernel launches. Plain C++ (no CUDA), so the CPU kernels use
// it directly and tests check the CUDA launch plan on machines without a GPU.
#pragma once

#include <cstdint>
#include <vector>

namespace mbfused {

// A contiguous piece [start, start + length) of one tensor of the op's list.
struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t length;
};

// Cuts every tensor into chunks of `chunk_size` elements (the last one shorter), in
// list order. Zero-size tensors contribute no chunk.
std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels, int64_t chunk_size);

// One kernel launch of a multi-tensor-apply kernel: a pointer table of at most
// `max_tensors` tensors and at most `max_blocks` blocks, each block one chunk.
struct Launch {
  std::vector<int64_t> tensors;      // table slot -> index into the op's tensor lists
  std::vector<int32_t> block_slot;   // block -> table slot
  std::vector<int64_t> block_chunk;  // block -> chunk number within its tensor
};

// Packs the chunks of all tensors into launches, starting a new launch when the
// pointer table or the block map is full. A tensor whose chunks span two launches
// appears in both tables.
std::vector<Launch> plan_launches(
    const std::vector<int64_t>& numels, int64_t chunk_size, int64_t max_tensors,
    int64_t max_blocks);

}  // namespace mbfused
