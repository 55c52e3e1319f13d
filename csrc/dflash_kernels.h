// Plain C++ interface of the compiled kernels: parameter structs and launchers.
// No PyTorch and no CUDA device code here, so engines that embed C++ (and
// bindings.cpp) can call the kernels with raw pointers and strides.
#pragma once

#include <cstdint>

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

}  // namespace dflash
