// Helpers shared by the header-only kernels. No PyTorch headers here.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DFLASH_HD __host__ __device__ __forceinline__
#define DFLASH_DEVICE __device__ __forceinline__
#define DFLASH_UNROLL _Pragma("unroll")
#else
// Host-only builds (tests compile philox.cuh with g++).
#define DFLASH_HD inline
#define DFLASH_UNROLL
#endif

namespace dflash {

constexpr int kWarpSize = 32;

DFLASH_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dflash
