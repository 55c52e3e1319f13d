"""The inject_kv reference against independent float64 loop math (tests/helpers.py)."""

import pytest
import torch

import dflash_kernels
from helpers import (FP8_MAX, ProjRows, assert_kv_edge_rules, check_caches, kv_edge_writer,
                     make_caches, make_inject_inputs, model_rows, snapshot, tolerances)


def _inject_case(device, *, L, N, page, Hkv, D, H, layout, neox, rotary_dim, bias, knorm,
                 cache_dtype=torch.float16, act=torch.float16, n_invalid=2, all_invalid_prefix=0,
                 backend="reference", P=None):
    P = P or (N // page + 3)
    # Skipped rows may carry any position: 10**9.
    hidden, kv_weight, kv_bias, k_norm_weight, positions, slots, cos_sin = make_inject_inputs(
        device, act, L=L, N=N, H=H, Hkv=Hkv, D=D, bias=bias, knorm=knorm, rotary_dim=rotary_dim,
        max_pos=97, num_slots=P * page, n_invalid=n_invalid, all_invalid_prefix=all_invalid_prefix,
        skipped_pos=10 ** 9)
    kc, vc, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    fp8 = cache_dtype in FP8_MAX
    k_scale, v_scale = (0.03, torch.tensor([0.02], device=device)) if fp8 else (None, None)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    dflash_kernels.inject_kv(hidden, kv_weight, k_norm_weight, positions, slots, kc, vc, cos_sin,
                             kv_bias=kv_bias, rope_style="neox" if neox else "gptj",
                             rotary_dim=rotary_dim, k_scale=k_scale, v_scale=v_scale,
                             backend=backend)
    return dict(hidden=hidden, kv_weight=kv_weight, kv_bias=kv_bias, k_norm_weight=k_norm_weight,
                positions=positions, slots=slots, cos_sin=cos_sin, k_list=k_list, v_list=v_list,
                k_before=k_before, v_before=v_before, k_scale=k_scale, v_scale=v_scale,
                Hkv=Hkv, D=D, page=page, neox=neox, rotary_dim=rotary_dim or D,
                cache_dtype=cache_dtype, act=act)


def _check_against_model(c, k_rows, v_rows, eps=1e-6):
    expect = model_rows(k_rows, v_rows, c["k_norm_weight"], c["positions"].cpu(), c["slots"].cpu(),
                        c["cos_sin"].cpu().double(), eps, c["rotary_dim"], c["neox"])
    rtol, atol = tolerances(c["cache_dtype"], c["act"])
    ks, vs = (None if s is None else float(s) for s in (c["k_scale"], c["v_scale"]))
    check_caches(c["k_list"], c["k_before"], expect, 0, ks, c["page"], rtol, atol)
    check_caches(c["v_list"], c["v_before"], expect, 1, vs, c["page"], rtol, atol)


@pytest.mark.parametrize(
    "L, N, page, layout, neox, rotary_dim, bias, knorm",
    [
        (2, 7, 16, "stacked", True, None, True, True),
        (2, 7, 16, "stacked_hnd", False, None, False, True),
        (3, 5, 1, "separate", True, 32, False, False),
        (1, 6, 16, "views", False, 48, True, False),
        (2, 7, 1, "combined", True, 16, True, True),
    ],
)
def test_inject_kv_reference_matches_loops(device, L, N, page, layout, neox, rotary_dim, bias, knorm):
    c = _inject_case(device, L=L, N=N, page=page, Hkv=2, D=64, H=24, layout=layout, neox=neox,
                     rotary_dim=rotary_dim, bias=bias, knorm=knorm)
    _check_against_model(c, ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 0, 2, 64),
                         ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 1, 2, 64))


@pytest.mark.parametrize(
    "cache_dtype, layout, neox",
    [
        (torch.float8_e4m3fn, "stacked", True),
        (torch.float8_e4m3fn, "separate", False),
        (torch.float8_e5m2, "views", True),
    ],
)
def test_inject_kv_reference_fp8(device, cache_dtype, layout, neox):
    c = _inject_case(device, L=2, N=6, page=16, Hkv=2, D=64, H=24, layout=layout, neox=neox,
                     rotary_dim=None, bias=True, knorm=True, cache_dtype=cache_dtype)
    _check_against_model(c, ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 0, 2, 64),
                         ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 1, 2, 64))


def test_fp8_saturates_to_max_finite(device):
    """Values far past the format's range are stored as +-max, never NaN/inf."""
    c = _inject_case(device, L=1, N=4, page=16, Hkv=1, D=64, H=8, layout="stacked", neox=True,
                     rotary_dim=None, bias=False, knorm=False, cache_dtype=torch.float8_e4m3fn,
                     n_invalid=0)
    # k_scale 0.03 with |v| up to ~3 stays in range; rerun V with a tiny scale to saturate.
    kc, vc, k_list, v_list = make_caches("stacked", 1, 3, 16, 1, 64, torch.float8_e4m3fn, device)
    dflash_kernels.inject_kv(c["hidden"], c["kv_weight"], None, c["positions"], c["slots"], kc, vc,
                             c["cos_sin"], k_scale=1.0, v_scale=1e-6, backend="reference")
    v_true = c["hidden"].float() @ c["kv_weight"][0, 1].float().T          # [N, D]
    slots = c["slots"]
    stored = v_list[0][slots // 16, slots % 16, 0].float()
    big = v_true.abs() / 1e-6 > 448
    assert big.any()
    assert torch.equal(stored[big], 448.0 * v_true[big].sign())
    assert torch.isfinite(stored).all()


def test_no_valid_slot_leaves_caches_bit_identical(device):
    c = _inject_case(device, L=2, N=5, page=16, Hkv=2, D=64, H=16, layout="stacked", neox=True,
                     rotary_dim=None, bias=True, knorm=True, n_invalid=5)
    for after, before in zip(c["k_list"] + c["v_list"], c["k_before"] + c["v_before"]):
        assert torch.equal(after.view(torch.int16), before.view(torch.int16))


def test_inject_kv_edge_slots_and_positions():
    # Slots outside the cache skipped, positions clamped, the last of duplicate slots wins.
    assert_kv_edge_rules(kv_edge_writer("inject_kv", "reference", "cpu"), "cpu")
