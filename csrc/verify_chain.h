// verify_chain, host side (no PyTorch, no device code): the kernel parameters,
// the host path that turns the op's arguments into them (memory-safety guards,
// strides, vector-path choice, split plan), and the launcher.
//
// Greedy and keyed point-mass sampling (docs/DESIGN.md, "verify_chain").
// Two launches: per (row, vocab split) best (score, id) into the workspace,
// then per request the split merge and the acceptance scan.
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "tensor.h"

namespace dflash {

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
  int32_t num_splits;           // from plan_splits
  int32_t split_len;            // vocab ids per split, a multiple of 16 / sizeof(dtype)
  bool vectorized;              // 16-byte aligned rows: 16-byte loads
};

// The op's arguments, in schema order (dflash::verify_chain_cuda).
struct VerifyChainArgs {
  TensorDesc logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
      draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens;
};

namespace verify {

// Vocabulary splits per row (host arithmetic on sizes): enough blocks for ~4
// per SM; a split keeps >= 4096 ids so the merge stays cheap; split_len is a
// multiple of the 16-byte vector so every split starts aligned.
inline void plan_splits(int64_t rows, int64_t vocab, int64_t elem_bytes, int num_sms,
                        int32_t& split_len, int32_t& num_splits) {
  constexpr int64_t kMinSplitLen = 4096;
  rows = rows < 1 ? 1 : rows;
  const int64_t want = ceil_div(4 * static_cast<int64_t>(num_sms < 1 ? 1 : num_sms), rows);
  const int64_t most = vocab / kMinSplitLen < 1 ? 1 : vocab / kMinSplitLen;
  const int64_t splits = want < 1 ? 1 : (want < most ? want : most);
  const int64_t vec = 16 / elem_bytes;
  const int64_t len = ceil_div(ceil_div(vocab, splits), vec) * vec;
  split_len = static_cast<int32_t>(len);
  const int64_t n = ceil_div(vocab, len);
  num_splits = static_cast<int32_t>(n < 1 ? 1 : n);
}

}  // namespace verify

// Whether every row start (and so every split start) is 16-byte aligned: the
// base pointer AND both row strides. Host arithmetic on the filled params.
inline bool verify_chain_vectorizable(const VerifyChainParams& p) {
  const int64_t esize = dtype_size(p.logits_dtype);
  return reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.logits_stride_b * esize) % 16 == 0 &&
         (p.logits_stride_s * esize) % 16 == 0;
}

// The host path: checks what the kernels need to stay in bounds (not the op's
// contract: the public op in ops.py validates that, with ValueErrors) and
// fills params, all but the workspace. Returns nullptr, or the message of the
// failed guard. params.batch == 0: nothing to launch.
inline const char* verify_chain_params(const VerifyChainArgs& a, int num_sms,
                                       VerifyChainParams& p) {
  const TensorDesc& logits = a.logits;
  const TensorDesc& tokens = a.block_tokens;
  DFLASH_GUARD(!a.top_k.defined && !a.top_p.defined && !a.draft_probs.defined,
               "top_k, top_p, draft_probs: not implemented by the compiled kernels (pass None)");
  DFLASH_GUARD(tokens.defined && tokens.ndim == 2 &&
                   (tokens.dtype == DType::kInt32 || tokens.dtype == DType::kInt64),
               "block_tokens: expected int32 or int64 [B, S]");
  const int64_t B = tokens.size[0], S = tokens.size[1];
  DFLASH_GUARD(S >= 1 && S <= INT32_MAX && B <= INT32_MAX,
               "block_tokens: expected [B, S] with 1 <= S and B, S < 2^31");
  DFLASH_GUARD(logits.defined && logits.ndim == 3 && logits.size[0] == B && logits.size[1] == S,
               "logits: expected [B, S, V]");
  const int64_t V = logits.size[2];
  DFLASH_GUARD(V >= 1 && V <= INT32_MAX && (V == 1 || logits.stride[2] == 1),
               "logits: expected 1 <= V < 2^31 and a unit last stride");
  DFLASH_GUARD(logits.dtype == DType::kFloat32 || logits.dtype == DType::kFloat16 ||
                   logits.dtype == DType::kBFloat16,
               "logits: expected fp32, fp16 or bf16");
  DFLASH_GUARD(is_vector(a.num_drafts, DType::kInt32, B),
               "num_drafts: expected a contiguous int32 [B]");
  if (a.temperature.defined) {
    DFLASH_GUARD(is_vector(a.temperature, DType::kFloat32, B),
                 "temperature: expected a contiguous fp32 [B]");
    DFLASH_GUARD(is_vector(a.seeds, DType::kInt64, B) && is_vector(a.positions, DType::kInt64, B),
                 "seeds, positions: expected contiguous int64 [B] (required with temperature)");
  }
  DFLASH_GUARD(is_vector(a.accept_len, DType::kInt32, B) && is_vector(a.bonus, DType::kInt32, B) &&
                   is_vector(a.out_tokens, DType::kInt32, B * S),
               "accept_len, out_tokens, bonus: expected contiguous int32 [B], [B, S], [B]");
  DFLASH_GUARD(a.seq_lens.defined == a.new_seq_lens.defined,
               "seq_lens, new_seq_lens: pass both or neither");
  if (a.seq_lens.defined) {
    DFLASH_GUARD(is_vector(a.seq_lens, DType::kInt32, B) &&
                     is_vector(a.new_seq_lens, DType::kInt32, B),
                 "seq_lens, new_seq_lens: expected contiguous int32 [B]");
  }
  for (const TensorDesc* t : {&tokens, &a.num_drafts, &a.temperature, &a.seeds, &a.positions,
                              &a.seq_lens, &a.accept_len, &a.out_tokens, &a.bonus,
                              &a.new_seq_lens}) {
    DFLASH_GUARD(!t->defined || t->device == logits.device,
                 "expected every tensor on the device of logits");
  }

  const bool sampled = a.temperature.defined;
  p = VerifyChainParams{};
  p.logits = logits.data;
  p.logits_dtype = logits.dtype;
  p.logits_stride_b = logits.stride[0];
  p.logits_stride_s = logits.stride[1];
  p.block_tokens = tokens.data;
  p.block_tokens_int64 = tokens.dtype == DType::kInt64;
  p.tokens_stride_b = tokens.stride[0];
  p.tokens_stride_s = tokens.stride[1];
  p.num_drafts = static_cast<const int32_t*>(a.num_drafts.data);
  p.temperature = sampled ? static_cast<const float*>(a.temperature.data) : nullptr;
  p.seeds = sampled ? static_cast<const int64_t*>(a.seeds.data) : nullptr;
  p.positions = sampled ? static_cast<const int64_t*>(a.positions.data) : nullptr;
  p.seq_lens = static_cast<const int32_t*>(a.seq_lens.data);
  p.accept_len = static_cast<int32_t*>(a.accept_len.data);
  p.out_tokens = static_cast<int32_t*>(a.out_tokens.data);
  p.bonus = static_cast<int32_t*>(a.bonus.data);
  p.new_seq_lens = static_cast<int32_t*>(a.new_seq_lens.data);
  p.batch = static_cast<int32_t>(B);
  p.block_size = static_cast<int32_t>(S);
  p.vocab = static_cast<int32_t>(V);
  p.vectorized = verify_chain_vectorizable(p);
  verify::plan_splits(B * S, V, dtype_size(p.logits_dtype), num_sms, p.split_len, p.num_splits);
  return nullptr;
}

// Workspace of the split results: host-known size, one allocation.
inline int64_t verify_chain_workspace_bytes(const VerifyChainParams& p) {
  return static_cast<int64_t>(p.batch) * p.block_size * p.num_splits *
         static_cast<int64_t>(sizeof(float) + sizeof(int32_t));
}

inline void set_verify_chain_workspace(VerifyChainParams& p, void* workspace) {
  const int64_t parts = static_cast<int64_t>(p.batch) * p.block_size * p.num_splits;
  p.workspace_score = static_cast<float*>(workspace);
  p.workspace_index = reinterpret_cast<int32_t*>(p.workspace_score + parts);
}

// Launches the two kernels on stream; returns the launch error, if any.
cudaError_t launch_verify_chain(const VerifyChainParams& params, cudaStream_t stream);

// Measurement only: the same dispatch (kernel templates, grids, launch checks)
// with a launcher that launches nothing. The probe ops time the host path with it.
cudaError_t probe_launch_verify_chain(const VerifyChainParams& params);

}  // namespace dflash
