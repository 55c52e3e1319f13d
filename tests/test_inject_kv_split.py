"""inject_kv's split-K path (docs/inject.md, "inject_kv grid"): forced split counts
at odd sizes against the reference (interpreter, fp16 / fp8, poisoned caches and
skipped rows as in test_inject_kv_triton.py), bit-exact agreement with the
unsplit kernel where fp32 sums are exact, run-to-run determinism, counters left
at 0, and the grid the host picks at production sizes.
"""

import functools

import pytest
import torch

import dflash_kernels
from dflash_kernels import _registry
from dflash_kernels.triton_backend import inject_kv as ik
from helpers import FP8_MAX, make_caches, make_inject_inputs, run_both, snapshot


@pytest.fixture
def force_splits(monkeypatch):
    """``force(s)``: the Triton inject_kv of the public op runs with ``num_splits=s``."""
    orig = _registry.get

    def force(s):
        def get(op, backend):
            fn = orig(op, backend)
            if op == "inject_kv" and backend == "triton":
                return functools.partial(fn, num_splits=s)
            return fn
        monkeypatch.setattr(_registry, "get", get)
    return force


def _inputs(device, L, N, H, Hkv, D, P, page, *, bias=True, knorm=True, rotary_dim=None,
            leading_invalid=0, act=torch.float16):
    return make_inject_inputs(device, act, L=L, N=N, H=H, Hkv=Hkv, D=D, bias=bias, knorm=knorm,
                              rotary_dim=rotary_dim, max_pos=211, num_slots=P * page,
                              n_invalid=max(N // 4, 0), all_invalid_prefix=leading_invalid,
                              skipped_pos=-(10 ** 9))


def _counters_zero():
    return all(int(c.abs().sum()) == 0 for c in ik._COUNTERS.values())


# Interpreter config: BLOCK_M 16, BLOCK_K 32. H 200 -> 7 K tiles (the last one of
# 8 columns): splits of 4+3, 3+3+1 and 1 x 7 tiles; H 72 -> 3 tiles.
SPLIT_CASES = [
    # L, N, H, splits, page, D, layout, neox, rotary_dim, bias, knorm, cache dtype, leading invalid
    (2, 7, 200, 2, 16, 64, "stacked", True, None, True, True, torch.float16, 0),
    (1, 20, 200, 3, 1, 64, "separate", False, 48, False, True, torch.float16, 0),
    (3, 1, 72, 3, 16, 64, "views", True, 32, True, False, torch.float16, 0),
    (2, 20, 200, 7, 16, 64, "combined", True, None, True, True, torch.float8_e4m3fn, 16),
    (1, 9, 200, 16, 16, 128, "stacked_hnd", False, 64, True, True, torch.float8_e5m2, 0),
]


@pytest.mark.parametrize(
    "L, N, H, splits, page, D, layout, neox, rotary_dim, bias, knorm, cache_dtype, leading",
    SPLIT_CASES)
def test_split_matches_reference(device, force_splits, L, N, H, splits, page, D, layout, neox,
                                 rotary_dim, bias, knorm, cache_dtype, leading):
    act, Hkv = torch.float16, 2
    P = N // page + 2
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = _inputs(
        device, L, N, H, Hkv, D, P, page, bias=bias, knorm=knorm, rotary_dim=rotary_dim,
        leading_invalid=leading)
    scales = {}
    if cache_dtype in FP8_MAX:
        scales = dict(k_scale=0.02, v_scale=torch.tensor([0.015], device=device))
    force_splits(splits)
    run_both(dflash_kernels.inject_kv, device, (hidden, kv_weight, knw, positions, slots),
             (cos_sin,), L=L, P=P, page=page, Hkv=Hkv, D=D, layout=layout,
             cache_dtype=cache_dtype, slots=slots, act=act, kv_bias=kv_bias,
             rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim, **scales)
    assert _counters_zero()


def _run(device, force_splits, splits, args, layout, L, P, page, Hkv, D, bias, fill=None):
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = args
    k, v, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, torch.float16, device)
    if fill is not None:
        for c, f in zip(k_list + v_list, fill):
            c.copy_(f)
    force_splits(splits)
    dflash_kernels.inject_kv(hidden, kv_weight, knw, positions, slots, k, v, cos_sin,
                             kv_bias=kv_bias if bias else None, backend="triton")
    return snapshot(k_list + v_list)


def _bits(caches):
    return [c.view(torch.int16) for c in caches]


def test_split_bit_exact_when_sums_are_exact(device, force_splits):
    """Small-integer inputs make every fp32 partial and total exact: each split
    count must then store the unsplit kernel's bits (every K tile summed once)."""
    L, N, H, Hkv, D, page, P = 2, 20, 200, 2, 64, 16, 4
    args = list(_inputs(device, L, N, H, Hkv, D, P, page))
    args[0] = torch.randint(-3, 4, args[0].shape, device=device).to(torch.float16)
    args[1] = torch.randint(-2, 3, args[1].shape, device=device).to(torch.float16)
    args[2] = torch.randint(-8, 9, args[2].shape, device=device).to(torch.float16)
    fill = _run(device, force_splits, 1, args, "stacked", L, P, page, Hkv, D, True)
    fill = [torch.full_like(c, float("nan")) for c in fill]     # poisoned, unwritten rows
    want = _run(device, force_splits, 1, args, "stacked", L, P, page, Hkv, D, True, fill)
    for s in (2, 3, 5, 7, 50):
        got = _run(device, force_splits, s, args, "stacked", L, P, page, Hkv, D, True, fill)
        assert all(torch.equal(a, b) for a, b in zip(_bits(got), _bits(want))), s
    assert _counters_zero()


def test_split_deterministic_run_to_run(device, force_splits):
    L, N, H, Hkv, D, page, P = 1, 9, 200, 2, 64, 16, 3
    args = _inputs(device, L, N, H, Hkv, D, P, page)
    fill = _run(device, force_splits, 1, args, "separate", L, P, page, Hkv, D, True)
    first = _run(device, force_splits, 3, args, "separate", L, P, page, Hkv, D, True, fill)
    for _ in range(2):
        again = _run(device, force_splits, 3, args, "separate", L, P, page, Hkv, D, True, fill)
        assert all(torch.equal(a, b) for a, b in zip(_bits(again), _bits(first)))


def test_split_all_rows_skipped_writes_nothing(device, force_splits):
    """Tiles whose slots are all negative exit before the GEMM in every split:
    nothing is written and no counter moves."""
    L, N, H, Hkv, D, page, P = 2, 20, 200, 2, 64, 16, 3
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = _inputs(
        device, L, N, H, Hkv, D, P, page, leading_invalid=N)
    k, v, k_list, v_list = make_caches("separate", L, P, page, Hkv, D, torch.float16, device)
    before = snapshot(k_list + v_list)
    force_splits(3)
    dflash_kernels.inject_kv(hidden, kv_weight, knw, positions, slots, k, v, cos_sin,
                             kv_bias=kv_bias, backend="triton")
    for a, b in zip(k_list + v_list, before):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert _counters_zero()


def test_plan_clamps_forced_splits():
    # 7 K tiles: 50 requested -> 7 splits of one tile; 3 -> 3 + 3 + 1; 4 -> 2 + 2 + 2 + 1.
    assert ik.plan(None, 20, 2, 2, 64, 200, 16, 32, 50)[1:] == (7, 32)
    assert ik.plan(None, 20, 2, 2, 64, 200, 16, 32, 3)[1:] == (3, 96)
    assert ik.plan(None, 20, 2, 2, 64, 200, 16, 32, 4)[1:] == (4, 64)
    assert ik.plan(None, 20, 2, 2, 64, 200, 16, 32, 1)[1:] == (1, 224)


# Production: H 4096, D 128, Hkv 8, BLOCK_M 64, BLOCK_K 64 (sm_90 / sm_100 configs).
@pytest.mark.parametrize("sms, L, N, want", [
    (132, 5, 16, (3, 240)), (132, 5, 32, (3, 240)), (132, 5, 64, (3, 240)),
    (132, 5, 128, (4, 640)), (132, 5, 256, (1, 320)),
    (148, 5, 16, (5, 400)), (148, 5, 64, (3, 240)), (148, 5, 128, (4, 640)),
    (148, 5, 256, (1, 320)),
    (132, 1, 16, (8, 128)), (132, 1, 256, (2, 128)),
])
def test_grid_fills_the_sms(sms, L, N, want):
    grid, splits, k_per = ik.plan(sms, N, L, 8, 128, 4096, 64, 64)
    ctas = grid[0] * grid[1] * grid[2]
    assert (splits, ctas) == want
    assert k_per % 64 == 0 and (splits - 1) * k_per < 4096 <= splits * k_per
    # Every SM gets a program (L 1: 16 heads x 8 splits = 128 of 132 is the
    # best the cost model finds: 9 splits would put 2 on 12 SMs).
    assert ctas >= sms or L == 1
