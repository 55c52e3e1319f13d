// Plain C++ interface of the compiled kernels: parameter structs and launchers.
// No PyTorch and no CUDA device code here, so engines that embed C++ (and
// bindings.cpp) can call the kernels with raw pointers and strides.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <cuda_runtime_api.h>

namespace dflash {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,  // float8_e4m3fn
  kFloat8E5M2 = 4,
};

// ---------------------------------------------------------------- verify_chain
// Greedy and keyed point-mass sampling (docs/DESIGN.md, "verify_chain").
// Two launches: per (row, vocab split) best (score, id) into the workspace,
// then per request the split merge and the acceptance scan.
struct VerifyChainParams {
  const void* logits;           // [B, S, V], unit last stride
  DType logits_dtype;           // fp32 / fp16 / bf16
  int64_t logits_stride_b;      // elements
  int64_t logits_stride_s;
  const void* block_tokens;     // [B, S] int32 or int64
  bool block_tokens_int64;
  int64_t tokens_stride_b;
  int64_t tokens_stride_s;
  const int32_t* num_drafts;    // [B]
  const float* temperature;     // [B] or null (all greedy)
  const int64_t* seeds;         // [B], required with temperature
  const int64_t* positions;     // [B], required with temperature
  const int32_t* seq_lens;      // [B] or null
  int32_t* accept_len;          // [B]
  int32_t* out_tokens;          // [B, S] contiguous
  int32_t* bonus;               // [B]
  int32_t* new_seq_lens;        // [B] or null (iff seq_lens null)
  float* workspace_score;       // [B * S * num_splits]
  int32_t* workspace_index;     // [B * S * num_splits]
  int32_t batch;                // B
  int32_t block_size;           // S
  int32_t vocab;                // V
  int32_t num_splits;           // from verify_chain_num_splits
  int32_t split_len;            // vocab ids per split, a multiple of 16 / sizeof(dtype)
  bool vectorized;              // 16-byte aligned rows: 16-byte loads
};

// Splits of the vocabulary per row so that B*S rows fill num_sms SMs; fills
// num_splits and split_len in params (host-only arithmetic on sizes).
void verify_chain_plan(VerifyChainParams& params, int num_sms);

// Launches the two kernels on stream; returns the launch error, if any.
cudaError_t launch_verify_chain(const VerifyChainParams& params, cudaStream_t stream);

// Whether every row start (and so every split start) is 16-byte aligned: the
// base pointer AND both row strides. Host arithmetic on the filled params.
inline bool verify_chain_vectorizable(const VerifyChainParams& p) {
  const int64_t esize = p.logits_dtype == DType::kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.logits_stride_b * esize) % 16 == 0 &&
         (p.logits_stride_s * esize) % 16 == 0;
}

// -------------------------------------------------------------------- write_kv
// K RMSNorm per head, RoPE, fp8 quantization, scatter into per-layer caches.
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

cudaError_t launch_write_kv(const WriteKVParams& params, cudaStream_t stream);

// Whether every (token, layer, head) row is 16-byte aligned in k and v and
// 8-element aligned in every layer's caches (16-byte stores, 8-byte for fp8):
// base pointers, layer offsets AND strides. Host arithmetic on the filled params.
inline bool write_kv_vectorizable(const WriteKVParams& p) {
  auto div8 = [](int64_t x) { return x % 8 == 0; };
  auto at = [](const void* ptr, int64_t bytes) {
    return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
  };
  const int64_t cache_bytes =
      p.cache_dtype == DType::kFloat8E4M3 || p.cache_dtype == DType::kFloat8E5M2 ? 1 : 2;
  const int64_t row_bytes = 8 * cache_bytes;
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

}  // namespace dflash
