// Shared by the op bindings (verify_chain.cpp, write_kv.cpp): ATen tensors to
// the plain TensorDesc of the host path, and the per-op host path policy (the
// real launch, or the probe's CPU stand-in). Only csrc/bindings/ sees ATen.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../tensor.h"

namespace dflash {
namespace bindings {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    case at::kFloat8_e5m2: return DType::kFloat8E5M2;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default: return DType::kOther;
  }
}

inline TensorDesc describe(const Tensor& t) {
  TensorDesc d;
  d.data = t.data_ptr();
  d.defined = true;
  d.dtype = dtype_of(t.scalar_type());
  const c10::Device dev = t.device();
  d.device = (static_cast<int32_t>(dev.type()) << 16) | static_cast<uint16_t>(dev.index());
  d.ndim = static_cast<int32_t>(t.dim());
  if (d.ndim <= TensorDesc::kMaxDims) {
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    for (int32_t i = 0; i < d.ndim; ++i) {
      d.size[i] = sizes[i];
      d.stride[i] = strides[i];
    }
  }
  return d;
}

inline TensorDesc describe(const OptTensor& t) { return t.has_value() ? describe(*t) : TensorDesc{}; }

// A Tensor[] argument as the host path's cache list: L per-layer caches, or a
// list of one stacked [L, P, page, Hkv, D] cache, whose layer l is described
// without making a view (the public op passes stacked caches so).
struct TensorListDescs {
  at::TensorList list;
  bool stacked() const { return list.size() == 1 && list[0].dim() == 5; }
  int64_t size() const {
    return stacked() ? list[0].size(0) : static_cast<int64_t>(list.size());
  }
  TensorDesc operator[](int64_t i) const {
    if (!stacked()) return describe(list[i]);
    const Tensor& t = list[0];
    TensorDesc d = describe(t);  // ndim 5: only ndim is kept
    d.data = static_cast<char*>(t.data_ptr()) + i * t.stride(0) * static_cast<int64_t>(t.element_size());
    d.ndim = 4;
    for (int32_t k = 0; k < 4; ++k) {
      d.size[k] = t.size(k + 1);
      d.stride[k] = t.stride(k + 1);
    }
    return d;
  }
};

// SM count of a device, cached (one attribute query per device per process;
// ATen/cuda/CUDAContext.h would pull cuBLAS / cuSPARSE headers into the build).
inline int num_sms(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size());
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// The host path of a real call: CUDA tensors, the device's SM count, a
// workspace from the caching allocator (host-known size: graph-capturable, no
// sync), launches on the current stream under a device guard.
struct Device {
  static constexpr bool kProbe = false;
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit Device(const Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
  static int sms(const Tensor& t) {
    TORCH_CHECK(t.is_cuda(), "expected CUDA tensors, got one on ", t.device());
    return num_sms(t.device().index());
  }
  static c10::DataPtr workspace(size_t bytes) {
    return c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
  }
};

// Measurement only (the _probe_*_cuda ops): the same path on CPU tensors,
// without the device guard, the stream query and the launches; the workspace
// comes from the CPU allocator and the SM count is an H100's.
struct Probe {
  static constexpr bool kProbe = true;
  explicit Probe(const Tensor&) {}
  static int sms(const Tensor&) { return 132; }
  static c10::DataPtr workspace(size_t bytes) { return c10::GetCPUAllocator()->allocate(bytes); }
};

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(err));
}

}  // namespace bindings
}  // namespace dflash
