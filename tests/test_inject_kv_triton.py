"""Triton inject_kv against the reference (interpreter on CPU, fp16; bf16 cases
run on a GPU only), the per-layer cache addressing it shares with write_kv,
and compile checks for sm_90 / sm_100.
"""

import pytest
import torch

import dflash_kernels
from dflash_kernels.triton_backend import _kv_epilogue, inject_kv
from helpers import (FP8_MAX, assert_compiles_to_tensor_cores, assert_kv_edge_rules, kv_edge_writer,
                     make_caches, make_inject_inputs, run_both, snapshot)


INJECT_CASES = [
    # L, N, page, D, layout, neox, rotary_dim, bias, knorm, cache dtype, leading invalid rows
    (1, 1, 16, 64, "stacked", True, None, True, True, torch.float16, 0),
    (3, 7, 1, 64, "separate", False, None, False, True, torch.float16, 0),
    (5, 64, 16, 64, "views", True, 32, True, False, torch.float16, 16),
    (2, 64, 16, 128, "stacked_hnd", False, 64, False, True, torch.float8_e4m3fn, 20),
    (2, 7, 16, 128, "combined", True, None, True, True, torch.float8_e4m3fn, 0),
    (1, 7, 1, 64, "views", False, 48, True, True, torch.float16, 0),
    (2, 7, 16, 64, "separate", True, 16, True, True, torch.float8_e5m2, 0),
]


def _inject_args(device, act, L, N, H, Hkv, D, P, page, bias, knorm, rotary_dim, leading_invalid):
    return make_inject_inputs(device, act, L=L, N=N, H=H, Hkv=Hkv, D=D, bias=bias, knorm=knorm,
                              rotary_dim=rotary_dim, max_pos=211, num_slots=P * page,
                              n_invalid=max(N // 4, 0), all_invalid_prefix=leading_invalid,
                              skipped_pos=-(10 ** 9))


@pytest.mark.parametrize(
    "L, N, page, D, layout, neox, rotary_dim, bias, knorm, cache_dtype, leading_invalid",
    INJECT_CASES)
def test_inject_kv_triton_matches_reference(device, L, N, page, D, layout, neox, rotary_dim,
                                            bias, knorm, cache_dtype, leading_invalid):
    act, Hkv, H = torch.float16, 2, 40
    P = N // page + 2
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = _inject_args(
        device, act, L, N, H, Hkv, D, P, page, bias, knorm, rotary_dim, leading_invalid)
    scales = {}
    if cache_dtype in FP8_MAX:
        scales = dict(k_scale=0.02, v_scale=torch.tensor([0.015], device=device))
    run_both(dflash_kernels.inject_kv, device, (hidden, kv_weight, knw, positions, slots),
             (cos_sin,), L=L, P=P, page=page, Hkv=Hkv, D=D, layout=layout,
             cache_dtype=cache_dtype, slots=slots, act=act, kv_bias=kv_bias,
             rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim, **scales)


@pytest.mark.parametrize("D, cache_dtype", [(128, torch.bfloat16), (256, torch.float8_e4m3fn)])
def test_inject_kv_triton_bf16(device, D, cache_dtype):
    act, L, N, H, Hkv, page = torch.bfloat16, 3, 100, 512, 4, 16
    P = N // page + 2
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = _inject_args(
        device, act, L, N, H, Hkv, D, P, page, True, True, None, 64)
    scales = dict(k_scale=0.02, v_scale=0.015) if cache_dtype in FP8_MAX else {}
    run_both(dflash_kernels.inject_kv, device, (hidden, kv_weight, knw, positions, slots),
             (cos_sin,), L=L, P=P, page=page, Hkv=Hkv, D=D, layout="stacked",
             cache_dtype=cache_dtype, slots=slots, act=act, kv_bias=kv_bias, **scales)


def test_inject_kv_all_rows_skipped_writes_nothing(device):
    L, N, H, Hkv, D, page, P = 2, 20, 40, 2, 64, 16, 3
    hidden, kv_weight, kv_bias, knw, positions, slots, cos_sin = _inject_args(
        device, torch.float16, L, N, H, Hkv, D, P, page, True, True, None, N)
    k, v, k_list, v_list = make_caches("separate", L, P, page, Hkv, D, torch.float16, device)
    before = snapshot(k_list + v_list)
    dflash_kernels.inject_kv(hidden, kv_weight, knw, positions, slots, k, v, cos_sin,
                             kv_bias=kv_bias, backend="triton")
    for a, b in zip(k_list + v_list, before):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("layout, L, uniform", [
    ("stacked", 3, True), ("stacked_hnd", 2, True), ("combined", 3, True), ("views", 4, True),
    ("separate", 3, False), ("separate", 1, True),
])
def test_layer_addressing(device, layout, L, uniform):
    """A shared layer stride when one exists, else a cached device table of base addresses."""
    _, _, k_list, _ = make_caches(layout, L, 2, 16, 2, 64, torch.float16, device)
    base, stride, table, uni = _kv_epilogue.layer_addressing(k_list)
    assert uni == uniform and base is k_list[0]
    if uniform:
        assert all(c.data_ptr() == base.data_ptr() + i * stride * 2 for i, c in enumerate(k_list))
    else:
        assert table.tolist() == [c.data_ptr() for c in k_list]
        assert _kv_epilogue.layer_addressing(k_list)[2] is table        # built once, then reused


def test_pointer_tables_outlive_many_layouts(device):
    # A CUDA graph holds the table's address, not the tensor: a table once
    # handed to a launch must never be freed while its caches may be replayed.
    import weakref
    buf = torch.empty(4096, device=device)
    # 70 distinct non-uniform layouts: three caches at offsets (i, 1000 + i, 3000 + 2i).
    keep = [[buf[o:o + 512].view(2, 4, 1, 64) for o in (i, 1000 + i, 3000 + 2 * i)]
            for i in range(70)]
    first = weakref.ref(_kv_epilogue.layer_addressing(keep[0])[2])
    for caches in keep[1:]:
        assert _kv_epilogue.layer_addressing(caches)[2] is not None
    assert first() is not None and _kv_epilogue.layer_addressing(keep[0])[2] is first()


@pytest.mark.parametrize("arch, cache_dtype", [
    (90, torch.bfloat16), (100, torch.bfloat16), (90, torch.float8_e4m3fn),
])
def test_compiles_to_tensor_cores_without_spills(arch, cache_dtype):
    """Default launch for H = 4096, D = 128, bf16."""
    spec = inject_kv.compile_spec(arch, torch.bfloat16, cache_dtype, D=128)
    rep = assert_compiles_to_tensor_cores("dflash_kernels.triton_backend.inject_kv", spec, arch)
    if cache_dtype == torch.float8_e4m3fn:
        assert "cvt.rn.satfinite.e4m3x2.f32" in rep["ptx"]     # saturating, round-to-nearest-even


def test_inject_kv_edge_slots_and_positions(device):
    # Slots outside the cache skipped, positions clamped, the last of duplicate slots wins.
    assert_kv_edge_rules(kv_edge_writer("inject_kv", "triton", device), device)
