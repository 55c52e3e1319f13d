// Launcher of the write_kv kernel (plain pointers; no PyTorch headers).
#include "dflash_kernels.h"
#include "write_kv.cuh"

namespace dflash {

namespace {

template <typename T, writekv::CacheKind kKind>
cudaError_t launch_for_dim(const WriteKVParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_layers * p.num_kv_heads;
  auto launch = [&](auto kernel, int lanes) {
    const int64_t groups = writekv::kThreads / lanes;
    const int64_t blocks = ceil_div(items, groups);
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    kernel<<<static_cast<unsigned>(blocks), writekv::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  switch (p.head_dim) {
    case 64: return launch(writekv::write_kv_kernel<T, 64, kKind>, 64 / writekv::kElems);
    case 128: return launch(writekv::write_kv_kernel<T, 128, kKind>, 128 / writekv::kElems);
    case 256: return launch(writekv::write_kv_kernel<T, 256, kKind>, 256 / writekv::kElems);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_for_act(const WriteKVParams& p, cudaStream_t stream) {
  switch (p.cache_dtype) {
    case DType::kFloat8E4M3: return launch_for_dim<T, writekv::CacheKind::kE4M3>(p, stream);
    case DType::kFloat8E5M2: return launch_for_dim<T, writekv::CacheKind::kE5M2>(p, stream);
    default:
      if (p.cache_dtype != p.act_dtype) return cudaErrorInvalidValue;
      return launch_for_dim<T, writekv::CacheKind::kSame>(p, stream);
  }
}

}  // namespace

cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.num_layers <= 0 || p.num_kv_heads <= 0) return cudaSuccess;
  if (!p.k_uniform && p.num_layers > kWriteKVMaxLayerPtrs) return cudaErrorInvalidValue;
  if (!p.v_uniform && p.num_layers > kWriteKVMaxLayerPtrs) return cudaErrorInvalidValue;
  if (p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0 ||
      p.max_position <= 0 || p.page_size <= 0) {
    return cudaErrorInvalidValue;
  }
  switch (p.act_dtype) {
    case DType::kFloat16: return launch_for_act<__half>(p, stream);
    case DType::kBFloat16: return launch_for_act<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dflash
