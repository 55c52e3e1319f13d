"""Triton kernels of the KV-injection ops (SPEC.md, docs/DESIGN.md, docs/inject.md).

- ``inject_kv``: ONE launch for all L layers. A GEMM of ``hidden [N, H]``
  against the weights viewed as ``[L*2*Hkv*D, H]`` whose output tile is
  BLOCK_M tokens x one (layer, K|V, head); the epilogue adds the bias, applies
  the per-head K RMSNorm (the whole head is in the tile), RoPE, the fp8
  quantization, and stores each valid row into its layer's paged cache.
- ``write_kv``: the same epilogue on given ``k, v [N, L, Hkv, D]``; one launch.
- ``fuse_target_features``: two launches, a split-K GEMM over the list of
  feature parts writing fp32 partial rows, then a row kernel that sums the
  splits, takes the RMS over the full row and writes the normalised output.

RoPE pairing without a second GEMM: the head's D columns are computed as two
half-width accumulators A and B whose column maps put RoPE partners side by
side: neox pairs (j, j + rotary_dim/2), gptj pairs (2j, 2j + 1), both with
frequency index j; the columns past rotary_dim fill the rest of A and B and
get cos = 1, sin = 0.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MAX_FEATURE_PARTS = 8


# --------------------------------------------------------------------------
# configs: chosen per architecture from a table (no autotuning, so that the
# interpreter and CUDA-graph capture never benchmark).
# --------------------------------------------------------------------------

def _arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return "sm90"
    if major == 10:
        return "sm100"
    return "default"


# inject_kv / write_kv: (BLOCK_M, BLOCK_K, num_warps, num_stages) keyed on (arch, D).
# BLOCK_M 64 is the wgmma / tcgen05 M of one warpgroup; decode batches are small.
_INJECT_CONFIGS = {
    ("sm90", 64): (64, 64, 4, 4), ("sm90", 128): (64, 64, 4, 4), ("sm90", 256): (64, 64, 8, 3),
    ("sm100", 64): (64, 64, 4, 4), ("sm100", 128): (64, 64, 4, 4), ("sm100", 256): (64, 64, 8, 3),
    ("default", 64): (32, 64, 4, 3), ("default", 128): (32, 64, 4, 3), ("default", 256): (32, 32, 8, 2),
    ("interp", 64): (16, 32, 4, 1), ("interp", 128): (16, 32, 4, 1), ("interp", 256): (16, 32, 4, 1),
}
_WRITE_BLOCK_M = {"sm90": 16, "sm100": 16, "default": 16, "interp": 16}

# fuse GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
_FUSE_CONFIGS = {
    "sm90": (64, 128, 64, 4, 4),
    "sm100": (64, 128, 64, 4, 4),
    "default": (32, 64, 64, 4, 3),
    "interp": (16, 32, 32, 4, 1),
}
_NORM_BLOCK_H = {"sm90": 1024, "sm100": 1024, "default": 1024, "interp": 64}


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4     # interpreter: small, so that the tests exercise split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------
# per-layer cache addressing
# --------------------------------------------------------------------------

_PTR_TABLES: dict = {}


def _layer_addressing(caches: list):
    """(base tensor, layer stride in elements or 0, pointer table or None, uniform).

    Uniform: every cache sits at ``base + l * stride`` (one allocation, e.g. a
    stacked ``[L, ...]`` tensor): decided from data_ptr() on the host.
    Otherwise an int64 device table of the L base addresses, cached on the
    addresses so a steady-state call (and CUDA-graph replay) builds nothing.
    """
    c0 = caches[0]
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


def _check_caches(k_caches, v_caches):
    """What the kernels rely on (ops.py checks shapes, dtypes, equal strides per list)."""
    for name, cs in (("k_caches", k_caches), ("v_caches", v_caches)):
        if cs[0].stride(3) != 1:
            raise ValueError(f"{name}: expected a unit stride in the head dim, got {cs[0].stride()}")
        if any(c.stride() != cs[0].stride() for c in cs):
            raise ValueError(f"{name}: expected every layer's cache to have the same strides")
    if k_caches[0].dtype != v_caches[0].dtype:
        raise ValueError("v_caches: expected the dtype of k_caches")


# --------------------------------------------------------------------------
# shared epilogue
# --------------------------------------------------------------------------

@triton.jit
def _head_columns(j, rot_half, D: tl.constexpr, NEOX: tl.constexpr):
    """Columns of the head held by accumulators A and B at position j in [0, D/2)."""
    if NEOX:
        col_a = tl.where(j < rot_half, j, j + rot_half)
        col_b = tl.where(j < rot_half, j + rot_half, j + D // 2)
    else:
        col_a = 2 * j
        col_b = 2 * j + 1
    return col_a, col_b


@triton.jit
def _norm_rope(a, b, col_a, col_b, j, pos, row_ok, knw_ptr, knw_off, cs_ptr, stride_cs, rot_half,
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
def _quantize(x, scale_ptr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, dtype: tl.constexpr):
    if FP8:
        x = tl.math.div_rn(x, tl.load(scale_ptr))
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return x.to(dtype)


@triton.jit
def _layer_base(c_ptr, c_table, layer, stride_layer, UNIFORM: tl.constexpr):
    if UNIFORM:
        base = c_ptr + layer.to(tl.int64) * stride_layer
    else:
        base = tl.load(c_table + layer).to(tl.pointer_type(c_ptr.dtype.element_ty))
    return base


@triton.jit
def _store_rows(a, b, base, slot, row_ok, col_a, col_b, head, page_size, s_page, s_row, s_head):
    page = slot // page_size
    off = page * s_page + (slot - page * page_size) * s_row + head.to(tl.int64) * s_head
    ptr = base + off[:, None]
    tl.store(ptr + col_a[None, :], a, mask=row_ok[:, None])
    tl.store(ptr + col_b[None, :], b, mask=row_ok[:, None])


@triton.jit
def _epilogue(a, b, is_k, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
              knw_ptr, stride_knl, cs_ptr, stride_cs, rot_half, eps,
              kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
              vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
              D: tl.constexpr, HAS_KNORM: tl.constexpr, FP8: tl.constexpr,
              FP8_MAX: tl.constexpr, UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr):
    row_ok = (rows < N) & (slot >= 0)
    dtype: tl.constexpr = kc_ptr.dtype.element_ty
    if is_k:
        # Positions of skipped rows may be anything: never read the table with them.
        pos = tl.load(pos_ptr + rows * stride_pos, mask=row_ok, other=0)
        a, b = _norm_rope(a, b, col_a, col_b, j, pos, row_ok, knw_ptr, layer * stride_knl,
                          cs_ptr, stride_cs, rot_half, eps, D, HAS_KNORM)
        base = _layer_base(kc_ptr, kc_table, layer, stride_kl, UNIFORM_K)
        _store_rows(_quantize(a, k_scale_ptr, FP8, FP8_MAX, dtype),
                    _quantize(b, k_scale_ptr, FP8, FP8_MAX, dtype),
                    base, slot, row_ok, col_a, col_b, head, page_size, ks_page, ks_row, ks_head)
    else:
        base = _layer_base(vc_ptr, vc_table, layer, stride_vl, UNIFORM_V)
        _store_rows(_quantize(a, v_scale_ptr, FP8, FP8_MAX, dtype),
                    _quantize(b, v_scale_ptr, FP8, FP8_MAX, dtype),
                    base, slot, row_ok, col_a, col_b, head, page_size, vs_page, vs_row, vs_head)


# --------------------------------------------------------------------------
# inject_kv
# --------------------------------------------------------------------------

@triton.jit
def _inject_kv_kernel(
    h_ptr, stride_hn, w_ptr, stride_wl, stride_wkv, stride_wo, bias_ptr, stride_bl, stride_bkv,
    knw_ptr, stride_knl, pos_ptr, stride_pos, slot_ptr, stride_slot, cs_ptr, stride_cs,
    kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
    vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr,
    N, H, Hkv, page_size, rot_half, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NEOX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr,
):
    pid_m = tl.program_id(0)        # fastest: the M tiles of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)        # (layer, K|V, head)
    layer = pid_n // (2 * Hkv)
    kv = (pid_n // Hkv) % 2
    head = pid_n % Hkv

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slot_ptr + rows * stride_slot, mask=rows < N, other=-1)
    # In a dense [B*S] layout most rows are rejected drafts: skip the whole GEMM.
    if tl.max(slot, axis=0) < 0:
        return

    j = tl.arange(0, D // 2)
    col_a, col_b = _head_columns(j, rot_half, D, NEOX)
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

    _epilogue(acc_a, acc_b, kv == 0, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
              knw_ptr, stride_knl, cs_ptr, stride_cs, rot_half, eps,
              kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
              vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
              D, HAS_KNORM, FP8, FP8_MAX, UNIFORM_K, UNIFORM_V)


def _cache_kernel_args(k_caches, v_caches):
    kc, kstride, ktab, kuni = _layer_addressing(k_caches)
    vc, vstride, vtab, vuni = _layer_addressing(v_caches)
    args = (kc, ktab, kstride, kc.stride(0), kc.stride(1), kc.stride(2))
    vargs = (vc, vtab, vstride, vc.stride(0), vc.stride(1), vc.stride(2))
    return args, vargs, kuni, vuni


def _inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping,
              k_caches: list, v_caches: list, cos_sin_cache, eps: float, rope_neox: bool,
              rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch for all layers. hidden fp16/bf16 ``[N, H]``."""
    _check_caches(k_caches, v_caches)
    N, H = hidden.shape
    L = kv_weight.shape[0]
    Hkv, D = k_caches[0].shape[2], k_caches[0].shape[3]
    if N == 0:
        return
    BLOCK_M, BLOCK_K, num_warps, num_stages = _INJECT_CONFIGS[(_arch(hidden.device), D)]
    kargs, vargs, kuni, vuni = _cache_kernel_args(k_caches, v_caches)
    fp8 = k_caches[0].dtype in FP8_MAX
    grid = (triton.cdiv(N, BLOCK_M), L * 2 * Hkv)
    bias_strides = (kv_bias.stride(0), kv_bias.stride(1)) if kv_bias is not None else (0, 0)
    if kv_bias is not None and kv_bias.stride(2) != 1:
        kv_bias = kv_bias.contiguous()
        bias_strides = (kv_bias.stride(0), kv_bias.stride(1))
    knw, knw_stride = _knorm_args(k_norm_weight)
    _inject_kv_kernel[grid](
        hidden, hidden.stride(0), kv_weight, kv_weight.stride(0), kv_weight.stride(1),
        kv_weight.stride(2), kv_bias, *bias_strides, knw, knw_stride,
        positions, positions.stride(0), slot_mapping, slot_mapping.stride(0),
        cos_sin_cache, cos_sin_cache.stride(0),
        *kargs, k_scale, *vargs, v_scale,
        N, H, Hkv, k_caches[0].shape[1], rotary_dim // 2, eps,
        D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=rope_neox, HAS_BIAS=kv_bias is not None,
        HAS_KNORM=k_norm_weight is not None, FP8=fp8,
        FP8_MAX=FP8_MAX.get(k_caches[0].dtype, 0.0), UNIFORM_K=kuni, UNIFORM_V=vuni,
        num_warps=num_warps, num_stages=num_stages)


def _knorm_args(k_norm_weight):
    if k_norm_weight is None:
        return None, 0
    if k_norm_weight.stride(1) != 1:
        # [L, D] parameter; a strided one is rare and tiny.
        k_norm_weight = k_norm_weight.contiguous()
    return k_norm_weight, k_norm_weight.stride(0)


# --------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, sk_n, sk_l, sk_h, sv_n, sv_l, sv_h,
    knw_ptr, stride_knl, pos_ptr, stride_pos, slot_ptr, stride_slot, cs_ptr, stride_cs,
    kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
    vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr,
    N, Hkv, page_size, rot_half, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, NEOX: tl.constexpr, HAS_KNORM: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    layer = pid_n // (2 * Hkv)
    kv = (pid_n // Hkv) % 2
    head = pid_n % Hkv

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slot_ptr + rows * stride_slot, mask=rows < N, other=-1)
    if tl.max(slot, axis=0) < 0:
        return
    row_ok = (rows < N) & (slot >= 0)
    j = tl.arange(0, D // 2)
    col_a, col_b = _head_columns(j, rot_half, D, NEOX)
    if kv == 0:
        src = k_ptr + rows.to(tl.int64)[:, None] * sk_n + layer * sk_l + head * sk_h
    else:
        src = v_ptr + rows.to(tl.int64)[:, None] * sv_n + layer * sv_l + head * sv_h
    a = tl.load(src + col_a[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    b = tl.load(src + col_b[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    _epilogue(a, b, kv == 0, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
              knw_ptr, stride_knl, cs_ptr, stride_cs, rot_half, eps,
              kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
              vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
              D, HAS_KNORM, FP8, FP8_MAX, UNIFORM_K, UNIFORM_V)


def _write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches: list, v_caches: list,
             cos_sin_cache, eps: float, rope_neox: bool, rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch. k, v fp16/bf16 ``[N, L, Hkv, D]``."""
    _check_caches(k_caches, v_caches)
    N, L, Hkv, D = k.shape
    if N == 0:
        return
    BLOCK_M = _WRITE_BLOCK_M[_arch(k.device)]
    kargs, vargs, kuni, vuni = _cache_kernel_args(k_caches, v_caches)
    fp8 = k_caches[0].dtype in FP8_MAX
    knw, knw_stride = _knorm_args(k_norm_weight)
    grid = (triton.cdiv(N, BLOCK_M), L * 2 * Hkv)
    _write_kv_kernel[grid](
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        knw, knw_stride, positions, positions.stride(0), slot_mapping, slot_mapping.stride(0),
        cos_sin_cache, cos_sin_cache.stride(0),
        *kargs, k_scale, *vargs, v_scale,
        N, Hkv, k_caches[0].shape[1], rotary_dim // 2, eps,
        D=D, BLOCK_M=BLOCK_M, NEOX=rope_neox, HAS_KNORM=k_norm_weight is not None, FP8=fp8,
        FP8_MAX=FP8_MAX.get(k_caches[0].dtype, 0.0), UNIFORM_K=kuni, UNIFORM_V=vuni,
        num_warps=4 if D <= 128 else 8)


# --------------------------------------------------------------------------
# fuse_target_features
# --------------------------------------------------------------------------

@triton.jit
def _fuse_part(acc, f_ptr, stride_f, width, col_off, t_start, t_count, tile_lo, tile_hi,
               w_ptr, stride_w, rows, cols, N, H, BLOCK_K: tl.constexpr):
    """acc += f[rows, k] @ W[cols, col_off + k].T over this split's K tiles of one part."""
    lo = tl.maximum(tile_lo, t_start) - t_start
    hi = tl.minimum(tile_hi, t_start + t_count) - t_start
    f_rows = f_ptr + rows.to(tl.int64)[:, None] * stride_f
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w + col_off
    row_in = rows < N
    col_in = cols < H
    for kt in range(lo, hi):
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_in = k < width
        x = tl.load(f_rows + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=col_in[None, :] & k_in[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _fuse_gemm_kernel(
    f0, f1, f2, f3, f4, f5, f6, f7, s0, s1, s2, s3, s4, s5, s6, s7,
    w0, w1, w2, w3, w4, w5, w6, w7, t0, t1, t2, t3, t4, t5, t6, t7,
    w_ptr, stride_w, ws_ptr, N, H, tiles_per_split,
    NUM_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ws[split, N, H] (fp32) = this split's share of sum_i f_i @ W[:, off_i:off_i+w_i].T.

    Part i owns the global K tiles [t_i, t_i + cdiv(w_i, BLOCK_K)) (each part
    padded to whole tiles); split s takes the tiles [s*T, (s+1)*T)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = split * tiles_per_split
    hi = lo + tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    off = 0
    acc = _fuse_part(acc, f0, s0, w0, off, t0, tl.cdiv(w0, BLOCK_K), lo, hi, w_ptr, stride_w,
                     rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 1:
        off += w0
        acc = _fuse_part(acc, f1, s1, w1, off, t1, tl.cdiv(w1, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 2:
        off += w1
        acc = _fuse_part(acc, f2, s2, w2, off, t2, tl.cdiv(w2, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 3:
        off += w2
        acc = _fuse_part(acc, f3, s3, w3, off, t3, tl.cdiv(w3, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 4:
        off += w3
        acc = _fuse_part(acc, f4, s4, w4, off, t4, tl.cdiv(w4, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 5:
        off += w4
        acc = _fuse_part(acc, f5, s5, w5, off, t5, tl.cdiv(w5, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 6:
        off += w5
        acc = _fuse_part(acc, f6, s6, w6, off, t6, tl.cdiv(w6, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    if NUM_PARTS > 7:
        off += w6
        acc = _fuse_part(acc, f7, s7, w7, off, t7, tl.cdiv(w7, BLOCK_K), lo, hi, w_ptr, stride_w,
                         rows, cols, N, H, BLOCK_K)
    ws = ws_ptr + split.to(tl.int64) * N * H + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(ws, acc, mask=(rows < N)[:, None] & (cols < H)[None, :])


@triton.jit
def _fuse_norm_kernel(ws_ptr, nw_ptr, out_ptr, stride_out, N, H, num_splits, eps,
                      BLOCK_H: tl.constexpr):
    """out[row] = rms_norm(sum over splits of ws[:, row]) * nw, one program per row."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        y = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in range(num_splits):
            y += tl.load(ws_ptr + (s * N + row) * H + c, mask=c < H, other=0.0)
        ss += y * y
    r = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        y = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in range(num_splits):
            y += tl.load(ws_ptr + (s * N + row) * H + c, mask=c < H, other=0.0)
        w = tl.load(nw_ptr + c, mask=c < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + c, (y * r * w).to(out_ptr.dtype.element_ty), mask=c < H)


def _fuse_split(m_tiles: int, n_tiles: int, k_tiles: int, device) -> int:
    """Split K until the grid fills ~2 waves, keeping >= 4 K tiles per split."""
    want = -(-2 * _num_sms(device) // (m_tiles * n_tiles))
    return max(1, min(want, k_tiles // 4, 16))


def _fuse_target_features(features: list, fc_weight, norm_weight, eps: float, out) -> None:
    """See the reference. Two launches: split-K GEMM into fp32 partials, then row RMSNorm."""
    parts = list(features)
    if len(parts) > MAX_FEATURE_PARTS:
        # Rare (more captured layers than kernel arguments): join the tail parts.
        parts = parts[:MAX_FEATURE_PARTS - 1] + [torch.cat(parts[MAX_FEATURE_PARTS - 1:], 1)]
    for i, p in enumerate(parts):
        if p.stride(1) != 1:
            parts[i] = p.contiguous()
    if fc_weight.stride(1) != 1:
        fc_weight = fc_weight.contiguous()
    # Read at a unit stride; ops.py checks only its shape.
    norm_weight = norm_weight.contiguous()
    N, H = out.shape
    if N == 0:
        return
    arch = _arch(out.device)
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = _FUSE_CONFIGS[arch]
    widths = [p.shape[1] for p in parts]
    starts, t = [], 0
    for w in widths:
        starts.append(t)
        t += triton.cdiv(w, BLOCK_K)
    k_tiles = t
    m_tiles, n_tiles = triton.cdiv(N, BLOCK_M), triton.cdiv(H, BLOCK_N)
    splits = _fuse_split(m_tiles, n_tiles, k_tiles, out.device)
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)
    ws = torch.empty((splits, N, H), dtype=torch.float32, device=out.device)
    pad = MAX_FEATURE_PARTS - len(parts)
    ptrs = parts + [parts[0]] * pad
    strides = [p.stride(0) for p in parts] + [0] * pad
    ws_args = widths + [0] * pad
    st_args = starts + [0] * pad
    _fuse_gemm_kernel[(n_tiles, m_tiles, splits)](
        *ptrs, *strides, *ws_args, *st_args, fc_weight, fc_weight.stride(0), ws, N, H,
        tiles_per_split, NUM_PARTS=len(parts), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=num_warps, num_stages=num_stages)
    block_h = min(_NORM_BLOCK_H[arch], triton.next_power_of_2(H))
    _fuse_norm_kernel[(N,)](ws, norm_weight, out, out.stride(0), N, H, splits, eps,
                            BLOCK_H=block_h, num_warps=4)


# --------------------------------------------------------------------------
# compile specs (for the no-GPU compile checks and docs/inject.md)
# --------------------------------------------------------------------------

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv",
       torch.float8_e5m2: "fp8e5"}


def compile_spec(kernel: str, arch: int, dtype=torch.bfloat16, cache_dtype=None, D: int = 128) -> dict:
    """signature / constexprs / launch options of the default launch on ``sm_{arch}``
    (``kernel`` in ``"inject"``, ``"fuse"``), and the int / pointer arguments that
    Triton's launcher marks 16-divisible for aligned shapes (H = 4096, D = 128)."""
    key = {90: "sm90", 100: "sm100"}.get(arch, "default")
    t = _TL[dtype]
    if kernel == "inject":
        cache_dtype = cache_dtype or dtype
        fp8 = cache_dtype in FP8_MAX
        BLOCK_M, BLOCK_K, num_warps, num_stages = _INJECT_CONFIGS[(key, D)]
        fn = _inject_kv_kernel
        sig = {}
        for name in fn.arg_names:
            sig[name] = "i32"
        sig.update(h_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", knw_ptr=f"*{t}", pos_ptr="*i64",
                   slot_ptr="*i64", cs_ptr="*fp32", kc_ptr=f"*{_TL[cache_dtype]}", kc_table="*i64",
                   vc_ptr=f"*{_TL[cache_dtype]}", vc_table="*i64", k_scale_ptr="*fp32",
                   v_scale_ptr="*fp32", eps="fp32")
        ce = dict(stride_pos=1, stride_slot=1, D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=True,
                  HAS_BIAS=True, HAS_KNORM=True, FP8=fp8, FP8_MAX=FP8_MAX.get(cache_dtype, 0.0),
                  UNIFORM_K=True, UNIFORM_V=True)
        if not fp8:
            ce.update(k_scale_ptr=None, v_scale_ptr=None)
        unaligned = ("N", "Hkv")
    elif kernel == "fuse":
        BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = _FUSE_CONFIGS[key]
        fn = _fuse_gemm_kernel
        sig = {name: "i32" for name in fn.arg_names}
        sig.update({f"f{i}": f"*{t}" for i in range(MAX_FEATURE_PARTS)})
        sig.update(w_ptr=f"*{t}", ws_ptr="*fp32")
        ce = dict(NUM_PARTS=3, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        unaligned = ("N",)
    else:
        raise ValueError(f"kernel: expected 'inject' or 'fuse', got {kernel!r}")
    for name in ce:
        sig[name] = "constexpr"
    divisible = [n for n, s in sig.items() if s != "constexpr" and s != "fp32" and n not in unaligned]
    return dict(kernel=fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__, signature=sig,
                constexprs=ce, num_warps=num_warps, num_stages=num_stages, divisible_by_16=divisible)


# --------------------------------------------------------------------------
# entry points (docs/DESIGN.md): Triton launches on the current device, so
# each launch runs under its tensors' device (multi-GPU processes).
# --------------------------------------------------------------------------

def _on_device(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping,
              k_caches: list, v_caches: list, cos_sin_cache, eps: float, rope_neox: bool,
              rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch for all layers. hidden fp16/bf16 ``[N, H]``."""
    with _on_device(hidden):
        _inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping, k_caches,
                   v_caches, cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale)


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches: list, v_caches: list,
             cos_sin_cache, eps: float, rope_neox: bool, rotary_dim: int, k_scale, v_scale) -> None:
    """See the reference; one launch. k, v fp16/bf16 ``[N, L, Hkv, D]``."""
    with _on_device(k):
        _write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches, cos_sin_cache,
                  eps, rope_neox, rotary_dim, k_scale, v_scale)


def fuse_target_features(features: list, fc_weight, norm_weight, eps: float, out) -> None:
    """See the reference. Two launches: split-K GEMM into fp32 partials, then row RMSNorm."""
    with _on_device(out):
        _fuse_target_features(features, fc_weight, norm_weight, eps, out)
