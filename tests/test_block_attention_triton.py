"""The Triton block_attention against the reference (interpreter on CPU, native on GPU).

Inputs come from helpers.make_attention_case: NaN in unused cache rows
and spare pages, garbage block-table entries past the used pages, and
outputs pre-filled with NaN so that any element left unwritten shows.
"""

import math

import pytest
import torch

from dflash_kernels.triton_backend import block_attention as tri
from helpers import NAN, attention_lens, make_attention_case, run_attention, window_cases
from microbench.compile import compile_report


def _scale_tensor(s, device):
    if s is None or isinstance(s, torch.Tensor):
        return s
    return torch.full((1,), float(s), dtype=torch.float32, device=device)


def run_triton(case, sm_scale, window, num_splits=None, with_lse=True):
    q = case["q"]
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:3], NAN, dtype=torch.float32, device=q.device) if with_lse else None
    tri.block_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                        case["context_lens"], case["k_block"], case["v_block"], sm_scale,
                        window, _scale_tensor(case["k_scale"], q.device),
                        _scale_tensor(case["v_scale"], q.device), out, lse,
                        num_splits=num_splits)
    return out, lse


def assert_matches_reference(case, out, lse, sm_scale, window, atol=4e-3):
    want, want_lse = run_attention(case, "reference", sm_scale=sm_scale, window=window or None)
    assert not out.isnan().any(), "unwritten or NaN output"
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=atol)
    if lse is not None:
        assert not lse.isnan().any(), "unwritten or NaN lse"
        torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "page_size, S, Hq, Hkv, D, block, window, layout, num_splits",
    [
        (16, 4, 4, 1, 64, True, 0, "nhd", 1),
        (16, 5, 8, 2, 64, False, 0, "hnd", 3),        # g=4, splits with empty ranges
        (1, 3, 8, 1, 64, True, 0, "combined", 2),     # token pool, g=8
        (1, 4, 2, 2, 64, False, 3, "nhd", 2),         # g=1, window
        (64, 6, 8, 1, 128, True, 5, "hnd", 1),
        (64, 4, 4, 4, 128, False, 0, "combined", 2),
        (16, 5, 16, 1, 256, True, 0, "nhd", 2),       # S*g=80 > BLOCK_M=64: two row blocks
        (16, 7, 16, 2, 64, True, 2, "combined", 4),   # window shorter than a tile
        (16, 16, 8, 1, 64, True, 0, "nhd", 1),        # S*g = 128 rows in one program
    ],
)
def test_triton_matches_reference(page_size, S, Hq, Hkv, D, block, window, layout, num_splits,
                                  device):
    case = make_attention_case(S=S, Hq=Hq, Hkv=Hkv, D=D, page_size=page_size,
                               ctx_lens=attention_lens(page_size, S, block), block=block,
                               layout=layout, device=device)
    sm_scale = D ** -0.5
    out, lse = run_triton(case, sm_scale, window, num_splits)
    assert_matches_reference(case, out, lse, sm_scale, window)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_triton_long_context(num_splits, device):
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, page_size=16, ctx_lens=[317, 3], block=True,
                               device=device)
    out, lse = run_triton(case, 0.2, 0, num_splits)
    assert_matches_reference(case, out, lse, 0.2, 0)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_triton_fp8_cache(cache_dtype, scale_kind, device):
    case = make_attention_case(S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=[0, 17, 40],
                               cache_dtype=cache_dtype, scale_kind=scale_kind, layout="hnd",
                               device=device)
    out, lse = run_triton(case, 0.125, 9 if scale_kind == "float" else 0, num_splits=2)
    assert_matches_reference(case, out, lse, 0.125, 9 if scale_kind == "float" else 0)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("q_scale", [1.0, 3e5, 1e-7])
def test_triton_fp8_cache_bf16_queries(cache_dtype, block, q_scale, device):
    # bf16 queries over an fp8 cache: the context MMAs run in fp16 on q times
    # a power of two (_fp16_q). 3e5 overflows fp16 unscaled; 1e-7 would be
    # fp16 subnormals; one head 1e3 x larger than the others shares the scale.
    torch.manual_seed(int(q_scale * 1e7) % 1000 + block)
    case = make_attention_case(S=4, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[0, 17, 40],
                               dtype=torch.bfloat16, cache_dtype=cache_dtype, block=block,
                               device=device)
    q = case["q"].float() * q_scale
    q[:, :, 1] *= 1e3
    case["q"] = q.to(torch.bfloat16)
    sm_scale = 0.125 / q_scale if q_scale > 1 else 0.125
    for window in (0, 7):
        out, lse = run_triton(case, sm_scale, window, num_splits=2)
        assert_matches_reference(case, out, lse, sm_scale, window, atol=3e-2)


def test_triton_bf16(device):
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, page_size=16, ctx_lens=[9, 70],
                               dtype=torch.bfloat16, device=device)
    out, lse = run_triton(case, 0.125, 0, num_splits=2)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(case, out, lse, 0.125, 0, atol=3e-2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_rows_without_visible_keys(num_splits, device):
    # Outside SPEC (no block and a context shorter than S), but defined: rows
    # that see nothing give zeros and lse = -inf; with several splits every
    # partial is neutral and the merge must not make NaN.
    case = make_attention_case(S=4, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[0, 2, 6],
                               block=False, device=device)
    out, lse = run_triton(case, 0.125, 1, num_splits)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert (out[1, :2] == 0).all() and (lse[1, :2] == -math.inf).all()
    assert_matches_reference(case, out, lse, 0.125, 1)


def test_triton_without_lse_through_public_api(device):
    # Default split count (2 on CPU for contexts over one tile), public entry point.
    import dflash_kernels

    case = make_attention_case(S=3, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=[100, 5],
                               device=device)
    out = torch.full_like(case["q"], NAN)
    res = dflash_kernels.block_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["context_lens"],
        case["k_block"], case["v_block"], out=out, backend="triton")
    assert res is out
    want = run_attention(case, "reference")[0]
    torch.testing.assert_close(out.float(), want.float(), atol=4e-3, rtol=4e-3)


def test_split_count_uses_host_sizes_only():
    # Same sizes, any context lengths: the plan depends on shapes alone.
    a = tri.plan(90, 132, 1, 16, 32, 8, 128, 16, 256, 0)
    assert a["NUM_SPLITS"] == min(tri.triton.cdiv(132, 8), 256 * 16 // 64 // 4)
    assert tri.plan(90, 132, 512, 16, 32, 8, 128, 16, 256, 0)["NUM_SPLITS"] == 1
    # A window bounds the span a block can see, whatever the table width.
    assert tri.plan(90, 132, 1, 16, 32, 8, 128, 16, 256, 8)["NUM_SPLITS"] == 1
    assert tri.plan(None, None, 1, 16, 32, 8, 128, 16, 256, 0)["NUM_SPLITS"] == tri.CPU_SPLITS


@pytest.mark.parametrize("sms, B, Hkv, span, want", [
    (132, 1, 8, 4096, 16),        # 128 programs: one wave, 4 tiles each
    (132, 2, 8, 4096, 8),         # cdiv(132, 16) = 9 would make 144 programs: 2 waves
    (148, 1, 8, 16384, 18),       # 144 programs on 148 SMs
    (132, 3, 8, 131072, 11),      # 264 programs: exactly 2 waves beat 120 programs of 410 tiles
    (132, 16, 8, 131072, 1),      # 128 programs already fill one wave
    (132, 1, 8, 1024, 4),         # 16 tiles: at most 16 // MIN_TILES_PER_SPLIT splits
    (132, 1, 8, 128, 1),          # 2 tiles: never split
])
def test_split_count_fills_whole_waves(sms, B, Hkv, span, want):
    got = tri.num_splits_for(sms, B, Hkv, 1, span, 64)
    assert got == want
    # The model it minimises: the busiest SM's tiles, fill and partial included.
    def cost(s):
        return -(-B * Hkv * s // sms) * (-(-span // 64 // s) + 2 + (2 if s > 1 else 0))
    assert all(cost(got) <= cost(s) for s in range(1, min(span // 64 // 4, 32) + 1))


# Compile checks: the default launch of the main kernel for Hopper and
# Blackwell uses the tensor-core instructions of each and never spills.
# Each arch with both dtypes and both group sizes, in 4 compiles (~10 s each).
@pytest.mark.parametrize(
    "arch, mma, smem_limit, dtype, g",
    [
        (90, "wgmma.mma_async", 227 * 1024, torch.float16, 4),
        (90, "wgmma.mma_async", 227 * 1024, torch.bfloat16, 8),
        (100, "tcgen05.mma", 227 * 1024, torch.float16, 8),
        (100, "tcgen05.mma", 227 * 1024, torch.bfloat16, 4),
    ],
)
def test_compiles_to_tensor_cores_without_spills(arch, mma, smem_limit, dtype, g):
    spec = tri.compile_spec(arch, dtype, dtype, S=16, Hq=8 * g, Hkv=8, D=128)
    rep = compile_report("dflash_kernels.triton_backend.block_attention", "_block_attention_kernel",
                         spec["signature"], spec["constexprs"], arch,
                         num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                         divisibility=spec["divisibility"], options=spec["options"])
    assert mma in rep["ptx"]
    assert rep["spills"] == 0, rep["registers"]
    assert rep["shared"] <= smem_limit


def _cache_addresses(cache, block_table, ctx_lens):
    """Byte addresses of every element of every context token, from the table."""
    s0, s1, s2, s3 = cache.stride()
    _, page, Hkv, D = cache.shape
    addrs = []
    for b, L in enumerate(ctx_lens):
        for t in range(L):
            p = int(block_table[b, t // page])
            for h in range(Hkv):
                base = p * s0 + (t % page) * s1 + h * s2
                addrs.extend(base + d * s3 for d in range(D))
    return {cache.data_ptr() + a * cache.element_size() for a in addrs}


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts loads through the interpreter")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_each_context_element_is_read_once(num_splits, monkeypatch):
    # Record every address the kernels load: the K and V cache elements read
    # must be exactly the context tokens' elements (nothing from poisoned
    # rows, spare pages or garbage table entries), each read exactly once.
    import numpy as np
    from triton.runtime import interpreter

    loaded = []
    orig = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args):
        loaded.append(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.uint64))
        return orig(self, ptrs, mask, other, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", spy)
    ctx = [0, 37, 100]
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, page_size=16, ctx_lens=ctx)
    out, lse = run_triton(case, 0.125, 0, num_splits)
    assert not out.isnan().any()
    addrs = np.concatenate(loaded)
    for name in ("k_cache", "v_cache"):
        cache = case[name]
        lo = cache.untyped_storage().data_ptr()
        hi = lo + cache.untyped_storage().nbytes()
        mine = addrs[(addrs >= lo) & (addrs < hi)]
        want = _cache_addresses(cache, case["block_table"], ctx)
        assert len(mine) == len(want) == sum(ctx) * 2 * 64      # read once, no more
        assert set(mine.tolist()) == want


def test_head_offsets_past_int32(device):
    # A head-major fp8 pool [Hkv, (k|v), P, page, D] viewed as [P, page, Hkv, D]:
    # each stride fits int32 but h * sk_h reaches 2**31 elements for h >= 2, so
    # the kernel must form 64-bit products. ~4.3 GB of address space; only the
    # pages copied in below are ever touched.
    Hkv, D, page = 4, 64, 4
    case = make_attention_case(S=3, Hq=8, Hkv=Hkv, D=D, page_size=page, ctx_lens=(7, 2, 9),
                               cache_dtype=torch.float8_e4m3fn, device=device)
    n = case["k_cache"].shape[0]
    big_pages = 2 ** 30 // (2 * page * D)
    buf = torch.empty((Hkv, 2, big_pages, page, D), dtype=torch.uint8, device=device)
    buf = buf.view(torch.float8_e4m3fn)
    k_big, v_big = (buf[:, i].permute(1, 2, 0, 3) for i in (0, 1))
    assert k_big.stride(2) == 2 ** 30 and (Hkv - 1) * k_big.stride(2) >= 2 ** 31
    k_big[:n].copy_(case["k_cache"])
    v_big[:n].copy_(case["v_cache"])
    sm_scale = D ** -0.5
    out, lse = run_triton(dict(case, k_cache=k_big, v_cache=v_big), sm_scale, 0, num_splits=1)
    assert_matches_reference(case, out, lse, sm_scale, 0)


def test_strided_context_lens_and_huge_window(device):
    # context_lens as a column view (stride 2), through the public op, which
    # hands the kernel a dense copy; window = 2**31 - 1 (a common "no window"
    # sentinel) is the same as no window, in the backend with forced splits too.
    case = make_attention_case(S=4, Hq=4, Hkv=2, D=64, page_size=16, ctx_lens=(5, 17, 0),
                               device=device)
    cl = case["context_lens"]
    strided = torch.stack([torch.full_like(cl, 9999), cl], 1)[:, 1]
    sm_scale = 0.125
    for window in (None, 2 ** 31 - 1):
        out, lse = run_attention(dict(case, context_lens=strided), "triton", sm_scale, window)
        assert_matches_reference(case, out, lse, sm_scale, 0)
        out, lse = run_triton(case, sm_scale, window or 0, num_splits=2)
        assert_matches_reference(case, out, lse, sm_scale, 0)


# ---------------------------------------------------------------------------
# Edge values (docs/DESIGN.md, "Edge values"): the reference's rules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("block", [True, False])
def test_triton_never_reads_pages_behind_the_window(block, device):
    window = 6
    clean, freed, _, _ = window_cases(window=window, block=block, device=device)
    want = run_attention(clean, "triton", window=window)
    got = run_attention(freed, "triton", window=window)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
        assert not g.isnan().any()


def test_triton_masked_nan_key_reaches_only_rows_that_see_it(device):
    window = 6
    clean, _, nan_kv, seen_by = window_cases(window=window, device=device)
    want, _ = run_attention(clean, "triton", window=window)
    got, _ = run_attention(nan_kv, "triton", window=window)
    for b, rows in enumerate(seen_by):
        for s in range(got.shape[1]):
            if s not in rows:
                assert torch.equal(got[b, s], want[b, s])


def test_triton_without_pages_and_empty_shapes(device):
    case = make_attention_case(S=3, Hq=2, Hkv=1, D=64, ctx_lens=(0, 0), device=device)
    case.update(k_cache=case["k_cache"][:0], v_cache=case["v_cache"][:0],
                block_table=torch.full_like(case["block_table"], -1))
    got = run_attention(case, "triton")
    want = run_attention(case, "reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("mode", ["window", "causal"])
def test_nan_in_an_unseen_value_row_stays_out(mode, device):
    # A NaN in a used V row must reach only the rows that see that key: for a
    # row that cannot (window, block mask) its P is 0, and 0 x NaN in P x V
    # would be NaN; the reference gives the finite answer there.
    case = make_attention_case(S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=(40,),
                               device=device)
    kw = dict(window=3) if mode == "window" else dict(block_mask="causal")
    if mode == "window":
        # Token 10 is outside every row's window; token 38 (element 5) is seen
        # by row 0 (position 40) only.
        for t, d in ((10, slice(None)), (38, 5)):
            case["v_cache"][case["block_table"][0, t // 16], t % 16, 0, d] = NAN
    else:
        case["v_block"][0, 3, 0, 7] = NAN          # block key 3: only row 3 sees it
    want, want_lse = run_attention(case, "reference", sm_scale=0.125, **kw)
    assert want.isnan().any() and not want[0, 1:3].isnan().any()
    runs = [run_attention(case, "triton", sm_scale=0.125, **kw)]
    if mode == "window":
        runs.append(run_triton(case, 0.125, 3, num_splits=2))
    for out, lse in runs:
        torch.testing.assert_close(out.float(), want.float(), atol=4e-3, rtol=4e-3,
                                   equal_nan=True)
        torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "page_size, S, block, window, ctx, num_splits, cache",
    [
        (16, 4, True, 3, (40, 7), 1, None),      # head edge; a context shorter than the window
        (4, 5, False, 3, (29, 2), 2, None),      # cached block: head and tail edges, splits
        (16, 6, True, 2, (37,), 3, None),        # window < S: block-tile edges, empty splits
        (8, 3, False, 40, (70, 50), 2, None),    # wide window: edges and whole middle tiles
        (16, 4, True, 5, (45,), 2, "fp8"),       # fp8 cache: NaN bytes
    ])
def test_nan_values_reach_exactly_the_rows_that_see_them(page_size, S, block, window, ctx,
                                                         num_splits, cache, device):
    # Non-finite V elements scattered over the window's keys (and the block's
    # own values): each output element is NaN iff one of the row's visible
    # keys holds one in that column (the reference), whichever tile (window
    # edge or middle), split or block tile the key falls in.
    torch.manual_seed(page_size * 100 + S * 10 + window)
    cdt = torch.float8_e4m3fn if cache == "fp8" else None
    case = make_attention_case(S=S, Hq=4, Hkv=2, D=64, page_size=page_size, ctx_lens=ctx,
                               block=block, cache_dtype=cdt, device=device)
    vc = case["v_cache"].view(torch.uint8) if cdt is not None else case["v_cache"]
    bad = torch.tensor(0x7F, dtype=torch.uint8) if cdt is not None else NAN
    for b, L in enumerate(ctx):
        # Keys within reach of some row's window (and a few just behind it).
        for t in torch.randint(max(L - S - window - 1, 0), L, (6,)).tolist():
            pg = int(case["block_table"][b, t // page_size])
            vc[pg, t % page_size, torch.randint(0, 2, ()).item(),
               torch.randint(0, 64, (3,))] = bad.to(device) if cdt is not None else NAN
    if block and cdt is None:    # (fp8: the NaN bytes alone make the case's NaN)
        case["v_block"][0, S // 2, 1, 5] = float("inf")
    want, want_lse = run_attention(case, "reference", sm_scale=0.125, window=window)
    assert want.isnan().any() and not want.isnan().all(), "a vacuous case"
    for out, lse in (run_attention(case, "triton", sm_scale=0.125, window=window),
                     run_triton(case, 0.125, window, num_splits=num_splits)):
        assert torch.equal(out.isnan(), want.isnan())
        torch.testing.assert_close(out.float(), want.float(), atol=4e-3, rtol=4e-3,
                                   equal_nan=True)
        torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-3)
