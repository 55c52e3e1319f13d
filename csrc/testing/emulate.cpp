// Test-only: C entry points that run the kernels under host_emulation.h
// (tests/test_cuda_ops.py loads this through ctypes). Arguments come as
// flat arrays so the Python side needs no struct layout.
#include "host_emulation.h"

#include "../verify_chain.cuh"
#include "../write_kv.cuh"

using namespace dflash;

namespace {
template <typename T, writekv::CacheKind kKind>
void run_write_kv(const WriteKVParams& p) {
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_layers * p.num_kv_heads;
  const int lanes = p.head_dim / writekv::kElems;
  const unsigned grid = static_cast<unsigned>(ceil_div(items, writekv::kThreads / lanes));
  switch (p.head_dim) {
    case 64: emu::launch(writekv::write_kv_kernel<T, 64, kKind>, grid, writekv::kThreads, 0, p); break;
    case 128: emu::launch(writekv::write_kv_kernel<T, 128, kKind>, grid, writekv::kThreads, 0, p); break;
    default: emu::launch(writekv::write_kv_kernel<T, 256, kKind>, grid, writekv::kThreads, 0, p);
  }
}

template <typename T>
void run_write_kv_cache(const WriteKVParams& p) {
  if (p.cache_dtype == DType::kFloat8E4M3) return run_write_kv<T, writekv::CacheKind::kE4M3>(p);
  if (p.cache_dtype == DType::kFloat8E5M2) return run_write_kv<T, writekv::CacheKind::kE5M2>(p);
  run_write_kv<T, writekv::CacheKind::kSame>(p);
}
}  // namespace

extern "C" {

// Vector accesses at misaligned addresses since the library was loaded.
int64_t emu_misaligned_vector_accesses() { return emu::misaligned_vector_accesses().load(); }

// ints: B, S, V, logits dtype, tokens int64, stride_b, stride_s, tok_stride_b,
// tok_stride_s, vectorized (out: bindings.cpp's choice), num_sms. ptrs: logits,
// block_tokens, num_drafts, temperature, seeds, positions, seq_lens,
// accept_len, out_tokens, bonus, new_seq_lens (0 for None). Returns the
// number of splits used.
int emu_verify_chain(int64_t* ints, const int64_t* ptrs) {
  VerifyChainParams p{};
  p.batch = static_cast<int32_t>(ints[0]);
  p.block_size = static_cast<int32_t>(ints[1]);
  p.vocab = static_cast<int32_t>(ints[2]);
  p.logits_dtype = static_cast<DType>(ints[3]);
  p.block_tokens_int64 = ints[4] != 0;
  p.logits_stride_b = ints[5];
  p.logits_stride_s = ints[6];
  p.tokens_stride_b = ints[7];
  p.tokens_stride_s = ints[8];
  auto ptr = [&](int i) { return reinterpret_cast<void*>(ptrs[i]); };
  p.logits = ptr(0);
  p.block_tokens = ptr(1);
  p.num_drafts = static_cast<const int32_t*>(ptr(2));
  p.temperature = static_cast<const float*>(ptr(3));
  p.seeds = static_cast<const int64_t*>(ptr(4));
  p.positions = static_cast<const int64_t*>(ptr(5));
  p.seq_lens = static_cast<const int32_t*>(ptr(6));
  p.accept_len = static_cast<int32_t*>(ptr(7));
  p.out_tokens = static_cast<int32_t*>(ptr(8));
  p.bonus = static_cast<int32_t*>(ptr(9));
  p.new_seq_lens = static_cast<int32_t*>(ptr(10));
  // The decision bindings.cpp makes, from the same function.
  p.vectorized = verify_chain_vectorizable(p);
  ints[9] = p.vectorized;
  const int64_t esize = p.logits_dtype == DType::kFloat32 ? 4 : 2;
  verify::plan_splits(static_cast<int64_t>(p.batch) * p.block_size, p.vocab, esize,
                      static_cast<int>(ints[10]), p.split_len, p.num_splits);
  const size_t parts = static_cast<size_t>(p.batch) * p.block_size * p.num_splits;
  // Garbage-filled workspace: every slot read must have been written.
  std::vector<float> ws_score(parts, std::nanf(""));
  std::vector<int32_t> ws_index(parts, -12345);
  p.workspace_score = ws_score.data();
  p.workspace_index = ws_index.data();
  const unsigned grid = static_cast<unsigned>(parts);
  switch (p.logits_dtype) {
    case DType::kFloat32:
      emu::launch(verify::split_argmax_kernel<float>, grid, verify::kThreads, 0, p);
      break;
    case DType::kFloat16:
      emu::launch(verify::split_argmax_kernel<__half>, grid, verify::kThreads, 0, p);
      break;
    default:
      emu::launch(verify::split_argmax_kernel<__nv_bfloat16>, grid, verify::kThreads, 0, p);
  }
  const size_t smem = sizeof(int32_t) * p.block_size;
  if (p.block_tokens_int64) {
    emu::launch(verify::accept_kernel<int64_t>, p.batch, verify::kFinishThreads, smem, p);
  } else {
    emu::launch(verify::accept_kernel<int32_t>, p.batch, verify::kFinishThreads, smem, p);
  }
  return p.num_splits;
}


// ints: N, L, Hkv, D, rotary_dim, act dtype, cache dtype, norm dtype, rope_neox,
// vectorized (out: bindings.cpp's choice), k strides (n, l, h), v strides (n, l, h), norm strides (l, d),
// cos_sin stride, max_position, k cache strides (page, row, head), v cache
// strides (page, row, head), num_pages, page_size, k_uniform, v_uniform,
// k_layer_stride, v_layer_stride (bytes). ptrs: k, v, k_norm_weight,
// positions, slot_mapping, cos_sin, k_scale, v_scale, then L k-cache bases
// and L v-cache bases (L <= 32).
void emu_write_kv(int64_t* ints, const int64_t* ptrs, float eps) {
  WriteKVParams p{};
  p.num_tokens = static_cast<int32_t>(ints[0]);
  p.num_layers = static_cast<int32_t>(ints[1]);
  p.num_kv_heads = static_cast<int32_t>(ints[2]);
  p.head_dim = static_cast<int32_t>(ints[3]);
  p.rotary_dim = static_cast<int32_t>(ints[4]);
  p.act_dtype = static_cast<DType>(ints[5]);
  p.cache_dtype = static_cast<DType>(ints[6]);
  p.norm_dtype = static_cast<DType>(ints[7]);
  p.rope_neox = ints[8] != 0;
  p.k_stride_n = ints[10]; p.k_stride_l = ints[11]; p.k_stride_h = ints[12];
  p.v_stride_n = ints[13]; p.v_stride_l = ints[14]; p.v_stride_h = ints[15];
  p.norm_stride_l = ints[16]; p.norm_stride_d = ints[17];
  p.cos_sin_stride = ints[18];
  p.max_position = ints[19];
  p.k_stride_page = ints[20]; p.k_stride_row = ints[21]; p.k_stride_head = ints[22];
  p.v_stride_page = ints[23]; p.v_stride_row = ints[24]; p.v_stride_head = ints[25];
  p.num_pages = ints[26];
  p.page_size = ints[27];
  p.k_uniform = ints[28] != 0;
  p.v_uniform = ints[29] != 0;
  p.k_layer_stride = ints[30];
  p.v_layer_stride = ints[31];
  p.eps = eps;
  auto ptr = [&](int i) { return reinterpret_cast<void*>(ptrs[i]); };
  p.k = ptr(0);
  p.v = ptr(1);
  p.k_norm_weight = ptr(2);
  p.positions = static_cast<const int64_t*>(ptr(3));
  p.slot_mapping = static_cast<const int64_t*>(ptr(4));
  p.cos_sin = static_cast<const float*>(ptr(5));
  p.k_scale = static_cast<const float*>(ptr(6));
  p.v_scale = static_cast<const float*>(ptr(7));
  for (int l = 0; l < p.num_layers && l < kWriteKVMaxLayerPtrs; ++l) {
    p.k_cache_base[l] = ptr(8 + l);
    p.v_cache_base[l] = ptr(8 + p.num_layers + l);
  }
  p.vectorized = write_kv_vectorizable(p);
  ints[9] = p.vectorized;
  if (p.act_dtype == DType::kFloat16) {
    run_write_kv_cache<__half>(p);
  } else {
    run_write_kv_cache<__nv_bfloat16>(p);
  }
}

}  // extern "C"
