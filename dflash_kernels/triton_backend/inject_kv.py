"""Triton ``inject_kv`` (SPEC.md, docs/DESIGN.md, docs/inject.md): ONE launch for
all L layers.

A GEMM of ``hidden [N, H]`` against the weights viewed as ``[L*2*Hkv*D, H]``
whose output tile is BLOCK_M tokens x one (layer, K|V, head), plus the bias;
the shared epilogue (_kv_epilogue.py) then applies the per-head K RMSNorm (the
whole head is in the tile), RoPE and the fp8 quantization, and stores each
valid row into its layer's paged cache.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import TL_DTYPES, arch, arch_family, on_device
from ._common import compile_spec as _spec
from ._kv_epilogue import (bounds_args, cache_kernel_args, check_caches, epilogue, fp8_args,
                           head_columns, knorm_args, program_rows)

# (BLOCK_M, BLOCK_K, num_warps, num_stages) keyed on (arch family, D); a table,
# not autotuning, so that the interpreter and CUDA-graph capture never benchmark.
# BLOCK_M 64 is the wgmma / tcgen05 M of one warpgroup; decode batches are small.
CONFIGS = {
    ("sm90", 64): (64, 64, 4, 4), ("sm90", 128): (64, 64, 4, 4), ("sm90", 256): (64, 64, 8, 3),
    ("sm100", 64): (64, 64, 4, 4), ("sm100", 128): (64, 64, 4, 4), ("sm100", 256): (64, 64, 8, 3),
    ("default", 64): (32, 64, 4, 3), ("default", 128): (32, 64, 4, 3), ("default", 256): (32, 32, 8, 2),
    ("interp", 64): (16, 32, 4, 1), ("interp", 128): (16, 32, 4, 1), ("interp", 256): (16, 32, 4, 1),
}


@triton.jit
def _inject_kv_kernel(
    h_ptr, stride_hn, w_ptr, stride_wl, stride_wkv, stride_wo, bias_ptr, stride_bl, stride_bkv,
    knw_ptr, stride_knl, pos_ptr, stride_pos, slot_ptr, stride_slot, cs_ptr, stride_cs,
    kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
    vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr,
    N, H, Hkv, page_size, num_slots, max_pos, rot_half, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NEOX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr,
):
    layer, kv, head, rows, slot = program_rows(slot_ptr, stride_slot, N, Hkv, num_slots, BLOCK_M)
    # In a dense [B*S] layout most rows are rejected drafts: skip the whole GEMM.
    if tl.max(slot, axis=0) < 0:
        return

    j = tl.arange(0, D // 2)
    col_a, col_b = head_columns(j, rot_half, D, NEOX)
    w_head = w_ptr + layer.to(tl.int64) * stride_wl + kv * stride_wkv + head * D * stride_wo
    wa_ptr = w_head + col_a[None, :] * stride_wo
    wb_ptr = w_head + col_b[None, :] * stride_wo
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    row_in = rows < N

    acc_a = tl.zeros((BLOCK_M, D // 2), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, D // 2), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < H
        x = tl.load(h_rows + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        wa = tl.load(wa_ptr + k[:, None], mask=k_in[:, None], other=0.0)
        wb = tl.load(wb_ptr + k[:, None], mask=k_in[:, None], other=0.0)
        acc_a = tl.dot(x, wa, acc_a)
        acc_b = tl.dot(x, wb, acc_b)

    if HAS_BIAS:
        b_head = bias_ptr + layer * stride_bl + kv * stride_bkv + head * D
        acc_a += tl.load(b_head + col_a).to(tl.float32)[None, :]
        acc_b += tl.load(b_head + col_b).to(tl.float32)[None, :]

    epilogue(acc_a, acc_b, kv == 0, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
             knw_ptr, stride_knl, cs_ptr, stride_cs, max_pos, rot_half, eps,
             kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
             vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
             D, HAS_KNORM, FP8, FP8_MAX, UNIFORM_K, UNIFORM_V)


def inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping,
              k_caches: list, v_caches: list, cos_sin_cache, eps: float, rope_neox: bool,
              rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch for all layers. hidden fp16/bf16 ``[N, H]``."""
    check_caches(k_caches, v_caches)
    N, H = hidden.shape
    L = kv_weight.shape[0]
    Hkv, D = k_caches[0].shape[2], k_caches[0].shape[3]
    if N == 0:
        return
    BLOCK_M, BLOCK_K, num_warps, num_stages = CONFIGS[(arch_family(arch(hidden.device)), D)]
    kargs, vargs, kuni, vuni = cache_kernel_args(k_caches, v_caches)
    grid = (triton.cdiv(N, BLOCK_M), L * 2 * Hkv)
    bias_strides = (kv_bias.stride(0), kv_bias.stride(1)) if kv_bias is not None else (0, 0)
    if kv_bias is not None and kv_bias.stride(2) != 1:
        kv_bias = kv_bias.contiguous()
        bias_strides = (kv_bias.stride(0), kv_bias.stride(1))
    knw, knw_stride = knorm_args(k_norm_weight)
    with on_device(hidden):
        _inject_kv_kernel[grid](
            hidden, hidden.stride(0), kv_weight, kv_weight.stride(0), kv_weight.stride(1),
            kv_weight.stride(2), kv_bias, *bias_strides, knw, knw_stride,
            positions, positions.stride(0), slot_mapping, slot_mapping.stride(0),
            cos_sin_cache, cos_sin_cache.stride(0),
            *kargs, k_scale, *vargs, v_scale,
            N, H, Hkv, k_caches[0].shape[1], *bounds_args(k_caches, cos_sin_cache),
            rotary_dim // 2, eps,
            D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=rope_neox, HAS_BIAS=kv_bias is not None,
            HAS_KNORM=k_norm_weight is not None, **fp8_args(k_caches[0].dtype),
            UNIFORM_K=kuni, UNIFORM_V=vuni, num_warps=num_warps, num_stages=num_stages)


def compile_spec(arch: int, dtype, cache_dtype=None, D: int = 128) -> dict:
    """The default launch on ``sm_{arch}`` for the no-GPU compile checks and
    docs/inject.md: bias, K norm, neox RoPE, uniform layer strides, and the
    16-divisibility of aligned shapes (H = 4096; N and Hkv arbitrary)."""
    cache_dtype = cache_dtype or dtype
    BLOCK_M, BLOCK_K, num_warps, num_stages = CONFIGS[(arch_family(arch), D)]
    t, c = TL_DTYPES[dtype], TL_DTYPES[cache_dtype]
    sig = {name: "i32" for name in _inject_kv_kernel.arg_names}
    sig.update(h_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", knw_ptr=f"*{t}", pos_ptr="*i64",
               slot_ptr="*i64", cs_ptr="*fp32", kc_ptr=f"*{c}", kc_table="*i64",
               vc_ptr=f"*{c}", vc_table="*i64", k_scale_ptr="*fp32",
               v_scale_ptr="*fp32", eps="fp32")
    fp8 = fp8_args(cache_dtype)
    ce = dict(stride_pos=1, stride_slot=1, D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=True,
              HAS_BIAS=True, HAS_KNORM=True, **fp8, UNIFORM_K=True, UNIFORM_V=True)
    if not fp8["FP8"]:
        ce.update(k_scale_ptr=None, v_scale_ptr=None)
    return _spec(_inject_kv_kernel, sig, ce, num_warps, num_stages, unaligned=("N", "Hkv"))
