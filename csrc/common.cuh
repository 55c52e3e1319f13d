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
#define DFLASH_DEVICE inline
#define DFLASH_UNROLL
#endif

namespace dflash {

constexpr int kWarpSize = 32;

DFLASH_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// N elements of T viewed as 16-byte (or 8-byte) words, for vector loads and
// stores without type-punned pointer casts.
template <typename T, int N, typename Word>
union Packed {
  static_assert(sizeof(T) * N == sizeof(Word), "a packed vector fills its word");
  Word word;
  T elems[N];
};

#if defined(__CUDACC__) && !defined(DFLASH_HOST_EMULATION)
// The block's dynamic shared memory (sized at launch).
template <typename T>
DFLASH_DEVICE T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char dflash_dynamic_smem[];
  return reinterpret_cast<T*>(dflash_dynamic_smem);
}
#endif

}  // namespace dflash
