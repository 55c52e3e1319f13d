"""Bounded draft KV (SPEC "block_attention: intra-block masks and bounded windows", issue 18
item 4): an engine decoding with a sliding window frees every page that holds no key inside
any query's window and hands it to other requests. Step for step the outputs equal those of
an unbounded pool that never frees, in every backend that runs here."""

import pytest
import torch

import dflash_kernels

NAN = float("nan")
PAGE, S, W, HQ, HKV, D = 4, 3, 5, 2, 1, 64


class Pool:
    """Paged K/V for B requests; ``bounded`` pools free pages behind the window and reuse
    them (freed pages are NaN-filled and their table entries set to -1 or a huge id)."""

    def __init__(self, num_pages, B, width, bounded):
        self.k = torch.full((num_pages, PAGE, HKV, D), NAN, dtype=torch.float16)
        self.v = torch.full_like(self.k, NAN)
        self.table = torch.full((B, width), -1, dtype=torch.int32)
        self.free = list(range(num_pages))[::-1]
        self.bounded, self.reused, self.freed = bounded, 0, 0
        self.ever = set()

    def append(self, b, pos, k, v):
        for i, p in enumerate(range(pos, pos + k.shape[0])):
            j = p // PAGE
            if self.table[b, j] < 0 or self.table[b, j] >= self.k.shape[0]:
                pg = self.free.pop()
                self.reused += pg in self.ever
                self.ever.add(pg)
                self.table[b, j] = pg
            pg = int(self.table[b, j])
            self.k[pg, p % PAGE] = k[i]
            self.v[pg, p % PAGE] = v[i]

    def release_behind(self, b, next_q0):
        if not self.bounded:
            return
        oldest = next_q0 - W + 1                      # the oldest key the next block sees
        for j in range(self.table.shape[1]):
            pg = int(self.table[b, j])
            if 0 <= pg < self.k.shape[0] and (j + 1) * PAGE <= oldest:
                self.k[pg] = NAN
                self.v[pg] = NAN
                self.free.append(pg)
                self.table[b, j] = -1 if (b + j) % 2 else 2 ** 31 - 1
                self.freed += 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_freeing_pages_behind_the_window_while_decoding(backend):
    g = torch.Generator().manual_seed(11)
    B, steps, lens = 3, 5, [2, 7, 0]
    width = (max(lens) + steps * S) // PAGE + 2
    full = Pool(B * width, B, width, bounded=False)
    small = Pool(B * (W // PAGE + 3), B, width, bounded=True)
    for b, L in enumerate(lens):                     # the prompts
        k, v = (torch.randn(L, HKV, D, generator=g).half() for _ in range(2))
        for pool in (full, small):
            pool.append(b, 0, k, v)
            pool.release_behind(b, L)
    for step in range(steps):
        q = torch.randn(B, S, HQ, D, generator=g).half()
        kb, vb = (torch.randn(B, S, HKV, D, generator=g).half() for _ in range(2))
        ctx = torch.tensor(lens, dtype=torch.int32)
        outs = []
        for pool in (full, small):
            out = torch.full_like(q, NAN)
            lse = torch.full((B, S, HQ), NAN)
            dflash_kernels.block_attention(q, pool.k, pool.v, pool.table, ctx, kb, vb,
                                           window=W, out=out, return_lse=True, lse_out=lse,
                                           backend=backend)
            outs.append((out, lse))
        assert not outs[0][0].isnan().any(), step
        assert torch.equal(outs[0][0], outs[1][0]), step
        assert torch.equal(outs[0][1], outs[1][1]), step
        for b in range(B):                           # the block's keys join the context
            for pool in (full, small):
                pool.append(b, lens[b], kb[b], vb[b])
                pool.release_behind(b, lens[b] + S)
            lens[b] += S
    # The bounded pool really freed pages and handed them to other requests.
    assert small.freed >= B and small.reused >= 2
    assert small.k.shape[0] < sum(-(-L // PAGE) for L in lens)
