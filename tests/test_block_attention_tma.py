"""block_attention's TMA path (docs/block_attention.md, "TMA path"), forced.

Triton's host-side tensor descriptors run under the interpreter (``load``
and ``gather`` both), so the TMA path is run here, not only compiled: one
box per tile (``KV_TMA`` 1, page 64 at the interpreter's 64-token tiles) and
the row gather (``KV_TMA`` 2, pages 16 and 1). On a GPU the same tests run
the modes that GPU has (sm_90: the box at page 64; sm_100: the box at page
64, the gather at 16 and 1) and skip the others. Each test checks that the
TMA path really ran (the launch's ``KV_TMA``, and under the interpreter its
descriptor loads), and compares it with the reference and with
the cp.async path on inputs poisoned as in tests/helpers.py (NaN, here also
+-inf, in the rows past each length and in spare pages; garbage table
entries past the used pages; NaN-prefilled outputs). The compile facts of
the TMA builds (sm_90a box, sm_100a box and gather) are asserted in
tests/test_compile_report.py.
"""

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from dflash_kernels.triton_backend import block_attention as tri
from helpers import NAN, make_attention_case, run_attention

INTERPRETED = not torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="counts loads through the interpreter")


def _scale(s, device):
    return torch.full((1,), float(s), dtype=torch.float32, device=device) if s is not None else None


def _plan(case, window=0, num_splits=None):
    B, S, Hq, D = case["q"].shape
    _, page, Hkv, _ = case["k_cache"].shape
    return tri.plan(tri.arch(case["q"].device), None, B, S, Hq, Hkv, D, page,
                    case["block_table"].shape[1], window, num_splits,
                    case["k_cache"].element_size())


def tma_mode_here(case, window=0, num_splits=None):
    """The mode a forced launch takes on this device (0: none, skip)."""
    mode = tri.kv_path(tri.arch(case["q"].device), _plan(case, window, num_splits),
                       case["k_cache"], case["v_cache"], True, window)[0]
    if mode == 0 and not INTERPRETED:
        pytest.skip("no TMA path for this arch and page size")
    return mode


def run(case, window=0, num_splits=None, tma=True, sm_scale=0.125):
    q = case["q"]
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:3], NAN, dtype=torch.float32, device=q.device)
    tri.block_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                        case["context_lens"], case["k_block"], case["v_block"], sm_scale, window,
                        _scale(case["k_scale"], q.device), _scale(case["v_scale"], q.device),
                        out, lse, num_splits=num_splits, tma=tma)
    return out, lse


@pytest.fixture
def descriptor_reads(monkeypatch):
    """Every descriptor load the interpreter runs (a gather is one per row):
    ``(block_shape, row, col)``; None on a GPU."""
    if not INTERPRETED:
        return None
    reads = []
    orig = interpreter.InterpreterBuilder.create_descriptor_load

    def spy(self, desc, indices, *args):
        reads.append((tuple(desc.block_shape), *(int(np.asarray(i.data).reshape(-1)[0]) for i in indices)))
        return orig(self, desc, indices, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load", spy)
    return reads


def poison_inf(case):
    """+inf in K and -inf in V (NaN for e4m3, which has no inf) in some of the rows
    past each length in its last page, on top of the helper's NaN."""
    page = case["k_cache"].shape[1]
    for b, L in enumerate(case["context_lens"].tolist()):
        if L % page:
            p = int(case["block_table"][b, L // page])
            for name, val in (("k_cache", float("inf")), ("v_cache", float("-inf"))):
                c = case[name]
                c[p, L % page::2] = torch.tensor(val).to(c.dtype)


def assert_close_to_reference(case, out, lse, window, atol):
    want, want_lse = run_attention(case, "reference", sm_scale=0.125, window=window or None)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten or NaN output"
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-3)


# Lengths: 0; one part-tile only; ending mid-page after whole tiles; exactly whole tiles;
# whole tiles plus one token (64-token tiles on the interpreter).
LENS = [0, 37, 141, 128, 193]


@pytest.mark.parametrize("page, mode", [(64, 1), (16, 2), (1, 2)])
@pytest.mark.parametrize("cache", ["act", "e4m3", "e5m2"])
def test_tma_matches_reference_and_cp_async(page, mode, cache, descriptor_reads, device):
    torch.manual_seed(page * 7 + len(cache))
    dtype = torch.bfloat16 if cache != "e5m2" else torch.float16
    cdt = {"act": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[cache]
    case = make_attention_case(S=3, Hq=4, Hkv=2, D=64, page_size=page, ctx_lens=LENS,
                               dtype=dtype, cache_dtype=cdt, device=device)
    poison_inf(case)
    assert tma_mode_here(case) == mode
    out, lse = run(case, num_splits=1)
    if INTERPRETED:
        assert descriptor_reads, "the TMA path did not run"
        assert {shape for shape, _, _ in descriptor_reads} == {(64, 64) if mode == 1 else (1, 64)}
    atol = 3e-2 if dtype == torch.bfloat16 or cdt is not None else 4e-3
    assert_close_to_reference(case, out, lse, 0, atol)
    # The same tiles in the same order as the cp.async path: the same result up to the
    # interpreter's rounding.
    out2, lse2 = run(case, num_splits=1, tma=False)
    torch.testing.assert_close(out.float(), out2.float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page, layout, num_splits, window, block",
                         [(64, "hnd", 3, 0, True),          # splits; heads as rows of the view
                          (16, "combined", 2, 0, False),    # block keys cached
                          (64, "nhd", 2, 200, True),        # window: whole tiles between the edges
                          (1, "hnd", 3, 150, False),
                          (16, "nhd", 4, 5, True)])         # window shorter than a tile: no TMA tile
def test_tma_splits_layouts_windows(page, layout, num_splits, window, block, descriptor_reads,
                                    device):
    torch.manual_seed(page + num_splits + window)
    S = 4
    lens = [L + (0 if block else S) for L in (0, 141, 250)]
    case = make_attention_case(S=S, Hq=8, Hkv=2, D=64, page_size=page, ctx_lens=lens,
                               block=block, layout=layout, device=device)
    poison_inf(case)
    assert tma_mode_here(case, window, num_splits) > 0
    out, lse = run(case, window, num_splits)
    if INTERPRETED:
        assert bool(descriptor_reads) == (window == 0 or window > 64)
    assert_close_to_reference(case, out, lse, window, 4e-3)
    out2, lse2 = run(case, window, num_splits, tma=False)
    torch.testing.assert_close(out, out2, atol=1e-3, rtol=1e-3)


def _context_rows(case):
    """Rows of the descriptors' [rows, cols] view holding context tokens: {(row, col)}."""
    _, page, hkv, D = case["k_cache"].shape
    view = tri.kv_tma(case["k_cache"], case["v_cache"], 1)
    _, _, _, rp, rh, ch = view
    rows = set()
    for b, L in enumerate(case["context_lens"].tolist()):
        for t in range(L):
            p = int(case["block_table"][b, t // page])
            rows.update((p * rp + t % page + h * rh, h * ch) for h in range(hkv))
    return rows


@interpreter_only
@pytest.mark.parametrize("page, layout", [(64, "nhd"), (16, "hnd"), (1, "combined")])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_tma_reads_each_context_row_once(page, layout, num_splits, descriptor_reads,
                                         monkeypatch):
    # Every cache element loaded (descriptor or pointer) is a context token's, each once:
    # no box reaches past a length (the part-tile is peeled onto the masked loads), no
    # garbage table entry is followed.
    loaded = []
    orig = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args, **kw):
        loaded.append(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.uint64))
        return orig(self, ptrs, mask, other, *args, **kw)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", spy)
    ctx = [0, 37, 141, 192]
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, page_size=page, ctx_lens=ctx,
                               layout=layout)
    out, _ = run(case, num_splits=num_splits)
    assert not out.isnan().any()
    addrs = np.concatenate(loaded)
    storages = {}
    for name in ("k_cache", "v_cache"):       # "combined": one storage holds both
        st = case[name].untyped_storage()
        storages.setdefault((st.data_ptr(), st.nbytes()), []).append(name)
    for (lo, nbytes), names in storages.items():
        mine = addrs[(addrs >= lo) & (addrs < lo + nbytes)]
        assert len(mine) == len(set(mine.tolist())) == len(names) * sum(ctx) * 2 * 64
    # The descriptor rows read lie in the context, and they are most of it.
    want = _context_rows(case)
    got = {(row + i, col) for shape, row, col in descriptor_reads for i in range(shape[0])}
    assert got <= want and len(got) >= 2 * 2 * 64


def test_tma_empty_and_zero_length_requests(descriptor_reads, device):
    # Every length below one tile: no whole tile, so no TMA load at all; the peeled
    # part-tile gives the whole answer.
    case = make_attention_case(S=4, Hq=4, Hkv=1, D=64, page_size=64, ctx_lens=[0, 1, 31],
                               cache_dtype=torch.float8_e4m3fn, device=device)
    assert tma_mode_here(case) > 0
    out, lse = run(case, num_splits=2)
    assert not descriptor_reads
    assert_close_to_reference(case, out, lse, 0, 4e-3)


# ---------------------------------------------------------------- host selection


def test_mode_by_arch_and_page():
    assert tri.tma_mode(90, 64, 64, 128, 2) == 1 and tri.tma_mode(90, 128, 64, 128, 1) == 1
    assert tri.tma_mode(90, 16, 64, 128, 2) == 0 and tri.tma_mode(90, 1, 64, 128, 2) == 0
    assert tri.tma_mode(100, 64, 32, 128, 2) == 1 and tri.tma_mode(100, 16, 32, 128, 2) == 2
    assert tri.tma_mode(100, 1, 64, 128, 1) == 2 and tri.tma_mode(103, 48, 32, 128, 2) == 2
    assert tri.tma_mode(80, 64, 64, 128, 2) == 0 and tri.tma_mode(120, 64, 64, 128, 2) == 0
    assert tri.tma_mode(None, 16, 64, 64, 2) == 2
    with pytest.raises(ValueError):
        tri.compile_spec(90, torch.bfloat16, torch.bfloat16, S=16, Hq=32, Hkv=8, D=128,
                         page_size=16, tma=True)


def test_default_is_the_box_on_hopper_and_blackwell():
    # Host facts only: the default takes the box where the arch and page allow it, never
    # the gather; the interpreter (arch None) takes neither unless forced.
    k = torch.zeros(4, 64, 8, 128, dtype=torch.bfloat16)
    k16 = torch.zeros(4, 16, 8, 128, dtype=torch.bfloat16)
    for arch in (90, 100):
        cfg = tri.plan(arch, None, 1, 16, 32, 8, 128, 64, 4, 0)
        assert tri.kv_path(arch, cfg, k, k)[0] == 1
        assert tri.kv_path(arch, cfg, k, k, False) == (0, {})
        cfg16 = tri.plan(arch, None, 1, 16, 32, 8, 128, 16, 4, 0)
        assert tri.kv_path(arch, cfg16, k16, k16)[0] == 0
    cfg16 = tri.plan(100, None, 1, 16, 32, 8, 128, 16, 4, 0)
    assert tri.kv_path(100, cfg16, k16, k16, True)[0] == 2
    assert tri.kv_path(None, tri.plan(None, None, 1, 16, 32, 8, 128, 64, 4, 0), k, k)[0] == 0
    # The TMA spec of the default launch is the box at page 64, the cp.async path at 16.
    spec = tri.compile_spec(90, torch.bfloat16, torch.bfloat16, S=16, Hq=32, Hkv=8, D=128,
                            page_size=64)
    assert spec["constexprs"]["KV_TMA"] == 1 and spec["signature"]["KD"].startswith("tensordesc")
    assert tri.compile_spec(100, torch.bfloat16, torch.bfloat16, S=16, Hq=32, Hkv=8, D=128,
                            page_size=16)["constexprs"]["KV_TMA"] == 0


def test_layouts_the_descriptors_cannot_view():
    P, page, hkv, D = 3, 16, 2, 64
    nhd = torch.zeros(P, page, hkv, D, dtype=torch.float16)
    assert tri.kv_tma(nhd, nhd, 2)[3:] == (page, 0, D)
    hnd = torch.zeros(P, hkv, page, D, dtype=torch.float16).permute(0, 2, 1, 3)
    assert tri.kv_tma(hnd, hnd, 2)[3:] == (hkv * page, page, 0)
    assert tri.kv_tma(nhd, nhd, 0) is None                                 # no mode
    wide = torch.zeros(P, page, hkv, D + 1, dtype=torch.float16)[..., :D]    # 2-byte misaligned rows
    assert tri.kv_tma(wide, wide, 2) is None
    strided = torch.zeros(P, page, hkv, 2 * D, dtype=torch.float16)[..., ::2]
    assert tri.kv_tma(strided, strided, 2) is None                         # non-unit last stride
    flat = torch.zeros(P * page * hkv * D + 1, dtype=torch.float16)
    off = flat[1:].view(P, page, hkv, D)                                   # base 2 bytes off
    assert tri.kv_tma(off, off, 2) is None
    assert tri.kv_tma(nhd, hnd.contiguous(), 2) is not None                # same strides
    assert tri.kv_tma(nhd, hnd, 2) is None                                 # K and V differ
    assert tri.kv_tma(nhd, nhd.float(), 2) is None                         # 4-byte elements


def test_forced_tma_falls_back_where_the_layout_has_none(descriptor_reads, device):
    # tma=True on a layout no descriptor can view runs the cp.async path, correctly.
    case = make_attention_case(S=3, Hq=4, Hkv=2, D=64, page_size=64, ctx_lens=[0, 141],
                               device=device)
    for name in ("k_cache", "v_cache"):
        c = case[name]
        padded = torch.full((*c.shape[:3], c.shape[3] + 1), NAN, dtype=c.dtype, device=device)
        padded[..., :c.shape[3]] = c
        case[name] = padded[..., :c.shape[3]]
    assert tri.kv_path(tri.arch(case["q"].device), _plan(case), case["k_cache"], case["v_cache"],
                       True) == (0, {})
    out, lse = run(case, num_splits=2)
    assert not descriptor_reads
    assert_close_to_reference(case, out, lse, 0, 4e-3)
