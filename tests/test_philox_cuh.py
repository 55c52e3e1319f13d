"""csrc/philox.cuh compiled as host code (g++) against dflash_kernels/noise.py:
the Philox words and u bit for bit, the Gumbel value within an ulp or two
(each side's fp32 log), for many (seed, position, vocab id, stream) keys."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dflash_kernels import noise

CSRC = Path(__file__).resolve().parents[1] / "csrc"

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include "philox.cuh"

// stdin lines: "K seed pos vocab stream" (keyed) or "R c0 c1 c2 c3 k0 k1" (raw block).
int main() {
  char mode;
  while (std::scanf(" %c", &mode) == 1) {
    if (mode == 'K') {
      long long seed, pos;
      unsigned vocab, stream;
      if (std::scanf("%lld %lld %u %u", &seed, &pos, &vocab, &stream) != 4) return 1;
      const dflash::Philox4 r = dflash::philox_keyed(seed, pos, vocab, stream);
      const float u = dflash::philox_uniform(r.w[0]);
      const float g = stream == dflash::kStreamGumbel ? dflash::gumbel_noise(seed, pos, vocab)
                                                       : dflash::gumbel_from_uniform(u);
      unsigned ub, gb;
      std::memcpy(&ub, &u, 4);
      std::memcpy(&gb, &g, 4);
      std::printf("%u %u %u %u %u %u\n", r.w[0], r.w[1], r.w[2], r.w[3], ub, gb);
    } else {
      unsigned c[4], k[2];
      if (std::scanf("%u %u %u %u %u %u", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) != 6) return 1;
      const dflash::Philox4 r = dflash::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
      std::printf("%u %u %u %u\n", r.w[0], r.w[1], r.w[2], r.w[3]);
    }
  }
  return 0;
}
"""

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@pytest.fixture(scope="module")
def philox_bin(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to compile csrc/philox.cuh")
    d = tmp_path_factory.mktemp("philox_cuh")
    (d / "main.cpp").write_text(PROGRAM)
    exe = d / "philox_host"
    res = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{CSRC}",
                          str(d / "main.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, f"csrc/philox.cuh does not compile as host code:\n{res.stderr}"
    return exe


def _run(exe, lines):
    res = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True)
    return np.array([[int(x) for x in ln.split()] for ln in res.stdout.splitlines()],
                    dtype=np.int64)


def _keys(n, rng):
    edge_seeds = [0, 1, -1, 42, INT64_MIN, INT64_MAX, 2 ** 32, -(2 ** 32) + 7, 0xDEADBEEF]
    edge_pos = [0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5, 2 ** 62 + 3]
    edge_vocab = [0, 1, 151935, 2 ** 31, 2 ** 32 - 1]
    rows = [(s, p, v, st) for s in edge_seeds for p in edge_pos for v in edge_vocab
            for st in (0, 1)]
    seeds = rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64, endpoint=True)
    pos = rng.integers(0, 2 ** 62, size=n, dtype=np.int64)
    pos[: n // 2] %= 1 << 20  # realistic positions too
    vocab = rng.integers(0, 2 ** 32, size=n, dtype=np.int64)
    vocab[: n // 2] %= 151936
    stream = rng.integers(0, 2, size=n, dtype=np.int64)
    rows += list(zip(seeds.tolist(), pos.tolist(), vocab.tolist(), stream.tolist()))
    return torch.tensor(rows, dtype=torch.int64)


def test_keyed_words_uniform_and_gumbel_match_noise_py(philox_bin):
    keys = _keys(3000, np.random.default_rng(1234))
    got = _run(philox_bin, [f"K {s} {p} {v} {st}" for s, p, v, st in keys.tolist()])
    assert got.shape == (keys.shape[0], 6)
    seed, pos, vocab, stream = keys.unbind(1)
    k0, k1 = noise.seed_key(seed)
    c1, c2 = noise.position_words(pos)
    want_words = torch.stack(noise.philox4x32_10(vocab, c1, c2, stream, k0, k1), 1).numpy()
    np.testing.assert_array_equal(got[:, :4], want_words)
    np.testing.assert_array_equal(got[:, 0], noise.random_bits(seed, pos, vocab, stream).numpy())

    u_got = got[:, 4].astype(np.uint32).view(np.float32)
    u_want = noise.uniform(seed, pos, vocab, stream).numpy()
    np.testing.assert_array_equal(u_got.view(np.uint32), u_want.view(np.uint32))
    assert (u_got > 0).all() and (u_got < 1).all()

    # g: both sides use an fp32 log (glibc logf here, torch's log there).
    g_got = got[:, 5].astype(np.uint32).view(np.float32)
    g_want = (-torch.log(-torch.log(torch.from_numpy(u_want)))).numpy()
    assert np.isfinite(g_got).all()
    np.testing.assert_allclose(g_got, g_want, rtol=4e-7, atol=4e-7)
    g_stream0 = noise.gumbel(seed, pos, vocab).numpy()
    m = (stream == 0).numpy()
    np.testing.assert_allclose(g_got[m], g_stream0[m], rtol=4e-7, atol=4e-7)


def test_raw_block_matches_noise_py(philox_bin):
    rng = np.random.default_rng(99)
    words = rng.integers(0, 2 ** 32, size=(2000, 6), dtype=np.int64)
    words[:4] = [[0, 0, 0, 0, 0, 0], [2 ** 32 - 1] * 6, [1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 0, 0]]
    got = _run(philox_bin, ["R " + " ".join(map(str, w)) for w in words.tolist()])
    t = torch.from_numpy(words)
    want = torch.stack(noise.philox4x32_10(*t.unbind(1)), 1).numpy()
    np.testing.assert_array_equal(got, want)
    # Random123's published answer for the all-ones block (kat_vectors, philox4x32_10).
    assert [hex(x) for x in got[1]] == ["0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd"]
