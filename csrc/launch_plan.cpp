#include "launch_plan.h"

#include <stdexcept>

namespace mbfused {

std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels, int64_t chunk_size) {
  if (chunk_size <= 0) {
    throw std::invalid_argument("chunk_size must be positive");
  }
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t start = 0; start < numels[t]; start += chunk_size) {
      const int64_t remaining = numels[t] - start;
      chunks.push_back({t, start, remaining < chunk_size ? remaining : chunk_size});
    }
  }
  return chunks;
}

std::vector<Launch> plan_launches(
    const std::vector<int64_t>& numels, int64_t chunk_size, int64_t max_tensors,
    int64_t max_blocks) {
  if (max_tensors <= 0 || max_blocks <= 0) {
    throw std::invalid_argument("max_tensors and max_blocks must be positive");
  }
  std::vector<Launch> launches;
  Launch current;
  auto flush = [&]() {
    if (!current.block_slot.empty()) {
      launches.push_back(std::move(current));
    }
    current = Launch{};
  };
  for (const Chunk& chunk : split_into_chunks(numels, chunk_size)) {
    const bool same_tensor = !current.tensors.empty() && current.tensors.back() == chunk.tensor;
    const bool table_full = !same_tensor && static_cast<int64_t>(current.tensors.size()) == max_tensors;
    const bool blocks_full = static_cast<int64_t>(current.block_slot.size()) == max_blocks;
    if (table_full || blocks_full) {
      flush();
    }
    if (current.tensors.empty() || current.tensors.back() != chunk.tensor) {
      current.tensors.push_back(chunk.tensor);
    }
    current.block_slot.push_back(static_cast<int32_t>(current.tensors.size() - 1));
    current.block_chunk.push_back(chunk.start / chunk_size);
  }
  flush();
  return launches;
}

}  // namespace mbfused
