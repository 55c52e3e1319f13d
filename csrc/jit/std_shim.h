// The C++ standard library names that the kernel headers of csrc/ use, for
// NVRTC, which ships no standard library headers. dflash_kernels/cuda/_nvrtc.py
// hands this file to NVRTC as each of <cstdint>, <climits>, <cfloat>, <cmath>,
// <cstring>, <cstddef>, <initializer_list> and <type_traits>, so csrc/*.cuh and
// csrc/*.h compile unchanged. Types are spelled as glibc's LP64 headers spell
// them, so the kernels' mangled names equal the nvcc build's (int64_t is long).
// std::initializer_list is built into NVRTC; <cstring>'s memcpy appears only in
// the host branches of common.cuh, which NVRTC never compiles.
#ifndef DFLASH_NVRTC_STD_SHIM
#define DFLASH_NVRTC_STD_SHIM

#if !defined(__CUDACC_RTC__)
#error "std_shim.h is for NVRTC only (nvcc builds use the real standard headers)"
#endif

typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;
typedef decltype(sizeof(0)) size_t;
typedef decltype((int*)0 - (int*)0) ptrdiff_t;

#define INT32_MAX 2147483647
#define INT32_MIN (-INT32_MAX - 1)
#define INT64_MAX 9223372036854775807L
#define UINT32_MAX 4294967295U
#define INT_MAX 2147483647
#define INT_MIN (-INT_MAX - 1)
#define UINT_MAX 4294967295U
#define FLT_MAX 3.40282347e+38F
#define FLT_MIN 1.17549435e-38F
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)  // as math_constants.h CUDART_INF_F
#endif

namespace std {
using ::int8_t;
using ::int16_t;
using ::int32_t;
using ::int64_t;
using ::uint8_t;
using ::uint16_t;
using ::uint32_t;
using ::uint64_t;
using ::intptr_t;
using ::uintptr_t;
using ::size_t;
using ::ptrdiff_t;

// <type_traits>: what the kernels use.
template <bool B, class T, class F>
struct conditional { typedef T type; };
template <class T, class F>
struct conditional<false, T, F> { typedef F type; };
template <class T, class U>
struct is_same { static constexpr bool value = false; };
template <class T>
struct is_same<T, T> { static constexpr bool value = true; };
}  // namespace std

#endif  // DFLASH_NVRTC_STD_SHIM
