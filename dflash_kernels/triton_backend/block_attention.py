"""Triton ``block_attention``: GQA-packed flash-decoding over a paged cache.

One program owns every query row of one (request, KV head, row block,
split): the S*g rows of a GQA group share each K/V tile, so a context byte is
read once per request and KV head per split. The context is split into
``num_splits`` contiguous tile ranges (a host-known count); with more than one
split, each writes a normalised partial output and its log2-sum-exp, and the
split that arrives last (an atomic counter) merges them in the same launch.
The block's own keys (``k_block``) are attended by the last split, after its
context tiles. See docs/block_attention.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import launch
from ._common import arch, cdiv, next_pow2, num_sms, on_device, TL_DTYPES, wave_split
from ._common import _counters

_LOG2E = 1.4426950408889634


@triton.jit
def _bad_values(v):
    """(``v`` with NaN / +-inf elements zeroed, where they were): all
    exponent bits set, read on the 16-bit pattern (no fp32 copy of the tile)."""
    EXP: tl.constexpr = 0x7F80 if v.dtype == tl.bfloat16 else 0x7C00
    bits = v.to(tl.int16, bitcast=True)
    bad = (bits & EXP) == EXP
    return tl.where(bad, 0, bits).to(v.dtype, bitcast=True), bad


@triton.jit
def _mark_bad(acc, visible, bad):
    """NaN in ``acc`` at the (row, column) pairs where a key the row sees held
    a non-finite V element (the reference's 0 x NaN-free rule; NaN then
    survives every rescale and the final division). Exact 0/1 counts in one
    fp16 MMA."""
    hits = tl.dot(visible.to(tl.float16), bad.to(tl.float16))
    return tl.where(hits > 0.0, float("nan"), acc)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, PARTIAL: tl.constexpr):
    """Online-softmax update with one key tile; scores in the log2 domain.

    ``PARTIAL`` (some rows may not see some in-range keys): 0 no; 1 yes, and
    non-finite V elements are zeroed for P x V (a key a row cannot see would
    otherwise reach it as 0 x NaN), the caller marks the rows that see them
    (:func:`_mark_bad`) later; 2 as 1, marked here. Keys past the range are
    loaded as 0 and need none of this.
    """
    if PARTIAL > 0:
        v, bad = _bad_values(v)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible so far keeps m = -inf; shift by 0 so that
    # exp2(-inf - -inf) never makes a NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    if PARTIAL == 2:
        acc = _mark_bad(acc, visible, bad)
    return acc, m_new, l_i


@triton.jit
def _fp16_q(q):
    """``(q16, inv)``: bf16 ``q [BLOCK_M, D]`` as fp16 times the power of two
    that puts its largest finite magnitude in [2^13, 2^14), and the inverse
    power (fp32 scalar).

    fp8 caches widen exactly and in one instruction per pair to fp16, but to
    bf16 only through fp32 (two more per element), so with an fp8 cache the
    context MMAs run in fp16. ``q16 * inv`` is ``q`` exactly for every element
    within 2^30 of the tile's largest (fp16's 11 bits hold bf16's 8); a
    smaller one is off by at most 2^-38 of that largest, far below its own
    bf16 rounding in any score. NaN and +-inf stay. fp16 ``q`` is used as is.
    """
    if q.dtype == tl.float16:
        return q, 1.0
    qf = q.to(tl.float32)
    qa = tl.abs(qf)
    qmax = tl.max(tl.max(tl.where(qa < float("inf"), qa, 0.0), 1), 0)
    eb = (qmax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.where(qmax > 0.0, tl.minimum(140 - eb, 126), 0)        # in [-114, 126]
    up = ((127 + e) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return (qf * up).to(tl.float16), inv


@triton.jit
def _window_visible(qpos, tok, tok_ok, window):
    dist = qpos[:, None] - tok[None, :]
    return tok_ok[None, :] & (dist < window) & (dist > -window)


@triton.jit
def _page_ids(BT, b, tok, tok_ok, num_pages, sbt_b, sbt_p, PAGE: tl.constexpr, n0, end,
              TILE: tl.constexpr):
    """Page id (int32) of each cached token ``tok``; ``TILE`` as in :func:`_gather_kv`."""
    # Page ids only for tokens in range, clamped: garbage entries past the
    # used pages are never followed.
    if TILE > 0 and TILE <= PAGE:
        j0 = n0 // PAGE
        j1 = tl.minimum(n0 + TILE - 1, end - 1) // PAGE
        p0 = tl.load(BT + b * sbt_b + j0 * sbt_p)
        p1 = tl.load(BT + b * sbt_b + j1 * sbt_p)
        p0 = tl.minimum(tl.maximum(p0, 0), num_pages - 1)
        p1 = tl.minimum(tl.maximum(p1, 0), num_pages - 1)
        page = tl.where(tok // PAGE == j0, p0, p1)
    else:
        page = tl.load(BT + b * sbt_b + (tok // PAGE) * sbt_p, mask=tok_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
    return page


@triton.jit
def _gather_kv(KC, VC, BT, b, h, tok, tok_ok, d64, num_pages, sk_p, sk_r, sk_h, sk_d,
               sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE: tl.constexpr, KV_VEC: tl.constexpr,
               n0=0, end=0, TILE: tl.constexpr = 0):
    """K and V tiles ``[len(tok), D]`` of cached tokens ``tok`` (0 where not ``tok_ok``).

    ``TILE`` = len(tok) > 0 says ``tok = n0 + arange(TILE)``, ``tok_ok = tok <
    end`` and ``n0 < end``; with ``TILE <= PAGE`` the tile lies in at most two
    pages, so the block table is read page-granular: two scalar entries (of
    pages holding in-range tokens) instead of one per token.

    ``KV_VEC`` > 1 (host-checked, ``kv_vec``: K and V with the same strides,
    unit last stride, the others and both base pointers multiples of
    ``KV_VEC`` elements = 16 bytes) tells the compiler each token row is
    contiguous and 16-byte aligned: without it V (unlike K) comes out as one
    1- or 2-byte synchronous load per element. V then reuses K's offsets
    (fewer 64-bit registers: 2 CTAs/SM at page 1).
    """
    page = _page_ids(BT, b, tok, tok_ok, num_pages, sbt_b, sbt_p, PAGE, n0, end, TILE).to(tl.int64)
    row = (tok % PAGE).to(tl.int64)
    k_row = page * sk_p + row * sk_r + h * sk_h
    if KV_VEC > 1:
        k_off = k_row[:, None] + d64[None, :]
        k_off = tl.max_contiguous(tl.multiple_of(k_off, [1, KV_VEC]), [1, KV_VEC])
        v_off = k_off
    else:
        k_off = k_row[:, None] + d64[None, :] * sk_d
        v_off = (page * sv_p + row * sv_r + h * sv_h)[:, None] + d64[None, :] * sv_d
    k = tl.load(KC + k_off, mask=tok_ok[:, None], other=0.0)
    v = tl.load(VC + v_off, mask=tok_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _context_tile(acc, m_i, l_i, q, qpos, n0, end, window, ctx_scale,
                  KC, VC, BT, b, h, d64, num_pages, sk_p, sk_r, sk_h, sk_d,
                  sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KV_VEC: tl.constexpr,
                  IS_FP8: tl.constexpr, EDGE: tl.constexpr):
    """One context tile ``[n0, min(n0 + BLOCK_N, end))``. ``EDGE``: a window
    edge tile, where rows see different keys (window test, non-finite V
    zeroed; :func:`_mark_edge` marks its NaN afterwards); every other tile is
    seen whole by every row and needs neither."""
    tok = n0 + tl.arange(0, BLOCK_N)
    tok_ok = tok < end
    k, v = _gather_kv(KC, VC, BT, b, h, tok, tok_ok, d64, num_pages, sk_p, sk_r, sk_h, sk_d,
                      sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE, KV_VEC, n0, end, BLOCK_N)
    if IS_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    visible = tok_ok[None, :]
    if EDGE:
        visible = _window_visible(qpos, tok, tok_ok, window)
    return _attend_tile(acc, m_i, l_i, q, k, v, visible, ctx_scale, 1 if EDGE else 0)


@triton.jit
def _tma_tile(acc, m_i, l_i, q, n0, ctx_scale, KD, VD, BT, b, hrow, hcol, tma_rp, num_pages,
              sbt_b, sbt_p, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KV_TMA: tl.constexpr,
              IS_FP8: tl.constexpr):
    """One whole context tile ``[n0, n0 + BLOCK_N)`` (every token in range and
    seen by every row) by TMA: ``KV_TMA`` 1 one box (the tile lies in one
    page: ``BLOCK_N`` divides ``PAGE`` and, without a window, ``n0``), 2 a row
    gather (Blackwell; any page size). The descriptors view the cache as
    ``[rows, cols]``: token ``r`` of page ``p``, head ``h`` is row ``p * tma_rp
    + r + hrow``, columns ``[hcol, hcol + D)`` (host-checked, ``kv_tma``).
    Only whole tiles come here: TMA reads whole token rows, and rows past a
    request's length are garbage (NaN in the tests) that ``0 x NaN`` would
    carry into P x V; the part-tile takes the masked loads."""
    if KV_TMA == 1:
        p = tl.load(BT + b * sbt_b + (n0 // PAGE) * sbt_p)
        p = tl.minimum(tl.maximum(p, 0), num_pages - 1)
        row = p * tma_rp + n0 % PAGE + hrow
        k = KD.load([row, hcol])
        v = VD.load([row, hcol])
    else:
        tok = n0 + tl.arange(0, BLOCK_N)
        page = _page_ids(BT, b, tok, tok < n0 + BLOCK_N, num_pages, sbt_b, sbt_p, PAGE,
                         n0, n0 + BLOCK_N, BLOCK_N)
        rows = page * tma_rp + tok % PAGE + hrow
        k = KD.gather(rows, hcol)
        v = VD.gather(rows, hcol)
    if IS_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    visible = tl.full([1, BLOCK_N], 1, tl.int1)
    return _attend_tile(acc, m_i, l_i, q, k, v, visible, ctx_scale, 0)


@triton.jit
def _mark_edge(acc, qpos, lo, hi, end, window, VC, BT, b, h, d64, num_pages,
               sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               KV_VEC: tl.constexpr, IS_FP8: tl.constexpr, DTYPE: tl.constexpr):
    """:func:`_mark_bad` over the EDGE tiles ``[lo, hi)`` (V only), before the
    context loops: the marks then never share registers with the scores (NaN
    set here survives every later rescale)."""
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=1):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        _, v = _gather_kv(VC, VC, BT, b, h, tok, tok_ok, d64, num_pages, sv_p, sv_r, sv_h, sv_d,
                          sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE, KV_VEC, n0, end, BLOCK_N)
        if IS_FP8:
            v = v.to(DTYPE)
        _, bad = _bad_values(v)
        acc = _mark_bad(acc, _window_visible(qpos, tok, tok_ok, window), bad)
    return acc


@triton.jit
def _merge_splits(PO, PLSE, r, r_ok, n_rows, num_splits, BLOCK_R: tl.constexpr,
                  D: tl.constexpr):
    """``(o, lse)`` fp32 ``[BLOCK_R, D]``, ``[BLOCK_R]`` of flat rows ``r``
    (``(b * S + s) * Hq + head``) from the partials ``PO [num_splits, n_rows,
    D]`` / ``PLSE [num_splits, n_rows]``: ``w_i = exp2(lse2_i - max lse2)``,
    summed in split order 0, 1, ..., num_splits - 1, so the result does not
    depend on which split runs it. ``lse`` is natural-log, -inf (and ``o``
    0) for a row no split saw a key of. L2 loads (``.cg``): the partials were
    written by other SMs. ``num_splits`` is a runtime trip count: with the
    constexpr the loops were unrolled and the partial tiles' loads hoisted
    (at 16 splits 40 bytes spilled on sm_100a with an fp8 cache)."""
    d = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for i in range(num_splits):
        m = tl.maximum(m, tl.load(PLSE + i * n_rows + r, mask=r_ok, other=float("-inf"),
                                  cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for i in range(num_splits):
        w = tl.exp2(tl.load(PLSE + i * n_rows + r, mask=r_ok, other=float("-inf"),
                            cache_modifier=".cg") - m_safe)
        o_i = tl.load(PO + (i * n_rows + r)[:, None] * D + d[None, :], mask=r_ok[:, None],
                      other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o_i
        den += w
    has_key = den > 0.0
    den_safe = tl.where(has_key, den, 1.0)
    o = acc / den_safe[:, None]
    lse = tl.where(has_key, (m_safe + tl.log2(den_safe)) * 0.6931471805599453, float("-inf"))
    return o, lse


@triton.jit
def _block_attention_kernel(
    Q, KC, VC, BT, CL, KB, VB, KS, VS, O, LSE, PO, PLSE, MB, CNT,
    qk_scale, window, max_slots, num_pages, batch,
    sq_b, sq_s, sq_h,
    sk_p, sk_r, sk_h, sk_d,
    sv_p, sv_r, sv_h, sv_d,
    sbt_b, sbt_p,
    skb_b, skb_s, skb_h,
    svb_b, svb_s, svb_h,
    so_b, so_s, so_h,
    S: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_FP8: tl.constexpr,
    HAS_LSE: tl.constexpr, MASK_MODE: tl.constexpr = 0, MASK_W: tl.constexpr = 1,
    KV_VEC: tl.constexpr = 1,
    KD=None, VD=None, tma_rp=0, tma_rh=0, tma_ch=0, KV_TMA: tl.constexpr = 0,
):
    # MASK_MODE: which block keys block row i sees: 0 all, 1 j <= i, 2 bit j of MB[b, i]
    # (int32 [B, S, MASK_W] packed words). Without k_block and with a mask, the block's
    # keys (the last S cached tokens) leave the context loop and are attended as the
    # block tile, so the mask is a few bit tests in one tile and never in the loop.
    CACHED_BLOCK: tl.constexpr = (not HAS_BLOCK) and (MASK_MODE != 0)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    mb = pid % NUM_M_BLOCKS
    bh = pid // NUM_M_BLOCKS
    # 64-bit index * stride products: with ANY cache strides (e.g. a head-major
    # pool) h * sk_h or row * sk_r passes 2**31 elements while each stride is i32.
    h = (bh % HKV).to(tl.int64)
    b = (bh // HKV).to(tl.int64)

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * GROUP
    s_idx = rows // GROUP
    head = h * GROUP + rows % GROUP
    d = tl.arange(0, D)
    d64 = d.to(tl.int64)
    q = tl.load(Q + (b * sq_b + s_idx * sq_s + head * sq_h)[:, None] + d[None, :],
                mask=row_ok[:, None], other=0.0)

    # Lengths outside [0, max_slots] (outside SPEC) are clamped so no block
    # table entry past the row is ever read.
    ctx = tl.minimum(tl.maximum(tl.load(CL + b), 0), max_slots)
    if HAS_BLOCK:
        q0 = ctx
    else:
        q0 = ctx - S
    qpos = q0 + s_idx

    # Context keys this block can see: all of them, or the window around it.
    ctx_end = ctx
    if CACHED_BLOCK:
        ctx_end = tl.maximum(q0, 0)
    lo = ctx * 0
    hi = ctx_end
    if HAS_WINDOW:
        lo = tl.maximum(q0 - window + 1, 0)
        hi = tl.minimum(ctx_end, q0 + S - 1 + window)
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    start = lo + split * per_split * BLOCK_N
    end = tl.minimum(hi, start + per_split * BLOCK_N)

    ctx_q = q
    ctx_scale = qk_scale
    if IS_FP8:
        # k's scale and q16's power of two fold into the logits exactly;
        # v's scales the accumulator once (below).
        ctx_q, inv = _fp16_q(q)
        ctx_scale = qk_scale * tl.load(KS) * inv
        v_scale = tl.load(VS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # With a window every row sees the keys in [q0 + S - window, q0 + window)
    # and rows differ only within S - 1 keys of either end of [lo, hi): the
    # split's tiles touching those ends are EDGE tiles (window test, NaN
    # rule), the ones between are seen whole by every row and run the plain
    # main loop. The tiles are the same and run in the same order either way.
    mid_start = start
    mid_end = end
    if HAS_WINDOW:
        mid_start = tl.minimum(
            start + tl.cdiv(tl.maximum(q0 + S - window - start, 0), BLOCK_N) * BLOCK_N, end)
        full_hi = q0 + window
        n_full = tl.maximum(full_hi - mid_start, 0) // BLOCK_N
        mid_end = tl.where(end <= full_hi, end,
                           tl.maximum(tl.minimum(mid_start + n_full * BLOCK_N, end), mid_start))
        acc = _mark_edge(acc, qpos, start, mid_start, end, window, VC, BT, b, h, d64,
                         num_pages, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE, BLOCK_N, KV_VEC,
                         IS_FP8, q.dtype)
        acc = _mark_edge(acc, qpos, mid_end, end, end, window, VC, BT, b, h, d64,
                         num_pages, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p, PAGE, BLOCK_N, KV_VEC,
                         IS_FP8, q.dtype)
        for n0 in tl.range(start, mid_start, BLOCK_N, num_stages=2):
            acc, m_i, l_i = _context_tile(
                acc, m_i, l_i, ctx_q, qpos, n0, end, window, ctx_scale, KC, VC, BT, b, h,
                d64, num_pages, sk_p, sk_r, sk_h, sk_d, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                PAGE, BLOCK_N, KV_VEC, IS_FP8, True)
    if KV_TMA > 0:
        # Whole tiles by TMA; the split's last part-tile (tokens past the
        # length inside its last page) peeled, by the masked loads.
        tl.static_assert(KV_TMA == 2 or not HAS_WINDOW, "a window's tiles straddle pages")
        tail = mid_start + (mid_end - mid_start) // BLOCK_N * BLOCK_N
        hrow = (h * tma_rh).to(tl.int32)
        hcol = (h * tma_ch).to(tl.int32)
        for n0 in range(mid_start, tail, BLOCK_N):
            acc, m_i, l_i = _tma_tile(acc, m_i, l_i, ctx_q, n0, ctx_scale, KD, VD, BT, b, hrow,
                                      hcol, tma_rp, num_pages, sbt_b, sbt_p, PAGE, BLOCK_N,
                                      KV_TMA, IS_FP8)
        if tail < mid_end:
            acc, m_i, l_i = _context_tile(
                acc, m_i, l_i, ctx_q, qpos, tail, end, window, ctx_scale, KC, VC, BT, b, h,
                d64, num_pages, sk_p, sk_r, sk_h, sk_d, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                PAGE, BLOCK_N, KV_VEC, IS_FP8, False)
    else:
        for n0 in range(mid_start, mid_end, BLOCK_N):
            acc, m_i, l_i = _context_tile(
                acc, m_i, l_i, ctx_q, qpos, n0, end, window, ctx_scale, KC, VC, BT, b, h,
                d64, num_pages, sk_p, sk_r, sk_h, sk_d, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                PAGE, BLOCK_N, KV_VEC, IS_FP8, False)
    if HAS_WINDOW:
        for n0 in tl.range(mid_end, end, BLOCK_N, num_stages=2):
            acc, m_i, l_i = _context_tile(
                acc, m_i, l_i, ctx_q, qpos, n0, end, window, ctx_scale, KC, VC, BT, b, h,
                d64, num_pages, sk_p, sk_r, sk_h, sk_d, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                PAGE, BLOCK_N, KV_VEC, IS_FP8, True)

    if IS_FP8 and HAS_BLOCK:
        # Cached V entered P x V unscaled (exact fp8 -> 16-bit casts): v_scale
        # once per program here, before the block's own (unscaled) values.
        acc = acc * v_scale
    if HAS_BLOCK or CACHED_BLOCK:
        if split == NUM_SPLITS - 1:
            j = tl.arange(0, BLOCK_S)
            j_ok = j < S
            if HAS_BLOCK:
                kb = tl.load(KB + (b * skb_b + j * skb_s + h * skb_h)[:, None] + d[None, :],
                             mask=j_ok[:, None], other=0.0)
                vb = tl.load(VB + (b * svb_b + j * svb_s + h * svb_h)[:, None] + d[None, :],
                             mask=j_ok[:, None], other=0.0)
                if IS_FP8:
                    # Read again rather than held in registers through the loops.
                    q = tl.load(Q + (b * sq_b + s_idx * sq_s + head * sq_h)[:, None] + d[None, :],
                                mask=row_ok[:, None], other=0.0)
                b_scale = qk_scale
            else:
                # Block key j is cached token q0 + j (none below 0: a context shorter than S).
                tok = q0 + j
                j_ok = j_ok & (tok >= 0)
                kb, vb = _gather_kv(KC, VC, BT, b, h, tl.maximum(tok, 0), j_ok, d64, num_pages,
                                    sk_p, sk_r, sk_h, sk_d, sv_p, sv_r, sv_h, sv_d, sbt_b, sbt_p,
                                    PAGE, KV_VEC)
                if IS_FP8:
                    kb = kb.to(ctx_q.dtype)
                    vb = vb.to(ctx_q.dtype)
                q = ctx_q
                b_scale = ctx_scale
            visible = j_ok[None, :]
            if HAS_WINDOW:
                visible = _window_visible(s_idx, j, j_ok, window)
            if MASK_MODE == 1:
                visible = visible & (j[None, :] <= s_idx[:, None])
            if MASK_MODE == 2:
                word = tl.load(MB + (b * S + s_idx)[:, None] * MASK_W + (j // 32)[None, :],
                               mask=row_ok[:, None] & j_ok[None, :], other=0)
                visible = visible & (((word >> (j % 32)[None, :]) & 1) != 0)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kb, vb, visible, b_scale,
                                         2 if MASK_MODE != 0 or HAS_WINDOW else 0)

    if IS_FP8 and not HAS_BLOCK:
        acc = acc * v_scale        # every value came from the cache, unscaled
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(O + (b * so_b + s_idx * so_s + head * so_h)[:, None] + d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])
        if HAS_LSE:
            lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + (b * S + s_idx) * (HKV * GROUP) + head, lse, mask=row_ok)
    else:
        # Partials [NUM_SPLITS, B*S*Hq, (D)]: an empty split writes o = 0 and
        # lse2 = -inf, the neutral element of the merge.
        n_rows = batch * S * (HKV * GROUP)
        r = (b * S + s_idx) * (HKV * GROUP) + head
        prow = split * n_rows + r
        tl.store(PO + prow[:, None] * D + d[None, :], o, mask=row_ok[:, None])
        tl.store(PLSE + prow, tl.where(has_key, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
        # The split that arrives last at this (request, KV head, row block)
        # merges all of them (docs/block_attention.md "Split merge"). Every
        # thread's partial is issued before the release (bar.sync, then one
        # thread's acq_rel atomic at GPU scope, its result broadcast): the
        # splits' releases and the last one's acquire order every partial
        # before the merge's loads.
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            # The grid's split axis (= NUM_SPLITS) as a runtime trip count (see _merge_splits).
            o, lse = _merge_splits(PO, PLSE, r, row_ok, n_rows, tl.num_programs(1), BLOCK_M, D)
            tl.store(O + (b * so_b + s_idx * so_s + head * so_h)[:, None] + d[None, :],
                     o.to(O.dtype.element_ty), mask=row_ok[:, None])
            if HAS_LSE:
                tl.store(LSE + r, lse, mask=row_ok)
            # Ready for the next launch (stream-ordered after this one).
            tl.store(CNT + pid, 0)


# --------------------------------------------------------------------------
# Host side: configuration from host-known sizes only.
# --------------------------------------------------------------------------

# Splits on CPU (the interpreter): a fixed small count, so both paths run.
CPU_SPLITS = 2
# A split should own at least this many key tiles before it pays to split.
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 32


def max_block_m(D: int) -> int:
    """Largest row tile: keeps the fp32 accumulator (BLOCK_M x D) in registers."""
    return 64 if D == 256 else 128


def kernel_config(arch: Optional[int], D: int, block_m: int, page_size: int = 16,
                  cache_bytes: int = 2, tma: bool = False) -> dict:
    """BLOCK_N, num_warps, num_stages (and a register cap) for (architecture,
    head dim, row tile, page size, cache element size).

    A fixed table (the interpreter cannot benchmark autotune candidates).
    Hopper and Blackwell have 227 KB of shared memory, so deeper pipelines fit.
    """
    if arch is None:
        return dict(BLOCK_N=64 if D <= 128 else 32, num_warps=4, num_stages=1)
    big_smem = arch in (90, 100, 103)
    # Each thread holds gathered K/V row pointers as well as its share of the
    # accumulator; 8 warps keep 64-row tiles clear of spills on sm_90/sm_100.
    warps = 8 if block_m >= (64 if big_smem or D == 256 else 128) else 4
    if D <= 128:
        cfg = dict(BLOCK_N=64, num_warps=warps, num_stages=2)
        if big_smem:
            # The block-table load feeds the K/V addresses, so the pipeliner
            # splits the stages along that chain: 3 stages put the page ids
            # one tile ahead and K/V one tile ahead (the loop then waits for
            # every copy, 1 tile in flight); 5 put K/V two tiles ahead.
            cfg["num_stages"] = 5
        if big_smem and arch != 90 and cache_bytes == 2:
            # sm_100 needs 114 KB for 3 buffers of 64-token bf16 tiles: 1 CTA/SM.
            # 32-token tiles: 66 KB, 2 CTAs/SM, 2 tiles in flight each.
            cfg["BLOCK_N"] = 32
            if tma:
                # By TMA at 5 (and 6) stages the pipeliner keeps 3 buffers with V
                # one tile behind K: 1.5 tiles issued at the first wait. 7 give a
                # fourth 16 KB buffer (82 KB, still 2 CTAs/SM): 2.5 tiles.
                cfg["num_stages"] = 7
        if arch == 90 and (page_size == 1 or cache_bytes == 1) and warps == 8:
            # Capped at 128 registers page 1 spills (8 bf16, 80 fp8) and so
            # does an fp8 cache (16: its fp16 q operand stays in registers,
            # see _fp16_q); uncapped they take 165-175 (1 CTA/SM). One
            # warpgroup (4 warps, the whole 64-row wgmma) fits in 217-229
            # registers: 2 CTAs/SM, the same shared memory and bytes in
            # flight per CTA.
            cfg["num_warps"] = 4
        elif big_smem and warps == 8 and block_m <= 64:
            # 2 CTAs/SM of 256 threads need <= 128 registers each; uncapped the
            # 16-byte K/V copies take up to 158 (fp8). The cap compiles with 0
            # spills (tests/test_compile_report.py); 128-row tiles (g = 8)
            # need ~228 (1 CTA/SM either way) and would spill under it.
            cfg["maxnreg"] = 128
        return cfg
    return dict(BLOCK_N=32, num_warps=warps, num_stages=2)


# What a program costs besides its own tiles, in tile-times: the pipeline
# fill (2 tiles in flight), and with splits its fp32 partial, written and read
# back by the merge (BLOCK_M x D x 4 bytes twice: about 2 bf16 K+V tiles).
SPLIT_FILL_TILES = 2
SPLIT_PARTIAL_TILES = 2


def num_splits_for(sms: Optional[int], B: int, Hkv: int, m_blocks: int, span: int,
                   block_n: int) -> int:
    """Context splits from host-known sizes: the count that minimises the
    busiest SM's work in tiles.

    ``programs = B * Hkv * m_blocks * s`` go round-robin over ``sms`` SMs, the
    busiest SM then streams ``cdiv(programs, sms) * (cdiv(tiles, s) +
    SPLIT_FILL_TILES (+ SPLIT_PARTIAL_TILES when s > 1))`` tiles (the kernel
    is bandwidth-bound: programs sharing an SM share its bandwidth); ties go
    to fewer splits. At most ``tiles // MIN_TILES_PER_SPLIT`` and MAX_SPLITS. So no
    split count leaves a partial second wave (``cdiv(SMs, base)`` did: at
    B 2, Hkv 8 on 132 SMs it chose 9 splits, 144 programs, 2 waves).
    ``sms`` is the device's SM count, or None on CPU (a fixed small count).
    """
    tiles = cdiv(max(span, 0), block_n)
    if sms is None:
        return max(1, min(CPU_SPLITS, tiles))
    return wave_split(max(B * Hkv * m_blocks, 1), sms, tiles, SPLIT_FILL_TILES,
                      SPLIT_PARTIAL_TILES, min(tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=4096)
def plan(arch: Optional[int], sms: Optional[int], B: int, S: int, Hq: int, Hkv: int, D: int,
         page_size: int, max_pages: int, window: int, num_splits: Optional[int] = None,
         cache_bytes: int = 2, tma: bool = False) -> dict:
    """Launch configuration from host-known sizes (never from context_lens values).

    Cached (a pure function of its ints; the split search is ~100 divisions):
    callers must not modify the returned dict."""
    g = Hq // Hkv
    block_m = min(max(16, next_pow2(S * g)), max_block_m(D))
    m_blocks = cdiv(S * g, block_m)
    cfg = kernel_config(arch, D, block_m, page_size, cache_bytes, tma)
    span = max_pages * page_size
    if window:
        # Keys a block can see lie within window - 1 of its S positions.
        span = min(span, S + 2 * window - 2)
    if num_splits is None:
        num_splits = num_splits_for(sms, B, Hkv, m_blocks, span, cfg["BLOCK_N"])
    return dict(cfg, BLOCK_M=block_m, NUM_M_BLOCKS=m_blocks, NUM_SPLITS=int(num_splits),
                BLOCK_S=max(16, next_pow2(S)))


def kv_vec(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Elements per 16 bytes if K and V share strides and every token row is
    contiguous and 16-byte aligned (unit last stride, other strides and base
    pointers multiples of 16 bytes), else 1: the kernel's ``KV_VEC`` (host
    facts, no device read)."""
    vec = 16 // k_cache.element_size()
    st = k_cache.stride()
    if (v_cache.stride() != st or st[3] != 1 or any(x % vec for x in st[:3])
            or k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16):
        return 1
    return vec


# The TMA modes (``tma_mode``) a launch on this arch takes by default
# (docs/block_attention.md, "TMA path"): the box, whose main loop the compile
# report puts at 20-28 % fewer instructions than the cp.async path's at the
# same budgets; not the gather (more instructions than cp.async for bf16).
# The ``tma=`` keyword of block_attention forces either path.
TMA_DEFAULT = {90: (1,), 100: (1,), 103: (1,)}


def tma_mode(arch: Optional[int], page_size: int, block_n: int, D: int, cache_bytes: int,
             window: int = 0) -> int:
    """The kernel's ``KV_TMA`` for a layout the descriptors can view (``kv_tma``):
    1 one TMA box per tile (the tile lies in one page: ``page_size`` a
    multiple of ``block_n``, and no window, whose tiles start at ``lo``, not at
    multiples of ``block_n``; sm_90 and up), 2 a TMA row gather (Blackwell's
    ``gather4``; any page size; ptxas rejects it for sm_90a), 0 none. ``arch``
    None is the interpreter, which runs both."""
    if arch is not None and arch not in (90, 100, 103):
        return 0
    if page_size % block_n == 0 and not window:
        return 1
    if (arch is None or arch != 90) and block_n >= 8 and D * cache_bytes >= 32:
        return 2
    return 0


def kv_tma(k_cache: torch.Tensor, v_cache: torch.Tensor, mode: int) -> Optional[tuple]:
    """``(rows, cols, row_stride, tma_rp, tma_rh, tma_ch)`` of a 2-D view of both
    caches that TMA can read (row ``p * tma_rp + r + h * tma_rh``, columns
    ``h * tma_ch + [0, D)`` hold token ``r`` of page ``p``, head ``h``), or None
    where none exists (host facts only): K and V with the same strides, unit
    last stride, 16-byte aligned bases and token stride, the page stride a
    multiple of the token stride, the head stride either a multiple of it
    (HND: heads are rows) or heads side by side within a token row (NHD, a
    combined tensor's slices); row indices in int32."""
    if mode == 0:
        return None
    P, page, hkv, D = k_cache.shape
    sp, sr, sh, sd = k_cache.stride()
    elt = k_cache.element_size()
    if (v_cache.stride() != k_cache.stride() or v_cache.dtype != k_cache.dtype or sd != 1
            or elt not in (1, 2) or (sr * elt) % 16 or k_cache.data_ptr() % 16
            or v_cache.data_ptr() % 16 or sr <= 0 or sp % sr or P == 0):
        return None
    if hkv == 1 or sh % sr == 0:
        rh, ch = (sh // sr if hkv > 1 else 0), 0
    elif sh * (hkv - 1) + D <= sr and sh % (16 // elt) == 0:
        rh, ch = 0, sh
    else:
        return None
    rows = (P - 1) * (sp // sr) + (hkv - 1) * rh + page
    cols = (hkv - 1) * ch + D
    if rows >= 2 ** 31 or cols > sr or (sp // sr) < page:
        return None
    return rows, cols, sr, sp // sr, rh, ch


def kv_path(arch_: Optional[int], cfg: dict, k_cache: torch.Tensor, v_cache: torch.Tensor,
            tma: Optional[bool] = None, window: int = 0) -> tuple:
    """``(KV_TMA, kernel keyword arguments)`` of a launch with plan ``cfg``: the TMA
    path where ``tma`` asks for it (None: the modes of ``TMA_DEFAULT`` of the arch)
    and the arch, page size and layout allow it (host facts only), else ``(0, {})``."""
    if tma is False:
        return 0, {}
    _, page, _, D = k_cache.shape
    mode = tma_mode(arch_, page, cfg["BLOCK_N"], D, k_cache.element_size(), window)
    if tma is None and mode not in TMA_DEFAULT.get(arch_, ()):
        return 0, {}
    view = kv_tma(k_cache, v_cache, mode)
    if view is None:
        return 0, {}
    rows, cols, sr, rp, rh, ch = view
    box = [cfg["BLOCK_N"] if mode == 1 else 1, D]
    kd, vd = (TensorDescriptor(c, shape=[rows, cols], strides=[sr, 1], block_shape=box)
              for c in (k_cache, v_cache))
    return mode, dict(KD=kd, VD=vd, tma_rp=rp, tma_rh=rh, tma_ch=ch, KV_TMA=mode)


_INT_ARGS = ("window", "max_slots", "num_pages", "batch", "sq_b", "sq_s", "sq_h",
             "sk_p", "sk_r", "sk_h", "sv_p", "sv_r", "sv_h", "sbt_b",
             "skb_b", "skb_s", "skb_h", "svb_b", "svb_s", "svb_h", "so_b", "so_s", "so_h")


def compile_spec(arch: int, dtype, cache_dtype, S: int, Hq: int, Hkv: int, D: int, *,
                 page_size: int = 16, has_block: bool = True, window: int = 0,
                 return_lse: bool = True, num_splits: int = 1, block_mask: str = "full",
                 tma: Optional[bool] = None) -> dict:
    """Signature, constexprs, num_warps, num_stages and divisibility hints of the
    main kernel's default launch for ``sm_{arch}`` (for compile checks without a
    GPU; unit last strides). ``block_mask``: "full", "causal" or "bits".
    ``tma``: True the TMA path (``tma_mode``, an NHD cache; ValueError where the
    arch and page size have none), False the cp.async path, None as a launch
    chooses (``TMA_DEFAULT``)."""
    mode = tma_mode(arch, page_size, plan(arch, None, 1, S, Hq, Hkv, D, page_size, 1, window,
                                          num_splits, cache_dtype.itemsize)["BLOCK_N"],
                    D, cache_dtype.itemsize, window)
    if tma and not mode:
        raise ValueError(f"no TMA path on sm_{arch} at page size {page_size}")
    if tma is False or (tma is None and mode not in TMA_DEFAULT.get(arch, ())):
        mode = 0
    p = plan(arch, None, 1, S, Hq, Hkv, D, page_size, 1, window, num_splits,
             cache_dtype.itemsize, mode > 0)
    act, cache = "*" + TL_DTYPES[dtype], "*" + TL_DTYPES[cache_dtype]
    sig = dict(Q=act, KC=cache, VC=cache, BT="*i32", CL="*i32", KB=act, VB=act, KS="*fp32",
               VS="*fp32", O=act, LSE="*fp32", PO="*fp32", PLSE="*fp32", MB="*i32",
               CNT="*i32", qk_scale="fp32")
    sig.update({n: "i32" for n in _INT_ARGS})
    const = dict(sk_d=1, sv_d=1, sbt_p=1, S=S, GROUP=Hq // Hkv, HKV=Hkv, D=D, PAGE=page_size,
                 BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_S=p["BLOCK_S"],
                 NUM_M_BLOCKS=p["NUM_M_BLOCKS"], NUM_SPLITS=p["NUM_SPLITS"],
                 HAS_BLOCK=has_block, HAS_WINDOW=window > 0,
                 IS_FP8=cache_dtype != dtype, HAS_LSE=return_lse,
                 MASK_MODE={"full": 0, "causal": 1, "bits": 2}[block_mask], MASK_W=(S + 31) // 32,
                 KV_VEC=16 // cache_dtype.itemsize)
    if mode:
        box = f"{TL_DTYPES[cache_dtype]}[{p['BLOCK_N'] if mode == 1 else 1},{D}]"
        sig.update(KD=f"tensordesc<{box}>", VD=f"tensordesc<{box}>", tma_rh="i32", tma_ch="i32")
        # An NHD cache: row = page * page_size + r, column h * D (tma_rh = 0).
        if page_size == 1:
            const.update(tma_rp=1)
        else:
            sig.update(tma_rp="i32")
        const.update(KV_TMA=mode)
    else:
        const.update(KD=None, VD=None, tma_rp=0, tma_rh=0, tma_ch=0, KV_TMA=0)
    sig.update({n: "constexpr" for n in const})
    # What a real launch derives from 16-byte aligned tensors whose head and
    # token strides are multiples of D (the block-table stride is arbitrary).
    hints = {n: 16 for n, t in sig.items() if t.startswith("*")}
    hints.update({n: 16 for n in _INT_ARGS if n.startswith("s") and n != "sbt_b"})
    hints.update({n: 16 for n in ("tma_rh", "tma_ch") if sig.get(n) == "i32"})
    if sig.get("tma_rp") == "i32" and page_size % 16 == 0:
        hints["tma_rp"] = 16
    options = {"maxnreg": p["maxnreg"]} if "maxnreg" in p else {}
    return dict(signature=sig, constexprs=const, num_warps=p["num_warps"],
                num_stages=p["num_stages"], divisibility=hints, options=options)


def block_attention(q, k_cache, v_cache, block_table, context_lens, k_block, v_block,
                    sm_scale: float, window: int, k_scale, v_scale, out, lse,
                    causal: bool = False, mask_bits=None,
                    *, num_splits: Optional[int] = None, tma: Optional[bool] = None) -> None:
    """Writes ``out`` ``[B, S, Hq, D]`` and ``lse`` fp32 ``[B, S, Hq]`` (or None).

    Arguments as in docs/DESIGN.md (``lse`` contiguous, as ops.py allocates or
    checks it); ``causal`` / ``mask_bits`` (int32 ``[B, S, ceil(S/32)]``,
    contiguous) select the block mask. ``num_splits`` (tests, tuning) forces the context split count;
    by default it comes from host-known sizes only. ``tma`` (tests, tuning): True takes the
    TMA path wherever the arch, page size and layout allow it (``kv_path``), False never;
    by default the modes of ``TMA_DEFAULT`` of the arch.
    """
    B, S, Hq, D = q.shape
    num_pages, page, Hkv, _ = k_cache.shape
    if B == 0 or S == 0 or Hq == 0:
        return
    # The kernel reads context_lens[b] and the block table's columns at unit
    # strides: ops.block_attention hands them over dense (ops._dense).
    if window >= block_table.shape[1] * page + S:
        # Wider than any two positions can be apart: no window. (The kernel's
        # int32 bounds q0 + S - 1 + window would overflow for e.g. 2**31 - 1.)
        window = 0
    g = Hq // Hkv
    cfg = plan(arch(q.device), num_sms(q.device), B, S, Hq, Hkv, D, page, block_table.shape[1],
               window, num_splits, k_cache.element_size())
    mode, tma_args = kv_path(arch(q.device), cfg, k_cache, v_cache, tma, window)
    if mode:
        # The same tiles and splits; the TMA path's own stage count.
        cfg = plan(arch(q.device), num_sms(q.device), B, S, Hq, Hkv, D, page,
                   block_table.shape[1], window, num_splits, k_cache.element_size(), True)
    ns = cfg["NUM_SPLITS"]
    has_block = k_block is not None
    is_fp8 = k_cache.dtype != q.dtype
    if ns > 1:
        # Sizes from host-known shapes (no device read: graph-capturable). The
        # counters, one per (request, KV head, row block), are persistent and
        # 0 between launches (the merging split resets its own).
        part_o = torch.empty((ns, B * S * Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((ns, B * S * Hq), dtype=torch.float32, device=q.device)
        counters = _counters(q.device, B * Hkv * cfg["NUM_M_BLOCKS"])
    else:
        part_o = part_lse = out
        counters = context_lens     # never read
    kb = k_block if has_block else q
    vb = v_block if has_block else q
    kbs = k_block.stride()[:3] if has_block else (0, 0, 0)
    vbs = v_block.stride()[:3] if has_block else (0, 0, 0)
    grid = (B * Hkv * cfg["NUM_M_BLOCKS"], ns)
    with on_device(q):
        launch(_block_attention_kernel, grid,
            q, k_cache, v_cache, block_table, context_lens, kb, vb,
            k_scale if is_fp8 else q, v_scale if is_fp8 else q,
            out, lse if lse is not None else out, part_o, part_lse,
            mask_bits if mask_bits is not None else context_lens, counters,
            float(sm_scale) * _LOG2E, int(window), block_table.shape[1] * page, num_pages, B,
            *q.stride()[:3], *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
            *kbs, *vbs, *out.stride()[:3],
            S=S, GROUP=g, HKV=Hkv, D=D, PAGE=page,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_S=cfg["BLOCK_S"],
            NUM_M_BLOCKS=cfg["NUM_M_BLOCKS"], NUM_SPLITS=ns,
            HAS_BLOCK=has_block, HAS_WINDOW=window > 0, IS_FP8=is_fp8, HAS_LSE=lse is not None,
            MASK_MODE=2 if mask_bits is not None else int(bool(causal)), MASK_W=(S + 31) // 32,
            KV_VEC=kv_vec(k_cache, v_cache), **tma_args,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
        )
