"""Triton ``write_kv`` (SPEC.md, docs/DESIGN.md, docs/inject.md): the epilogue of
inject_kv (_kv_epilogue.py: K RMSNorm, RoPE, fp8 quantization, paged stores) on
given ``k, v [N, L, Hkv, D]``, one launch for all L layers."""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import launch
from ._common import cdiv, on_device
from ._kv_epilogue import (bounds_args, cache_kernel_args, check_caches, epilogue, fp8_args,
                           head_columns, knorm_args, program_rows)

# Token rows per program, the same on every architecture: the kernel has no
# GEMM, hence no MMA tile shape to match.
BLOCK_M = 16



@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, sk_n, sk_l, sk_h, sv_n, sv_l, sv_h,
    knw_ptr, stride_knl, pos_ptr, stride_pos, slot_ptr, stride_slot, cs_ptr, stride_cs,
    kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
    vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr,
    N, Hkv, page_size, num_slots, max_pos, rot_half, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, NEOX: tl.constexpr, HAS_KNORM: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr,
):
    layer, kv, head, rows, slot = program_rows(slot_ptr, stride_slot, N, Hkv, num_slots, BLOCK_M)
    if tl.max(slot, axis=0) < 0:
        return
    row_ok = (rows < N) & (slot >= 0)
    j = tl.arange(0, D // 2)
    col_a, col_b = head_columns(j, rot_half, D, NEOX)
    if kv == 0:
        src = k_ptr + rows.to(tl.int64)[:, None] * sk_n + layer * sk_l + head * sk_h
    else:
        src = v_ptr + rows.to(tl.int64)[:, None] * sv_n + layer * sv_l + head * sv_h
    a = tl.load(src + col_a[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    b = tl.load(src + col_b[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    epilogue(a, b, kv == 0, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
             knw_ptr, stride_knl, cs_ptr, stride_cs, max_pos, rot_half, eps,
             kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
             vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
             D, HAS_KNORM, FP8, FP8_MAX, UNIFORM_K, UNIFORM_V)


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches: list, v_caches: list,
             cos_sin_cache, eps: float, rope_neox: bool, rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch. k, v fp16/bf16 ``[N, L, Hkv, D]``."""
    check_caches(k_caches, v_caches)
    N, L, Hkv, D = k.shape
    if N == 0:
        return
    kargs, vargs, kuni, vuni = cache_kernel_args(k_caches, v_caches)
    knw, knw_stride = knorm_args(k_norm_weight)
    grid = (cdiv(N, BLOCK_M), L * 2 * Hkv)
    with on_device(k):
        launch(_write_kv_kernel, grid,
            k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            knw, knw_stride, positions, positions.stride(0), slot_mapping, slot_mapping.stride(0),
            cos_sin_cache, cos_sin_cache.stride(0),
            *kargs, k_scale, *vargs, v_scale,
            N, Hkv, k_caches[0].shape[-3], *bounds_args(k_caches, cos_sin_cache),
            rotary_dim // 2, eps,
            D=D, BLOCK_M=BLOCK_M, NEOX=rope_neox, HAS_KNORM=k_norm_weight is not None,
            **fp8_args(k_caches[0].dtype), UNIFORM_K=kuni, UNIFORM_V=vuni,
            num_warps=4 if D <= 128 else 8)
