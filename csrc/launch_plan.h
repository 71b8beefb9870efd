// Host-side planning of multi-tensor work: how tensors are cut into chunks and how
// they are packed into kernel launches. Plain C++ (no CUDA), so the CPU kernels use it
// directly and tests check the CUDA launch plan on machines without a GPU.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define MBFUSED_HOST_DEVICE __host__ __device__
#else
#define MBFUSED_HOST_DEVICE
#endif

namespace mbfused {

// The table slot that owns chunk `chunk` of a launch: the first slot whose chunk_end
// exceeds it. Shared by the CUDA kernels and the host-side test hook.
MBFUSED_HOST_DEVICE inline int64_t find_slot(const int64_t* chunk_end, int64_t slots, int64_t chunk) {
  int64_t lo = 0;
  int64_t hi = slots - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_end[mid] > chunk) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// A contiguous piece [start, start + length) of one tensor of the op's list.
struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t length;
};

// Cuts every tensor into chunks of `chunk_size` elements (the last one shorter), in
// list order. Zero-size tensors contribute no chunk.
std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels, int64_t chunk_size);

// One launch of a multi-tensor kernel: a pointer table of at most `max_tensors`
// whole tensors. Its chunks are numbered 0..total_chunks-1 in table order; slot s owns
// chunks [chunk_end[s-1], chunk_end[s]) (chunk_end[-1] = 0), so a block finds the
// tensor and offset of any chunk by a binary search over chunk_end.
struct Launch {
  std::vector<int64_t> tensors;    // slot -> index into the op's tensor lists
  std::vector<int64_t> chunk_end;  // slot -> one past its last chunk (inclusive prefix sum)
  int64_t total_chunks() const { return chunk_end.empty() ? 0 : chunk_end.back(); }
};

// Packs the non-empty tensors, in list order, into launches of at most `max_tensors`
// tensors each. A launch has no block limit (blocks stride over its chunks), so a
// dtype group of up to `max_tensors` tensors is one launch whatever their sizes.
std::vector<Launch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                  int64_t max_tensors);

// The chunk `chunk` of a launch, located as the kernels do it (find_slot): its table
// slot, first element and length.
struct LocatedChunk {
  int64_t slot;
  int64_t start;
  int64_t length;
};
LocatedChunk locate_chunk(const Launch& launch, const std::vector<int64_t>& numels,
                          int64_t chunk_size, int64_t chunk);

}  // namespace mbfused
