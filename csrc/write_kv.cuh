// write_kv kernel (SPEC.md "inject_kv / write_kv"): per (token, layer, KV head)
// K RMSNorm, RoPE (neox or gptj, partial rotary_dim), fp8 quantization with
// saturation, and the scatter of K and V into the layer's paged cache.
// Header-only, no PyTorch.
//
// One group of D/8 lanes per (token, layer, head); each lane owns 8 adjacent
// elements, so a row moves as 16-byte loads and 16-byte (8-byte for fp8)
// stores. The normed K row is staged in shared memory for RoPE's partner
// elements, which live in another lane for neox.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_fp8.h>

#include "device.cuh"
#include "write_kv.h"

namespace dflash {
namespace writekv {

constexpr int kThreads = 256;
constexpr int kElems = 8;  // elements per lane

enum class CacheKind : int { kSame = 0, kE4M3 = 1, kE5M2 = 2 };

DFLASH_DEVICE float load_weight(const void* w, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(w)[offset]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[offset]);
    default: return static_cast<const float*>(w)[offset];
  }
}

DFLASH_DEVICE uint16_t bits_of(__half x) { return __half_as_ushort(x); }
DFLASH_DEVICE uint16_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// stored = sat(value / scale): round to nearest even, finite values saturate
// to the format's largest finite value (448 / 57344), NaN stays NaN.
template <CacheKind kKind>
DFLASH_DEVICE uint8_t quantize_fp8(float x, float scale) {
  const float q = __fdiv_rn(x, scale);
  constexpr __nv_fp8_interpretation_t kFormat = kKind == CacheKind::kE4M3 ? __NV_E4M3 : __NV_E5M2;
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, kFormat));
}

// Loads 8 contiguous elements of a row (16-byte vector when aligned).
template <typename T>
DFLASH_DEVICE void load8(const T* src, bool vectorized, T (&out)[kElems]) {
  if (vectorized) {
    Packed<T, kElems, uint4> pack;
    pack.word = __ldg(reinterpret_cast<const uint4*>(src));
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) out[e] = pack.elems[e];
  } else {
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) out[e] = src[e];
  }
}

// Stores 8 fp32 values in the cache format (activation dtype or fp8).
template <typename T, CacheKind kKind>
DFLASH_DEVICE void store8(void* dst, bool vectorized, const float (&x)[kElems], float scale) {
  if constexpr (kKind == CacheKind::kSame) {
    uint32_t words[kElems / 2];
    DFLASH_UNROLL
    for (int e = 0; e < kElems; e += 2) {
      words[e / 2] = static_cast<uint32_t>(bits_of(from_float<T>(x[e]))) |
                     (static_cast<uint32_t>(bits_of(from_float<T>(x[e + 1]))) << 16);
    }
    if (vectorized) {
      store_16B(dst, words[0], words[1], words[2], words[3]);
    } else {
      DFLASH_UNROLL
      for (int e = 0; e < kElems; ++e) {
        static_cast<uint16_t*>(dst)[e] = static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
      }
    }
  } else {
    uint8_t q[kElems];
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) q[e] = quantize_fp8<kKind>(x[e], scale);
    if (vectorized) {
      uint32_t words[2] = {0u, 0u};
      DFLASH_UNROLL
      for (int e = 0; e < kElems; ++e) words[e / 4] |= static_cast<uint32_t>(q[e]) << (8 * (e % 4));
      store_8B(dst, words[0], words[1]);
    } else {
      DFLASH_UNROLL
      for (int e = 0; e < kElems; ++e) static_cast<uint8_t*>(dst)[e] = q[e];
    }
  }
}

template <typename T, int D, CacheKind kKind>
__global__ void __launch_bounds__(kThreads) write_kv_kernel(const WriteKVParams p) {
  constexpr int kLanes = D / kElems;              // lanes per (token, layer, head)
  constexpr int kGroups = kThreads / kLanes;      // items per block
  using CacheT = typename std::conditional<kKind == CacheKind::kSame, T, uint8_t>::type;
  __shared__ float staged[kGroups][D];

  const int group = threadIdx.x / kLanes;
  const int glane = threadIdx.x % kLanes;
  const int d0 = glane * kElems;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  const int64_t num_items =
      static_cast<int64_t>(p.num_tokens) * p.num_layers * p.num_kv_heads;

  // Every lane runs the shuffles and __syncwarp below, so inactive groups only mask memory ops.
  bool active = item < num_items;
  int32_t t = 0, l = 0, h = 0;
  int64_t page = 0, row = 0, pos = 0;
  if (active) {
    h = static_cast<int32_t>(item % p.num_kv_heads);
    l = static_cast<int32_t>((item / p.num_kv_heads) % p.num_layers);
    t = static_cast<int32_t>(item / (static_cast<int64_t>(p.num_kv_heads) * p.num_layers));
    const int64_t slot = p.slot_mapping[t];
    page = slot / p.page_size;
    row = slot % p.page_size;
    // Negative slots are skipped; slots past the cache are out of the documented
    // range and skipped too rather than written out of bounds.
    active = slot >= 0 && page < p.num_pages;
    // Duplicate slots (docs/DESIGN.md, "Edge values"): the last token wins, so no
    // row gets bytes of two writers. O(N - t) slot loads per lane, L2-resident;
    // a handful at decode sizes.
    for (int32_t u = t + 1; active && u < p.num_tokens; ++u) active = p.slot_mapping[u] != slot;
    // Positions outside the cos/sin table are out of range; clamp so reads stay in bounds.
    pos = min(max(p.positions[t], int64_t(0)), p.max_position - 1);
  }

  float k[kElems];
  T v_raw[kElems];
  if (active) {
    T k_raw[kElems];
    const T* k_src = static_cast<const T*>(p.k) + t * p.k_stride_n + l * p.k_stride_l + h * p.k_stride_h + d0;
    const T* v_src = static_cast<const T*>(p.v) + t * p.v_stride_n + l * p.v_stride_l + h * p.v_stride_h + d0;
    load8(k_src, p.vectorized, k_raw);
    load8(v_src, p.vectorized, v_raw);
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) k[e] = to_float(k_raw[e]);
  } else {
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) {
      k[e] = 0.f;
      v_raw[e] = from_float<T>(0.f);
    }
  }

  if (p.k_norm_weight != nullptr) {
    float ss = 0.f;
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) ss += k[e] * k[e];
    DFLASH_UNROLL
    for (int off = kLanes / 2; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float inv_rms = rsqrtf(ss / static_cast<float>(D) + p.eps);
    if (active) {
      DFLASH_UNROLL
      for (int e = 0; e < kElems; ++e) {
        const float w = load_weight(p.k_norm_weight, p.norm_dtype,
                                    l * p.norm_stride_l + (d0 + e) * p.norm_stride_d);
        k[e] = __fmul_rn(__fmul_rn(k[e], inv_rms), w);
      }
    }
  }

  DFLASH_UNROLL
  for (int e = 0; e < kElems; ++e) staged[group][d0 + e] = k[e];
  __syncwarp();

  const int R = p.rotary_dim;
  const int half_r = R / 2;
  if (active) {
    const float* cs = p.cos_sin + pos * p.cos_sin_stride;
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) {
      const int d = d0 + e;
      if (d >= R) continue;  // dims past rotary_dim pass through
      float c, s, partner;
      bool first;  // x1 of the pair: x1*cos - x2*sin, else x2*cos + x1*sin
      if (p.rope_neox) {
        first = d < half_r;
        const int f = first ? d : d - half_r;
        c = cs[f];
        s = cs[half_r + f];
        partner = staged[group][first ? d + half_r : d - half_r];
      } else {
        first = (d & 1) == 0;
        const int f = d >> 1;
        c = cs[f];
        s = cs[half_r + f];
        partner = staged[group][first ? d + 1 : d - 1];
      }
      k[e] = first ? __fsub_rn(__fmul_rn(k[e], c), __fmul_rn(partner, s))
                   : __fadd_rn(__fmul_rn(k[e], c), __fmul_rn(partner, s));
    }

    const bool vec = p.vectorized;
    char* k_base = p.k_uniform ? static_cast<char*>(p.k_cache_base[0]) + l * p.k_layer_stride
                               : static_cast<char*>(p.k_cache_base[l]);
    char* v_base = p.v_uniform ? static_cast<char*>(p.v_cache_base[0]) + l * p.v_layer_stride
                               : static_cast<char*>(p.v_cache_base[l]);
    CacheT* k_dst = reinterpret_cast<CacheT*>(k_base) + page * p.k_stride_page +
                    row * p.k_stride_row + h * p.k_stride_head + d0;
    CacheT* v_dst = reinterpret_cast<CacheT*>(v_base) + page * p.v_stride_page +
                    row * p.v_stride_row + h * p.v_stride_head + d0;
    const float k_scale = kKind == CacheKind::kSame ? 1.f : *p.k_scale;
    const float v_scale = kKind == CacheKind::kSame ? 1.f : *p.v_scale;
    store8<T, kKind>(k_dst, vec, k, k_scale);
    float v[kElems];
    DFLASH_UNROLL
    for (int e = 0; e < kElems; ++e) v[e] = to_float(v_raw[e]);
    store8<T, kKind>(v_dst, vec, v, v_scale);
  }
}

template <typename T, CacheKind kKind, typename Launch>
cudaError_t dispatch_head_dim(const WriteKVParams& p, Launch& launch) {
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_layers * p.num_kv_heads;
  auto go = [&](auto kernel, int head_dim) {
    const int64_t blocks = ceil_div(items, kThreads / (head_dim / kElems));
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    return launch(kernel, static_cast<unsigned>(blocks), kThreads, 0, p);
  };
  switch (p.head_dim) {
    case 64: return go(write_kv_kernel<T, 64, kKind>, 64);
    case 128: return go(write_kv_kernel<T, 128, kKind>, 128);
    case 256: return go(write_kv_kernel<T, 256, kKind>, 256);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename Launch>
cudaError_t dispatch_cache(const WriteKVParams& p, Launch& launch) {
  switch (p.cache_dtype) {
    case DType::kFloat8E4M3: return dispatch_head_dim<T, CacheKind::kE4M3>(p, launch);
    case DType::kFloat8E5M2: return dispatch_head_dim<T, CacheKind::kE5M2>(p, launch);
    default:
      if (p.cache_dtype != p.act_dtype) return cudaErrorInvalidValue;
      return dispatch_head_dim<T, CacheKind::kSame>(p, launch);
  }
}

// The one launch dispatch of write_kv: activation dtype x cache kind x head
// dim picks the kernel, the grid covers every (token, layer, head). Launch: a
// launcher of common.cuh (write_kv.cu: a stream or none) or host_emulation.h
// (testing/emulate.cpp), so the tests run this very code. The checks keep a
// hand-filled params block (an engine's) inside the pointer table and off a
// zero divisor / an empty cos-sin table.
template <typename Launch>
cudaError_t dispatch(const WriteKVParams& p, Launch&& launch) {
  if (p.num_tokens <= 0 || p.num_layers <= 0 || p.num_kv_heads <= 0) return cudaSuccess;
  if ((!p.k_uniform || !p.v_uniform) && p.num_layers > kWriteKVMaxLayerPtrs) {
    return cudaErrorInvalidValue;
  }
  if (p.max_position <= 0 || p.page_size <= 0) return cudaErrorInvalidValue;
  switch (p.act_dtype) {
    case DType::kFloat16: return dispatch_cache<__half>(p, launch);
    case DType::kBFloat16: return dispatch_cache<__nv_bfloat16>(p, launch);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace writekv
}  // namespace dflash
