"""The write_kv reference against independent float64 loop math (tests/helpers.py)."""

import pytest
import torch

import dflash_kernels
from helpers import (FP8_MAX, GivenRows, assert_kv_edge_rules, check_caches, kv_edge_writer,
                     make_caches, make_cos_sin, make_slots, model_rows, snapshot, tolerances)


@pytest.mark.parametrize("neox, rotary_dim, knorm, page, cache_dtype", [
    (True, None, True, 16, torch.float16),
    (False, 32, False, 1, torch.float16),
    (True, 48, True, 16, torch.float8_e4m3fn),
])
def test_write_kv_reference_matches_loops(device, neox, rotary_dim, knorm, page, cache_dtype):
    L, N, Hkv, D = 2, 7, 2, 64
    P = N // page + 2
    k = torch.randn(N, L, Hkv, D, device=device).half()
    v = torch.randn(N, L, Hkv, D, device=device).half()
    k_norm_weight = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    positions = torch.randint(0, 50, (N,), device=device)
    slots = make_slots(N, P * page, 2, device)
    cos_sin = make_cos_sin(50, rotary_dim or D, device)
    kc, vc, k_list, v_list = make_caches("stacked_hnd", L, P, page, Hkv, D, cache_dtype, device)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    fp8 = cache_dtype in FP8_MAX
    scales = dict(k_scale=0.05, v_scale=0.04) if fp8 else {}
    dflash_kernels.write_kv(k, v, k_norm_weight, positions, slots, kc, vc, cos_sin,
                            rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
                            backend="reference", **scales)
    expect = model_rows(GivenRows(k), GivenRows(v), k_norm_weight, positions.cpu(), slots.cpu(),
                        cos_sin.cpu().double(), 1e-6, rotary_dim or D, neox)
    rtol, atol = tolerances(cache_dtype, torch.float16)
    check_caches(k_list, k_before, expect, 0, scales.get("k_scale"), page, rtol, atol)
    check_caches(v_list, v_before, expect, 1, scales.get("v_scale"), page, rtol, atol)


def test_write_kv_edge_slots_and_positions():
    # Slots outside the cache skipped, positions clamped, the last of duplicate slots wins.
    assert_kv_edge_rules(kv_edge_writer("write_kv", "reference", "cpu"), "cpu")
