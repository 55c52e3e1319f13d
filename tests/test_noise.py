"""Keyed Philox noise: known answers, an independent scalar Philox, the fp32
uniform's range, and the Triton functions bit for bit against noise.py."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dflash_kernels import noise
from dflash_kernels.triton_backend import noise as tnoise

# Random123 tests/kat_vectors, the three "philox4x32 10" lines:
# counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_scalar(ctr, key):
    """Philox-4x32-10 with Python big integers (independent of noise.py)."""
    c, k = list(ctr), list(key)
    for rnd in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        if rnd < 9:
            k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return tuple(c)


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_known_answers(ctr, key, expected):
    assert philox_scalar(ctr, key) == expected
    words = noise.philox4x32_10(*ctr, *key)
    assert tuple(int(w) for w in words) == expected
    # The same through tensors broadcast against each other.
    t = [torch.tensor([v, v], dtype=torch.int64) for v in ctr + key]
    words = noise.philox4x32_10(*t)
    assert all(w.tolist() == [e, e] for w, e in zip(words, expected))


def test_random_inputs_match_scalar():
    g = torch.Generator().manual_seed(1)
    n = 64
    ctr = torch.randint(0, 2 ** 32, (4, n), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2 ** 32, (2, n), generator=g, dtype=torch.int64)
    # Extremes of each word.
    ctr[:, :2] = torch.tensor([[0, 2 ** 32 - 1]] * 4)
    key[:, :2] = torch.tensor([[2 ** 32 - 1, 0]] * 2)
    words = torch.stack(noise.philox4x32_10(*ctr, *key)).T.tolist()
    for i in range(n):
        assert tuple(words[i]) == philox_scalar(ctr[:, i].tolist(), key[:, i].tolist())


def test_key_and_counter_layout():
    seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 63)], dtype=torch.int64)
    pos = torch.tensor([0, 5, 2 ** 33 + 3, 2 ** 32 - 1, 17], dtype=torch.int64)
    vocab = torch.tensor([0, 3, 151935, 9, 2 ** 31 - 1], dtype=torch.int64)
    for stream in (0, 1):
        r0 = noise.random_bits(seeds, pos, vocab, stream).tolist()
        for i in range(len(seeds)):
            s, p = int(seeds[i]) % 2 ** 64, int(pos[i])
            ctr = (int(vocab[i]), p & 0xFFFFFFFF, p >> 32, stream)
            assert r0[i] == philox_scalar(ctr, (s & 0xFFFFFFFF, s >> 32))[0]


def test_uniform_exact_and_inside_unit_interval():
    # The extreme words, and words around the 2**24 boundary of the fp32 mantissa.
    r0 = torch.tensor([0, 511, 512, 2 ** 31, 2 ** 32 - 513, 2 ** 32 - 512, 2 ** 32 - 1],
                      dtype=torch.int64)
    u = noise.bits_to_uniform(r0)
    assert u.dtype == torch.float32
    exact = [(2 * (int(r) >> 9) + 1) / 2 ** 24 for r in r0]
    assert u.double().tolist() == exact
    assert u.min().item() == 2.0 ** -24 and u.max().item() == 1 - 2.0 ** -24
    # Many keyed draws: strictly inside (0, 1), mean 1/2, Gumbel finite with mean ~ Euler's gamma.
    seeds = torch.arange(40, dtype=torch.int64)[:, None]
    vocab = torch.arange(5000, dtype=torch.int64)[None, :]
    u = noise.uniform(seeds, 1234, vocab, 0)
    assert u.shape == (40, 5000)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(u.double().mean().item() - 0.5) < 0.005
    g = noise.gumbel(seeds, 1234, vocab)
    assert bool(torch.isfinite(g).all())
    assert abs(g.double().mean().item() - 0.5772156649) < 0.01
    assert torch.equal(g, -torch.log(-torch.log(u)))


def test_streams_and_keys_are_distinct():
    vocab = torch.arange(256)
    a = noise.random_bits(7, 100, vocab, 0)
    assert not torch.equal(a, noise.random_bits(7, 100, vocab, 1))
    assert not torch.equal(a, noise.random_bits(8, 100, vocab, 0))
    assert not torch.equal(a, noise.random_bits(7, 101, vocab, 0))
    assert torch.equal(a, noise.random_bits(torch.tensor(7), torch.tensor(100), vocab, 0))


@triton.jit
def _noise_probe_kernel(seed_ptr, pos_ptr, vocab_ptr, words_ptr, bits_ptr, u_ptr, g_ptr, n,
                        STREAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(seed_ptr + pid)
    pos = tl.load(pos_ptr + pid)
    vid = tl.load(vocab_ptr + pid * n + offs, mask=mask, other=0)
    k0, k1 = tnoise.seed_key(seed)
    p_lo, p_hi = tnoise.position_words(pos)
    c = vid.to(tl.uint32)
    w0, w1, w2, w3 = tnoise.philox4x32_10(c, c * 0 + p_lo, c * 0 + p_hi, c * 0 + STREAM,
                                          c * 0 + k0, c * 0 + k1)
    base = words_ptr + (pid * n + offs) * 4
    tl.store(base + 0, w0.to(tl.int64), mask=mask)
    tl.store(base + 1, w1.to(tl.int64), mask=mask)
    tl.store(base + 2, w2.to(tl.int64), mask=mask)
    tl.store(base + 3, w3.to(tl.int64), mask=mask)
    r0 = tnoise.random_bits(k0, k1, vid, p_lo, p_hi, STREAM)
    tl.store(bits_ptr + pid * n + offs, r0.to(tl.int64), mask=mask)
    tl.store(u_ptr + pid * n + offs, tnoise.bits_to_uniform(r0), mask=mask)
    tl.store(g_ptr + pid * n + offs, tnoise.bits_to_gumbel(r0), mask=mask)


@pytest.mark.parametrize("stream", [0, 1])
def test_triton_noise_bit_identical(stream, device):
    seeds = torch.tensor([0, -1, 2 ** 40 + 7, -(2 ** 63), 12345], dtype=torch.int64, device=device)
    pos = torch.tensor([0, 2 ** 32 - 1, 2 ** 33 + 3, 5, 2 ** 62], dtype=torch.int64, device=device)
    n = 200
    vocab = torch.randint(0, 2 ** 31 - 1, (5, n), dtype=torch.int64, device=device)
    vocab[:, 0] = 0
    vocab[:, 1] = 2 ** 31 - 1
    words = torch.full((5, n, 4), -7, dtype=torch.int64, device=device)
    bits = torch.full((5, n), -7, dtype=torch.int64, device=device)
    u = torch.full((5, n), -7.0, device=device)
    g = torch.full((5, n), -7.0, device=device)
    _noise_probe_kernel[(5,)](seeds, pos, vocab, words, bits, u, g, n, STREAM=stream, BLOCK=256)
    k0, k1 = noise.seed_key(seeds[:, None])
    c1, c2 = noise.position_words(pos[:, None])
    want = torch.stack(noise.philox4x32_10(vocab, c1, c2, stream, k0, k1), dim=-1)
    assert torch.equal(words, want)
    want_bits = noise.random_bits(seeds[:, None], pos[:, None], vocab, stream)
    assert torch.equal(bits, want_bits)
    assert torch.equal(u, noise.uniform(seeds[:, None], pos[:, None], vocab, stream))
    # log may differ by an ulp between backends; the Gumbel values within a few ulps.
    torch.testing.assert_close(g, noise.gumbel(seeds[:, None], pos[:, None], vocab, stream),
                               rtol=4e-7, atol=4e-7)
