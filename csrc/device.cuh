// What the kernel headers share beyond common.cuh (which stays free of CUDA
// headers for the g++ build of philox.cuh): dtype conversions, the launchers
// of the ops' dispatch templates, and the entry points of a .cu file.
#pragma once

#include <cstddef>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "common.cuh"

namespace dflash {

DFLASH_DEVICE float to_float(float x) { return x; }
DFLASH_DEVICE float to_float(__half x) { return __half2float(x); }
DFLASH_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even.
template <typename T>
DFLASH_DEVICE T from_float(float x);
template <>
DFLASH_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
DFLASH_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Launchers for the dispatch templates (verify::dispatch, writekv::dispatch):
// launch(kernel, grid, threads, dynamic smem bytes, params) -> the launch
// error. host_emulation.h adds the emulator's.
#if defined(__CUDACC__) && !defined(DFLASH_HOST_EMULATION)
// Launches on a stream: what the real entry points pass.
struct StreamLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename Params>
  cudaError_t operator()(Kernel kernel, unsigned grid, unsigned threads, size_t smem,
                         const Params& p) const {
    kernel<<<grid, threads, smem, stream>>>(p);
    return cudaGetLastError();
  }
};

// The two entry points of an op's .cu file (declared in its .h): the dispatch
// with a stream launcher, and with none (the probe ops: host path measurement only).
#define DFLASH_ENTRY_POINTS(Params, dispatch, launch_name, probe_name)                         \
  cudaError_t launch_name(const Params& p, cudaStream_t stream) {                              \
    return dispatch(p, StreamLaunch{stream});                                                  \
  }                                                                                            \
  cudaError_t probe_name(const Params& p) { return dispatch(p, NoLaunch{}); }
#endif

// Launches nothing: the probe ops' stand-in.
struct NoLaunch {
  template <typename Kernel, typename Params>
  cudaError_t operator()(Kernel, unsigned, unsigned, size_t, const Params&) const {
    return cudaSuccess;
  }
};

}  // namespace dflash
