"""Triton ``inject_kv`` (SPEC.md, docs/DESIGN.md, docs/inject.md): ONE launch for
all L layers.

A GEMM of ``hidden [N, H]`` against the weights viewed as ``[L*2*Hkv*D, H]``
whose output tile is BLOCK_M tokens x one (layer, K|V, head), plus the bias;
the shared epilogue (_kv_epilogue.py) then applies the per-head K RMSNorm (the
whole head is in the tile), RoPE and the fp8 quantization, and stores each
valid row into its layer's paged cache.

Split-K (docs/inject.md, "inject_kv grid"): at decode sizes there are too few
(token tile, head) outputs to fill the SMs (N 16, L 5, Hkv 8: 80 on 132), so
H is split into ``num_splits`` ranges of whole K tiles, still in ONE launch:
each split stores its fp32 partial ``[rows, D]`` in a workspace, then adds 1
to its output tile's arrival counter; the split that arrives last sums the
S partials from the workspace in split order 0, 1, ..., S-1, resets the
counter to 0 for the next launch and runs the epilogue. The counter only
elects who runs the epilogue: the sum's order is fixed, so results are
deterministic run to run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._common import TL_DTYPES, arch, arch_family, cdiv, num_sms, on_device, wave_split
# The split-K arrival counters (shared with block_attention; the names stay
# importable from here, tests read ik._COUNTERS).
from ._common import _COUNTERS, _KEEP, _UNZEROED, MIN_COUNTERS, _counters  # noqa: F401
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
def _k_tile(acc_a, acc_b, h_rows, wa_ptr, wb_ptr, row_in, k, k_end):
    """One K tile of both half-head GEMMs: columns ``k`` below ``k_end``."""
    k_in = k < k_end
    x = tl.load(h_rows + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
    wa = tl.load(wa_ptr + k[:, None], mask=k_in[:, None], other=0.0)
    wb = tl.load(wb_ptr + k[:, None], mask=k_in[:, None], other=0.0)
    return tl.dot(x, wa, acc_a), tl.dot(x, wb, acc_b)


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
    ws_ptr=None, cnt_ptr=None, num_splits=1, k_per_split=0, SPLIT: tl.constexpr = False,
):
    layer, kv, head, rows, slot = program_rows(slot_ptr, stride_slot, N, Hkv, num_slots, BLOCK_M)
    # In a dense [B*S] layout most rows are rejected drafts: skip the whole GEMM
    # (every split of the tile takes the same exit, so its counter stays 0).
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
    if SPLIT:
        # Split s: K in [s * k_per_split, (s + 1) * k_per_split), whole BLOCK_K
        # tiles. Counted from the split's first column (a trip count, not a
        # runtime lower bound: that kept sm_100a's stage indices out of uniform
        # registers, 187 instead of 154 instructions per iteration).
        split = tl.program_id(2)
        k_lo = split * k_per_split
        k_len = tl.minimum(k_per_split, H - k_lo)
        h_rows += k_lo
        wa_ptr += k_lo
        wb_ptr += k_lo
        for kt in range(0, tl.cdiv(k_len, BLOCK_K)):
            acc_a, acc_b = _k_tile(acc_a, acc_b, h_rows, wa_ptr, wb_ptr, row_in,
                                   kt * BLOCK_K + tl.arange(0, BLOCK_K), k_len)
    else:
        for k0 in range(0, H, BLOCK_K):
            acc_a, acc_b = _k_tile(acc_a, acc_b, h_rows, wa_ptr, wb_ptr, row_in,
                                   k0 + tl.arange(0, BLOCK_K), H)

    if SPLIT:
        # ws [P, S, N, D] fp32, P = L * 2 * Hkv (grid axis 1): A in [0, D/2), B after.
        pid_n = tl.program_id(1)
        tile = pid_n * tl.num_programs(0) + tl.program_id(0)
        ws_rows = ws_ptr + (pid_n.to(tl.int64) * num_splits * N + rows.to(tl.int64))[:, None] * D
        ws_mine = ws_rows + split.to(tl.int64) * N * D
        tl.store(ws_mine + j[None, :], acc_a, mask=row_in[:, None])
        tl.store(ws_mine + D // 2 + j[None, :], acc_b, mask=row_in[:, None])
        # Every thread's partial is issued before the release (bar.sync, then
        # one thread's acq_rel atomic at GPU scope, its result broadcast).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived < num_splits - 1:
            return
        # The last split sums every partial, its own included, in split order
        # 0, 1, ..., S-1 from the workspace: the order is fixed whoever
        # arrives last, and the GEMM's accumulators are dead by now. L2 loads
        # (.cg): the partials were written by other SMs.
        # Two loops, A then B (128 B per thread per iteration each at BLOCK_M 64).
        sum_a = tl.load(ws_rows + j[None, :], mask=row_in[:, None], other=0.0,
                        cache_modifier=".cg")
        for s in range(1, num_splits):
            sum_a += tl.load(ws_rows + s * N * D + j[None, :], mask=row_in[:, None], other=0.0,
                             cache_modifier=".cg")
        ws_rows += D // 2
        sum_b = tl.load(ws_rows + j[None, :], mask=row_in[:, None], other=0.0,
                        cache_modifier=".cg")
        for s in range(1, num_splits):
            sum_b += tl.load(ws_rows + s * N * D + j[None, :], mask=row_in[:, None], other=0.0,
                             cache_modifier=".cg")
        acc_a = sum_a
        acc_b = sum_b
        # Ready for the next launch (stream-ordered after this one).
        tl.store(cnt_ptr + tile, 0)

    if HAS_BIAS:
        b_head = bias_ptr + layer * stride_bl + kv * stride_bkv + head * D
        acc_a += tl.load(b_head + col_a).to(tl.float32)[None, :]
        acc_b += tl.load(b_head + col_b).to(tl.float32)[None, :]

    epilogue(acc_a, acc_b, kv == 0, rows, N, layer, head, j, col_a, col_b, slot, pos_ptr, stride_pos,
             knw_ptr, stride_knl, cs_ptr, stride_cs, max_pos, rot_half, eps,
             kc_ptr, kc_table, stride_kl, ks_page, ks_row, ks_head, k_scale_ptr,
             vc_ptr, vc_table, stride_vl, vs_page, vs_row, vs_head, v_scale_ptr, page_size,
             D, HAS_KNORM, FP8, FP8_MAX, UNIFORM_K, UNIFORM_V)


# ---------------------------------------------------------------- the grid


# Resident CTAs per SM of the GEMM (compile report, split kernel, bf16, sm_90a and
# sm_100a: D 64: 3, D 128: 2 (97 KB of shared memory), D 256: 1).
CTAS_PER_SM = {64: 3, 128: 2, 256: 1}
# What a split program costs besides its own K tiles, in K-tile times: the
# pipeline fill (num_stages - 1 tiles of 4-stage loads), and with splits its
# fp32 partial (rows x D x 4 bytes written, read back by the last split)
# against a weight tile of D x BLOCK_K x 2 bytes.
FILL_TILES = 3
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 16
# SMs assumed without a GPU (interpreter): small, as fuse_target_features does.
CPU_SMS = 4


def num_splits_for(sms: Optional[int], tiles: int, k_tiles: int, rows: int, D: int,
                   block_k: int) -> int:
    """K splits from host-known sizes (never from slot values).

    ``tiles`` (token tiles x L*2*Hkv heads) programs per split go round-robin
    over ``sms`` SMs; the kernel is weight-read-bound and programs sharing an
    SM share its bandwidth, so the cost is the busiest SM's K tiles:
    ``cdiv(tiles * s, sms) * (cdiv(k_tiles, s) + FILL_TILES (+ partial))``,
    ``partial = cdiv(4 * rows, block_k)`` when s > 1 (the fp32 partial written
    and read back, in weight-tile times). The smallest cost wins, ties to fewer
    splits; at most ``k_tiles // MIN_TILES_PER_SPLIT`` and MAX_SPLITS. No split
    when the tiles alone fill every resident slot (CTAs/SM x SMs): then a split
    only moves a few per cent inside the model's error, for fp32 traffic.
    """
    sms = sms or CPU_SMS
    if tiles >= CTAS_PER_SM.get(D, 1) * sms:
        return 1
    return wave_split(tiles, sms, k_tiles, FILL_TILES, cdiv(4 * rows, block_k),
                      min(k_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=4096)
def plan(sms: Optional[int], N: int, L: int, Hkv: int, D: int, H: int, block_m: int,
         block_k: int, num_splits: Optional[int] = None) -> tuple:
    """(grid, splits, K elements per split): splits of whole BLOCK_K tiles, none empty.
    Cached (a pure function of its ints)."""
    m_tiles, heads = cdiv(N, block_m), L * 2 * Hkv
    k_tiles = max(1, cdiv(H, block_k))
    if num_splits is None:
        num_splits = num_splits_for(sms, m_tiles * heads, k_tiles, min(N, block_m), D, block_k)
    per = cdiv(k_tiles, max(1, min(int(num_splits), k_tiles)))
    splits = cdiv(k_tiles, per)
    return (m_tiles, heads, splits), splits, per * block_k


def inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping,
              k_caches: list, v_caches: list, cos_sin_cache, eps: float, rope_neox: bool,
              rotary_dim: int, k_scale, v_scale, *, num_splits: Optional[int] = None) -> None:
    """See the reference; one launch for all layers. hidden fp16/bf16 ``[N, H]``.

    ``num_splits`` (tests only) forces the K split count (clamped to the K tiles)."""
    check_caches(k_caches, v_caches)
    N, H = hidden.shape
    L = kv_weight.shape[0]
    Hkv, D = k_caches[0].shape[-2], k_caches[0].shape[-1]
    if N == 0:
        return
    BLOCK_M, BLOCK_K, num_warps, num_stages = CONFIGS[(arch_family(arch(hidden.device)), D)]
    kargs, vargs, kuni, vuni = cache_kernel_args(k_caches, v_caches)
    grid, splits, k_per_split = plan(num_sms(hidden.device), N, L, Hkv, D, H, BLOCK_M, BLOCK_K,
                                     num_splits)
    split_args = {}
    if splits > 1:
        ws = torch.empty((grid[1], splits, N, D), dtype=torch.float32, device=hidden.device)
        cnt = _counters(hidden.device, grid[0] * grid[1])
        split_args = dict(ws_ptr=ws, cnt_ptr=cnt, num_splits=splits, k_per_split=k_per_split,
                          SPLIT=True)
    bias_strides = (kv_bias.stride(0), kv_bias.stride(1)) if kv_bias is not None else (0, 0)
    if kv_bias is not None and kv_bias.stride(2) != 1:
        kv_bias = kv_bias.contiguous()
        bias_strides = (kv_bias.stride(0), kv_bias.stride(1))
    knw, knw_stride = knorm_args(k_norm_weight)
    with on_device(hidden):
        launch(_inject_kv_kernel, grid,
            hidden, hidden.stride(0), kv_weight, kv_weight.stride(0), kv_weight.stride(1),
            kv_weight.stride(2), kv_bias, *bias_strides, knw, knw_stride,
            positions, positions.stride(0), slot_mapping, slot_mapping.stride(0),
            cos_sin_cache, cos_sin_cache.stride(0),
            *kargs, k_scale, *vargs, v_scale,
            N, H, Hkv, k_caches[0].shape[-3], *bounds_args(k_caches, cos_sin_cache),
            rotary_dim // 2, eps,
            D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=rope_neox, HAS_BIAS=kv_bias is not None,
            HAS_KNORM=k_norm_weight is not None, **fp8_args(k_caches[0].dtype),
            UNIFORM_K=kuni, UNIFORM_V=vuni, **split_args, num_warps=num_warps,
            num_stages=num_stages)


def compile_spec(arch: int, dtype, cache_dtype=None, D: int = 128, split: bool = False) -> dict:
    """The default launch on ``sm_{arch}`` for the no-GPU compile checks and
    docs/inject.md: bias, K norm, neox RoPE, uniform layer strides, and the
    16-divisibility of aligned shapes (H = 4096; N and Hkv arbitrary).
    ``split``: the split-K kernel (N 16 .. 128 on an H200 / B200 at L 5; its
    split count is a runtime argument, so one compile serves every count)."""
    cache_dtype = cache_dtype or dtype
    BLOCK_M, BLOCK_K, num_warps, num_stages = CONFIGS[(arch_family(arch), D)]
    t, c = TL_DTYPES[dtype], TL_DTYPES[cache_dtype]
    sig = {name: "i32" for name in _inject_kv_kernel.arg_names}
    sig.update(h_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", knw_ptr=f"*{t}", pos_ptr="*i64",
               slot_ptr="*i64", cs_ptr="*fp32", kc_ptr=f"*{c}", kc_table="*i64",
               vc_ptr=f"*{c}", vc_table="*i64", k_scale_ptr="*fp32",
               v_scale_ptr="*fp32", eps="fp32", ws_ptr="*fp32", cnt_ptr="*i32")
    fp8 = fp8_args(cache_dtype)
    ce = dict(stride_pos=1, stride_slot=1, D=D, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NEOX=True,
              HAS_BIAS=True, HAS_KNORM=True, **fp8, UNIFORM_K=True, UNIFORM_V=True, SPLIT=split)
    if not split:
        ce.update(ws_ptr=None, cnt_ptr=None, num_splits=1)
    if not fp8["FP8"]:
        ce.update(k_scale_ptr=None, v_scale_ptr=None)
    return _spec(_inject_kv_kernel, sig, ce, num_warps, num_stages,
                 unaligned=("N", "Hkv", "num_splits"))
