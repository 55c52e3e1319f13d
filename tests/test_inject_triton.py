"""Triton KV-injection kernels against the reference (interpreter on CPU, fp16;
bf16 cases run on a GPU only), plus compile checks for sm_90 / sm_100."""

import math

import pytest
import torch

import dflash_kernels
from test_inject_reference import (FP8_MAX, INT_VIEW, make_caches, make_cos_sin, make_slots,
                                   sentinel_fill, snapshot)

HAS_CUDA = torch.cuda.is_available()


def _patch_interpreter_fp8_cast():
    """The interpreter rounds fp32 -> fp8 without carrying into the exponent
    (127.9 -> 64 in e4m3) and without ties-to-even; a GPU's cvt.rn does both.
    Route those casts through torch's correctly rounded conversion."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_dflash_fp8_patched", False):
        return
    to_torch = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    src_np = {tl.float32: np.float32, tl.float16: np.float16}
    orig = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst, sty = dst_type.scalar, src.dtype.scalar
        if dst in to_torch and sty in src_np:
            x = torch.from_numpy(np.ascontiguousarray(src.data).view(src_np[sty]).copy())
            data = x.to(to_torch[dst]).view(torch.uint8).numpy().reshape(src.data.shape)
            return interp.TensorHandle(data, dst)
        return orig(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp
    builder._dflash_fp8_patched = True


if not HAS_CUDA:
    _patch_interpreter_fp8_cast()


def assert_same_writes(got, want, before, slots, page_size, act):
    """Rows at valid slots close to the reference's; every other element of every
    cache bit-identical to the sentinel fill."""
    slots = slots.cpu()
    valid = slots[slots >= 0]
    for layer, (g, w, b) in enumerate(zip(got, want, before)):
        g, w, b = g.cpu(), w.cpu(), b.cpu()
        written = torch.zeros(g.shape[:2], dtype=torch.bool)
        written[valid // page_size, valid % page_size] = True
        iv = INT_VIEW[g.element_size()]
        assert torch.equal(g.view(iv)[~written], b.view(iv)[~written]), \
            f"layer {layer}: elements outside the valid slots changed"
        gw, ww = g[written].float(), w[written].float()
        if g.dtype in FP8_MAX:
            # Summation order may move a value across an fp8 rounding boundary: one ulp.
            rtol, atol = (2 ** -3, 2 ** -8) if g.dtype == torch.float8_e4m3fn else (2 ** -2, 2 ** -15)
        else:
            rtol, atol = (2e-3, 2e-3) if act == torch.float16 else (1.6e-2, 1.6e-2)
        torch.testing.assert_close(gw, ww, rtol=rtol, atol=atol, msg=lambda m: f"layer {layer}: {m}")


def _clone_layout(k, v, k_list, v_list):
    """A second set of caches with the same layout and bits (for the reference run)."""
    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.clone(memory_format=torch.preserve_format)
        return [c.clone() for c in x]
    k2, v2 = clone(k), clone(v)
    k2_list = list(k2.unbind(0)) if isinstance(k2, torch.Tensor) else k2
    v2_list = list(v2.unbind(0)) if isinstance(v2, torch.Tensor) else v2
    return k2, v2, k2_list, v2_list


def _run_both(fn, device, args_before, args_after, *, L, P, page, Hkv, D, layout, cache_dtype,
              slots, act, **kw):
    k, v, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    k_ref, v_ref, k_ref_list, v_ref_list = _clone_layout(k, v, k_list, v_list)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    fn(*args_before, k, v, *args_after, backend="triton", **kw)
    fn(*args_before, k_ref, v_ref, *args_after, backend="reference", **kw)
    assert_same_writes(k_list, k_ref_list, k_before, slots, page, act)
    assert_same_writes(v_list, v_ref_list, v_before, slots, page, act)


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
    hidden = torch.randn(N, H, device=device).to(act)
    kv_weight = (torch.randn(L, 2, Hkv * D, H, device=device) / math.sqrt(H)).to(act)
    kv_bias = torch.randn(L, 2, Hkv * D, device=device).to(act) if bias else None
    k_norm_weight = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    max_pos = 211
    positions = torch.randint(0, max_pos, (N,), device=device)
    slots = make_slots(N, P * page, max(N // 4, 0), device, leading_invalid)
    positions[slots < 0] = -(10 ** 9)           # never read
    cos_sin = make_cos_sin(max_pos, rotary_dim or D, device)
    return hidden, kv_weight, kv_bias, k_norm_weight, positions, slots, cos_sin


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
    _run_both(dflash_kernels.inject_kv, device, (hidden, kv_weight, knw, positions, slots),
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
    _run_both(dflash_kernels.inject_kv, device, (hidden, kv_weight, knw, positions, slots),
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
    from dflash_kernels.triton_backend import inject as tri
    _, _, k_list, _ = make_caches(layout, L, 2, 16, 2, 64, torch.float16, device)
    base, stride, table, uni = tri._layer_addressing(k_list)
    assert uni == uniform and base is k_list[0]
    if uniform:
        assert all(c.data_ptr() == base.data_ptr() + i * stride * 2 for i, c in enumerate(k_list))
    else:
        assert table.tolist() == [c.data_ptr() for c in k_list]
        assert tri._layer_addressing(k_list)[2] is table        # built once, then reused


def test_pointer_tables_outlive_many_layouts(device):
    # A CUDA graph holds the table's address, not the tensor: a table once
    # handed to a launch must never be freed while its caches may be replayed.
    import weakref
    from dflash_kernels.triton_backend import inject as tri
    buf = torch.empty(4096, device=device)
    # 70 distinct non-uniform layouts: three caches at offsets (i, 1000 + i, 3000 + 2i).
    keep = [[buf[o:o + 512].view(2, 4, 1, 64) for o in (i, 1000 + i, 3000 + 2 * i)]
            for i in range(70)]
    first = weakref.ref(tri._layer_addressing(keep[0])[2])
    for caches in keep[1:]:
        assert tri._layer_addressing(caches)[2] is not None
    assert first() is not None and tri._layer_addressing(keep[0])[2] is first()


def test_fuse_split_choice():
    from dflash_kernels.triton_backend import inject as tri
    cpu = torch.device("cpu")
    assert tri._fuse_split(1, 2, 10, cpu) == 2     # the first fuse case below runs two splits
    assert tri._fuse_split(1, 2, 3, cpu) == 1      # too few K tiles to split
    assert tri._fuse_split(8, 64, 400, cpu) == 1   # the grid is already full


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
    _run_both(dflash_kernels.write_kv, device, (k, v, knw, positions, slots), (cos_sin,),
              L=L, P=P, page=page, Hkv=Hkv, D=D, layout=layout, cache_dtype=cache_dtype,
              slots=slots, act=act, rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
              **scales)


@pytest.mark.parametrize("widths, concatenated, N, H", [
    ((80, 72, 120), False, 7, 48),       # K split inside a part (interpreter: 2 splits)
    ((48, 48, 48), True, 5, 40),
    ((16,) * 9, False, 3, 32),           # more parts than kernel arguments
])
def test_fuse_target_features_triton(device, widths, concatenated, N, H):
    act = torch.float16
    parts = [torch.randn(N, w, device=device).to(act) for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / math.sqrt(sum(widths))).to(act)
    norm_weight = 1 + 0.3 * torch.randn(H, device=device)
    if not concatenated:
        # A strided view (ops.py checks only its shape): the kernel must not assume a unit stride.
        norm_weight = torch.stack([torch.full_like(norm_weight, 7.0), norm_weight], 1)[:, 1]
    feats = torch.cat(parts, 1) if concatenated else parts
    out = sentinel_fill(torch.empty(N, H, dtype=act, device=device))
    ref = torch.empty(N, H, dtype=act, device=device)
    got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, out=out, backend="triton")
    dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, out=ref, backend="reference")
    assert got is out
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_fuse_target_features_triton_bf16(device):
    N, H, widths = 37, 1024, (1024, 1024, 1024)
    parts = [torch.randn(N, w, device=device).bfloat16() for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / math.sqrt(sum(widths))).bfloat16()
    norm_weight = torch.randn(H, device=device).bfloat16()
    out = dflash_kernels.fuse_target_features(parts, fc_weight, norm_weight, backend="triton")
    ref = dflash_kernels.fuse_target_features(parts, fc_weight, norm_weight, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1.6e-2)


# Compile checks (tensor cores, cp.async, spills, the saturating e4m3 cvt) at the
# production configurations: tests/test_compile_report.py.


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fuse_on_a_non_current_gpu():
    # Triton launches on the current device; the op must launch on its tensors' one.
    dev, act, N, H = "cuda:1", torch.float16, 5, 64
    feats = torch.randn(N, 3 * H, device=dev).to(act)
    fc_weight = (torch.randn(H, 3 * H, device=dev) / 16).to(act)
    norm_weight = 1 + 0.3 * torch.randn(H, device=dev)
    with torch.cuda.device(0):
        got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, backend="triton")
    want = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, backend="reference")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
