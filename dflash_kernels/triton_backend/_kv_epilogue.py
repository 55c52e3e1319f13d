"""What the Triton KV-writing ops (inject_kv, write_kv) share: the epilogue that
takes fp32 head halves through K RMSNorm, RoPE and fp8 quantization into the
paged caches (@triton.jit), and the host side of the per-layer cache addressing.

RoPE pairing without a second GEMM: the head's D columns are held as two
half-width accumulators A and B whose column maps put RoPE partners side by
side: neox pairs (j, j + rotary_dim/2), gptj pairs (2j, 2j + 1), both with
frequency index j; the columns past rotary_dim fill the rest of A and B and
get cos = 1, sin = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import FP8_MAX


# --------------------------------------------------------------------------
# host side: per-layer cache addressing and the epilogue's kernel arguments
# --------------------------------------------------------------------------

_PTR_TABLES: dict = {}


def layer_addressing(caches: list):
    """(base tensor, layer stride in elements or 0, pointer table or None, uniform).

    Uniform: every cache sits at ``base + l * stride``: a list of one stacked
    ``[L, P, page, Hkv, D]`` cache (the public op passes stacked caches so), or
    per-layer caches of one allocation, decided from data_ptr() on the host.
    Otherwise an int64 device table of the L base addresses, cached on the
    addresses so a steady-state call (and CUDA-graph replay) builds nothing.
    """
    c0 = caches[0]
    if c0.dim() == 5:
        return c0, c0.stride(0), None, True
    ptrs = tuple(c.data_ptr() for c in caches)
    esz = c0.element_size()
    if len(ptrs) == 1:
        return c0, 0, None, True
    step = ptrs[1] - ptrs[0]
    if step % esz == 0 and all(p - ptrs[0] == i * step for i, p in enumerate(ptrs)):
        return c0, step // esz, None, True
    key = (c0.device, ptrs)
    table = _PTR_TABLES.get(key)
    if table is None:
        # Never evicted: a captured CUDA graph keeps the table's address, and
        # freeing it would make a replay read reused memory. 8 bytes per layer
        # per distinct set of cache addresses.
        table = torch.tensor(ptrs, dtype=torch.int64, device=c0.device)
        _PTR_TABLES[key] = table
    return c0, 0, table, False


def check_caches(k_caches, v_caches):
    """What the kernels rely on (ops.py checks shapes, dtypes, equal strides per list)."""
    for name, cs in (("k_caches", k_caches), ("v_caches", v_caches)):
        if cs[0].stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride in the head dim, got {cs[0].stride()}")
        if any(c.stride() != cs[0].stride() for c in cs):
            raise ValueError(f"{name}: expected every layer's cache to have the same strides")
    if k_caches[0].dtype != v_caches[0].dtype:
        raise ValueError("v_caches: expected the dtype of k_caches")


def bounds_args(k_caches, cos_sin_cache):
    """(num_slots, max_pos): the slot range a kernel writes and the rows of the
    cos/sin table it reads (an empty table, rejected by ops.py, reads row 0)."""
    c = k_caches[0]
    return c.shape[-4] * c.shape[-3], max(cos_sin_cache.shape[0], 1)


def cache_kernel_args(k_caches, v_caches):
    """(K cache args, V cache args, uniform K, uniform V) in the epilogue's order:
    base, pointer table, layer stride, page / row / head strides."""
    kc, kstride, ktab, kuni = layer_addressing(k_caches)
    vc, vstride, vtab, vuni = layer_addressing(v_caches)
    args = (kc, ktab, kstride, kc.stride(-4), kc.stride(-3), kc.stride(-2))
    vargs = (vc, vtab, vstride, vc.stride(-4), vc.stride(-3), vc.stride(-2))
    return args, vargs, kuni, vuni


def knorm_args(k_norm_weight):
    """(K norm weight or None, its layer stride)."""
    if k_norm_weight is None:
        return None, 0
    if k_norm_weight.stride(1) != 1:
        # [L, D] parameter; a strided one is rare and tiny.
        k_norm_weight = k_norm_weight.contiguous()
    return k_norm_weight, k_norm_weight.stride(0)


def fp8_args(cache_dtype) -> dict:
    """The epilogue's FP8 / FP8_MAX constexprs for a cache dtype."""
    return dict(FP8=cache_dtype in FP8_MAX, FP8_MAX=FP8_MAX.get(cache_dtype, 0.0))


# --------------------------------------------------------------------------
# the epilogue (@triton.jit)
# --------------------------------------------------------------------------

@triton.jit
def program_rows(slot_ptr, stride_slot, N, Hkv, num_slots, BLOCK_M: tl.constexpr):
    """This program's (layer, kv, head, rows, slots of the rows; -1 where the row
    is not written). Grid axis 0 tiles the tokens (fastest: the token tiles of
    one weight tile run together, for L2 reuse), axis 1 is (layer, K|V, head).

    Not written (docs/DESIGN.md, "Edge values"): rows past N, slots outside
    ``[0, num_slots)``, and a token whose slot a later token also holds (the
    last one wins, so two programs never store one row). That rule costs an
    O(N) scan per program: ``cdiv(N - m0, BLOCK_M)`` tiles of BLOCK_M int64
    slot loads (L2-resident) and BLOCK_M^2 compares, m0 the program's first
    row; one tile at decode sizes (N <= BLOCK_M).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    slot = tl.load(slot_ptr + rows * stride_slot, mask=rows < N, other=-1)
    slot = tl.where((slot >= 0) & (slot < num_slots), slot, -1)
    dup = rows < 0
    for off in range(m0, N, BLOCK_M):
        later = off + tl.arange(0, BLOCK_M)
        s2 = tl.load(slot_ptr + later * stride_slot, mask=later < N, other=-1)
        hit = (s2[None, :] == slot[:, None]) & (later[None, :] > rows[:, None])
        dup = dup | (tl.max(hit.to(tl.int32), axis=1) > 0)
    slot = tl.where(dup, -1, slot)
    return pid_n // (2 * Hkv), (pid_n // Hkv) % 2, pid_n % Hkv, rows, slot


@triton.jit
def head_columns(j, rot_half, D: tl.constexpr, NEOX: tl.constexpr):
    """Columns of the head held by accumulators A and B at position j in [0, D/2)."""
    if NEOX:
        col_a = tl.where(j < rot_half, j, j + rot_half)
        col_b = tl.where(j < rot_half, j + rot_half, j + D // 2)
    else:
        col_a = 2 * j
        col_b = 2 * j + 1
    return col_a, col_b


@triton.jit
def norm_rope(a, b, col_a, col_b, j, pos, row_ok, knw_ptr, knw_off, cs_ptr, stride_cs, rot_half,
              eps, D: tl.constexpr, HAS_KNORM: tl.constexpr):
    """Per-head RMSNorm (optional) then RoPE of fp32 [BLOCK_M, D/2] halves."""
    if HAS_KNORM:
        knw_ptr += knw_off
        ss = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
        r = tl.rsqrt(ss / D + eps)[:, None]
        a = a * r * tl.load(knw_ptr + col_a).to(tl.float32)[None, :]
        b = b * r * tl.load(knw_ptr + col_b).to(tl.float32)[None, :]
    rot = row_ok[:, None] & (j < rot_half)[None, :]
    cs_row = cs_ptr + pos[:, None] * stride_cs
    cos = tl.load(cs_row + j[None, :], mask=rot, other=1.0)
    sin = tl.load(cs_row + rot_half + j[None, :], mask=rot, other=0.0)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def quantize(x, scale_ptr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, dtype: tl.constexpr):
    """fp32 to the cache dtype; fp8: ``sat(x / scale)``, rounded to nearest even."""
    if FP8:
        x = tl.math.div_rn(x, tl.load(scale_ptr))
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return x.to(dtype)


@triton.jit
def layer_base(c_ptr, c_table, layer, stride_layer, UNIFORM: tl.constexpr):
    """A layer's cache: ``base + layer * stride``, or its entry in the pointer table."""
    if UNIFORM:
        base = c_ptr + layer.to(tl.int64) * stride_layer
    else:
        base = tl.load(c_table + layer).to(tl.pointer_type(c_ptr.dtype.element_ty))
    return base


@triton.jit
def store_rows(a, b, base, slot, row_ok, col_a, col_b, head, page_size, s_page, s_row, s_head):
    """Store one head's halves at the paged rows of the valid slots."""
    page = slot // page_size
    off = page * s_page + (slot - page * page_size) * s_row + head.to(tl.int64) * s_head
    ptr = base + off[:, None]
    tl.store(ptr + col_a[None, :], a, mask=row_ok[:, None])
    tl.store(ptr + col_b[None, :], b, mask=row_ok[:, None])


@triton.jit
def epilogue(a, b, is_k, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
             knw_ptr, stride_knl, cs_ptr, stride_cs, max_pos, rot_half, eps,
             kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
             vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
             D: tl.constexpr, HAS_KNORM: tl.constexpr, FP8: tl.constexpr,
             FP8_MAX: tl.constexpr, UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr):
    """K: norm + RoPE, then quantize and store; V: quantize and store."""
    row_ok = (rows < N) & (slot >= 0)
    dtype: tl.constexpr = kc_ptr.dtype.element_ty
    if is_k:
        # Positions of skipped rows may be anything: never read the table with them.
        pos = tl.load(pos_ptr + rows * stride_pos, mask=row_ok, other=0)
        # Positions outside the cos/sin table are clamped into it (not wrapped).
        pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)
        a, b = norm_rope(a, b, col_a, col_b, j, pos, row_ok, knw_ptr, layer * stride_knl,
                         cs_ptr, stride_cs, rot_half, eps, D, HAS_KNORM)
        base = layer_base(kc_ptr, kc_table, layer, stride_kl, UNIFORM_K)
        store_rows(quantize(a, k_scale_ptr, FP8, FP8_MAX, dtype),
                   quantize(b, k_scale_ptr, FP8, FP8_MAX, dtype),
                   base, slot, row_ok, col_a, col_b, head, page_size, ks_page, ks_row, ks_head)
    else:
        base = layer_base(vc_ptr, vc_table, layer, stride_vl, UNIFORM_V)
        store_rows(quantize(a, v_scale_ptr, FP8, FP8_MAX, dtype),
                   quantize(b, v_scale_ptr, FP8, FP8_MAX, dtype),
                   base, slot, row_ok, col_a, col_b, head, page_size, vs_page, vs_row, vs_head)

