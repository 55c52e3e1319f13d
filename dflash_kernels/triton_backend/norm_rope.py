"""Triton ``norm_rope``: the draft block's q and k heads, per head RMSNorm and
RoPE in place, one launch; the math is the K epilogue of write_kv / inject_kv
(``_kv_epilogue.norm_rope``), so the three ops round identically."""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import launch
from ._common import cdiv, on_device
from ._kv_epilogue import head_columns, norm_rope as _epilogue_norm_rope

BLOCK_M = 16     # token rows per program: one [16, D] head tile


@triton.jit
def _one_head(base, row_ok, j, col_a, col_b, pos, w_ptr, cs_ptr, stride_cs, rot_half, eps,
              D: tl.constexpr, HAS_NORM: tl.constexpr):
    a = tl.load(base + col_a[None, :], mask=row_ok[:, None], other=0.0)
    b = tl.load(base + col_b[None, :], mask=row_ok[:, None], other=0.0)
    dtype = a.dtype
    a, b = _epilogue_norm_rope(a.to(tl.float32), b.to(tl.float32), col_a, col_b, j, pos, row_ok,
                               w_ptr, 0, cs_ptr, stride_cs, rot_half, eps, D, HAS_NORM)
    tl.store(base + col_a[None, :], a.to(dtype), mask=row_ok[:, None])
    tl.store(base + col_b[None, :], b.to(dtype), mask=row_ok[:, None])


@triton.jit
def _norm_rope_kernel(q_ptr, k_ptr, sq_n, sq_h, sk_n, sk_h, pos_ptr, qw_ptr, kw_ptr, cs_ptr,
                      stride_cs, N, Hq, max_pos, rot_half, eps, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, NEOX: tl.constexpr, HAS_QNORM: tl.constexpr,
                      HAS_KNORM: tl.constexpr):
    # Grid (token tiles, Hq + Hkv): one program per (rows, head) of q or k.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    row_ok = rows < N
    j = tl.arange(0, D // 2)
    col_a, col_b = head_columns(j, rot_half, D, NEOX)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)     # clamped into the table, as write_kv
    r64 = rows.to(tl.int64)[:, None]
    if h < Hq:
        _one_head(q_ptr + r64 * sq_n + h * sq_h, row_ok, j, col_a, col_b, pos, qw_ptr, cs_ptr,
                  stride_cs, rot_half, eps, D, HAS_QNORM)
    else:
        _one_head(k_ptr + r64 * sk_n + (h - Hq) * sk_h, row_ok, j, col_a, col_b, pos, kw_ptr,
                  cs_ptr, stride_cs, rot_half, eps, D, HAS_KNORM)


def norm_rope(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, rope_neox,
              rotary_dim) -> None:
    """q ``[N, Hq, D]``, k ``[N, Hkv, D]`` (unit last stride), positions int64 ``[N]``
    dense, weights ``[D]`` contiguous or None; in place."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    with on_device(q.device):
        launch(_norm_rope_kernel, (cdiv(N, BLOCK_M), Hq + Hkv),
            q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), positions,
            q_norm_weight if q_norm_weight is not None else q,
            k_norm_weight if k_norm_weight is not None else k,
            cos_sin_cache, cos_sin_cache.stride(0), N, Hq, cos_sin_cache.shape[0],
            rotary_dim // 2, eps, D=D, BLOCK_M=BLOCK_M, NEOX=rope_neox,
            HAS_QNORM=q_norm_weight is not None, HAS_KNORM=k_norm_weight is not None,
            num_warps=4)
