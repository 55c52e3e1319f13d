// Entry points of the write_kv kernel (plain pointers; no PyTorch headers):
// the dispatch of write_kv.cuh with a stream launcher, or with none (probe).
#include "write_kv.cuh"

namespace dflash {

cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  return writekv::dispatch(p, StreamLaunch{stream});
}

cudaError_t probe_launch_write_kv(const WriteKVParams& p) {
  return writekv::dispatch(p, NoLaunch{});
}

}  // namespace dflash
