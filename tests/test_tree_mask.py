"""tree_mask (reference and Triton) against Python loops over the parent links:
random trees up to N = 256 slots (8 words per row), unused slots, parents past
the contract, garbage-prefilled outputs, validation errors."""

import numpy as np
import pytest
import torch

import dflash_kernels as dk
from tree_cases import random_parents

BACKENDS = ["reference", "triton"]


def truth(par):
    """(mask words [N][W] as int32 values, depth [N]) by walking each slot to the root."""
    N = len(par)
    W = (N + 31) // 32
    used = 1
    while used < N and 0 <= par[used] < used:
        used += 1
    words, depth = [], []
    for i in range(N):
        seen = {i}
        d = 0
        if i < used:
            j = i
            while j > 0:
                j = par[j]
                seen.add(j)
                d += 1
        row = [0] * W
        for j in seen:
            row[j // 32] |= 1 << (j % 32)
        words.append([w - (1 << 32) if w >= 1 << 31 else w for w in row])
        depth.append(d)
    return words, depth


def run(backend, parents):
    B, N = parents.shape
    W = (N + 31) // 32
    out = (torch.full((B, N, W), -777, dtype=torch.int32), torch.full((B, N), -777, dtype=torch.int32))
    mask, depth = dk.tree_mask(parents, out=out, backend=backend)
    assert mask is out[0] and depth is out[1]
    return mask, depth


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 5, 31, 32, 33, 70, 256])
def test_against_loops(backend, N):
    rng = np.random.default_rng(N)
    kinds = ("chain", "star", "deep", "bushy", "short")
    rows = [random_parents(N, k, rng) for k in kinds]
    if N > 3:
        bad = random_parents(N, "bushy", rng)
        bad[N // 2] = N + 5               # outside SPEC: ends the used slots like -1
        bad[N // 2 + 1] = 0               # (a valid-looking slot after it stays unused)
        rows.append(bad)
    parents = torch.tensor(rows, dtype=torch.int32)
    mask, depth = run(backend, parents)
    for b, par in enumerate(rows):
        words, d = truth(par)
        assert mask[b].tolist() == words, f"row {b} ({par})"
        assert depth[b].tolist() == d


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_is_causal(backend):
    N = 40
    mask, depth = run(backend, torch.tensor([[-1] + list(range(N - 1))], dtype=torch.int32))
    bits = (mask[0, :, :, None].long() >> torch.arange(32)) & 1
    dense = bits.reshape(N, -1)[:, :N].bool()
    assert torch.equal(dense, torch.ones(N, N).tril().bool())
    assert depth[0].tolist() == list(range(N))


def test_default_out_and_validation():
    mask, depth = dk.tree_mask(torch.tensor([[-1, 0, 0]], dtype=torch.int32))
    assert mask.shape == (1, 3, 1) and mask.dtype == torch.int32 and depth.tolist() == [[0, 1, 1]]
    assert mask[0, :, 0].tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="parents"):
        dk.tree_mask(torch.tensor([[-1, 0]]))                         # int64
    with pytest.raises(ValueError, match="parents"):
        dk.tree_mask(torch.tensor([-1, 0], dtype=torch.int32))       # 1-D
    with pytest.raises(ValueError, match="out.mask"):
        dk.tree_mask(torch.tensor([[-1, 0]], dtype=torch.int32),
                     out=(torch.empty(1, 2, 2, dtype=torch.int32), torch.empty(1, 2, dtype=torch.int32)))


def test_kernel_compiles_without_spills():
    from dflash_kernels.triton_backend import tree_mask as ttm
    from microbench.compile import compile_report

    spec = ttm.compile_spec(256)
    rep = compile_report("dflash_kernels.triton_backend.tree_mask", "_tree_mask_kernel",
                         spec["signature"], spec["constexprs"], 90, spec["num_warps"],
                         spec["num_stages"])
    assert rep["spills"] == 0 and rep["registers"] <= 128, rep
