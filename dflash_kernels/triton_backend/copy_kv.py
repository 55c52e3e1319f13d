"""copy_kv in Triton: one launch for every layer, K and V; no host synchronisation.

Grid ``(L, cdiv(Hkv*D, COLS))``: program (l, c) owns columns
``[c*COLS, (c+1)*COLS)`` of the flattened (head, dim) row of layer l, in both
K and V, for ALL M pairs. No other program touches those bytes, so "all reads
before any write" only has to hold inside the program: it reads every source
row's column slice, passes a CTA barrier (``tl.debug_barrier``, i.e.
``bar.sync``, which orders the CTA's global accesses), then writes every kept
destination. With ``M <= ROWS`` the sources stay in registers; beyond that
each program stages its slice of the M source rows in a global scratch
``[L, 2, M, Hkv*D]`` (host-known M) that only it touches, then scatters from
there. Rows move as raw integers (an integer view of the cache dtype), so
fp8, NaN payloads and every bit are copied exactly. ``dst < 0`` (or, outside
SPEC, ``dst >= num_slots``) skips the pair; sources outside
``[0, num_slots)`` are clamped. Layers: one base plus a stride when they are
one allocation (a stacked cache), else a device table of base addresses
(shared with inject_kv). See docs/tree.md.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import launch
from ._common import cdiv, next_pow2, on_device

from ._kv_epilogue import layer_addressing as _layer_addressing, layer_base as _layer_base

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ROWS = 16
COLS = 64


@triton.jit
def _row_offsets(slot_ptr, m, m_ok, n_slots, page_size, s_page, s_row):
    s = tl.load(slot_ptr + m, mask=m_ok, other=0)
    s = tl.minimum(tl.maximum(s, 0), n_slots - 1)
    return (s // page_size) * s_page + (s % page_size) * s_row


@triton.jit
def _copy_kv_kernel(
    src_ptr, dst_ptr, stage_ptr, M, n_slots, page_size,
    kc_ptr, kc_table, k_layer, k_page, k_row, k_head,
    vc_ptr, vc_table, v_layer, v_page, v_row, v_head,
    D: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    STAGED: tl.constexpr, UNIFORM_K: tl.constexpr, UNIFORM_V: tl.constexpr,
):
    layer = tl.program_id(0)
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    col_ok = col < C
    k_col = ((col // D) * k_head + col % D).to(tl.int64)
    v_col = ((col // D) * v_head + col % D).to(tl.int64)
    kb = _layer_base(kc_ptr, kc_table, layer, k_layer, UNIFORM_K)
    vb = _layer_base(vc_ptr, vc_table, layer, v_layer, UNIFORM_V)
    r = tl.arange(0, ROWS)
    if STAGED:
        stage_k = stage_ptr + layer.to(tl.int64) * 2 * M * C
        stage_v = stage_k + M * C
        for m0 in range(0, M, ROWS):
            m = m0 + r
            ok = (m < M)[:, None] & col_ok[None, :]
            so = (m.to(tl.int64) * C)[:, None] + col[None, :]
            ko = _row_offsets(src_ptr, m, m < M, n_slots, page_size, k_page, k_row)
            vo = _row_offsets(src_ptr, m, m < M, n_slots, page_size, v_page, v_row)
            tl.store(stage_k + so, tl.load(kb + ko[:, None] + k_col[None, :], mask=ok), mask=ok)
            tl.store(stage_v + so, tl.load(vb + vo[:, None] + v_col[None, :], mask=ok), mask=ok)
        tl.debug_barrier()  # every source slice read (and staged) before any destination write
        for m0 in range(0, M, ROWS):
            m = m0 + r
            d = tl.load(dst_ptr + m, mask=m < M, other=-1)
            keep = (d >= 0) & (d < n_slots)
            ok = keep[:, None] & col_ok[None, :]
            so = (m.to(tl.int64) * C)[:, None] + col[None, :]
            ko = _row_offsets(dst_ptr, m, keep, n_slots, page_size, k_page, k_row)
            vo = _row_offsets(dst_ptr, m, keep, n_slots, page_size, v_page, v_row)
            tl.store(kb + ko[:, None] + k_col[None, :], tl.load(stage_k + so, mask=ok), mask=ok)
            tl.store(vb + vo[:, None] + v_col[None, :], tl.load(stage_v + so, mask=ok), mask=ok)
    else:
        m = r
        ok = (m < M)[:, None] & col_ok[None, :]
        ko = _row_offsets(src_ptr, m, m < M, n_slots, page_size, k_page, k_row)
        vo = _row_offsets(src_ptr, m, m < M, n_slots, page_size, v_page, v_row)
        k = tl.load(kb + ko[:, None] + k_col[None, :], mask=ok)
        v = tl.load(vb + vo[:, None] + v_col[None, :], mask=ok)
        tl.debug_barrier()  # every source slice in registers before any destination write
        d = tl.load(dst_ptr + m, mask=m < M, other=-1)
        keep = (d >= 0) & (d < n_slots)
        ok = keep[:, None] & col_ok[None, :]
        ko = _row_offsets(dst_ptr, m, keep, n_slots, page_size, k_page, k_row)
        vo = _row_offsets(dst_ptr, m, keep, n_slots, page_size, v_page, v_row)
        tl.store(kb + ko[:, None] + k_col[None, :], k, mask=ok)
        tl.store(vb + vo[:, None] + v_col[None, :], v, mask=ok)


def copy_kv(src_slots, dst_slots, k_caches: list, v_caches: list) -> None:
    """Copies every layer's K and V rows ``src_slots[i] -> dst_slots[i]`` (int64 ``[M]``, dense).

    ``k_caches`` / ``v_caches``: lists of L paged caches ``[P, page, Hkv, D]`` with
    a unit last stride and the same strides per list (ops.copy_kv checks them).
    """
    M = src_slots.shape[0]
    L = len(k_caches)
    P, page, Hkv, D = k_caches[0].shape
    if M == 0 or P * page == 0:
        return
    esz = k_caches[0].element_size()
    kraw = [c.view(_BITS[esz]) for c in k_caches]
    vraw = [c.view(_BITS[esz]) for c in v_caches]
    kc, k_layer, ktab, kuni = _layer_addressing(kraw)
    vc, v_layer, vtab, vuni = _layer_addressing(vraw)
    C = Hkv * D
    cols = min(COLS, next_pow2(C))
    staged = M > ROWS
    dev = src_slots.device
    stage = (torch.empty((L, 2, M, C), dtype=_BITS[esz], device=dev) if staged else src_slots)
    with on_device(dev):
        launch(_copy_kv_kernel, (L, cdiv(C, cols)),
            src_slots, dst_slots, stage, M, P * page, page,
            kc, ktab if ktab is not None else src_slots, k_layer, kc.stride(0), kc.stride(1),
            kc.stride(2),
            vc, vtab if vtab is not None else src_slots, v_layer, vc.stride(0), vc.stride(1),
            vc.stride(2),
            D=D, C=C, ROWS=ROWS, COLS=cols, STAGED=staged, UNIFORM_K=kuni, UNIFORM_V=vuni,
            num_warps=4)


def compile_spec(staged: bool, Hkv: int = 8, D: int = 128, elt_bits: int = 16) -> dict:
    """Signature and constexprs of the launch (stacked K cache, listed V cache) for
    compile checks without a GPU."""
    t = f"*i{elt_bits}" if elt_bits > 8 else "*u8"
    C = Hkv * D
    const = dict(D=D, C=C, ROWS=ROWS, COLS=min(COLS, next_pow2(C)), STAGED=staged,
                 UNIFORM_K=True, UNIFORM_V=False)
    sig = dict(src_ptr="*i64", dst_ptr="*i64", stage_ptr=t, M="i32", n_slots="i32",
               page_size="i32", kc_ptr=t, kc_table="*i64", k_layer="i64", k_page="i32",
               k_row="i32", k_head="i32", vc_ptr=t, vc_table="*i64", v_layer="i64",
               v_page="i32", v_row="i32", v_head="i32", **{n: "constexpr" for n in const})
    return dict(signature=sig, constexprs=const, num_warps=4, num_stages=2)
