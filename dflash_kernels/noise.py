"""Counter-based sampling noise: Philox-4x32-10 in exact PyTorch integer math.

This module is the oracle for ``triton_backend/noise.py`` and
``csrc/philox.cuh``: the integers and ``u`` must match it bit for bit.
Scheme (docs/DESIGN.md, "Noise"):

- key ``(k0, k1)`` = low / high 32 bits of the int64 seed (two's complement);
- counter ``(vocab id, pos & 0xFFFFFFFF, pos >> 32, stream)``, ``pos`` the
  absolute position of the token being decided, ``stream`` 0 for Gumbel noise
  and 1 for the acceptance uniform of the ``draft_probs`` rule (vocab id 0);
- only the first output word ``r0`` is used.

**Uniform (deviation from DESIGN.md, reported to the lead):** DESIGN.md's
``u = (2 * (r0 >> 8) + 1) * 2**-25`` is not exact in fp32: ``2*(r0>>8)+1``
has 25 significant bits, and for ``r0 >= 0xFFFFFF00`` it rounds to ``2**25``,
giving ``u = 1.0`` and ``g = +inf`` (a uniformly random token for ~V/2**24 of
the rows). We use 23 bits, which are exact in fp32 in every backend:

    u = (2 * (r0 >> 9) + 1) * 2**-24        # 2**-24 <= u <= 1 - 2**-24
    g = -log(-log(u))                        # fp32

Every function broadcasts its tensor arguments and takes Python ints too.
Integer tensors are int64 holding uint32 values (0 <= w < 2**32).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1",
    "STREAM_GUMBEL", "STREAM_ACCEPT",
    "philox4x32_10", "seed_key", "position_words", "random_bits",
    "bits_to_uniform", "uniform", "gumbel",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
STREAM_GUMBEL = 0
STREAM_ACCEPT = 1

_MASK32 = 0xFFFFFFFF
IntLike = Union[int, Tensor]


def _as_i64(x: IntLike, device=None) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(torch.int64)
    return torch.tensor(int(x), dtype=torch.int64, device=device)


def _mulhilo(m: int, a: Tensor) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product m * a, m and a < 2**32.

    Split a into 16-bit halves so every partial product stays < 2**48 and
    nothing overflows signed int64.
    """
    t_lo = (a & 0xFFFF) * m              # < 2**48
    t_hi = (a >> 16) * m                 # < 2**48, weight 2**16
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (t_lo + ((t_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32_10(c0: IntLike, c1: IntLike, c2: IntLike, c3: IntLike,
                  k0: IntLike, k1: IntLike) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 block: four uint32 words (as int64 tensors).

    Arguments are uint32 values (int64 tensors or ints), broadcast together.
    """
    dev = next((t.device for t in (c0, c1, c2, c3, k0, k1) if isinstance(t, Tensor)), None)
    c0, c1, c2, c3, k0, k1 = (_as_i64(v, dev) & _MASK32 for v in (c0, c1, c2, c3, k0, k1))
    for rnd in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if rnd < 9:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def seed_key(seeds: IntLike) -> Tuple[Tensor, Tensor]:
    """(k0, k1): low and high 32 bits of int64 seeds (two's complement)."""
    s = _as_i64(seeds)
    return s & _MASK32, (s >> 32) & _MASK32


def position_words(pos: IntLike) -> Tuple[Tensor, Tensor]:
    """(c1, c2): low and high 32 bits of int64 positions."""
    p = _as_i64(pos)
    return p & _MASK32, (p >> 32) & _MASK32


def random_bits(seeds: IntLike, pos: IntLike, vocab_ids: IntLike, stream: IntLike = 0) -> Tensor:
    """``r0`` (int64 holding uint32) for the broadcast of (seed, pos, vocab id, stream)."""
    dev = next((t.device for t in (seeds, pos, vocab_ids, stream) if isinstance(t, Tensor)), None)
    k0, k1 = seed_key(_as_i64(seeds, dev))
    c1, c2 = position_words(_as_i64(pos, dev))
    r0, _, _, _ = philox4x32_10(_as_i64(vocab_ids, dev), c1, c2, _as_i64(stream, dev), k0, k1)
    return r0


def bits_to_uniform(r0: Tensor) -> Tensor:
    """fp32 ``u = (2 * (r0 >> 9) + 1) * 2**-24``, exact, in [2**-24, 1 - 2**-24]."""
    odd = 2 * (r0 >> 9) + 1              # < 2**24: exact in fp32
    return odd.to(torch.float32) * (2.0 ** -24)


def uniform(seeds: IntLike, pos: IntLike, vocab_ids: IntLike, stream: IntLike = 0) -> Tensor:
    """fp32 uniform noise in (0, 1), keyed by (seed, position, vocab id, stream)."""
    return bits_to_uniform(random_bits(seeds, pos, vocab_ids, stream))


def gumbel(seeds: IntLike, pos: IntLike, vocab_ids: IntLike, stream: IntLike = STREAM_GUMBEL) -> Tensor:
    """fp32 Gumbel noise ``-log(-log(u))``, keyed like :func:`uniform`."""
    u = uniform(seeds, pos, vocab_ids, stream)
    return -torch.log(-torch.log(u))
