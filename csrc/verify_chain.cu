// Entry points of the verify_chain kernels (plain pointers; no PyTorch headers):
// the dispatch of verify_chain.cuh with a stream launcher, or with none (probe).
#include "verify_chain.cuh"

namespace dflash {

cudaError_t launch_verify_chain(const VerifyChainParams& p, cudaStream_t stream) {
  return verify::dispatch(p, StreamLaunch{stream});
}

cudaError_t probe_launch_verify_chain(const VerifyChainParams& p) {
  return verify::dispatch(p, NoLaunch{});
}

}  // namespace dflash
