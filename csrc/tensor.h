// Plain description of a tensor argument (pointer, dtype, sizes, strides) and
// the guard helpers of the host path. No PyTorch and no CUDA device code: the
// bindings fill these from at::Tensor, the host emulator from ctypes, an engine
// from its own tensors.
#pragma once

#include <cstdint>
#include <initializer_list>  // the guards loop over {&a, &b, ...}

namespace dflash {

enum class DType : int32_t {
  kOther = -1,  // any dtype no kernel takes
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,  // float8_e4m3fn
  kFloat8E5M2 = 4,
  kInt32 = 5,
  kInt64 = 6,
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kFloat8E4M3: case DType::kFloat8E5M2: return 1;
    case DType::kInt64: return 8;
    default: return 0;
  }
}

constexpr bool is_fp8(DType dtype) {
  return dtype == DType::kFloat8E4M3 || dtype == DType::kFloat8E5M2;
}

// Sizes and strides in elements. ndim > kMaxDims keeps only ndim (every guard
// expects at most kMaxDims, so such a tensor is rejected, never indexed).
struct TensorDesc {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  bool defined = false;  // false: the argument was None
  DType dtype = DType::kOther;
  int32_t device = 0;    // any code that tells devices apart (the bindings: type and index)
  int32_t ndim = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};

  int64_t numel() const {
    int64_t n = 1;
    for (int32_t d = 0; d < ndim && d < kMaxDims; ++d) n *= size[d];
    return n;
  }
  // Row-major dense (strides of size-1 dimensions, and of empty tensors, do not
  // matter), as torch's is_contiguous.
  bool contiguous() const {
    if (ndim <= kMaxDims && numel() == 0) return true;
    int64_t expected = 1;
    for (int32_t d = (ndim < kMaxDims ? ndim : kMaxDims) - 1; d >= 0; --d) {
      if (size[d] != 1 && stride[d] != expected) return false;
      expected *= size[d];
    }
    return ndim <= kMaxDims;
  }
  bool same_layout(const TensorDesc& o) const {
    if (ndim != o.ndim || dtype != o.dtype) return false;
    for (int32_t d = 0; d < ndim && d < kMaxDims; ++d) {
      if (size[d] != o.size[d] || stride[d] != o.stride[d]) return false;
    }
    return true;
  }
};

// A dense vector of n elements of dtype (the kernels index it as p[i]).
inline bool is_vector(const TensorDesc& t, DType dtype, int64_t n) {
  return t.defined && t.dtype == dtype && t.ndim <= TensorDesc::kMaxDims && t.numel() == n &&
         t.contiguous();
}

// The host path's guards return the message of the first failed one (a string
// literal), or nullptr when the call is safe to launch.
#define DFLASH_GUARD(cond, message) \
  do {                              \
    if (!(cond)) return message;    \
  } while (0)

}  // namespace dflash
