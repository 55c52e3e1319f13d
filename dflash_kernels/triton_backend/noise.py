"""Philox-4x32-10 keyed noise as ``@triton.jit`` functions.

Bit-identical to :mod:`dflash_kernels.noise` (the oracle): same key and
counter layout, same ``u = (2 * (r0 >> 9) + 1) * 2**-24``; ``g`` uses
``tl.log`` (libdevice ``__nv_logf`` on CUDA, within an ulp of torch's).
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Four uint32 output words of Philox-4x32-10 (all arguments uint32)."""
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    W0: tl.constexpr = 0x9E3779B9
    W1: tl.constexpr = 0xBB67AE85
    for rnd in tl.static_range(10):
        hi0 = tl.umulhi(c0, M0)
        lo0 = c0 * M0
        hi1 = tl.umulhi(c2, M1)
        lo1 = c2 * M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if rnd < 9:
            k0 = k0 + W0
            k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed):
    """int64 seed -> (k0, k1) uint32: its low and high words."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def position_words(pos):
    """int64 position -> (c1, c2) uint32: its low and high words."""
    p_lo = (pos & 0xFFFFFFFF).to(tl.uint32)
    p_hi = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return p_lo, p_hi


@triton.jit
def random_bits(k0, k1, vocab_ids, p_lo, p_hi, stream: tl.constexpr):
    """``r0`` (uint32) for vocab ids (int32/int64, >= 0) at one key and position."""
    c0 = vocab_ids.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + p_lo
    c2 = zero + p_hi
    c3 = zero + stream
    r0, _r1, _r2, _r3 = philox4x32_10(c0, c1, c2, c3, zero + k0, zero + k1)
    return r0


@triton.jit
def bits_to_uniform(r0):
    """fp32 u in [2**-24, 1 - 2**-24], exact: (2 * (r0 >> 9) + 1) * 2**-24."""
    odd = (r0 >> 9) * 2 + 1
    return odd.to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def bits_to_gumbel(r0):
    """fp32 Gumbel noise -log(-log(u)) from the Philox word r0."""
    u = bits_to_uniform(r0)
    return -tl.log(-tl.log(u))
