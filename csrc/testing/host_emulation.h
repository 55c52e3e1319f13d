// Test-only: runs the header-only kernels on the host (g++), so that the CUDA
// source is checked against the PyTorch reference on machines without a GPU.
// Every thread of a block is a std::thread; __syncthreads / __syncwarp are
// barriers and warp shuffles exchange through a per-warp mailbox. Blocks run
// one after another, so `__shared__` can be a function-local static.
// It checks indexing, reductions and arithmetic, not timing or the memory model.
#pragma once

#define DFLASH_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

using std::isnan;
using std::max;
using std::min;

namespace dflash {
namespace emu {

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  std::barrier<> bar;
  uint64_t mailbox[32] = {};
};

struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 16) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>(32));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};

// Vector loads / stores at addresses that are not multiples of their width
// (a fault on the GPU; memcpy on the host would hide it): counted here so the
// tests can assert that only aligned data takes the vector path.
inline std::atomic<int64_t>& misaligned_vector_accesses() {
  static std::atomic<int64_t> count{0};
  return count;
}

inline void check_vector_alignment(const void* ptr, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) ++misaligned_vector_accesses();
}

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

// Runs kernel(args...) over a 1-D grid, block by block; blockDim.x must be a multiple of 32.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t smem, const Args&... args);

}  // namespace emu

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(emu::current_block()->smem.data());
}

}  // namespace dflash

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { dflash::emu::current_block()->bar.arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) {
  dflash::emu::current_block()->warps[threadIdx.x / 32]->bar.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto& warp = *dflash::emu::current_block()->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  std::memcpy(&warp.mailbox[lane], &value, sizeof(T));
  warp.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &warp.mailbox[lane ^ lane_mask], sizeof(T));
  warp.bar.arrive_and_wait();
  return out;
}

// The kernels read rows of T through 16-byte vector types, as CUDA code does;
// on the host that is type punning, so loads go through memcpy and the
// library is built with -fno-strict-aliasing.
template <typename T>
T __ldg(const T* p) {
  dflash::emu::check_vector_alignment(p, sizeof(T));
  T out;
  std::memcpy(&out, p, sizeof(T));
  return out;
}

// Correctly rounded fp32 operations (what the _rn intrinsics are on the GPU).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }

template <typename Kernel, typename... Args>
void dflash::emu::launch(Kernel kernel, unsigned grid, unsigned threads, size_t smem,
                         const Args&... args) {
  for (unsigned b = 0; b < grid; ++b) {
    Block block(static_cast<int>(threads), smem);
    current_block() = &block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = uint3{t, 0, 0};
        blockIdx = uint3{b, 0, 0};
        blockDim = dim3(threads);
        gridDim = dim3(grid);
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
    current_block() = nullptr;
  }
}

namespace dflash {
namespace emu {

// The launcher the emulator passes to the ops' dispatch templates (common.cuh's interface).
struct Launch {
  template <typename Kernel, typename Params>
  cudaError_t operator()(Kernel kernel, unsigned grid, unsigned threads, size_t smem,
                         const Params& p) const {
    launch(kernel, grid, threads, smem, p);
    return cudaSuccess;
  }
};

}  // namespace emu
}  // namespace dflash
