// PyTorch bindings of the compiled kernels: ops dflash::verify_chain_cuda and
// dflash::write_kv_cuda (the backend signatures of docs/DESIGN.md). Only this
// file sees ATen; it turns tensors into pointers and strides and calls the
// plain launchers of dflash_kernels.h on the current stream.
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dflash_kernels.h"

namespace dflash {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    case at::kFloat8_e5m2: return DType::kFloat8E5M2;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, ": expected a tensor on ",
              ref.device(), ", got one on ", t.device());
}

void check_vec(const Tensor& t, at::ScalarType dtype, int64_t n, const char* name,
               const Tensor& ref, bool contiguous = false) {
  check_cuda(t, ref, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, ": expected ", n, " elements, got ", t.numel());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, ": expected a contiguous tensor");
}

// The kernels index the per-request / per-token vectors as p[i]. ops.py only
// checks their shape, so a strided view (a column of a [B, 2] state tensor) or
// an expanded one (one temperature for the whole batch, stride 0) would be read
// at the wrong offsets or past its storage: pass a dense copy instead (a device
// copy on the current stream; graph-capturable, no sync). Returns the input
// itself when it is already contiguous.
Tensor dense(const Tensor& t) { return t.contiguous(); }
OptTensor dense(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

template <typename P>
const P* opt_ptr(const OptTensor& t) {
  return t.has_value() ? static_cast<const P*>(t->data_ptr()) : nullptr;
}

// SM count of the current device, cached per device (a host attribute query;
// ATen/cuda/CUDAContext.h would pull cuBLAS / cuSPARSE headers into the build).
int num_sms(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size())) {
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// ------------------------------------------------------------------ verify_chain

void verify_chain_cuda(const Tensor& logits, const Tensor& block_tokens,
                       const Tensor& num_drafts_in, const OptTensor& temperature_in,
                       const OptTensor& top_k, const OptTensor& top_p, const OptTensor& seeds_in,
                       const OptTensor& positions_in, const OptTensor& draft_probs,
                       const OptTensor& seq_lens_in, const Tensor& accept_len,
                       const Tensor& out_tokens, const Tensor& bonus,
                       const OptTensor& new_seq_lens) {
  TORCH_CHECK(!top_k.has_value() && !top_p.has_value() && !draft_probs.has_value(),
              "verify_chain_cuda: top_k, top_p and draft_probs are not implemented in the "
              "compiled kernel (dflash_kernels.cuda routes such calls to the Triton backend)");
  TORCH_CHECK(logits.is_cuda(), "logits: expected a CUDA tensor");
  TORCH_CHECK(block_tokens.dim() == 2, "block_tokens: expected [B, S]");
  const int64_t B = block_tokens.size(0), S = block_tokens.size(1);
  TORCH_CHECK(S >= 1, "block_tokens: expected at least one column");
  int64_t stride_b, stride_s, V;
  if (logits.dim() == 3) {
    TORCH_CHECK(logits.size(0) == B && logits.size(1) == S, "logits: expected [B, S, V]");
    V = logits.size(2);
    stride_b = logits.stride(0);
    stride_s = logits.stride(1);
  } else {
    TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B * S, "logits: expected [B*S, V]");
    V = logits.size(1);
    stride_s = logits.stride(0);
    stride_b = stride_s * S;
  }
  TORCH_CHECK(V >= 1 && V <= INT32_MAX, "logits: vocabulary size out of range: ", V);
  TORCH_CHECK(V == 1 || logits.stride(-1) == 1, "logits: expected a unit last stride");
  const DType ldt = to_dtype(logits, "logits");
  TORCH_CHECK(ldt == DType::kFloat32 || ldt == DType::kFloat16 || ldt == DType::kBFloat16,
              "logits: expected fp32, fp16 or bf16");
  check_cuda(block_tokens, logits, "block_tokens");
  TORCH_CHECK(block_tokens.scalar_type() == at::kInt || block_tokens.scalar_type() == at::kLong,
              "block_tokens: expected int32 or int64");
  check_vec(num_drafts_in, at::kInt, B, "num_drafts", logits);
  if (temperature_in.has_value()) {
    check_vec(*temperature_in, at::kFloat, B, "temperature", logits);
    TORCH_CHECK(seeds_in.has_value() && positions_in.has_value(),
                "seeds, positions: required with temperature");
    check_vec(*seeds_in, at::kLong, B, "seeds", logits);
    check_vec(*positions_in, at::kLong, B, "positions", logits);
  }
  check_vec(accept_len, at::kInt, B, "accept_len", logits, true);
  check_vec(out_tokens, at::kInt, B * S, "out_tokens", logits, true);
  check_vec(bonus, at::kInt, B, "bonus", logits, true);
  TORCH_CHECK(seq_lens_in.has_value() == new_seq_lens.has_value(),
              "seq_lens, new_seq_lens: pass both or neither");
  if (seq_lens_in.has_value()) {
    check_vec(*seq_lens_in, at::kInt, B, "seq_lens", logits);
    check_vec(*new_seq_lens, at::kInt, B, "new_seq_lens", logits, true);
  }
  if (B == 0) return;

  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor num_drafts = dense(num_drafts_in);
  const OptTensor temperature = dense(temperature_in), seeds = dense(seeds_in),
                  positions = dense(positions_in), seq_lens = dense(seq_lens_in);
  VerifyChainParams p{};
  p.logits = logits.data_ptr();
  p.logits_dtype = ldt;
  p.logits_stride_b = stride_b;
  p.logits_stride_s = stride_s;
  p.block_tokens = block_tokens.data_ptr();
  p.block_tokens_int64 = block_tokens.scalar_type() == at::kLong;
  p.tokens_stride_b = block_tokens.stride(0);
  p.tokens_stride_s = block_tokens.stride(1);
  p.num_drafts = num_drafts.data_ptr<int32_t>();
  p.temperature = opt_ptr<float>(temperature);
  p.seeds = opt_ptr<int64_t>(seeds);
  p.positions = opt_ptr<int64_t>(positions);
  p.seq_lens = opt_ptr<int32_t>(seq_lens);
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.out_tokens = out_tokens.data_ptr<int32_t>();
  p.bonus = bonus.data_ptr<int32_t>();
  p.new_seq_lens = new_seq_lens.has_value() ? new_seq_lens->data_ptr<int32_t>() : nullptr;
  p.batch = static_cast<int32_t>(B);
  p.block_size = static_cast<int32_t>(S);
  p.vocab = static_cast<int32_t>(V);
  p.vectorized = verify_chain_vectorizable(p);
  verify_chain_plan(p, num_sms(logits.get_device()));
  // Workspace from the caching allocator: sizes are host-known, so this is
  // graph-capturable and never synchronizes.
  const int64_t parts = B * S * p.num_splits;
  Tensor ws_score = at::empty({parts}, logits.options().dtype(at::kFloat));
  Tensor ws_index = at::empty({parts}, logits.options().dtype(at::kInt));
  p.workspace_score = ws_score.data_ptr<float>();
  p.workspace_index = ws_index.data_ptr<int32_t>();
  const cudaError_t err = launch_verify_chain(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(err == cudaSuccess, "verify_chain_cuda: launch failed: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------- write_kv

void write_kv_cuda(const Tensor& k, const Tensor& v, const OptTensor& k_norm_weight,
                   const Tensor& positions_in, const Tensor& slot_mapping_in,
                   at::TensorList k_caches,
                   at::TensorList v_caches, const Tensor& cos_sin_cache, double eps,
                   bool rope_neox, int64_t rotary_dim, const OptTensor& k_scale,
                   const OptTensor& v_scale) {
  TORCH_CHECK(k.is_cuda() && k.dim() == 4, "k: expected a CUDA tensor [N, L, Hkv, D]");
  const int64_t N = k.size(0), L = k.size(1), H = k.size(2), D = k.size(3);
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "v: expected the shape and dtype of k");
  check_cuda(v, k, "v");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "k: head dim must be 64, 128 or 256, got ", D);
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v: expected a unit last stride");
  const DType act = to_dtype(k, "k");
  TORCH_CHECK(act == DType::kFloat16 || act == DType::kBFloat16, "k: expected fp16 or bf16");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L &&
                  static_cast<int64_t>(v_caches.size()) == L,
              "k_caches, v_caches: expected ", L, " per-layer caches");
  if (N == 0 || L == 0 || H == 0) return;
  const Tensor& kc0 = k_caches[0];
  const Tensor& vc0 = v_caches[0];
  for (int64_t l = 0; l < L; ++l) {
    for (const Tensor* c : {&k_caches[l], &v_caches[l]}) {
      const Tensor& ref = c == &k_caches[l] ? kc0 : vc0;
      check_cuda(*c, k, "k_caches / v_caches");
      TORCH_CHECK(c->dim() == 4 && c->size(2) == H && c->size(3) == D,
                  "k_caches / v_caches: expected [num_pages, page_size, Hkv, D] caches");
      TORCH_CHECK(c->sizes() == ref.sizes() && c->strides() == ref.strides() &&
                      c->scalar_type() == ref.scalar_type(),
                  "k_caches / v_caches: every layer needs the shape, strides and dtype of layer 0");
      TORCH_CHECK(c->stride(3) == 1, "k_caches / v_caches: expected a unit last stride");
    }
  }
  TORCH_CHECK(vc0.sizes() == kc0.sizes() && vc0.scalar_type() == kc0.scalar_type(),
              "v_caches: expected the shape and dtype of k_caches");
  const DType cdt = to_dtype(kc0, "k_caches");
  const bool fp8 = cdt == DType::kFloat8E4M3 || cdt == DType::kFloat8E5M2;
  TORCH_CHECK(fp8 || cdt == act, "k_caches: expected the dtype of k or fp8");
  TORCH_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()),
              "k_scale, v_scale: required with (and only with) fp8 caches");
  if (fp8) {
    check_vec(*k_scale, at::kFloat, 1, "k_scale", k);
    check_vec(*v_scale, at::kFloat, 1, "v_scale", k);
  }
  check_vec(positions_in, at::kLong, N, "positions", k);
  check_vec(slot_mapping_in, at::kLong, N, "slot_mapping", k);
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim <= D && rotary_dim % 2 == 0,
              "rotary_dim: expected an even number <= ", D);
  check_cuda(cos_sin_cache, k, "cos_sin_cache");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == rotary_dim && cos_sin_cache.size(0) >= 1 &&
                  (rotary_dim <= 1 || cos_sin_cache.stride(1) == 1),
              "cos_sin_cache: expected fp32 [max_position >= 1, rotary_dim] with unit last stride");
  DType ndt = DType::kFloat32;
  if (k_norm_weight.has_value()) {
    check_cuda(*k_norm_weight, k, "k_norm_weight");
    TORCH_CHECK(k_norm_weight->dim() == 2 && k_norm_weight->size(0) == L &&
                    k_norm_weight->size(1) == D,
                "k_norm_weight: expected [L, D]");
    ndt = to_dtype(*k_norm_weight, "k_norm_weight");
    TORCH_CHECK(!(ndt == DType::kFloat8E4M3 || ndt == DType::kFloat8E5M2),
                "k_norm_weight: expected fp32, fp16 or bf16");
  }

  const c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor positions = dense(positions_in), slot_mapping = dense(slot_mapping_in);
  const int64_t act_size = k.element_size();
  const int64_t norm_size = k_norm_weight.has_value() ? k_norm_weight->element_size() : 0;

  // A stacked cache arrives as L views at a uniform distance: one launch for
  // any L. Separate allocations go as a table of base pointers in the kernel
  // arguments (graph-capturable, no device array), 32 layers per launch.
  auto uniform_stride = [&](at::TensorList caches, int64_t& stride) {
    const auto base = reinterpret_cast<intptr_t>(caches[0].data_ptr());
    stride = L > 1 ? reinterpret_cast<intptr_t>(caches[1].data_ptr()) - base : 0;
    for (int64_t l = 2; l < L; ++l) {
      if (reinterpret_cast<intptr_t>(caches[l].data_ptr()) - base != l * stride) return false;
    }
    return true;
  };
  int64_t k_layer_stride = 0, v_layer_stride = 0;
  const bool k_uniform = uniform_stride(k_caches, k_layer_stride);
  const bool v_uniform = uniform_stride(v_caches, v_layer_stride);
  const int64_t chunk = (k_uniform && v_uniform) ? L : kWriteKVMaxLayerPtrs;

  for (int64_t l0 = 0; l0 < L; l0 += chunk) {
    const int64_t nl = std::min(chunk, L - l0);
    WriteKVParams p{};
    p.k = static_cast<const char*>(k.data_ptr()) + l0 * k.stride(1) * act_size;
    p.v = static_cast<const char*>(v.data_ptr()) + l0 * v.stride(1) * act_size;
    p.act_dtype = act;
    p.k_stride_n = k.stride(0);
    p.k_stride_l = k.stride(1);
    p.k_stride_h = k.stride(2);
    p.v_stride_n = v.stride(0);
    p.v_stride_l = v.stride(1);
    p.v_stride_h = v.stride(2);
    if (k_norm_weight.has_value()) {
      p.k_norm_weight = static_cast<const char*>(k_norm_weight->data_ptr()) +
                        l0 * k_norm_weight->stride(0) * norm_size;
      p.norm_dtype = ndt;
      p.norm_stride_l = k_norm_weight->stride(0);
      p.norm_stride_d = k_norm_weight->stride(1);
    }
    p.positions = positions.data_ptr<int64_t>();
    p.slot_mapping = slot_mapping.data_ptr<int64_t>();
    p.cos_sin = cos_sin_cache.data_ptr<float>();
    p.cos_sin_stride = cos_sin_cache.stride(0);
    p.max_position = cos_sin_cache.size(0);
    p.k_uniform = k_uniform;
    p.v_uniform = v_uniform;
    p.k_layer_stride = k_layer_stride;
    p.v_layer_stride = v_layer_stride;
    for (int64_t i = 0; i < nl; ++i) {
      if (i == 0 || !k_uniform) p.k_cache_base[i] = k_caches[l0 + i].data_ptr();
      if (i == 0 || !v_uniform) p.v_cache_base[i] = v_caches[l0 + i].data_ptr();
    }
    p.cache_dtype = cdt;
    p.k_stride_page = kc0.stride(0);
    p.k_stride_row = kc0.stride(1);
    p.k_stride_head = kc0.stride(2);
    p.v_stride_page = vc0.stride(0);
    p.v_stride_row = vc0.stride(1);
    p.v_stride_head = vc0.stride(2);
    p.num_pages = kc0.size(0);
    p.page_size = kc0.size(1);
    p.k_scale = opt_ptr<float>(k_scale);
    p.v_scale = opt_ptr<float>(v_scale);
    p.num_tokens = static_cast<int32_t>(N);
    p.num_layers = static_cast<int32_t>(nl);
    p.num_kv_heads = static_cast<int32_t>(H);
    p.head_dim = static_cast<int32_t>(D);
    p.rotary_dim = static_cast<int32_t>(rotary_dim);
    p.eps = static_cast<float>(eps);
    p.rope_neox = rope_neox;
    // Each lane moves 8 elements: 16-byte loads need 8-element-aligned rows,
    // and so do the cache stores (16 bytes, or 8 for fp8).
    p.vectorized = write_kv_vectorizable(p);
    const cudaError_t err = launch_write_kv(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    TORCH_CHECK(err == cudaSuccess, "write_kv_cuda: launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace
}  // namespace dflash

TORCH_LIBRARY_FRAGMENT(dflash, m) {
  m.def(
      "verify_chain_cuda(Tensor logits, Tensor block_tokens, Tensor num_drafts, "
      "Tensor? temperature, Tensor? top_k, Tensor? top_p, Tensor? seeds, Tensor? positions, "
      "Tensor? draft_probs, Tensor? seq_lens, Tensor(a!) accept_len, Tensor(b!) out_tokens, "
      "Tensor(c!) bonus, Tensor(d!)? new_seq_lens) -> ()");
  m.def(
      "write_kv_cuda(Tensor k, Tensor v, Tensor? k_norm_weight, Tensor positions, "
      "Tensor slot_mapping, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos_sin_cache, "
      "float eps, bool rope_neox, int rotary_dim, Tensor? k_scale, Tensor? v_scale) -> ()");
}

TORCH_LIBRARY_IMPL(dflash, CUDA, m) {
  m.impl("verify_chain_cuda", &dflash::verify_chain_cuda);
  m.impl("write_kv_cuda", &dflash::write_kv_cuda);
}

// An importable module: loading it runs the registrations above.
static PyModuleDef dflash_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "Compiled CUDA kernels of dflash_kernels (torch.ops.dflash)",
                                      -1, nullptr};

#define DFLASH_STR_(x) #x
#define DFLASH_STR(x) DFLASH_STR_(x)
#ifdef DFLASH_KERNELS_SM_TARGETS
#define DFLASH_SM_TARGETS DFLASH_STR(DFLASH_KERNELS_SM_TARGETS)
#else
#define DFLASH_SM_TARGETS ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dflash_c_module);
  // The SASS targets the binary was built for ("90a_100a"), so tests know what to expect.
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "sm_targets", DFLASH_SM_TARGETS) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
