"""Triton write_kv against the reference (interpreter on CPU, fp16)."""

import pytest
import torch

import dflash_kernels
from helpers import FP8_MAX, assert_kv_edge_rules, kv_edge_writer, make_cos_sin, make_slots, run_both


WRITE_CASES = [
    # L, N, page, D, layout, neox, rotary_dim, knorm, cache dtype
    (1, 7, 16, 64, "stacked", True, None, True, torch.float16),
    (3, 20, 1, 64, "separate", False, 32, False, torch.float16),
    (2, 9, 16, 128, "stacked_hnd", True, 96, True, torch.float8_e4m3fn),
]


@pytest.mark.parametrize("L, N, page, D, layout, neox, rotary_dim, knorm, cache_dtype", WRITE_CASES)
def test_write_kv_triton_matches_reference(device, L, N, page, D, layout, neox, rotary_dim, knorm,
                                           cache_dtype):
    act, Hkv = torch.float16, 2
    P = N // page + 2
    # Strided k / v (views of a fused [N, L, 2, Hkv, D] projection output).
    kv = torch.randn(N, L, 2, Hkv, D, device=device).to(act)
    k, v = kv[:, :, 0], kv[:, :, 1]
    knw = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    positions = torch.randint(0, 64, (N,), device=device)
    slots = make_slots(N, P * page, N // 3, device)
    cos_sin = make_cos_sin(64, rotary_dim or D, device)
    scales = dict(k_scale=0.05, v_scale=0.04) if cache_dtype in FP8_MAX else {}
    run_both(dflash_kernels.write_kv, device, (k, v, knw, positions, slots), (cos_sin,),
             L=L, P=P, page=page, Hkv=Hkv, D=D, layout=layout, cache_dtype=cache_dtype,
             slots=slots, act=act, rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
             **scales)


def test_write_kv_edge_slots_and_positions(device):
    # Slots outside the cache skipped, positions clamped, the last of duplicate slots wins.
    assert_kv_edge_rules(kv_edge_writer("write_kv", "triton", device), device)
