// write_kv, host side (no PyTorch, no device code): the kernel parameters,
// the host path that turns the op's arguments into one parameter block per
// launch (memory-safety guards, layer addressing, vector-path choice), and the
// launcher.
//
// K RMSNorm per head, RoPE, fp8 quantization, scatter into per-layer caches.
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "tensor.h"

namespace dflash {

constexpr int kWriteKVMaxLayerPtrs = 32;

struct WriteKVParams {
  const void* k;                // [N, L, Hkv, D], unit last stride
  const void* v;
  DType act_dtype;              // fp16 / bf16
  int64_t k_stride_n, k_stride_l, k_stride_h;
  int64_t v_stride_n, v_stride_l, v_stride_h;
  const void* k_norm_weight;    // [L, D] or null
  DType norm_dtype;
  int64_t norm_stride_l, norm_stride_d;
  const int64_t* positions;     // [N]
  const int64_t* slot_mapping;  // [N], < 0: skip
  const float* cos_sin;         // [max_position, rotary_dim]: cos half, sin half
  int64_t cos_sin_stride;
  int64_t max_position;
  // Layer l's cache starts at k_cache_base[0] + l * k_layer_stride (bytes) when
  // k_uniform, else at k_cache_base[l] (l < kWriteKVMaxLayerPtrs).
  void* k_cache_base[kWriteKVMaxLayerPtrs];
  void* v_cache_base[kWriteKVMaxLayerPtrs];
  bool k_uniform, v_uniform;
  int64_t k_layer_stride, v_layer_stride;  // bytes
  DType cache_dtype;            // act dtype or fp8
  int64_t k_stride_page, k_stride_row, k_stride_head;  // cache strides, elements
  int64_t v_stride_page, v_stride_row, v_stride_head;
  int64_t num_pages, page_size;
  const float* k_scale;         // fp8 only: stored = sat(value / scale)
  const float* v_scale;
  int32_t num_tokens, num_layers, num_kv_heads, head_dim, rotary_dim;
  float eps;
  bool rope_neox;
  bool vectorized;              // every row 16-byte aligned (8-byte for fp8 caches)
};

// The op's arguments, in schema order (dflash::write_kv_cuda). Caches: a list
// of L caches, anything with size() and operator[](layer) -> TensorDesc.
template <typename Caches>
struct WriteKVArgs {
  TensorDesc k, v, k_norm_weight, positions, slot_mapping;
  Caches k_caches, v_caches;
  TensorDesc cos_sin_cache;
  double eps;
  bool rope_neox;
  int64_t rotary_dim;
  TensorDesc k_scale, v_scale;
};

// Whether every (token, layer, head) row is 16-byte aligned in k and v and
// 8-element aligned in every layer's caches (16-byte stores, 8-byte for fp8):
// base pointers, layer offsets AND strides. Host arithmetic on the filled params.
inline bool write_kv_vectorizable(const WriteKVParams& p) {
  auto div8 = [](int64_t x) { return x % 8 == 0; };
  auto at = [](const void* ptr, int64_t bytes) {
    return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
  };
  const int64_t row_bytes = 8 * dtype_size(p.cache_dtype);
  if (!at(p.k, 16) || !at(p.v, 16)) return false;
  for (int64_t s : {p.k_stride_n, p.k_stride_l, p.k_stride_h, p.v_stride_n, p.v_stride_l,
                    p.v_stride_h, p.k_stride_page, p.k_stride_row, p.k_stride_head,
                    p.v_stride_page, p.v_stride_row, p.v_stride_head}) {
    if (!div8(s)) return false;
  }
  const int32_t tables = p.num_layers < kWriteKVMaxLayerPtrs ? p.num_layers : kWriteKVMaxLayerPtrs;
  for (int32_t l = 0; l < tables; ++l) {
    if ((l == 0 || !p.k_uniform) && !at(p.k_cache_base[l], row_bytes)) return false;
    if ((l == 0 || !p.v_uniform) && !at(p.v_cache_base[l], row_bytes)) return false;
  }
  if (p.k_uniform && p.k_layer_stride % row_bytes != 0) return false;
  if (p.v_uniform && p.v_layer_stride % row_bytes != 0) return false;
  return true;
}

// The host path: checks what the kernel needs to stay in bounds (not the op's
// contract: the public op in ops.py validates that, with ValueErrors), then
// calls launch(const WriteKVParams&) once per launch. Layer caches at one
// uniform distance (views of a stacked tensor) go in one launch for any L;
// others as tables of base pointers in the kernel arguments (no device array,
// so graph capture needs nothing), kWriteKVMaxLayerPtrs layers per launch.
// Returns nullptr, or the message of the failed guard (before any launch).
template <typename Caches, typename Launch>
const char* write_kv_launches(const WriteKVArgs<Caches>& a, Launch&& launch) {
  const TensorDesc& k = a.k;
  const TensorDesc& v = a.v;
  DFLASH_GUARD(k.defined && k.ndim == 4 &&
                   (k.dtype == DType::kFloat16 || k.dtype == DType::kBFloat16),
               "k: expected fp16 or bf16 [N, L, Hkv, D]");
  const int64_t N = k.size[0], L = k.size[1], H = k.size[2], D = k.size[3];
  DFLASH_GUARD(D == 64 || D == 128 || D == 256, "k: head dim must be 64, 128 or 256");
  DFLASH_GUARD(N <= INT32_MAX && L <= INT32_MAX && H <= INT32_MAX, "k: sizes must be < 2^31");
  DFLASH_GUARD(v.defined && v.ndim == 4 && v.dtype == k.dtype && v.size[0] == N &&
                   v.size[1] == L && v.size[2] == H && v.size[3] == D,
               "v: expected the shape and dtype of k");
  DFLASH_GUARD(k.stride[3] == 1 && v.stride[3] == 1, "k, v: expected a unit last stride");
  DFLASH_GUARD(static_cast<int64_t>(a.k_caches.size()) == L &&
                   static_cast<int64_t>(a.v_caches.size()) == L,
               "k_caches, v_caches: expected L per-layer caches");
  DFLASH_GUARD(is_vector(a.positions, DType::kInt64, N) &&
                   is_vector(a.slot_mapping, DType::kInt64, N),
               "positions, slot_mapping: expected contiguous int64 [N]");
  if (N == 0 || L == 0 || H == 0) return nullptr;

  const TensorDesc kc0 = a.k_caches[0];
  const TensorDesc vc0 = a.v_caches[0];
  DFLASH_GUARD(kc0.ndim == 4 && kc0.size[1] >= 1 && kc0.size[2] == H && kc0.size[3] == D &&
                   kc0.stride[3] == 1,
               "k_caches: expected [num_pages, page_size >= 1, Hkv, D] with a unit last stride");
  DFLASH_GUARD(vc0.ndim == 4 && vc0.dtype == kc0.dtype && vc0.size[0] == kc0.size[0] &&
                   vc0.size[1] == kc0.size[1] && vc0.size[2] == H && vc0.size[3] == D &&
                   vc0.stride[3] == 1,
               "v_caches: expected the shape and dtype of k_caches with a unit last stride");
  const bool fp8 = is_fp8(kc0.dtype);
  DFLASH_GUARD(fp8 || kc0.dtype == k.dtype, "k_caches: expected the dtype of k or fp8");
  DFLASH_GUARD(fp8 == (a.k_scale.defined && a.v_scale.defined),
               "k_scale, v_scale: required with (and only with) fp8 caches");
  DFLASH_GUARD(!fp8 || (is_vector(a.k_scale, DType::kFloat32, 1) &&
                        is_vector(a.v_scale, DType::kFloat32, 1)),
               "k_scale, v_scale: expected fp32 tensors of one element");
  const int64_t R = a.rotary_dim;
  DFLASH_GUARD(R >= 0 && R <= D && R % 2 == 0, "rotary_dim: expected an even number <= head dim");
  const TensorDesc& cs = a.cos_sin_cache;
  DFLASH_GUARD(cs.defined && cs.dtype == DType::kFloat32 && cs.ndim == 2 && cs.size[0] >= 1 &&
                   cs.size[1] == R && (R <= 1 || cs.stride[1] == 1),
               "cos_sin_cache: expected fp32 [max_position >= 1, rotary_dim], unit last stride");
  const TensorDesc& nw = a.k_norm_weight;
  DFLASH_GUARD(!nw.defined || (nw.ndim == 2 && nw.size[0] == L && nw.size[1] == D &&
                               (nw.dtype == DType::kFloat32 || nw.dtype == DType::kFloat16 ||
                                nw.dtype == DType::kBFloat16)),
               "k_norm_weight: expected fp32, fp16 or bf16 [L, D]");
  for (const TensorDesc* t : {&v, &nw, &a.positions, &a.slot_mapping, &cs, &a.k_scale,
                              &a.v_scale, &kc0, &vc0}) {
    DFLASH_GUARD(!t->defined || t->device == k.device, "expected every tensor on the device of k");
  }

  // One pass over the layers: the kernel addresses every layer with layer 0's
  // strides, and a uniform distance between base addresses allows one launch.
  const auto base_k = reinterpret_cast<intptr_t>(kc0.data);
  const auto base_v = reinterpret_cast<intptr_t>(vc0.data);
  const int64_t k_layer_stride = L > 1 ? reinterpret_cast<intptr_t>(a.k_caches[1].data) - base_k : 0;
  const int64_t v_layer_stride = L > 1 ? reinterpret_cast<intptr_t>(a.v_caches[1].data) - base_v : 0;
  bool k_uniform = true, v_uniform = true;
  for (int64_t l = 1; l < L; ++l) {
    const TensorDesc kl = a.k_caches[l];
    const TensorDesc vl = a.v_caches[l];
    DFLASH_GUARD(kl.same_layout(kc0) && vl.same_layout(vc0) && kl.device == k.device &&
                     vl.device == k.device,
                 "k_caches, v_caches: every layer needs the shape, strides, dtype and device of "
                 "layer 0");
    k_uniform = k_uniform && reinterpret_cast<intptr_t>(kl.data) - base_k == l * k_layer_stride;
    v_uniform = v_uniform && reinterpret_cast<intptr_t>(vl.data) - base_v == l * v_layer_stride;
  }

  WriteKVParams p{};
  p.act_dtype = k.dtype;
  auto strides3 = [](const TensorDesc& t, int64_t& s0, int64_t& s1, int64_t& s2) {
    s0 = t.stride[0];
    s1 = t.stride[1];
    s2 = t.stride[2];
  };
  strides3(k, p.k_stride_n, p.k_stride_l, p.k_stride_h);
  strides3(v, p.v_stride_n, p.v_stride_l, p.v_stride_h);
  strides3(kc0, p.k_stride_page, p.k_stride_row, p.k_stride_head);
  strides3(vc0, p.v_stride_page, p.v_stride_row, p.v_stride_head);
  p.norm_dtype = nw.defined ? nw.dtype : DType::kFloat32;
  p.norm_stride_l = nw.stride[0];
  p.norm_stride_d = nw.stride[1];
  p.positions = static_cast<const int64_t*>(a.positions.data);
  p.slot_mapping = static_cast<const int64_t*>(a.slot_mapping.data);
  p.cos_sin = static_cast<const float*>(cs.data);
  p.cos_sin_stride = cs.stride[0];
  p.max_position = cs.size[0];
  p.k_uniform = k_uniform;
  p.v_uniform = v_uniform;
  p.k_layer_stride = k_layer_stride;
  p.v_layer_stride = v_layer_stride;
  p.cache_dtype = kc0.dtype;
  p.num_pages = kc0.size[0];
  p.page_size = kc0.size[1];
  p.k_scale = fp8 ? static_cast<const float*>(a.k_scale.data) : nullptr;
  p.v_scale = fp8 ? static_cast<const float*>(a.v_scale.data) : nullptr;
  p.num_tokens = static_cast<int32_t>(N);
  p.num_kv_heads = static_cast<int32_t>(H);
  p.head_dim = static_cast<int32_t>(D);
  p.rotary_dim = static_cast<int32_t>(R);
  p.eps = static_cast<float>(a.eps);
  p.rope_neox = a.rope_neox;

  const int64_t act_bytes = dtype_size(k.dtype);
  const int64_t chunk = (k_uniform && v_uniform) ? L : kWriteKVMaxLayerPtrs;
  for (int64_t l0 = 0; l0 < L; l0 += chunk) {
    const int64_t nl = L - l0 < chunk ? L - l0 : chunk;
    p.k = static_cast<const char*>(k.data) + l0 * k.stride[1] * act_bytes;
    p.v = static_cast<const char*>(v.data) + l0 * v.stride[1] * act_bytes;
    p.k_norm_weight = nw.defined ? static_cast<const char*>(nw.data) +
                                       l0 * nw.stride[0] * dtype_size(nw.dtype)
                                 : nullptr;
    p.num_layers = static_cast<int32_t>(nl);
    // A uniform chunk may hold more than kWriteKVMaxLayerPtrs layers: fill only the table.
    const int64_t entries = nl < kWriteKVMaxLayerPtrs ? nl : kWriteKVMaxLayerPtrs;
    for (int64_t i = 0; i < entries; ++i) {
      // A uniform list needs only the chunk's first base (the kernel adds l * layer stride).
      p.k_cache_base[i] = k_uniform && i > 0 ? nullptr : a.k_caches[l0 + i].data;
      p.v_cache_base[i] = v_uniform && i > 0 ? nullptr : a.v_caches[l0 + i].data;
    }
    p.vectorized = write_kv_vectorizable(p);
    launch(static_cast<const WriteKVParams&>(p));
  }
  return nullptr;
}

// Launches the kernel on stream; returns the launch error, if any.
cudaError_t launch_write_kv(const WriteKVParams& params, cudaStream_t stream);

// Measurement only: the same dispatch (kernel template, grid, launch checks)
// with a launcher that launches nothing. The probe ops time the host path with it.
cudaError_t probe_launch_write_kv(const WriteKVParams& params);

}  // namespace dflash
