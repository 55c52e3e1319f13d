"""The block_attention reference against independent float64 math.

The truth here walks each request's pages token by token in Python, appends
the block keys, and runs a dense softmax per query head with an explicit
visibility mask. The case builder is in tests/helpers.py.
"""

import math

import pytest
import torch

from dflash_kernels.reference import block_attention as ref
from helpers import NAN, attention_lens, make_attention_case, run_attention, window_cases


def dense_truth(case, sm_scale, window):
    """float64 output ``[B, S, Hq, D]`` and lse ``[B, S, Hq]``, by explicit loops."""
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    bt = case["block_table"].cpu()
    B, S, Hq, D = q.shape
    Hkv, page = kc.shape[2], kc.shape[1]
    g = Hq // Hkv
    ks, vs = case["k_scale"], case["v_scale"]
    ks = 1.0 if ks is None else float(ks)
    vs = 1.0 if vs is None else float(vs)
    out = torch.zeros(B, S, Hq, D, dtype=torch.float64)
    lse = torch.full((B, S, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = int(case["context_lens"][b])
        keys, vals = [], []
        for t in range(L):
            p, r = int(bt[b, t // page]), t % page
            keys.append(kc[p, r].cpu().float().double() * ks)
            vals.append(vc[p, r].cpu().float().double() * vs)
        if case["k_block"] is not None:
            for i in range(S):
                keys.append(case["k_block"][b, i].cpu().double())
                vals.append(case["v_block"][b, i].cpu().double())
            qpos = [L + i for i in range(S)]
        else:
            qpos = [L - S + i for i in range(S)]
        if not keys:
            continue
        K, V = torch.stack(keys), torch.stack(vals)                 # [Tk, Hkv, D]
        mask = torch.ones(S, len(keys), dtype=torch.bool)
        if window:
            for i in range(S):
                for j in range(len(keys)):
                    mask[i, j] = abs(qpos[i] - j) < window
        for h in range(Hq):
            s = q[b, :, h].cpu().double() @ K[:, h // g].T * sm_scale
            s = s.masked_fill(~mask, -math.inf)
            row_lse = torch.logsumexp(s, dim=-1)
            lse[b, :, h] = row_lse
            p = torch.exp(s - row_lse[:, None])
            p = torch.where(mask, p, torch.zeros_like(p))          # rows with no key: 0
            out[b, :, h] = p @ V[:, h // g]
    return out, lse


def assert_matches_truth(case, out, lse, sm_scale, window, atol=3e-3):
    want, want_lse = dense_truth(case, sm_scale, window)
    torch.testing.assert_close(out.cpu().double(), want, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "page_size, S, Hq, Hkv, D, block, window, layout",
    [
        (16, 4, 4, 1, 64, True, None, "nhd"),
        (16, 5, 8, 2, 128, False, None, "hnd"),
        (1, 3, 8, 1, 64, True, None, "nhd"),        # token pool
        (1, 4, 2, 2, 64, False, 3, "combined"),
        (64, 6, 8, 1, 128, True, 5, "hnd"),
        (64, 4, 4, 4, 256, False, None, "combined"),
        (16, 7, 16, 2, 64, True, 2, "combined"),
    ],
)
def test_reference_matches_dense_math(page_size, S, Hq, Hkv, D, block, window, layout):
    case = make_attention_case(S=S, Hq=Hq, Hkv=Hkv, D=D, page_size=page_size,
                               ctx_lens=attention_lens(page_size, S, block), block=block,
                               layout=layout)
    sm_scale = D ** -0.5
    out, lse = run_attention(case, "reference", window=window)
    assert_matches_truth(case, out, lse, sm_scale, window or 0)


@pytest.mark.parametrize("block", [True, False])
def test_reference_long_context_custom_scale(block):
    case = make_attention_case(S=8, Hq=8, Hkv=2, D=64, page_size=16, ctx_lens=[317, 200, 16],
                               block=block)
    out, lse = run_attention(case, "reference", sm_scale=0.3)
    assert_matches_truth(case, out, lse, 0.3, 0)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_reference_fp8_cache(cache_dtype, scale_kind):
    case = make_attention_case(S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=[0, 17, 40],
                               cache_dtype=cache_dtype, scale_kind=scale_kind, layout="hnd")
    out, lse = run_attention(case, "reference", window=9)
    assert_matches_truth(case, out, lse, 64 ** -0.5, 9)


def test_reference_bf16():
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, page_size=16, ctx_lens=[9, 33],
                               dtype=torch.bfloat16)
    out, lse = run_attention(case, "reference")
    assert out.dtype == torch.bfloat16
    assert_matches_truth(case, out, lse, 0.125, 0, atol=2e-2)


@pytest.mark.parametrize("window", [None, 1, 2])
def test_reference_rows_without_visible_keys(window):
    # Outside SPEC (context shorter than S with no block), but still defined:
    # rows with nothing visible give zeros and lse = -inf, never NaN.
    S = 4
    case = make_attention_case(S=S, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[0, 2, 6],
                               block=False)
    B, _, Hq, D = case["q"].shape
    out = torch.full_like(case["q"], NAN)
    lse = torch.full((B, S, Hq), NAN)
    ref.block_attention(case["q"], case["k_cache"], case["v_cache"], case["block_table"],
                        case["context_lens"], None, None, 0.125, window or 0, None, None, out, lse)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    if window == 1:
        # Request 1: rows at positions -2, -1 see nothing; rows at 0, 1 see their own key.
        assert (out[1, :2] == 0).all() and (lse[1, :2] == -math.inf).all()
        assert torch.isfinite(lse[1, 2:]).all()
    assert_matches_truth(case, out, lse, 0.125, window or 0)


def test_reference_visible_key_scan():
    # Each query row sees exactly the keys within the window: with one-hot
    # values the output is the softmax weight of each key, so the support of
    # every row can be read off and counted against the window rule.
    S, W, page = 3, 4, 4
    L = 9
    case = make_attention_case(S=S, Hq=1, Hkv=1, D=64, page_size=page, ctx_lens=[L], block=True)
    Tk = L + S
    vals = torch.zeros(Tk, 64, dtype=torch.float16)
    vals[torch.arange(Tk), torch.arange(Tk)] = 1
    bt = case["block_table"]
    for t in range(L):
        case["v_cache"][bt[0, t // page], t % page, 0] = vals[t]
    case["v_block"][0, :, 0] = vals[L:]
    out, _ = run_attention(case, "reference", window=W)
    support = out[0, :, 0, :Tk] > 0
    for i in range(S):
        want = [abs(L + i - j) < W for j in range(Tk)]
        assert support[i].tolist() == want


def test_reference_has_no_data_dependent_ops():
    # On meta tensors there are no values: any .item()/.tolist() or
    # data-dependent shape would raise, so this proves the op never syncs.
    case = make_attention_case(S=4, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[3, 20])
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = torch.empty_like(meta["q"])
    lse = torch.empty(meta["q"].shape[:3], device="meta")
    ref.block_attention(meta["q"], meta["k_cache"], meta["v_cache"], meta["block_table"],
                        meta["context_lens"], meta["k_block"], meta["v_block"], 0.125, 3,
                        None, None, out, lse)


# ---------------------------------------------------------------------------
# Edge values (docs/DESIGN.md, "Edge values")
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("block", [True, False])
def test_reference_never_reads_pages_behind_the_window(block):
    window = 6
    clean, freed, _, _ = window_cases(window=window, block=block)
    want = run_attention(clean, "reference", window=window)
    got = run_attention(freed, "reference", window=window)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
        assert not g.isnan().any()


def test_reference_masked_nan_key_reaches_only_rows_that_see_it():
    window = 6
    clean, _, nan_kv, seen_by = window_cases(window=window)
    want, _ = run_attention(clean, "reference", window=window)
    got, _ = run_attention(nan_kv, "reference", window=window)
    for b, rows in enumerate(seen_by):
        for s in range(got.shape[1]):
            if s in rows:
                assert got[b, s].isnan().all()
            else:
                assert torch.equal(got[b, s], want[b, s])
    assert any(seen_by)


def test_reference_without_pages():
    # num_pages = 0 with every length 0 (IndexError before); the block keys only.
    case = make_attention_case(S=3, Hq=2, Hkv=1, D=64, ctx_lens=(0, 0))
    case.update(k_cache=case["k_cache"][:0], v_cache=case["v_cache"][:0],
                block_table=torch.full_like(case["block_table"], -1))
    out, lse = run_attention(case, "reference")
    want, want_lse = dense_truth(case, 1 / 8, 0)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)
