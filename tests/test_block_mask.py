"""block_attention's ``block_mask`` ("full", "causal", packed tree bits) on both
backends against independent float64 math with an explicit per-key visibility
rule, on the poisoned cases of helpers.make_attention_case (NaN in
unused rows and spare pages, garbage table entries, NaN-prefilled outputs), in
both block modes, with windows, fp8 and several context splits; plus the
compile check of the masked Triton kernel for sm_90a / sm_100a."""

import math

import numpy as np
import pytest
import torch

import dflash_kernels as dk
from dflash_kernels.triton_backend import block_attention as tri
from helpers import make_attention_case as make_case
from microbench.compile import compile_report

NAN = float("nan")


def tree_bits(B, S, rng, kind="bushy"):
    """int32 [B, S, ceil(S/32)] ancestor-or-self bits of random trees, and the dense bool mask."""
    W = (S + 31) // 32
    dense = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        par = [-1] + [int(rng.integers(0, i)) if kind == "bushy" else i - 1 for i in range(1, S)]
        for i in range(S):
            j = i
            dense[b, i, j] = True
            while j > 0:
                j = par[j]
                dense[b, i, j] = True
    words = torch.zeros(B, S, W, dtype=torch.int64)
    for j in range(S):
        words[:, :, j // 32] |= dense[:, :, j].long() << (j % 32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words, dense


def masked_truth(case, sm_scale, window, allow):
    """float64 (out, lse); ``allow [B, S, S]`` bool: block row i may see block key j."""
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    bt = case["block_table"]
    B, S, Hq, D = q.shape
    Hkv, page = kc.shape[2], kc.shape[1]
    g = Hq // Hkv
    ks = 1.0 if case["k_scale"] is None else float(case["k_scale"])
    vs = 1.0 if case["v_scale"] is None else float(case["v_scale"])
    out = torch.zeros(B, S, Hq, D, dtype=torch.float64)
    lse = torch.full((B, S, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = int(case["context_lens"][b])
        keys, vals, kpos = [], [], []
        for t in range(L):
            p, r = int(bt[b, t // page]), t % page
            keys.append(kc[p, r].float().double() * ks)
            vals.append(vc[p, r].float().double() * vs)
            kpos.append(t)
        if case["k_block"] is not None:
            for i in range(S):
                keys.append(case["k_block"][b, i].double())
                vals.append(case["v_block"][b, i].double())
                kpos.append(L + i)
            q0 = L
        else:
            q0 = L - S
        if not keys:
            continue
        K, V = torch.stack(keys), torch.stack(vals)
        vis = torch.zeros(S, len(keys), dtype=torch.bool)
        for i in range(S):
            for n, pk in enumerate(kpos):
                j = pk - q0                              # block key index, < 0 for context
                ok = j < 0 or bool(allow[b, i, j])
                if window:
                    ok = ok and abs(q0 + i - pk) < window
                vis[i, n] = ok
        for h in range(Hq):
            s = q[b, :, h].double() @ K[:, h // g].T * sm_scale
            s = s.masked_fill(~vis, -math.inf)
            row_lse = torch.logsumexp(s, dim=-1)
            lse[b, :, h] = row_lse
            p = torch.where(vis, torch.exp(s - row_lse[:, None]), torch.zeros_like(s))
            out[b, :, h] = p @ V[:, h // g]
    return out, lse


def run(case, backend, block_mask, window=None, num_splits=None):
    q = case["q"]
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:3], NAN, dtype=torch.float32)
    if num_splits is not None:  # the Triton backend directly, to force the split count
        scale = lambda s: None if s is None else torch.full((1,), float(s))  # noqa: E731
        causal = isinstance(block_mask, str) and block_mask == "causal"
        bits = block_mask if isinstance(block_mask, torch.Tensor) else None
        tri.block_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                            case["context_lens"], case["k_block"], case["v_block"],
                            q.shape[-1] ** -0.5, window or 0, scale(case["k_scale"]),
                            scale(case["v_scale"]), out, lse, causal, bits, num_splits=num_splits)
        return out, lse
    res = dk.block_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                             case["context_lens"], case["k_block"], case["v_block"],
                             window=window, k_scale=case["k_scale"], v_scale=case["v_scale"],
                             out=out, return_lse=True, lse_out=lse, block_mask=block_mask,
                             backend=backend)
    assert res[0] is out
    return out, lse


def check(case, out, lse, window, allow, atol=4e-3):
    want, want_lse = masked_truth(case, case["q"].shape[-1] ** -0.5, window or 0, allow)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-3, rtol=1e-3)


MASKS = ["full", "causal", "tree"]


def _mask(kind, B, S, rng):
    if kind == "full":
        return (None if rng.random() < 0.5 else "full"), torch.ones(B, S, S, dtype=torch.bool)
    if kind == "causal":
        return "causal", torch.ones(S, S).tril().bool().expand(B, S, S)
    return tree_bits(B, S, rng)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("page, S, Hq, Hkv, D, block, window, layout, splits", [
    (16, 5, 4, 1, 64, True, None, "nhd", 2),
    (4, 6, 4, 2, 64, False, None, "hnd", 3),      # mask on the last S cached keys, split pages
    (1, 7, 2, 1, 64, False, 3, "combined", 2),    # token pool, window inside the block
    (16, 4, 8, 1, 128, True, 2, "nhd", 1),
])
def test_matches_dense_math(backend, mask, page, S, Hq, Hkv, D, block, window, layout, splits):
    rng = np.random.default_rng(S * page)
    lens = [0, 3, page + 2] if block else [S, S + 3, page + S + 2]
    case = make_case(S=S, Hq=Hq, Hkv=Hkv, D=D, page_size=page, ctx_lens=lens, block=block,
                     layout=layout)
    block_mask, allow = _mask(mask, len(lens), S, rng)
    out, lse = run(case, backend, block_mask, window, splits if backend == "triton" else None)
    check(case, out, lse, window, allow)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("block", [True, False])
def test_tree_of_33_nodes_two_words(backend, block):
    # Bits past the first word, and a block tile wider than 32 keys.
    S = 33
    rng = np.random.default_rng(3)
    lens = [5, 20] if block else [S + 5, S + 20]
    case = make_case(S=S, Hq=1, Hkv=1, D=64, page_size=16, ctx_lens=lens, block=block)
    bits, allow = tree_bits(2, S, rng)
    out, lse = run(case, backend, bits, None, 2 if backend == "triton" else None)
    check(case, out, lse, None, allow)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_cache_and_public_default_splits(backend):
    rng = np.random.default_rng(9)
    case = make_case(S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=[4, 21, 70], block=False,
                     cache_dtype=torch.float8_e4m3fn, scale_kind="tensor", layout="hnd")
    bits, allow = tree_bits(3, 4, rng)
    out, lse = run(case, backend, bits, 9)
    check(case, out, lse, 9, allow)


def test_chain_bits_equal_causal_and_full_bits_equal_full():
    case = make_case(S=6, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[7, 30], block=True)
    rng = np.random.default_rng(0)
    chain, _ = tree_bits(2, 6, rng, kind="chain")
    full = torch.full((2, 6, 1), 63, dtype=torch.int32)
    for backend in ("reference", "triton"):
        c = run(case, backend, "causal")[0]
        assert torch.equal(run(case, backend, chain)[0], c)
        f = run(case, backend, None)[0]
        assert torch.equal(run(case, backend, full)[0], f)
        assert not torch.equal(c, f)


def test_validation():
    case = make_case(S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=[5])
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_table", "context_lens",
                              "k_block", "v_block")]
    for bad in ("tril", torch.zeros(1, 4, 1), torch.zeros(1, 4, 2, dtype=torch.int32),
                torch.zeros(2, 4, 1, dtype=torch.int32), 3):
        with pytest.raises(ValueError, match="block_mask"):
            dk.block_attention(*args, block_mask=bad, backend="reference")


# Compile check: the tree-masked kernel (both block modes) for Hopper and Blackwell
# keeps the tensor-core MMA and never spills.
@pytest.mark.parametrize("arch, mma, has_block", [(90, "wgmma.mma_async", True),
                                                  (100, "tcgen05.mma", False)])
def test_masked_kernel_compiles_without_spills(arch, mma, has_block):
    spec = tri.compile_spec(arch, torch.float16, torch.float16, S=16, Hq=32, Hkv=8, D=128,
                            has_block=has_block, block_mask="bits")
    rep = compile_report("dflash_kernels.triton_backend.block_attention", "_block_attention_kernel",
                         spec["signature"], spec["constexprs"], arch, spec["num_warps"],
                         spec["num_stages"], divisibility=spec["divisibility"],
                         options=spec["options"])
    assert rep["spills"] == 0, rep
    assert mma in rep["ptx"]
