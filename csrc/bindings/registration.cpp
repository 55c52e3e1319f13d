// Registration only: the op schemas (the backend signatures of docs/DESIGN.md)
// and their implementations. The _probe_* ops have the same schemas, run the
// same host path on CPU tensors without launching anything, and exist only to
// measure that host path (python -m microbench overhead); nothing else calls them.
#include <torch/library.h>

#include "ops.h"

#define DFLASH_VERIFY_CHAIN_SCHEMA                                                            \
  "(Tensor logits, Tensor block_tokens, Tensor num_drafts, Tensor? temperature, "            \
  "Tensor? top_k, Tensor? top_p, Tensor? seeds, Tensor? positions, Tensor? draft_probs, "    \
  "Tensor? seq_lens, Tensor(a!) accept_len, Tensor(b!) out_tokens, Tensor(c!) bonus, "       \
  "Tensor(d!)? new_seq_lens) -> ()"

#define DFLASH_WRITE_KV_SCHEMA                                                                \
  "(Tensor k, Tensor v, Tensor? k_norm_weight, Tensor positions, Tensor slot_mapping, "      \
  "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos_sin_cache, float eps, "          \
  "bool rope_neox, int rotary_dim, Tensor? k_scale, Tensor? v_scale) -> ()"

TORCH_LIBRARY_FRAGMENT(dflash, m) {
  m.def("verify_chain_cuda" DFLASH_VERIFY_CHAIN_SCHEMA);
  m.def("write_kv_cuda" DFLASH_WRITE_KV_SCHEMA);
  m.def("_probe_verify_chain_cuda" DFLASH_VERIFY_CHAIN_SCHEMA);
  m.def("_probe_write_kv_cuda" DFLASH_WRITE_KV_SCHEMA);
}

TORCH_LIBRARY_IMPL(dflash, CUDA, m) {
  m.impl("verify_chain_cuda", &dflash::bindings::verify_chain_cuda);
  m.impl("write_kv_cuda", &dflash::bindings::write_kv_cuda);
}

TORCH_LIBRARY_IMPL(dflash, CPU, m) {
  m.impl("_probe_verify_chain_cuda", &dflash::bindings::probe_verify_chain_cuda);
  m.impl("_probe_write_kv_cuda", &dflash::bindings::probe_write_kv_cuda);
}
