// Counter-based noise shared by every backend (docs/DESIGN.md, "Noise"):
// Philox-4x32-10 keyed by the request seed, counter (vocab id, position, stream).
// Header-only and free of PyTorch so that engines can include it, and host-
// compilable (g++) so that tests can check it bit for bit against noise.py.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dflash {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Stream ids of the counter's last word.
constexpr uint32_t kStreamGumbel = 0u;
constexpr uint32_t kStreamAccept = 1u;

DFLASH_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t w[4];
};

// Philox-4x32-10 (Salmon et al. 2011): ten rounds, key bumped between rounds.
DFLASH_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t k0, uint32_t k1) {
  DFLASH_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi_u32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi_u32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    if (round < 9) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Philox words for (seed, position, vocab id, stream) as DESIGN.md keys them:
// key = the seed's two's-complement halves, counter = (id, pos lo, pos hi, stream).
DFLASH_HD Philox4 philox_keyed(int64_t seed, int64_t position, uint32_t vocab_id,
                               uint32_t stream) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t p = static_cast<uint64_t>(position);
  return philox4x32_10(vocab_id, static_cast<uint32_t>(p), static_cast<uint32_t>(p >> 32), stream,
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// u = (2 * (r0 >> 9) + 1) * 2^-24, as dflash_kernels/noise.py: 23 random bits,
// so the odd numerator (< 2^24) and u are exact in fp32 and 2^-24 <= u <= 1 - 2^-24.
// (DESIGN.md's 24-bit form needs 25 significant bits and rounds to u = 1.)
DFLASH_HD float philox_uniform(uint32_t r0) {
  return static_cast<float>(2u * (r0 >> 9) + 1u) * 5.9604644775390625e-08f;
}

// g = -log(-log(u)) in fp32 with the IEEE logf (never build with --use_fast_math:
// __logf would change the noise).
DFLASH_HD float gumbel_from_uniform(float u) { return -logf(-logf(u)); }

DFLASH_HD float gumbel_noise(int64_t seed, int64_t position, uint32_t vocab_id) {
  return gumbel_from_uniform(
      philox_uniform(philox_keyed(seed, position, vocab_id, kStreamGumbel).w[0]));
}

}  // namespace dflash
