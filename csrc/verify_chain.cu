// Launchers of the verify_chain kernels (plain pointers; no PyTorch headers).
#include "dflash_kernels.h"
#include "verify_chain.cuh"

namespace dflash {

namespace {
int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }
}  // namespace

void verify_chain_plan(VerifyChainParams& p, int num_sms) {
  verify::plan_splits(static_cast<int64_t>(p.batch) * p.block_size, p.vocab,
                      elem_size(p.logits_dtype), num_sms, p.split_len, p.num_splits);
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
