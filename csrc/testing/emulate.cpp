// Test-only: C entry points that run an op's host path (verify_chain.h,
// write_kv.h: the guards and parameter filling the bindings run) and its
// launch dispatch (verify_chain.cuh, write_kv.cuh) with the kernels under
// host_emulation.h. tests/test_cuda_ops.py loads this through ctypes and
// passes each tensor as kDescWords int64 words, so the Python side holds no
// op logic and no struct layout.
#include "host_emulation.h"

#include "../verify_chain.cuh"
#include "../write_kv.cuh"

using namespace dflash;

namespace {

// A tensor: data pointer, defined, DType code, device, ndim, 4 sizes, 4 strides.
constexpr int kDescWords = 13;

TensorDesc desc(const int64_t* w) {
  TensorDesc t;
  t.data = reinterpret_cast<void*>(w[0]);
  t.defined = w[1] != 0;
  t.dtype = static_cast<DType>(w[2]);
  t.device = static_cast<int32_t>(w[3]);
  t.ndim = static_cast<int32_t>(w[4]);
  for (int d = 0; d < TensorDesc::kMaxDims; ++d) {
    t.size[d] = w[5 + d];
    t.stride[d] = w[5 + TensorDesc::kMaxDims + d];
  }
  return t;
}

// A list of tensors for write_kv_launches (the bindings pass an at::TensorList).
struct DescList {
  const int64_t* words;
  int64_t n;
  int64_t size() const { return n; }
  TensorDesc operator[](int64_t i) const { return desc(words + i * kDescWords); }
};

}  // namespace

extern "C" {

// Vector accesses at misaligned addresses since the library was loaded.
int64_t emu_misaligned_vector_accesses() { return emu::misaligned_vector_accesses().load(); }

// tensors: the 14 tensor arguments of dflash::verify_chain_cuda in schema
// order. Returns the failed guard's message, or null after running the
// kernels; info (out): the number of splits and whether the vector path was taken.
const char* emu_verify_chain(const int64_t* tensors, int num_sms, int64_t* info) {
  auto at = [&](int i) { return desc(tensors + i * kDescWords); };
  const VerifyChainArgs args{at(0), at(1), at(2), at(3),  at(4),  at(5),  at(6),
                             at(7), at(8), at(9), at(10), at(11), at(12), at(13)};
  VerifyChainParams p;
  if (const char* err = verify_chain_params(args, num_sms, p)) return err;
  info[0] = p.num_splits;
  info[1] = p.vectorized;
  if (p.batch == 0) return nullptr;
  std::vector<unsigned char> workspace(static_cast<size_t>(verify_chain_workspace_bytes(p)));
  set_verify_chain_workspace(p, workspace.data());
  // Garbage-filled workspace: every slot read must have been written.
  const size_t parts = workspace.size() / (sizeof(float) + sizeof(int32_t));
  std::fill_n(p.workspace_score, parts, std::nanf(""));
  std::fill_n(p.workspace_index, parts, -12345);
  return verify::dispatch(p, emu::Launch{}) == cudaSuccess ? nullptr : "dispatch failed";
}

// tensors: k, v, k_norm_weight, positions, slot_mapping, cos_sin_cache,
// k_scale, v_scale, then num_layers k caches and num_layers v caches. Returns
// the failed guard's message, or null after running the kernel; info (out):
// the number of launches, then per launch whether it took the vector path.
const char* emu_write_kv(const int64_t* tensors, int64_t num_layers, double eps, int rope_neox,
                         int64_t rotary_dim, int64_t* info, int64_t info_len) {
  auto at = [&](int i) { return desc(tensors + i * kDescWords); };
  const int64_t* caches = tensors + 8 * kDescWords;
  const WriteKVArgs<DescList> args{
      at(0), at(1), at(2), at(3), at(4), DescList{caches, num_layers},
      DescList{caches + num_layers * kDescWords, num_layers}, at(5), eps, rope_neox != 0,
      rotary_dim, at(6), at(7)};
  info[0] = 0;
  const char* failed = nullptr;
  const char* err = write_kv_launches(args, [&](const WriteKVParams& p) {
    if (++info[0] < info_len) info[info[0]] = p.vectorized;
    if (writekv::dispatch(p, emu::Launch{}) != cudaSuccess) failed = "dispatch failed";
  });
  return err != nullptr ? err : failed;
}

}  // extern "C"
