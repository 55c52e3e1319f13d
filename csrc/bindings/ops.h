// The bound functions, as registration.cpp registers them (schemas there).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace dflash {
namespace bindings {

using OptTensor = std::optional<at::Tensor>;

#define DFLASH_VERIFY_CHAIN_ARGS                                                               \
  const at::Tensor &logits, const at::Tensor &block_tokens, const at::Tensor &num_drafts,       \
      const OptTensor &temperature, const OptTensor &top_k, const OptTensor &top_p,             \
      const OptTensor &seeds, const OptTensor &positions, const OptTensor &draft_probs,         \
      const OptTensor &seq_lens, const at::Tensor &accept_len, const at::Tensor &out_tokens,    \
      const at::Tensor &bonus, const OptTensor &new_seq_lens

#define DFLASH_WRITE_KV_ARGS                                                                    \
  const at::Tensor &k, const at::Tensor &v, const OptTensor &k_norm_weight,                     \
      const at::Tensor &positions, const at::Tensor &slot_mapping, at::TensorList k_caches,     \
      at::TensorList v_caches, const at::Tensor &cos_sin_cache, double eps, bool rope_neox,     \
      int64_t rotary_dim, const OptTensor &k_scale, const OptTensor &v_scale

// dflash::verify_chain_cuda (CUDA) and dflash::_probe_verify_chain_cuda (CPU).
void verify_chain_cuda(DFLASH_VERIFY_CHAIN_ARGS);
void probe_verify_chain_cuda(DFLASH_VERIFY_CHAIN_ARGS);

// dflash::write_kv_cuda (CUDA) and dflash::_probe_write_kv_cuda (CPU).
void write_kv_cuda(DFLASH_WRITE_KV_ARGS);
void probe_write_kv_cuda(DFLASH_WRITE_KV_ARGS);

}  // namespace bindings
}  // namespace dflash
