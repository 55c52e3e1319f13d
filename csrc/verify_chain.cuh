// verify_chain kernels (docs/DESIGN.md, "verify_chain"): greedy and keyed
// point-mass sampling. Header-only, no PyTorch.
//
// Kernel 1, one block per (row, vocabulary split): the best (score, id) of the
// split, score = logit (greedy) or logit * (1/T) + Gumbel noise (sampled),
// NaN as -inf, lowest id on exact ties. Rows past num_drafts[b] are skipped.
// Kernel 2, one block per request: merge the splits of each needed row into
// the target token t_j, then accept the leading drafts equal to t_{j-1}.
#pragma once

#include <cfloat>
#include <climits>
#include <cstdint>

#include "device.cuh"
#include "philox.cuh"
#include "verify_chain.h"

namespace dflash {
namespace verify {

constexpr int kThreads = 256;
constexpr int kFinishThreads = 128;

// Candidate (score, id) beats the incumbent: higher score, or equal score and lower id.
DFLASH_DEVICE bool beats(float s, int32_t i, float best_s, int32_t best_i) {
  return s > best_s || (s == best_s && i < best_i);
}

DFLASH_DEVICE void warp_argmax(float& s, int32_t& i) {
  DFLASH_UNROLL
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const float os = __shfl_xor_sync(0xffffffffu, s, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (beats(os, oi, s, i)) {
      s = os;
      i = oi;
    }
  }
}

struct RowKey {
  bool sampled;
  float inv_t;
  int64_t seed;
  int64_t position;  // absolute position of the token being drawn
};

// docs/DESIGN.md, "Edge values": a request samples iff T >= kSamplingEps (fp32;
// NaN, negative and tiny T are greedy). dflash_kernels/_rules.py: SAMPLING_EPS.
constexpr float kSamplingEps = 1e-5f;

DFLASH_DEVICE float score_of(float logit, int32_t id, const RowKey& key) {
  float s = isnan(logit) ? -INFINITY : logit;
  if (key.sampled) {
    const bool pos_inf = s == INFINITY;
    // Separate mul and add (no FMA contraction) to round like the PyTorch reference.
    s = __fadd_rn(__fmul_rn(s, key.inv_t),
                  gumbel_noise(key.seed, key.position, static_cast<uint32_t>(id)));
    // A +inf logit stays +inf (1/T = 0 at T = +inf made it NaN), so it wins, lowest id
    // on ties: a point mass on the lowest +inf id. Other NaN (-inf * 0) is -inf.
    if (pos_inf) {
      s = INFINITY;
    } else if (isnan(s)) {
      s = -INFINITY;
    }
  }
  return s;
}

// Test hook: the host emulator also builds the unpruned loop (tests/test_cuda_ops.py).
#ifndef DFLASH_VERIFY_PRUNE
#define DFLASH_VERIFY_PRUNE 1
#endif

// Above every fp32 Gumbel value -logf(-logf(u)): u <= 1 - 2^-24 gives g ~= 16.636.
constexpr float kGumbelMax = 17.f;

// Exact pruning of a sampled row: fp32 addition rounds monotonically, so when
// logit * (1/T) + kGumbelMax is already below the best score so far, so is
// logit * (1/T) + g for any noise g, and the element cannot win: its Philox and
// two logs are skipped. A -inf best so far never prunes (the lowest-id rule of
// an all -inf split still sees every id).
DFLASH_DEVICE bool cannot_win(float logit, const RowKey& key, float best_s) {
  const float x = isnan(logit) ? -INFINITY : logit;
  return __fadd_rn(__fmul_rn(x, key.inv_t), kGumbelMax) < best_s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    split_argmax_kernel(const VerifyChainParams p) {
  const int32_t split = blockIdx.x % p.num_splits;
  const int64_t row = blockIdx.x / p.num_splits;
  const int32_t b = static_cast<int32_t>(row / p.block_size);
  const int32_t j = static_cast<int32_t>(row % p.block_size);
  const int32_t nd = min(max(p.num_drafts[b], 0), p.block_size - 1);
  if (j > nd) return;  // t_j is never needed: the acceptance scan stops at num_drafts

  RowKey key{false, 0.f, 0, 0};
  if (p.temperature != nullptr) {
    const float t = p.temperature[b];
    key.sampled = t >= kSamplingEps;
    if (key.sampled) {
      key.inv_t = __frcp_rn(t);
      key.seed = p.seeds[b];
      key.position = p.positions[b] + j + 1;
    }
  }

  const T* logits = static_cast<const T*>(p.logits) + b * p.logits_stride_b + j * p.logits_stride_s;
  const int32_t begin = split * p.split_len;
  const int32_t end = min(begin + p.split_len, p.vocab);

  float best_s = -INFINITY;
  int32_t best_i = INT_MAX;
  // Ids grow along each thread's walk, so a strict > keeps the lowest id on ties.
  auto consider = [&](float logit, int32_t id) {
    if (DFLASH_VERIFY_PRUNE && key.sampled && cannot_win(logit, key, best_s)) return;
    const float s = score_of(logit, id, key);
    if (beats(s, id, best_s, best_i)) {
      best_s = s;
      best_i = id;
    }
  };
  auto consider_vec = [&](const uint4& raw, int32_t base) {
    const T* vals = reinterpret_cast<const T*>(&raw);
    DFLASH_UNROLL
    for (int e = 0; e < static_cast<int>(16 / sizeof(T)); ++e) consider(to_float(vals[e]), base + e);
  };

  int32_t scalar_begin = begin;
  if (p.vectorized) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int32_t kStep = kThreads * kVec;
    const int32_t vec_end = begin + (end - begin) / kVec * kVec;
    int32_t base = begin + threadIdx.x * kVec;
    // Two 16-byte loads issued before either is consumed: 32 B per thread in flight.
    // Each thread still walks its ids in increasing order (base, base + kStep, ...).
    for (; base + kStep < vec_end; base += 2 * kStep) {
      const uint4 raw0 = __ldg(reinterpret_cast<const uint4*>(logits + base));
      const uint4 raw1 = __ldg(reinterpret_cast<const uint4*>(logits + base + kStep));
      consider_vec(raw0, base);
      consider_vec(raw1, base + kStep);
    }
    if (base < vec_end) consider_vec(__ldg(reinterpret_cast<const uint4*>(logits + base)), base);
    scalar_begin = vec_end;
  }
  for (int32_t id = scalar_begin + threadIdx.x; id < end; id += kThreads) {
    consider(to_float(logits[id]), id);
  }

  warp_argmax(best_s, best_i);
  __shared__ float warp_s[kThreads / kWarpSize];
  __shared__ int32_t warp_i[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_s[warp] = best_s;
    warp_i[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    best_s = lane < kThreads / kWarpSize ? warp_s[lane] : -INFINITY;
    best_i = lane < kThreads / kWarpSize ? warp_i[lane] : INT_MAX;
    warp_argmax(best_s, best_i);
    if (lane == 0) {
      p.workspace_score[row * p.num_splits + split] = best_s;
      p.workspace_index[row * p.num_splits + split] = best_i;
    }
  }
}

template <typename TokenT>
__global__ void __launch_bounds__(kFinishThreads)
    accept_kernel(const VerifyChainParams p) {
  int32_t* target = dynamic_smem<int32_t>();  // [S]: t_j for j <= num_drafts
  __shared__ int32_t accepted;
  const int32_t b = blockIdx.x;
  const int32_t S = p.block_size;
  const int32_t nd = min(max(p.num_drafts[b], 0), S - 1);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = kFinishThreads / kWarpSize;

  for (int32_t j = warp; j <= nd; j += kWarps) {
    const int64_t row = static_cast<int64_t>(b) * S + j;
    float best_s = -INFINITY;
    int32_t best_i = INT_MAX;
    for (int32_t s = lane; s < p.num_splits; s += kWarpSize) {
      const float cs = p.workspace_score[row * p.num_splits + s];
      const int32_t ci = p.workspace_index[row * p.num_splits + s];
      if (beats(cs, ci, best_s, best_i)) {
        best_s = cs;
        best_i = ci;
      }
    }
    warp_argmax(best_s, best_i);
    // INT_MAX only when no id was seen (V = 0 is rejected on the host); keep ids in [0, V).
    if (lane == 0) target[j] = (best_i >= 0 && best_i < p.vocab) ? best_i : 0;
  }
  __syncthreads();

  const TokenT* tokens = static_cast<const TokenT*>(p.block_tokens) + b * p.tokens_stride_b;
  if (threadIdx.x == 0) {
    int32_t a = 0;
    while (a < nd && static_cast<int64_t>(tokens[(a + 1) * p.tokens_stride_s]) == target[a]) ++a;
    accepted = a;
    p.accept_len[b] = a;
    p.bonus[b] = target[a];
    if (p.new_seq_lens != nullptr) p.new_seq_lens[b] = p.seq_lens[b] + a + 1;
  }
  __syncthreads();
  const int32_t a = accepted;
  for (int32_t k = threadIdx.x; k < S; k += kFinishThreads) {
    // Accepted drafts equal t_k, so they are already in [0, V).
    p.out_tokens[static_cast<int64_t>(b) * S + k] = k < a ? target[k] : (k == a ? target[a] : -1);
  }
}

// The one launch dispatch of verify_chain: kernel templates and grids from the
// params. Launch: a launcher of common.cuh (verify_chain.cu: a stream or none)
// or host_emulation.h (testing/emulate.cpp), so the tests run this very code.
template <typename Launch>
cudaError_t dispatch(const VerifyChainParams& p, Launch&& launch) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.block_size <= 0 || p.vocab <= 0 || p.num_splits <= 0 || p.split_len <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.block_size * p.num_splits;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const auto grid = static_cast<unsigned>(blocks);
  cudaError_t err;
  switch (p.logits_dtype) {
    case DType::kFloat32: err = launch(split_argmax_kernel<float>, grid, kThreads, 0, p); break;
    case DType::kFloat16: err = launch(split_argmax_kernel<__half>, grid, kThreads, 0, p); break;
    case DType::kBFloat16:
      err = launch(split_argmax_kernel<__nv_bfloat16>, grid, kThreads, 0, p);
      break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  const size_t smem = sizeof(int32_t) * static_cast<size_t>(p.block_size);
  const auto requests = static_cast<unsigned>(p.batch);
  return p.block_tokens_int64
             ? launch(accept_kernel<int64_t>, requests, kFinishThreads, smem, p)
             : launch(accept_kernel<int32_t>, requests, kFinishThreads, smem, p);
}

}  // namespace verify
}  // namespace dflash
