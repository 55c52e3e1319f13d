// Launchers of the verify_chain kernels (plain pointers; no PyTorch headers).
#include <algorithm>

#include "dflash_kernels.h"
#include "verify_chain.cuh"

namespace dflash {

namespace {
int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }
}  // namespace

void verify_chain_plan(VerifyChainParams& p, int num_sms) {
  // Enough blocks for ~4 per SM; a split keeps >= 4096 ids so the merge stays cheap.
  constexpr int64_t kMinSplitLen = 4096;
  const int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(p.batch) * p.block_size);
  const int64_t want = ceil_div(4 * static_cast<int64_t>(std::max(num_sms, 1)), rows);
  const int64_t most = std::max<int64_t>(1, p.vocab / kMinSplitLen);
  const int64_t splits = std::min(std::max<int64_t>(want, 1), most);
  const int64_t vec = 16 / elem_size(p.logits_dtype);
  const int64_t len = ceil_div(ceil_div(p.vocab, splits), vec) * vec;
  p.split_len = static_cast<int32_t>(len);
  p.num_splits = static_cast<int32_t>(std::max<int64_t>(1, ceil_div(p.vocab, len)));
}

cudaError_t launch_verify_chain(const VerifyChainParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.block_size <= 0 || p.vocab <= 0 || p.num_splits <= 0 || p.split_len <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.block_size * p.num_splits;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (p.logits_dtype) {
    case DType::kFloat32:
      verify::split_argmax_kernel<float><<<grid, verify::kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      verify::split_argmax_kernel<__half><<<grid, verify::kThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      verify::split_argmax_kernel<__nv_bfloat16><<<grid, verify::kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = sizeof(int32_t) * static_cast<size_t>(p.block_size);
  if (p.block_tokens_int64) {
    verify::accept_kernel<int64_t><<<p.batch, verify::kFinishThreads, smem, stream>>>(p);
  } else {
    verify::accept_kernel<int32_t><<<p.batch, verify::kFinishThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace dflash
