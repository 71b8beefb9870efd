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

std::vector<Launch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                  int64_t max_tensors) {
  if (chunk_size <= 0 || max_tensors <= 0) {
    throw std::invalid_argument("chunk_size and max_tensors must be positive");
  }
  std::vector<Launch> launches;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    if (numels[t] == 0) {
      continue;
    }
    if (launches.empty() || static_cast<int64_t>(launches.back().tensors.size()) == max_tensors) {
      launches.emplace_back();
    }
    Launch& launch = launches.back();
    const int64_t chunks = (numels[t] + chunk_size - 1) / chunk_size;
    launch.tensors.push_back(t);
    launch.chunk_end.push_back(launch.total_chunks() + chunks);
  }
  return launches;
}

LocatedChunk locate_chunk(const Launch& launch, const std::vector<int64_t>& numels,
                          int64_t chunk_size, int64_t chunk) {
  const int64_t lo = find_slot(launch.chunk_end.data(), static_cast<int64_t>(launch.chunk_end.size()), chunk);
  const int64_t first = lo == 0 ? 0 : launch.chunk_end[lo - 1];
  const int64_t start = (chunk - first) * chunk_size;
  const int64_t remaining = numels[launch.tensors[lo]] - start;
  return {lo, start, remaining < chunk_size ? remaining : chunk_size};
}

}  // namespace mbfused
