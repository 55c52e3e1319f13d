// Helpers shared by the header-only kernels. No PyTorch headers here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// N elements of T viewed as 16-byte (or 8-byte) words, for vector loads and
// stores without type-punned pointer casts.
template <typename T, int N, typename Word>
union Packed {
  static_assert(sizeof(T) * N == sizeof(Word), "a packed vector fills its word");
  Word word;
  T elems[N];
};

// Plain (weak) 16- and 8-byte global stores. A uint4 assignment is copied
// member-wise by the front end (four 4-byte stores) and __stwb is a strong
// store, so the vector store is spelled out.
DFLASH_DEVICE void store_16B(void* ptr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
#else
#if defined(DFLASH_HOST_EMULATION)
  emu::check_vector_alignment(ptr, 16);
#endif
  const uint32_t w[4] = {a, b, c, d};
  std::memcpy(ptr, w, sizeof(w));
#endif
}

DFLASH_DEVICE void store_8B(void* ptr, uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(ptr), "r"(a), "r"(b) : "memory");
#else
#if defined(DFLASH_HOST_EMULATION)
  emu::check_vector_alignment(ptr, 8);
#endif
  const uint32_t w[2] = {a, b};
  std::memcpy(ptr, w, sizeof(w));
#endif
}

#if defined(__CUDACC__) && !defined(DFLASH_HOST_EMULATION)
// The block's dynamic shared memory (sized at launch).
template <typename T>
DFLASH_DEVICE T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char dflash_dynamic_smem[];
  return reinterpret_cast<T*>(dflash_dynamic_smem);
}
#endif

}  // namespace dflash
