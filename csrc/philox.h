// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2,
// 3", SC'11; Random123's philox4x32_10), for host and device code: the counter-based
// generator behind stochastic rounding. The word layout is defined once, in
// mbfused/reference.py (stochastic_bits); the Triton kernels use tl.philox, which
// computes the same function.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mbfused {

struct PhiloxKey {
  uint32_t lo;  // seed mod 2^32
  uint32_t hi;  // seed >> 32
};

C10_HOST_DEVICE inline PhiloxKey philox_key(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

struct PhiloxBlock {
  uint32_t word[4];
};

C10_HOST_DEVICE inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

C10_HOST_DEVICE inline PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 PhiloxKey key) {
  uint32_t k0 = key.lo;
  uint32_t k1 = key.hi;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// The Philox block of elements 8b .. 8b+7 of tensor `tensor` of a call: element e
// rounds with stochastic_word(block e / 8, e % 8).
C10_HOST_DEVICE inline PhiloxBlock stochastic_block(PhiloxKey key, uint64_t tensor, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(tensor), static_cast<uint32_t>(tensor >> 32), key);
}

// The random word of the element at position `lane` (0 .. 7) of its block: 16 random
// bits, half lane % 2 (0: low) of word lane / 2, in the high half of the word.
C10_HOST_DEVICE inline uint32_t stochastic_word(const PhiloxBlock& block, int lane) {
  return (block.word[lane / 2] >> (16 * (lane % 2))) << 16;
}

}  // namespace mbfused
