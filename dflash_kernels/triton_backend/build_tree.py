"""build_tree in Triton: two launches, fixed work for given (B, N, S, top_k),
no host synchronisation.

1. ``_build_tree_topk_kernel``, grid ``(B * (S-1), splits)``: one pass over a
   slice of one row of draft logits. It keeps the slice's ``top_k`` candidates
   as int64 keys (orderable fp32 logit in the high word, ``2^31 - 1 - id`` in
   the low word: unique, and a larger key is a larger logit, then a lower id)
   in an unsorted register list, touched only when a tile holds a key above
   the list's minimum (after the first tiles almost never), and the online
   ``max`` / ``sum(exp)`` of the scaled logits plus the count of +inf ones.
2. ``_build_tree_select_kernel``, grid ``(B,)``: merges the splits of each row
   (``top_k`` max extractions over ``splits * top_k`` keys; the log-sum-exp
   from the partial sums), then the best-first selection. Children of a slot
   are scored in rank order, and a lower rank never scores below a higher one,
   so the frontier holds one key per slot (its next unchosen child: score in
   the high word, SPEC's tie code in the low word) and each of the ``N - 1``
   steps is one max over ``N`` keys plus three table lookups.

Edge values as the reference (``reference/build_tree.py``, docs/tree.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import launch
from .._rules import SAMPLING_EPS
from ._common import cdiv, next_pow2, num_sms, on_device

import torch

MIN_KEY = tl.constexpr(-(2 ** 63))     # below every real key
MAX_KEY = tl.constexpr(2 ** 63 - 1)


@triton.jit
def _ord(x):
    """fp32 -> int32 with the same order (-0.0 taken as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _unord(o):
    bits = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key(score, code):
    return (_ord(score).to(tl.int64) << 32) | (0x7FFFFFFF - code).to(tl.int64)


@triton.jit
def _inv_temperature(temp_ptr, b, HAS_T: tl.constexpr, EPS: tl.constexpr):
    if HAS_T:
        t = tl.load(temp_ptr + b)
        # NaN fails the comparison: it counts as tiny, like the reference.
        return tl.math.div_rn(1.0, tl.where(t >= EPS, t, EPS))
    return 1.0


@triton.jit
def _build_tree_topk_kernel(x_ptr, stride_b, stride_d, D, V, chunk, temp_ptr, keys_ptr,
                            stats_ptr, k, HAS_T: tl.constexpr, EPS: tl.constexpr,
                            KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    splits = tl.num_programs(1)
    b = row // D
    base = x_ptr + b.to(tl.int64) * stride_b + (row % D).to(tl.int64) * stride_d
    inv_t = _inv_temperature(temp_ptr, b, HAS_T, EPS)
    j = tl.arange(0, KP)
    # Distinct placeholders below every real key; slots past k never leave.
    lst = tl.where(j < k, MIN_KEY + j.to(tl.int64), MAX_KEY)
    lst_min = tl.min(lst, axis=0)
    # Per tile, one fp32 max across the CTA; the int64 keys are formed only for a
    # tile whose max reaches the list's minimum (after the first tiles, rarely).
    # z is monotone in x, so the tile's largest finite z is max(x) / T unless that
    # is +inf (then, rarely, the +inf ones are counted and dropped from the sums);
    # the exp-sums stay per thread (relative to the shared running max).
    m = float("-inf")
    s = tl.zeros((BLOCK,), tl.float32)
    cnt = 0
    start = sp * chunk
    end = tl.minimum(start + chunk, V)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        msk = idx < end
        x = tl.load(base + idx, mask=msk, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        x_max = tl.max(x, axis=0)
        z = x * inv_t
        z_top = x_max * inv_t
        if z_top == float("inf"):
            pinf = z == float("inf")
            cnt += tl.sum(pinf.to(tl.int32), axis=0)
            z = tl.where(pinf, float("-inf"), z)
            z_top = tl.max(z, axis=0)
        m_new = tl.maximum(m, z_top)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.exp(z - m_ref)
        m = m_new
        if _ord(x_max) >= (lst_min >> 32).to(tl.int32):
            key = (_ord(x).to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)
            key = tl.where(msk, key, MIN_KEY)
            top = tl.max(key, axis=0)
            while top > lst_min:
                lst = tl.where(lst == lst_min, top, lst)
                lst_min = tl.min(lst, axis=0)
                key = tl.where(key == top, MIN_KEY, key)
                top = tl.max(key, axis=0)
    out = (row.to(tl.int64) * splits + sp)
    tl.store(keys_ptr + out * KP + j, lst)
    tl.store(stats_ptr + out * 3 + 0, m)
    tl.store(stats_ptr + out * 3 + 1, tl.sum(s, axis=0))
    tl.store(stats_ptr + out * 3 + 2, cnt.to(tl.float32))


@triton.jit
def _build_tree_select_kernel(keys_ptr, stats_ptr, temp_ptr, tbl_ptr, tok_ptr, par_ptr, num_ptr,
                              dep_ptr, D, N, k, splits, steps, HAS_T: tl.constexpr, EPS: tl.constexpr,
                              KP: tl.constexpr, SPP: tl.constexpr, DKP: tl.constexpr,
                              NP: tl.constexpr):
    b = tl.program_id(0)
    inv_t = _inv_temperature(temp_ptr, b, HAS_T, EPS)
    sp = tl.arange(0, SPP)
    j = tl.arange(0, KP)
    t_idx = tl.arange(0, DKP)
    tbl_lp = tl.full((DKP,), float("-inf"), tl.float32)
    tbl_tok = tl.full((DKP,), -1, tl.int32)
    in_sp = sp < splits
    for d in range(D):
        row = (b.to(tl.int64) * D + d) * splits
        keys = tl.load(keys_ptr + (row + sp[:, None]) * KP + j[None, :],
                       mask=in_sp[:, None] & (j[None, :] < k), other=MIN_KEY)
        m_r = tl.load(stats_ptr + (row + sp) * 3 + 0, mask=in_sp, other=float("-inf"))
        s_r = tl.load(stats_ptr + (row + sp) * 3 + 1, mask=in_sp, other=0.0)
        c_r = tl.load(stats_ptr + (row + sp) * 3 + 2, mask=in_sp, other=0.0)
        mm = tl.max(m_r, axis=0)
        m_ref = tl.where(mm == float("-inf"), 0.0, mm)
        lse = m_ref + tl.log(tl.sum(s_r * tl.exp(m_r - m_ref), axis=0))
        cnt = tl.sum(c_r, axis=0)
        for r in range(k):
            top = tl.max(tl.max(keys, axis=1), axis=0)
            keys = tl.where(keys == top, MIN_KEY, keys)
            tok = 0x7FFFFFFF - (top & 0xFFFFFFFF).to(tl.int32)
            z = _unord((top >> 32).to(tl.int32)) * inv_t
            lp = tl.where(mm == float("-inf"), float("-inf"), z - lse)
            lp = tl.where(cnt > 0, tl.where(z == float("inf"), -tl.log(cnt), float("-inf")), lp)
            hit = t_idx == d * k + r
            tbl_lp = tl.where(hit, lp, tbl_lp)
            tbl_tok = tl.where(hit, tok, tbl_tok)
    # The tables go to a per-request scratch row ([2, DKP + 1] int32: score bits,
    # tokens; the last entry a sentinel) so that each step reads its three entries
    # with scalar loads (L1) instead of three masked reductions over the table.
    tb = tbl_ptr + b.to(tl.int64) * (2 * (DKP + 1))
    tl.store(tb + t_idx, tbl_lp.to(tl.int32, bitcast=True))
    tl.store(tb + (DKP + 1) + t_idx, tbl_tok)
    tl.store(tb + DKP, tl.full((), float("-inf"), tl.float32).to(tl.int32, bitcast=True))
    tl.store(tb + (2 * DKP + 1), -1)
    tl.debug_barrier()
    slot = tl.arange(0, NP)
    head = tl.full((NP,), MIN_KEY, tl.int64)   # each slot's next child
    score = tl.zeros((NP,), tl.float32)
    sdep = tl.zeros((NP,), tl.int32)
    out_tok = tl.full((NP,), -1, tl.int32)
    out_par = tl.full((NP,), -1, tl.int32)
    if D > 0:
        lp0 = tl.load(tb).to(tl.float32, bitcast=True)
        head = tl.where(slot == 0, _key(lp0, tl.full((), KP * NP, tl.int32)), head)
    for step in range(1, steps):
        best = tl.max(head, axis=0)
        ok = best != MIN_KEY
        code = 0x7FFFFFFF - (best & 0xFFFFFFFF).to(tl.int32)
        sc = _unord((best >> 32).to(tl.int32))
        # code = (depth * KP + rank) * NP + parent slot: power-of-two radices.
        p = code % NP
        r = (code // NP) % KP
        d = code // (NP * KP)                # the child's depth, >= 1
        # Entries (d-1)k + r (the token), +1 (the next sibling: index <= Dk), dk (the
        # first grandchild: index <= Dk); out-of-range ones are discarded below.
        e = tl.where(ok, (d - 1) * k + r, DKP)
        tok = tl.load(tb + (DKP + 1) + e)
        lp_sib = tl.load(tb + tl.minimum(e + 1, DKP)).to(tl.float32, bitcast=True)
        lp_c = tl.load(tb + tl.where(ok, tl.minimum(d * k, DKP), DKP)).to(tl.float32, bitcast=True)
        here = (slot == step) & ok
        out_tok = tl.where(here, tok, out_tok)
        out_par = tl.where(here, p, out_par)
        sdep = tl.where(here, d, sdep)
        score = tl.where(here, sc, score)
        # The chosen child's next sibling takes its place in the parent's head.
        r1 = r + 1
        sib = _key(score + lp_sib, (d * KP + r1) * NP + slot)
        head = tl.where((slot == p) & ok, tl.where(r1 < k, sib, MIN_KEY), head)
        # The new slot's best child opens (none at the last depth).
        child = _key(sc + lp_c, ((d + 1) * KP) * NP + step)
        head = tl.where(here, tl.where(d < D, child, MIN_KEY), head)
    in_n = slot < N
    o = b.to(tl.int64) * N + slot
    tl.store(tok_ptr + o, out_tok, mask=in_n)
    tl.store(par_ptr + o, out_par, mask=in_n)
    tl.store(dep_ptr + o, sdep, mask=in_n)
    tl.store(num_ptr + b, 1 + tl.sum((out_par >= 0).to(tl.int32), axis=0))


BLOCK = 1024        # elements per tile: 8 per thread at 4 warps (16-byte loads of bf16)
TOPK_WARPS = 4


def select_warps(N: int) -> int:
    """Warps of the selection CTA. Its N - 1 steps are serial, so per-step latency is
    what counts: one warp reduces with shuffles only (sm_90a SASS: no barrier in the
    step loop, 63 / 91 registers at N 64 / 256), where two or more warps add 8
    barriers per step for the cross-warp reductions. Past 256 slots one warp would
    hold too many registers per thread."""
    return 1 if N <= 256 else 8


def split(ctas, B, D, V, block):
    """(splits, chunk) of each draft row: about ``ctas`` CTAs in all (two per SM;
    host-known sizes only), at most 64 splits, whole tiles per split."""
    tiles = cdiv(V, block)
    want = cdiv(ctas, max(1, B * D))
    chunk = cdiv(tiles, max(1, min(want, tiles, 64))) * block
    return cdiv(V, chunk), chunk


def _config(dev, B, D, V):
    """(BLOCK, splits, chunk); on the CPU small stand-ins (64-element tiles, 3 splits
    per row) so that the tests exercise the tile loop and the merge."""
    sms = num_sms(dev)
    if sms is None:
        return (64,) + split(3 * B * D, B, D, V, 64)
    return (BLOCK,) + split(2 * sms, B, D, V, BLOCK)


def build_tree(draft_logits, top_k, temperature, tree_tokens, parents, num_nodes, depth) -> None:
    """Writes the DraftTree of ``draft_logits`` (``[B, S-1, V]``, last dim
    contiguous) into dense outputs; ``temperature`` fp32 ``[B]`` or None."""
    B, D, V = draft_logits.shape
    N = tree_tokens.shape[1]
    if B == 0:
        return
    dev = draft_logits.device
    k = int(top_k)
    KP = max(2, next_pow2(k))
    block, splits, chunk = _config(dev, B, D, V)
    keys = torch.empty((max(1, B * D), splits, KP), dtype=torch.int64, device=dev)
    stats = torch.empty((max(1, B * D), splits, 3), dtype=torch.float32, device=dev)
    DKP = max(2, next_pow2(max(1, D * k)))
    tbl = torch.empty((B, 2, DKP + 1), dtype=torch.int32, device=dev)
    has_t = temperature is not None
    temp = temperature if has_t else stats
    with on_device(dev):
        if D > 0:
            launch(_build_tree_topk_kernel, (B * D, splits),
                draft_logits, draft_logits.stride(0), draft_logits.stride(1), D, V, chunk, temp,
                keys, stats, k, HAS_T=has_t, EPS=SAMPLING_EPS, KP=KP, BLOCK=block, num_warps=TOPK_WARPS)
        launch(_build_tree_select_kernel, (B,),
            keys, stats, temp, tbl, tree_tokens, parents, num_nodes, depth, D, N, k, splits, N if D > 0 else 1,
            HAS_T=has_t, EPS=SAMPLING_EPS, KP=KP, SPP=max(2, next_pow2(splits)),
            DKP=DKP, NP=max(2, next_pow2(N)), num_warps=select_warps(N))
