"""verify_chain in Triton: one launch (plus the split search's count and mass
launches at small B x S), no host synchronisation.

The launch, grid ``(B*S rows, n_split)``: each program streams its vocab chunk
once, keeping the running argmax (greedy rows) or the keyed Gumbel-max of
``logit * (1/T) + g`` (sampled rows, Philox noise made in registers), and,
with ``draft_probs``, the online max / sum-exp of the scaled logits. It
writes one (value, index, max, sum) partial per (row, split). A sampled row
with top-k / top-p is handled whole by its split-0 program: a K-way search
for the threshold on an order-preserving integer key (the scaled fp32 logit's,
or a bf16 / fp16 logit's own 16-bit pattern: :func:`_key_range`); each pass
over the row evaluates KWAY = 16 candidate thresholds at once: each thread
loads 8 contiguous logits per tile in one 16-byte load and adds them into its
own 16 counts or int64 fixed-point masses (the contract's, docs/DESIGN.md), in
registers, with no barrier in the element loop; the lanes are summed after the
row; the pass keeps one of 16 buckets: at most SEARCH_PASSES (4 for 16-bit
keys, 8 for fp32) passes for top-k, whose first pass also gives the row max,
and as many for top-p, whose first pass also gives the normaliser; top-p alone
adds one max pass), then the Gumbel-max pass over the kept set; its other
splits write neutral partials. At small B x S (use_split_search) the passes
run as launches over every split instead (_search_count_kernel,
_search_mass_kernel: integer partials, the same thresholds) and every split
streams its chunk.

The finish (``_finish_request``), run by the program that arrives last at its
request's counter (an acq_rel atomic after the partials are stored): reduce
the partials (lowest index on ties), walk the drafts (point mass, or the
``draft_probs`` rule with ``p(x)`` from the row's max / sum and the logit of
x), sample the residual ``max(p - q, 0)`` of the first rejected row by
streaming that one row, and write accept_len / out_tokens / bonus /
new_seq_lens. ``FOLD_FINISH = False`` (tests) launches it as a second kernel
instead, grid ``(B,)``, as before the fold.

Noise: :mod:`.noise`, bit-identical to :mod:`dflash_kernels.noise`. See
docs/verify_chain.md for passes and bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._rules import RESIDUAL_EPS, SAMPLING_EPS
from . import noise as tnoise
from ._launch import launch
from ._common import _counters, cdiv, next_pow2, num_sms, on_device

_SAMPLING_EPS = tl.constexpr(SAMPLING_EPS)
_RESIDUAL_EPS = tl.constexpr(RESIDUAL_EPS)


# Above every fp32 Gumbel value -log(-log(u)): u <= 1 - 2**-24 gives g ~= 16.636 (an ulp
# or two of log error moves it by ~1e-6), so s + GUMBEL_MAX bounds any score s + g.
GUMBEL_MAX = tl.constexpr(17.0)

# Contiguous elements per thread of the threshold search's tiles (8 bf16: one 16-byte load;
# _columns splits exactly 8).
_SEARCH_VEC = tl.constexpr(8)


@triton.jit
def _key_of(x):
    """Order-preserving int64 key of an fp32 value (not NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


# The threshold search's key spaces (KEYDT, from the logits dtype: key_space). 0 (fp32
# logits): the order-preserving key of the scaled fp32 logit. 1 / 2 (bf16 / fp16 logits):
# the key of the logit's own 16-bit pattern, scaled when compared. Scaling by 1/T > 0
# rounds monotonically, so every order statistic of the scaled row is the scaled order
# statistic of the logits: the same thresholds from 65,282 (bf16) or 63,490 (fp16) keys,
# 4 passes of 16 candidates instead of 8 over fp32's 2**32.
_KEY_LO = tl.constexpr(-2139095041)     # _key_of(-inf)
_KEY_HI = tl.constexpr(2139095040)      # _key_of(+inf)
_KEY16_LO_BF16 = tl.constexpr(-32641)   # bf16 -inf 0xFF80: -1 - 0x7F80
_KEY16_HI_BF16 = tl.constexpr(32640)    # bf16 +inf 0x7F80
_KEY16_LO_FP16 = tl.constexpr(-31745)   # fp16 -inf 0xFC00: -1 - 0x7C00
_KEY16_HI_FP16 = tl.constexpr(31744)    # fp16 +inf 0x7C00


@triton.jit
def _key_range(KEYDT: tl.constexpr):
    """(key of -inf, key of +inf) in the search's key space (int64 scalars)."""
    if KEYDT == 1:
        lo = tl.full((), _KEY16_LO_BF16, tl.int64)
        hi = tl.full((), _KEY16_HI_BF16, tl.int64)
    elif KEYDT == 2:
        lo = tl.full((), _KEY16_LO_FP16, tl.int64)
        hi = tl.full((), _KEY16_HI_FP16, tl.int64)
    else:
        lo = tl.full((), _KEY_LO, tl.int64)
        hi = tl.full((), _KEY_HI, tl.int64)
    return lo, hi


@triton.jit
def _cand(key, inv_t, KEYDT: tl.constexpr):
    """The scaled fp32 threshold of a search key (:func:`_key_range`'s spaces)."""
    k = key.to(tl.int32)
    if KEYDT == 0:
        c = (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    else:
        b = k ^ ((k >> 15) & 0x7FFF)        # the sign-extended 16-bit pattern
        if KEYDT == 1:
            x = (b << 16).to(tl.float32, bitcast=True)
        else:
            x = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        c = _scale(x, inv_t)
    return c


@triton.jit
def _threshold(lo, inv_t, KEYDT: tl.constexpr):
    """The kept set's scaled threshold from the search's final key: -0.0 written as +0.0
    (the packed count keys -0.0 below +0.0; the same kept set, the compare path's bits)."""
    return _cand(lo, inv_t, KEYDT) + 0.0


@triton.jit
def _topp_hi(lo, m, KEYDT: tl.constexpr):
    """Top of top-p's search range above ``lo``: the key of the kept max m (fp32 keys) or
    of +inf (16-bit keys: the logit of m is not known); ``lo`` (nothing to search) when the
    row has no finite kept logit."""
    if KEYDT == 0:
        hi = _key_of(m)
    else:
        lo_, hi = _key_range(KEYDT)
    return tl.where(m > float("-inf"), hi, lo)


@triton.jit
def _scale(x, inv_t):
    """``x * inv_t`` under the edge rules (docs/DESIGN.md): NaN logits and NaN
    products (``-inf * 0`` at T = +inf) as -inf, +inf logits stay +inf. A +inf
    score then wins every Gumbel-max and threshold (lowest id on ties): the row
    is a point mass on its lowest +inf id, as in the reference."""
    x = tl.where(x != x, float("-inf"), x)
    s = tl.where(x == float("inf"), x, x * inv_t)
    return tl.where(s != s, float("-inf"), s)


@triton.jit
def _temperature(temp_ptr, b):
    """(sampled, 1/T) of request b: sampled iff T >= SAMPLING_EPS (NaN: greedy)."""
    t = tl.load(temp_ptr + b)
    sampled = t >= _SAMPLING_EPS
    return sampled, tl.where(sampled, tl.math.div_rn(1.0, tl.where(sampled, t, 1.0)), 1.0)


@triton.jit
def _load_scaled(row_ptr, offs, end, inv_t):
    """Scaled fp32 logits (:func:`_scale`), lanes past ``end`` as -inf."""
    x = tl.load(row_ptr + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
    return _scale(x, inv_t)


@triton.jit
def _row_max(row_ptr, V, inv_t, BLOCK: tl.constexpr, start=0):
    acc = tl.full((BLOCK,), float("-inf"), tl.float32)
    for off in range(start, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, _load_scaled(row_ptr, offs, V, inv_t))
    return tl.max(acc, axis=0)


@triton.jit
def _search_tile(off, BLOCK: tl.constexpr):
    """Offsets of a search tile as ``[8, BLOCK // 8]``: column r holds the 8 contiguous
    elements ``off + 8r .. off + 8r + 7``. Triton's default layout of that shape gives each
    thread whole columns, which the coalescer keeps (one 16-byte load of bf16 per thread)."""
    r = tl.arange(0, BLOCK // _SEARCH_VEC)
    c = tl.arange(0, _SEARCH_VEC)
    return off + r[None, :] * _SEARCH_VEC + c[:, None]


@triton.jit
def _columns(x):
    """The 8 rows of a tile ``x [8, R]`` as 8 tensors ``[R]``, in element order. Each thread
    holds whole columns, so the transpose, reshape and splits move no data (no shared memory,
    no barrier)."""
    y = tl.reshape(tl.trans(x), (x.shape[1], 2, 2, 2))   # element c = 4i + 2j + k at [., i, j, k]
    k0, k1 = tl.split(y)
    k0j0, k0j1 = tl.split(k0)
    k1j0, k1j1 = tl.split(k1)
    x0, x4 = tl.split(k0j0)
    x2, x6 = tl.split(k0j1)
    x1, x5 = tl.split(k1j0)
    x3, x7 = tl.split(k1j1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _add_columns(acc, s, w, c2):
    """``acc [K, R] += w`` where ``s >= c2`` for each of the tile's 8 columns
    ``s, w [8, R]`` (:func:`_columns`), one element after the other in element
    order: every candidate adds the same terms in the same order."""
    s0, s1, s2, s3, s4, s5, s6, s7 = _columns(s)
    w0, w1, w2, w3, w4, w5, w6, w7 = _columns(w)
    acc += tl.where(s0[None, :] >= c2, w0[None, :], 0)
    acc += tl.where(s1[None, :] >= c2, w1[None, :], 0)
    acc += tl.where(s2[None, :] >= c2, w2[None, :], 0)
    acc += tl.where(s3[None, :] >= c2, w3[None, :], 0)
    acc += tl.where(s4[None, :] >= c2, w4[None, :], 0)
    acc += tl.where(s5[None, :] >= c2, w5[None, :], 0)
    acc += tl.where(s6[None, :] >= c2, w6[None, :], 0)
    acc += tl.where(s7[None, :] >= c2, w7[None, :], 0)
    return acc


# round(exp(s - m) * 2**40) in fp32 (the reference's token_mass): 2**40 scales exactly, and
# below 2**23 adding 2**23 leaves no fraction bit, so the sum rounds half to even as
# torch.round does (the launches disable fp fusion; nothing reassociates the two adds).
_MASS_SCALE = tl.constexpr(1099511627776.0)
_ROUND_HALF_EVEN = tl.constexpr(8388608.0)


@triton.jit
def _mass_of(s, m):
    """int64 fixed-point mass ``round(exp(s - m) * 2**40)`` of scaled logits s (0 for -inf;
    s = m = +inf, a +inf row's point mass, as exp(0)). A function of (s, m) alone, so its
    sums are exact in any order and over any split of the row."""
    d = s - m
    e = tl.exp(tl.where(d != d, 0.0, d)) * _MASS_SCALE
    e = tl.where(e < _ROUND_HALF_EVEN, (e + _ROUND_HALF_EVEN) - _ROUND_HALF_EVEN, e)
    return e.to(tl.int64)


@triton.jit
def _top_p_target(tp, z):
    """int64 mass top-p must reach (reference top_p_target): ``clamp(ceil(tp * z), 1, z)``
    in fp64, 1 when z = 0."""
    t = tl.math.ceil(tp.to(tl.float64) * z.to(tl.float64))
    t = tl.where(z > 0, tl.maximum(t, 1.0), 1.0).to(tl.int64)
    return tl.where(z > 0, tl.minimum(t, z), 1)


@triton.jit
def _key16(x, KEYDT: tl.constexpr):
    """int32 key of bf16 (KEYDT 1) / fp16 (KEYDT 2) logits ``x`` (fp32 after the load) in
    :func:`_key_range`'s space, NaN as -inf: the pattern :func:`_cand` maps back."""
    x = tl.where(x != x, float("-inf"), x)
    if KEYDT == 1:
        b = x.to(tl.int32, bitcast=True) >> 16     # bf16 -> fp32 is a 16-bit shift
    else:
        b = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return b ^ ((b >> 15) & 0x7FFF)


@triton.jit
def _shift(lo, hi):
    """log2 of a pass's bucket width: the smallest multiple of 4 with (hi - lo) >> sh < 16
    (KWAY = 16 power-of-two buckets from lo; int64 scalar)."""
    w = hi - lo
    sh = tl.full((), 0, tl.int64)
    for _ in tl.static_range(8):
        sh = tl.where((w >> sh) >= 16, sh + 4, sh)
    return sh


@triton.jit
def _kway_hist(row_ptr, V, inv_t, lo, hi, K: tl.constexpr, BLOCK: tl.constexpr,
               KEYDT: tl.constexpr, start=0):
    """Per candidate ``lo + j << sh`` (:func:`_candidates`): #(key >= it); and the row's
    max scaled logit.

    A packed histogram instead of K compares per element: each element in [lo, +inf)
    adds ``1 << 4 (d % 8)`` (d its bucket, keys above hi in bucket 15) into one of two
    int32 per thread column (d < 8 or not); a tile's 8 elements per column keep every
    4-bit field <= 8; the fields are spread into four 8-bit-field words (<= 31 tiles x 8)
    and flushed into K int32 counts every 31 tiles. int32 words, not int64: the rows
    kernel's register budget at unaligned rows (tests/test_verify_tree.py). Integer
    counts: exact in any order and over any split."""
    R: tl.constexpr = BLOCK // _SEARCH_VEC
    GROUP: tl.constexpr = 31 * BLOCK
    sh = _shift(lo, hi).to(tl.int32)
    lo32 = lo.to(tl.int32)
    j = tl.arange(0, K)
    byte = ((j % 8) // 2) * 8
    hist = tl.zeros((K,), tl.int32)
    mx = tl.full((R,), float("-inf"), tl.float32)
    key_lo, _ = _key_range(KEYDT)
    mk = tl.full((R,), 0, tl.int32) + key_lo.to(tl.int32)
    for g in range(start, V, GROUP):   # [start, V): V is the chunk's end in a split pass
        ev0 = tl.zeros((R,), tl.int32)
        od0 = tl.zeros((R,), tl.int32)
        ev1 = tl.zeros((R,), tl.int32)
        od1 = tl.zeros((R,), tl.int32)
        for off in range(g, tl.minimum(g + GROUP, V), BLOCK):
            offs = _search_tile(off, BLOCK)
            inb = offs < V
            x = tl.load(row_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
            if KEYDT == 0:      # keys of the scaled values; int64: key - lo can pass 2**31,
                s = _scale(x, inv_t)        # so the bucket is clamped before it narrows
                mx = tl.maximum(mx, tl.max(s, axis=0))
                d = tl.minimum(tl.maximum((_key_of(s) - lo) >> sh, -1), 15).to(tl.int32)
            else:               # the logits' own patterns (scaling is monotone)
                key = _key16(x, KEYDT)
                mk = tl.maximum(mk, tl.max(key, axis=0))
                d = tl.minimum((key - lo32) >> sh, 15)
            ok = inb & (d >= 0)     # keys below lo count for no candidate
            bit = tl.where(ok, 1 << ((d * 4) & 31), 0)
            t0 = tl.sum(tl.where(d < 8, bit, 0), axis=0)
            t1 = tl.sum(tl.where(d < 8, 0, bit), axis=0)
            ev0 += t0 & 0x0F0F0F0F
            od0 += (t0 >> 4) & 0x0F0F0F0F
            ev1 += t1 & 0x0F0F0F0F
            od1 += (t1 >> 4) & 0x0F0F0F0F
        w0 = tl.where((j % 2 == 0)[:, None], ev0[None, :], od0[None, :])
        w1 = tl.where((j % 2 == 0)[:, None], ev1[None, :], od1[None, :])
        src = tl.where((j < 8)[:, None], w0, w1)
        hist += tl.sum((src >> byte[:, None]) & 0xFF, axis=1)
    ge = tl.sum(tl.where(j[None, :] >= j[:, None], hist[None, :], 0), axis=1)
    if KEYDT == 0:
        m = tl.max(mx, axis=0)
    else:               # the max scaled logit is the scaled max logit
        m = _cand(tl.max(mk, axis=0).to(tl.int64), inv_t, KEYDT)
    return ge, m


@triton.jit
def _kway_mass(row_ptr, V, inv_t, cand, m, K: tl.constexpr, BLOCK: tl.constexpr,
               FULL: tl.constexpr = False, start=0):
    """Per candidate threshold ``cand [K]``: the int64 mass (:func:`_mass_of`, m the finite
    row max) of s >= cand over [start, V); and (FULL) the mass of all of it, else 0.
    Integer sums: the same bits in any order, in one program or summed over splits."""
    c2 = cand[:, None]
    acc = tl.zeros((K, BLOCK // _SEARCH_VEC), tl.int64)
    full = tl.zeros((BLOCK // _SEARCH_VEC,), tl.int64)
    for off in range(start, V, BLOCK):
        offs = _search_tile(off, BLOCK)
        s = _load_scaled(row_ptr, offs, V, inv_t)      # lanes past V: -inf, mass 0
        w = _mass_of(s, m)
        acc = _add_columns(acc, s, w, c2)
        if FULL:
            w0, w1, w2, w3, w4, w5, w6, w7 = _columns(w)
            full = full + w0 + w1 + w2 + w3 + w4 + w5 + w6 + w7
    return tl.sum(acc, axis=1), tl.sum(full, axis=0)


@triton.jit
def _compact(row_ptr, V, inv_t, c0, m, ws_ptr, ctr_ptr, CAP: tl.constexpr,
             BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Copies the logits whose scaled value is >= c0 (top-k's kept set) to
    ``ws_ptr[0 : min(n, CAP)]``, then -inf up to the next multiple of 8 (mass 0; the mass
    passes keep their 16-byte loads): ``(n rounded up to 8, the int64 mass of the whole row
    if FULL else 0)``. The raw logits, so a mass pass scales them to the same bits.

    Slots come from a relaxed atomic counter (``ctr_ptr``, int32, zeroed here): no scan,
    no barrier per tile. Their order varies from run to run; the integer mass sums over
    them do not."""
    tl.store(ctr_ptr, 0)
    tl.debug_barrier()
    zf = tl.zeros((BLOCK // _SEARCH_VEC,), tl.int64)
    for off in range(0, V, BLOCK):
        offs = _search_tile(off, BLOCK)
        inb = offs < V
        x = tl.load(row_ptr + offs, mask=inb, other=float("-inf"))
        s = _scale(x.to(tl.float32), inv_t)
        keep = inb & (s >= c0)
        pos = tl.atomic_add(ctr_ptr + tl.zeros_like(offs), 1, mask=keep, sem="relaxed")
        tl.store(ws_ptr + pos, x, mask=keep & (pos < CAP))
        if FULL:
            zf += tl.sum(_mass_of(s, m), axis=0)    # -inf lanes (and past V): mass 0
    tl.debug_barrier()
    n = tl.atomic_add(ctr_ptr, 0, sem="relaxed")    # the count, at the atomics' level
    pad = n + tl.arange(0, 8)
    n8 = ((n + 7) >> 3) << 3
    tl.store(ws_ptr + pad, tl.full((8,), float("-inf"), tl.float32).to(ws_ptr.dtype.element_ty),
             mask=(pad < n8) & (pad < CAP))
    return n8, tl.sum(zf, axis=0)


@triton.jit
def _candidates(lo, hi, inv_t, KWAY: tl.constexpr, KEYDT: tl.constexpr):
    """A pass's KWAY scaled candidate thresholds: [lo, hi] in KWAY buckets from lo."""
    slot = tl.arange(0, KWAY).to(tl.int64)
    step = tl.full((), 1, tl.int64) << _shift(lo, hi)
    return _cand(tl.minimum(lo + slot * step, hi), inv_t, KEYDT)


@triton.jit
def _next_range(lo, hi, ok, KWAY: tl.constexpr):
    """The bucket after a pass: the highest slot whose candidate passed (``ok [KWAY]``;
    slot 0, lo itself, when none did)."""
    slot = tl.arange(0, KWAY).to(tl.int64)
    sh = _shift(lo, hi)
    step = tl.full((), 1, tl.int64) << sh
    last = (hi - lo) >> sh  # the slots whose start lo + slot * step <= hi
    lo = lo + tl.max(tl.where(ok & (slot <= last), slot, 0), axis=0) * step
    return lo, tl.minimum(lo + step - 1, hi)


@triton.jit
def _mass_step(lo, hi, mass, z_full, target, first, tp, k_on, KWAY: tl.constexpr,
               JOINT: tl.constexpr):
    """One top-p pass's step from its candidates' masses: (lo, hi, target). The first pass
    (``first``) fixes the target from slot 0's mass (lo: the top-k set's, or the row's) or,
    JOINT with top-k on, from the whole row's mass ``z_full``; a JOINT target the top-k set
    already meets ends the search at lo (the nucleus holds the top-k set)."""
    slot = tl.arange(0, KWAY)
    z0 = tl.sum(tl.where(slot == 0, mass, 0), axis=0)
    whole = False
    if JOINT:
        t_full = _top_p_target(tp, z_full)
        target = tl.where(first, tl.where(k_on, t_full, _top_p_target(tp, z0)), target)
        whole = first & k_on & (t_full >= z0)
    else:
        target = tl.where(first, _top_p_target(tp, z0), target)
    lo_next, hi_next = _next_range(lo, hi, mass >= target, KWAY)
    return tl.where(whole, lo, lo_next), tl.where(whole, lo, hi_next), target


@triton.jit
def _max2(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _update_best(score, offs, best_v, best_i):
    # Strictly greater: each lane sees increasing indices, so ties keep the lowest.
    upd = score > best_v
    return tl.where(upd, score, best_v), tl.where(upd, offs, best_i)


@triton.jit
def _stream_best(row_ptr, start, end, inv_t, thr, k0, k1, p_lo, p_hi,
                 SAMPLED: tl.constexpr, NEED_MZ: tl.constexpr, BLOCK: tl.constexpr,
                 PRUNE: tl.constexpr = True):
    """Best (score, index) over [start, end) and the max / sum-exp of kept scaled logits.

    PRUNE (sampled): a tile whose largest kept scaled logit plus GUMBEL_MAX (above any
    noise value) is below the best score so far cannot hold the winner: its Philox and
    logs are skipped. fp32 addition rounds monotonically, so every skipped score is
    strictly below the final best and the result is bit-identical to the unpruned loop.
    """
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = start + tl.arange(0, BLOCK)
    m_run = tl.full((), float("-inf"), tl.float32)
    z_run = tl.full((), 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        s = _load_scaled(row_ptr, offs, end, inv_t)
        if SAMPLED:
            kept = s >= thr
            sk = tl.where(kept, s, float("-inf"))
            if NEED_MZ:
                m_new = tl.maximum(m_run, tl.max(sk, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                z_run = z_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(sk - m_safe), axis=0)
                m_run = m_new
            live = True
            if PRUNE:
                # One CTA-wide reduction of both maxima (one barrier round per tile); a -inf
                # best so far (nothing finite yet) never skips.
                top, best = tl.reduce((sk, best_v), 0, _max2)
                live = top + GUMBEL_MAX >= best
            if live:
                g = tnoise.bits_to_gumbel(tnoise.random_bits(k0, k1, offs, p_lo, p_hi, 0))
                best_v, best_i = _update_best(tl.where(kept, s + g, float("-inf")), offs,
                                              best_v, best_i)
        else:
            best_v, best_i = _update_best(s, offs, best_v, best_i)
    bv = tl.max(best_v, axis=0)
    bi = tl.min(tl.where(best_v == bv, best_i, 2147483647), axis=0)
    return bv, bi, m_run, z_run


@triton.jit
def _ragged_rows(cu_ptr, b, T, S):
    """(first flat row, drafts) of request b of a ragged batch, both int64: the
    reference's ``ragged_rows`` clamps, so any cu_rows values stay inside [0, T)."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), T - 1)
    nd = tl.load(cu_ptr + b + 1).to(tl.int64) - start - 1
    nd = tl.maximum(tl.minimum(nd, tl.minimum(S - 1, T - 1 - start)), 0)
    return start, nd


@triton.jit
def _tree_depth(par_row, node):
    """Depth of a tree node: the steps of its parent chain to the root (slot 0)."""
    d = node * 0
    while node > 0:
        nxt = tl.load(par_row + node)
        # A used node's parent lies in [0, node); anything else (an unused slot) ends the walk,
        # so it stops within ``node`` steps whatever the values.
        node = tl.where((nxt >= 0) & (nxt < node), nxt, 0)
        d += 1
    return d


@triton.jit
def _filters(topk_ptr, topp_ptr, b, V, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr):
    """(k, top_p, top-k on, top-p on) of request b (on: the filter removes something)."""
    k = 0
    tp = 1.0
    k_on = False
    p_on = False
    if HAS_TOPK:
        k = tl.load(topk_ptr + b)
        k_on = (k > 0) & (k < V)
    if HAS_TOPP:
        tp = tl.load(topp_ptr + b)
        p_on = tp < 1.0
    return k, tp, k_on, p_on


@triton.jit
def _split_max(mx_ptr, r, NSPLIT, NSPLIT_P2: tl.constexpr):
    """Split search: row r's max scaled logit, from the first count pass's per-split maxima."""
    o = tl.arange(0, NSPLIT_P2)
    return tl.max(tl.load(mx_ptr + r * NSPLIT + o, mask=o < NSPLIT, other=float("-inf")),
                  axis=0)


@triton.jit
def _count_state(st_ptr, cnt_ptr, r, t, ROWS, NSPLIT, k, KWAY: tl.constexpr,
                 NSPLIT_P2: tl.constexpr):
    """Split top-k search: the row's (lo, hi) after count passes 0 .. t-1 (t >= 1).

    State t-1 (written by pass t-1's split 0) plus pass t-1's per-split counts, summed in
    split order (int32: exact in any order), so every program derives the same state and
    the same step as the single-program search (:func:`_verify_rows_kernel`)."""
    so = (t - 1) * ROWS + r
    lo = tl.load(st_ptr + 2 * so)
    hi = tl.load(st_ptr + 2 * so + 1)
    if lo < hi:
        o = tl.arange(0, NSPLIT_P2)
        po = so * NSPLIT + o
        c = tl.load(cnt_ptr + po[:, None] * KWAY + tl.arange(0, KWAY)[None, :],
                    mask=(o < NSPLIT)[:, None], other=0)
        lo, hi = _next_range(lo, hi, tl.sum(c, axis=0) >= k, KWAY)
    return lo, hi


@triton.jit
def _mass_state(st_ptr, cnt_ptr, mx_ptr, pst_ptr, pms_ptr, pzf_ptr, r, u, NCOUNT, ROWS,
                NSPLIT, k, k_on, tp, KEYDT: tl.constexpr, KWAY: tl.constexpr,
                NSPLIT_P2: tl.constexpr, JOINT: tl.constexpr):
    """Split top-p search: the row's (lo, hi, target, m) after mass passes 0 .. u-1.

    u = 0: lo is top-k's threshold key (after its NCOUNT count passes) or the key of
    -inf, hi :func:`_topp_hi`, m the row max from the first count pass. Later: state u-1
    (pass u-1's split 0 wrote it) stepped by pass u-1's per-split int64 masses, summed
    exactly, so every program and the single-program search take the same steps."""
    m = _split_max(mx_ptr, r, NSPLIT, NSPLIT_P2)
    target = tl.full((), 0, tl.int64)
    if u == 0:
        lo, hi = _key_range(KEYDT)
        if k_on:
            lo, hi = _count_state(st_ptr, cnt_ptr, r, NCOUNT, ROWS, NSPLIT, k, KWAY, NSPLIT_P2)
        hi = _topp_hi(lo, m, KEYDT)
    else:
        so = (u - 1) * ROWS + r
        lo = tl.load(pst_ptr + 3 * so)
        hi = tl.load(pst_ptr + 3 * so + 1)
        target = tl.load(pst_ptr + 3 * so + 2)
        if lo < hi:
            o = tl.arange(0, NSPLIT_P2)
            po = so * NSPLIT + o
            mass = tl.sum(tl.load(pms_ptr + po[:, None] * KWAY + tl.arange(0, KWAY)[None, :],
                                  mask=(o < NSPLIT)[:, None], other=0), axis=0)
            z_full = tl.full((), 0, tl.int64)
            if JOINT:
                z_full = tl.sum(tl.load(pzf_ptr + po, mask=o < NSPLIT, other=0), axis=0)
            lo, hi, target = _mass_step(lo, hi, mass, z_full, target, u == 1, tp, k_on, KWAY,
                                        JOINT)
    return lo, hi, target, m


@triton.jit
def _program_row(logits_ptr, stride_lb, stride_ls, r, sp, S, V, CHUNK, RAGGED: tl.constexpr,
                 cu_ptr, T):
    """Program (row r, split sp) of a (rows, NSPLIT) grid: ``(b, j, start, end, live,
    row_ptr)``, its request and block row, its vocabulary chunk [start, end), whether the
    row exists (a ragged request's padding rows do not: their chunk is empty) and the
    row's logits."""
    b = r // S
    j = r - b * S
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, V)
    if RAGGED:
        first, nd_b = _ragged_rows(cu_ptr, b, T, S)
        live = j <= nd_b
        row_ptr = logits_ptr + (first + tl.minimum(j, nd_b)) * stride_ls
        end = tl.where(live, end, start)
    else:
        live = True
        row_ptr = logits_ptr + b.to(tl.int64) * stride_lb + j.to(tl.int64) * stride_ls
    return b, j, start, end, live, row_ptr


@triton.jit
def _search_program(logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, S, V,
                    CHUNK, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
                    RAGGED: tl.constexpr, cu_ptr, T):
    """A split-search program (row r, split sp): ``(r, sp, start, end, row_ptr, 1/T, k, top_p,
    top-k on, top-p on)``, the filters on only for a sampled, live row."""
    r = tl.program_id(0)
    sp = tl.program_id(1)
    b, j, start, end, live, row_ptr = _program_row(logits_ptr, stride_lb, stride_ls, r, sp, S,
                                                   V, CHUNK, RAGGED, cu_ptr, T)
    sampled, inv_t = _temperature(temp_ptr, b)
    k, tp, k_on, p_on = _filters(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
    return r, sp, start, end, row_ptr, inv_t, k, tp, k_on & sampled & live, p_on & sampled & live


@triton.jit
def _search_count_kernel(
    logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, st_ptr, cnt_ptr, mx_ptr,
    t, ROWS, S, V, CHUNK, NSPLIT,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, KEYDT: tl.constexpr, KWAY: tl.constexpr,
    SBLOCK: tl.constexpr, NSPLIT_P2: tl.constexpr,
    RAGGED: tl.constexpr = False, cu_ptr=None, T=1,
):
    # Count pass t of the split search, grid (rows, NSPLIT): a top-k row derives its state
    # after passes < t (_count_state), split 0 records it, and, while lo < hi, the program
    # counts the KWAY candidates over its chunk (partial counts at cnt_ptr). Pass 0 also
    # stores each chunk's max (mx_ptr: the m of the masses), for top-p-only rows too, which
    # do nothing else here. Greedy, unfiltered and ragged padding rows exit at once.
    r, sp, start, end, row_ptr, inv_t, k, tp, k_on, p_on = _search_program(
        logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, S, V, CHUNK,
        HAS_TOPK, HAS_TOPP, RAGGED, cu_ptr, T)
    if k_on:
        if t == 0:
            lo, hi = _key_range(KEYDT)
        else:
            lo, hi = _count_state(st_ptr, cnt_ptr, r, t, ROWS, NSPLIT, k, KWAY, NSPLIT_P2)
        so = t * ROWS + r
        if sp == 0:
            tl.store(st_ptr + 2 * so, lo)
            tl.store(st_ptr + 2 * so + 1, hi)
        if lo < hi:
            cnt, mx = _kway_hist(row_ptr, end, inv_t, lo, hi, KWAY, SBLOCK, KEYDT, start)
            tl.store(cnt_ptr + (so * NSPLIT + sp) * KWAY + tl.arange(0, KWAY), cnt)
            if t == 0:
                tl.store(mx_ptr + r * NSPLIT + sp, mx)
    elif p_on & (t == 0):
        tl.store(mx_ptr + r * NSPLIT + sp, _row_max(row_ptr, end, inv_t, SBLOCK, start))


@triton.jit
def _search_mass_kernel(
    logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, st_ptr, cnt_ptr, mx_ptr,
    pst_ptr, pms_ptr, pzf_ptr, u, NCOUNT, ROWS, S, V, CHUNK, NSPLIT,
    HAS_TOPK: tl.constexpr, KEYDT: tl.constexpr, KWAY: tl.constexpr, SBLOCK: tl.constexpr,
    NSPLIT_P2: tl.constexpr, JOINT: tl.constexpr = False,
    RAGGED: tl.constexpr = False, cu_ptr=None, T=1,
):
    # Mass pass u of the split top-p search, grid (rows, NSPLIT), after the NCOUNT count
    # passes: a top-p row derives its state after mass passes < u (_mass_state), split 0
    # records it (pst_ptr: lo, hi, target), and, while lo < hi, the program sums the KWAY
    # candidates' int64 masses over its chunk (pms_ptr; JOINT: the chunk's whole mass at
    # pzf_ptr). Rows without top-p exit at once.
    r, sp, start, end, row_ptr, inv_t, k, tp, k_on, p_on = _search_program(
        logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, S, V, CHUNK,
        HAS_TOPK, True, RAGGED, cu_ptr, T)
    if p_on:
        lo, hi, target, m = _mass_state(st_ptr, cnt_ptr, mx_ptr, pst_ptr, pms_ptr, pzf_ptr, r,
                                        u, NCOUNT, ROWS, NSPLIT, k, k_on, tp, KEYDT, KWAY,
                                        NSPLIT_P2, JOINT)
        so = u * ROWS + r
        if sp == 0:
            tl.store(pst_ptr + 3 * so, lo)
            tl.store(pst_ptr + 3 * so + 1, hi)
            tl.store(pst_ptr + 3 * so + 2, target)
        if lo < hi:
            cand = _candidates(lo, hi, inv_t, KWAY, KEYDT)
            mass, z_full = _kway_mass(row_ptr, end, inv_t, cand, m, KWAY, SBLOCK, JOINT, start)
            po = so * NSPLIT + sp
            tl.store(pms_ptr + po * KWAY + tl.arange(0, KWAY), mass)
            if JOINT:
                tl.store(pzf_ptr + po, z_full)


@triton.jit
def _verify_rows_kernel(
    logits_ptr, stride_lb, stride_ls, temp_ptr, topk_ptr, topp_ptr, seed_ptr, pos_ptr,
    pval_ptr, pidx_ptr, pm_ptr, pz_ptr, thr_ptr, S, V, CHUNK, NSPLIT,
    HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    NEED_MZ: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr, KWAY: tl.constexpr,
    HAS_TREE: tl.constexpr = False, par_ptr=None, stride_pb=0, PRUNE: tl.constexpr = True,
    RAGGED: tl.constexpr = False, cu_ptr=None, T=1, JOINT: tl.constexpr = False,
    SEARCH_SPLIT: tl.constexpr = False, st_ptr=None, cnt_ptr=None, mx_ptr=None, pst_ptr=None,
    pms_ptr=None, pzf_ptr=None, NCOUNT=0, NMASS=0, NSPLIT_P2: tl.constexpr = 1,
    KEYDT: tl.constexpr = 0,
    FOLD: tl.constexpr = False, arr_ptr=None, bt_ptr=None, stride_tb=0, nd_ptr=None,
    dp_ptr=None, stride_db=0, stride_ds=0, seq_ptr=None, acc_ptr=None, out_ptr=None,
    bonus_ptr=None, nsl_ptr=None, HAS_SEQ: tl.constexpr = False, S_P2: tl.constexpr = 1,
    CAP: tl.constexpr = 0, ws_ptr=None, ctr_ptr=None,
):
    # HAS_TREE (verify_tree): row j is tree node j, whose token sits at position
    # positions[b] + depth(j) + 1 (a chain row is the tree node of depth j).
    # par_ptr: int32 parents [B, S], row stride stride_pb.
    # RAGGED: logits [T, V] (row stride stride_ls); request b's row j is flat row
    # cu_rows[b] + j (cu_ptr, clamped by _ragged_rows); a program past the request's
    # rows streams nothing and writes neutral partials, which the finish kernel never uses.
    # JOINT: top-p's target is top_p times the whole row's mass (SGLang's order).
    # SEARCH_SPLIT: the thresholds come from the split search's NCOUNT count launches
    # (_search_count_kernel: state st_ptr, partials cnt_ptr / mx_ptr) and NMASS mass
    # launches (_search_mass_kernel: state pst_ptr, partials pms_ptr / pzf_ptr); every
    # filtered row then streams its chunk in every split like an unfiltered sampled row.
    # KEYDT: the search's key space (_key_range; key_space(logits.dtype)).
    # FOLD (verify_chain's one launch): the program that arrives last at request b's
    # counter (arr_ptr, int32 [>= B], 0 between launches) runs b's finish (_finish_request:
    # bt_ptr .. nsl_ptr, HAS_SEQ, S_P2 are its arguments; NSPLIT_P2 = next_pow2(NSPLIT);
    # draft_probs iff NEED_MZ).
    # CAP > 0 (single-program search, top-k + top-p): top-p's mass passes read top-k's kept
    # set from the row's CAP-element workspace (ws_ptr, logits dtype, [rows, CAP]) after one
    # compaction pass instead of the whole row, when it fits (docs/verify_chain.md); ctr_ptr:
    # int32 [rows], the compaction's slot counters.
    r = tl.program_id(0)
    sp = tl.program_id(1)
    b, j, start, end, live, row_ptr = _program_row(logits_ptr, stride_lb, stride_ls, r, sp, S,
                                                   V, CHUNK, RAGGED, cu_ptr, T)
    NEG: tl.constexpr = float("-inf")

    bv = tl.full((), NEG, tl.float32)
    bi = start
    m_run = tl.full((), NEG, tl.float32)
    z_run = tl.full((), 0.0, tl.float32)
    thr = tl.full((), NEG, tl.float32)
    if HAS_TEMP:
        sampled, inv_t = _temperature(temp_ptr, b)
        k0, k1 = tnoise.seed_key(tl.load(seed_ptr + b))
        if HAS_TREE:
            depth = _tree_depth(par_ptr + b.to(tl.int64) * stride_pb, j)
        else:
            depth = j
        p_lo, p_hi = tnoise.position_words(tl.load(pos_ptr + b) + depth + 1)
        k, tp, k_on, p_on = _filters(topk_ptr, topp_ptr, b, V, HAS_TOPK, HAS_TOPP)
        if (k_on | p_on) & sampled & live:
            if SEARCH_SPLIT:
                if p_on:
                    lo, hi, target, m = _mass_state(
                        st_ptr, cnt_ptr, mx_ptr, pst_ptr, pms_ptr, pzf_ptr, r, NMASS, NCOUNT,
                        tl.num_programs(0), NSPLIT, k, k_on, tp, KEYDT, KWAY, NSPLIT_P2, JOINT)
                else:
                    lo, hi = _count_state(st_ptr, cnt_ptr, r, NCOUNT, tl.num_programs(0),
                                          NSPLIT, k, KWAY, NSPLIT_P2)
                thr = _threshold(lo, inv_t, KEYDT)
                bv, bi, m_run, z_run = _stream_best(row_ptr, start, end, inv_t, thr, k0, k1,
                                                    p_lo, p_hi, True, NEED_MZ, BLOCK, PRUNE)
            elif sp == 0:
                # Whole row in this program: K-way threshold searches on the search key
                # (each pass splits [lo, hi] into KWAY buckets starting at lo, and keeps
                # the highest bucket whose start passes), then the Gumbel-max.
                m = tl.full((), NEG, tl.float32)
                lo, hi = _key_range(KEYDT)
                if k_on:
                    # No max pass: the first count pass spans every key up to +inf and
                    # yields the row max for top-p on the way.
                    while lo < hi:
                        cnt, mx = _kway_hist(row_ptr, V, inv_t, lo, hi, KWAY, SBLOCK, KEYDT)
                        m = tl.maximum(m, mx)
                        lo, hi = _next_range(lo, hi, cnt >= k, KWAY)
                if p_on:
                    if m == NEG:  # no top-k pass gave it (or an all -inf row: -inf again)
                        m = _row_max(row_ptr, V, inv_t, BLOCK)
                    hi = _topp_hi(lo, m, KEYDT)
                    target = tl.full((), 0, tl.int64)
                    first = True
                    src, n_src = row_ptr, V
                    fits = False
                    zf_c = tl.full((), 0, tl.int64)
                    if CAP > 0:
                        # Every candidate is >= lo's, so the masses count top-k's kept set
                        # only: from the workspace when it holds all of it (else the row).
                        if k_on & (lo < hi):
                            ws = ws_ptr + r.to(tl.int64) * CAP
                            n_c, zf_c = _compact(row_ptr, V, inv_t, _cand(lo, inv_t, KEYDT), m,
                                                 ws, ctr_ptr + r, CAP, SBLOCK, JOINT)
                            fits = n_c <= CAP
                            tl.debug_barrier()  # the workspace's stores before its loads
                            src = tl.where(fits, ws, row_ptr)
                            n_src = tl.where(fits, n_c, V)
                    while lo < hi:
                        cand = _candidates(lo, hi, inv_t, KWAY, KEYDT)
                        mass, z_full = _kway_mass(src, n_src, inv_t, cand, m, KWAY, SBLOCK,
                                                  JOINT)
                        z_full = tl.where(fits, zf_c, z_full)   # JOINT: the whole row's
                        lo, hi, target = _mass_step(lo, hi, mass, z_full, target, first, tp,
                                                    k_on, KWAY, JOINT)
                        first = False
                thr = _threshold(lo, inv_t, KEYDT)
                bv, bi, m_run, z_run = _stream_best(row_ptr, 0, V, inv_t, thr, k0, k1, p_lo, p_hi,
                                                    True, NEED_MZ, BLOCK, PRUNE)
            else:
                bi = 2147483647     # the row is split 0's: neutral partials
        elif sampled:
            bv, bi, m_run, z_run = _stream_best(row_ptr, start, end, inv_t, thr, k0, k1, p_lo,
                                                p_hi, True, NEED_MZ, BLOCK, PRUNE)
        else:
            bv, bi, m_run, z_run = _stream_best(row_ptr, start, end, 1.0, thr, 0, 0, 0, 0,
                                                False, False, BLOCK)
    else:
        bv, bi, m_run, z_run = _stream_best(row_ptr, start, end, 1.0, thr, 0, 0, 0, 0,
                                            False, False, BLOCK)
    o = r * NSPLIT + sp
    tl.store(pval_ptr + o, bv)
    tl.store(pidx_ptr + o, bi)
    if NEED_MZ:
        tl.store(pm_ptr + o, m_run)
        tl.store(pz_ptr + o, z_run)
        if sp == 0:
            tl.store(thr_ptr + r, thr)
    if FOLD:
        # Request b's S * NSPLIT programs each add 1 once their partials are stored; the one
        # that sees S * NSPLIT - 1 arrives last and finishes b (docs/verify_chain.md "One
        # launch"). The bar.sync puts every thread's partial stores before the one thread's
        # acq_rel atomic at GPU scope (its result broadcast): the arrivals' releases and the
        # last one's acquire make every partial of b visible to the finish's loads.
        # The request again, from the partial's index: the b of the row addressing, kept
        # alive across the streaming loops, cost an 8-byte stack frame (compile report).
        bf = o // NSPLIT // S
        tl.debug_barrier()
        arrived = tl.atomic_add(arr_ptr + bf, 1, sem="acq_rel", scope="gpu")
        if arrived == S * NSPLIT - 1:
            _finish_request(bf, logits_ptr, stride_lb, stride_ls, bt_ptr, stride_tb, nd_ptr,
                            temp_ptr, seed_ptr, pos_ptr, dp_ptr, stride_db, stride_ds, seq_ptr,
                            pval_ptr, pidx_ptr, pm_ptr, pz_ptr, thr_ptr, acc_ptr, out_ptr,
                            bonus_ptr, nsl_ptr, S, V, NSPLIT, HAS_TEMP, NEED_MZ, HAS_SEQ,
                            NSPLIT_P2, S_P2, BLOCK, RAGGED, cu_ptr, T)
            # Ready for the next launch on this stream (stream-ordered after this one).
            tl.store(arr_ptr + bf, 0)


@triton.jit
def _row_partials(x_ptr, y_ptr, r, NSPLIT, NSPLIT_P2: tl.constexpr, x_pad, y_pad):
    """Row r's NSPLIT per-split partials from two arrays, padded to NSPLIT_P2."""
    o = tl.arange(0, NSPLIT_P2)
    msk = o < NSPLIT
    x = tl.load(x_ptr + r * NSPLIT + o, mask=msk, other=x_pad)
    return x, tl.load(y_ptr + r * NSPLIT + o, mask=msk, other=y_pad)


@triton.jit
def _reduce_token(pval_ptr, pidx_ptr, r, NSPLIT, NSPLIT_P2: tl.constexpr):
    """The row's best token: highest value, lowest index among ties."""
    v, i = _row_partials(pval_ptr, pidx_ptr, r, NSPLIT, NSPLIT_P2, float("-inf"), 2147483647)
    best = tl.max(v, axis=0)
    return tl.min(tl.where(v == best, i, 2147483647), axis=0)


@triton.jit
def _reduce_norm(pm_ptr, pz_ptr, r, NSPLIT, NSPLIT_P2: tl.constexpr):
    """(max, sum-exp relative to max) of a row's kept scaled logits."""
    m, z = _row_partials(pm_ptr, pz_ptr, r, NSPLIT, NSPLIT_P2, float("-inf"), 0.0)
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, tl.sum(z * tl.exp(m - mx_safe), axis=0)


@triton.jit
def _finish_request(
    b, logits_ptr, stride_lb, stride_ls, bt_ptr, stride_tb, nd_ptr, temp_ptr, seed_ptr, pos_ptr,
    dp_ptr, stride_db, stride_ds, seq_ptr, pval_ptr, pidx_ptr, pm_ptr, pz_ptr, thr_ptr,
    acc_ptr, out_ptr, bonus_ptr, nsl_ptr, S, V, NSPLIT,
    HAS_TEMP: tl.constexpr, HAS_DP: tl.constexpr, HAS_SEQ: tl.constexpr,
    NSPLIT_P2: tl.constexpr, S_P2: tl.constexpr, BLOCK: tl.constexpr,
    RAGGED: tl.constexpr, cu_ptr, T,
):
    """Request b's verification from its rows' complete per-split partials: reduce them
    (lowest index on ties), walk the drafts, sample the bonus / residual, write accept_len,
    out_tokens, bonus, new_seq_lens. Run by the rows launch's last-arriving program of b
    (FOLD) or by :func:`_verify_finish_kernel` (the two-launch path, tests only).

    RAGGED: logits [T, V], block_tokens [T] and draft_probs [T, V] are flat (row stride
    stride_ls / 1 / stride_ds); request b's row j is flat row first + j, j <= nd. Rows
    past nd are never loaded (their indices clamp to nd), so no read leaves the tensors."""
    nd = tl.minimum(tl.maximum(tl.load(nd_ptr + b), 0), S - 1)
    if RAGGED:
        first, nd_b = _ragged_rows(cu_ptr, b, T, S)
        nd = tl.minimum(nd.to(tl.int64), nd_b).to(tl.int32)
        bt_row = bt_ptr + first
        lp_row = logits_ptr + first * stride_ls
        dq_row = dp_ptr + first * stride_ds
    else:
        bt_row = bt_ptr + b.to(tl.int64) * stride_tb
        lp_row = logits_ptr + b.to(tl.int64) * stride_lb
        dq_row = dp_ptr + b.to(tl.int64) * stride_db
    sampled = False
    inv_t = 1.0
    k0 = 0
    k1 = 0
    pos = 0
    if HAS_TEMP:
        sampled, inv_t = _temperature(temp_ptr, b)
        k0, k1 = tnoise.seed_key(tl.load(seed_ptr + b))
        pos = tl.load(pos_ptr + b)

    a = 0
    alive = nd >= 0
    for j in range(1, S):
        rp = b * S + j - 1
        jr = tl.minimum(j, nd)      # rows past nd decide nothing; stay inside the request
        x = tl.load(bt_row + jr).to(tl.int64)
        t_prev = _reduce_token(pval_ptr, pidx_ptr, rp, NSPLIT, NSPLIT_P2)
        acc = x == t_prev
        if HAS_DP:
            if sampled:
                in_vocab = (x >= 0) & (x < V)
                xc = tl.minimum(tl.maximum(x, 0), V - 1)
                mx, z = _reduce_norm(pm_ptr, pz_ptr, rp, NSPLIT, NSPLIT_P2)
                lp = lp_row + tl.cast(tl.maximum(jr - 1, 0), tl.int64) * stride_ls
                sx = _scale(tl.load(lp + xc).to(tl.float32), inv_t)
                kept = in_vocab & (sx >= tl.load(thr_ptr + rp)) & (z > 0)
                px = tl.where(kept, tl.exp(sx - tl.where(kept, mx, 0.0)) / tl.where(kept, z, 1.0), 0.0)
                # A +inf row is a point mass on its lowest +inf id, which is t_{j-1}.
                px = tl.where(mx == float("inf"), (x == t_prev).to(tl.float32), px)
                dq = dq_row + tl.cast(tl.maximum(jr - 1, 0), tl.int64) * stride_ds
                qx = tl.where(in_vocab, tl.load(dq + xc).to(tl.float32), 0.0)
                pj_lo, pj_hi = tnoise.position_words(pos + j)
                u = tnoise.bits_to_uniform(
                    tnoise.random_bits(k0, k1, tl.zeros((1,), tl.int32), pj_lo, pj_hi, 1))
                acc = tl.sum((u * qx < px).to(tl.int32), axis=0) > 0
        alive = alive & acc & (j <= nd)
        a += alive.to(tl.int32)

    ra = b * S + a
    bonus = _reduce_token(pval_ptr, pidx_ptr, ra, NSPLIT, NSPLIT_P2)
    if HAS_DP:
        x_rej = tl.load(bt_row + tl.minimum(a + 1, nd)).to(tl.int64)
        mx, z = _reduce_norm(pm_ptr, pz_ptr, ra, NSPLIT, NSPLIT_P2)
        # An out-of-vocab draft, or a +inf row (p a point mass on t_a: its residual is
        # that id or empty), gives t_a, the sample from p, without a residual pass.
        if sampled & (a < nd) & (x_rej >= 0) & (x_rej < V) & (mx < float("inf")):
            # Residual max(p - q, 0) of the first rejected row, Gumbel-max with the row's noise.
            mx_safe = tl.where(z > 0, mx, 0.0)
            z_safe = tl.where(z > 0, z, 1.0)
            thr = tl.load(thr_ptr + ra)
            lp = lp_row + tl.cast(a, tl.int64) * stride_ls
            dq = dq_row + tl.cast(a, tl.int64) * stride_ds
            pa_lo, pa_hi = tnoise.position_words(pos + a + 1)
            best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
            best_i = tl.arange(0, BLOCK)
            mass = tl.zeros((BLOCK,), tl.float32)
            for off in range(0, V, BLOCK):
                offs = off + tl.arange(0, BLOCK)
                s = _load_scaled(lp, offs, V, inv_t)
                p = tl.where(s >= thr, tl.exp(s - mx_safe) / z_safe, 0.0)  # z = 0: all s = -inf
                q = tl.load(dq + offs, mask=offs < V, other=0.0).to(tl.float32)
                d = p - q
                pos_r = d > 0  # NaN compares False
                res = tl.where(pos_r, d, 0.0)
                g = tnoise.bits_to_gumbel(tnoise.random_bits(k0, k1, offs, pa_lo, pa_hi, 0))
                score = tl.where(pos_r, tl.log(tl.where(pos_r, res, 1.0)) + g, float("-inf"))
                upd = score > best_v
                best_v = tl.where(upd, score, best_v)
                best_i = tl.where(upd, offs, best_i)
                mass += res
            bv = tl.max(best_v, axis=0)
            res_tok = tl.min(tl.where(best_v == bv, best_i, 2147483647), axis=0)
            # A residual of mass < RESIDUAL_EPS is rounding noise of p ~ q: bonus from p,
            # reduced again here rather than kept alive across the residual loop (that cost
            # the ragged one-launch build an 8-byte stack frame on sm_90a).
            bonus = tl.where(tl.sum(mass, axis=0) >= _RESIDUAL_EPS, res_tok,
                             _reduce_token(pval_ptr, pidx_ptr, ra, NSPLIT, NSPLIT_P2))
    bonus = tl.minimum(tl.maximum(bonus, 0), V - 1)

    c = tl.arange(0, S_P2)
    drafts = tl.load(bt_row + c + 1, mask=(c + 1 < S) & (c < nd), other=0).to(tl.int64)
    drafts = tl.minimum(tl.maximum(drafts, 0), V - 1).to(tl.int32)
    toks = tl.where(c < a, drafts, tl.where(c == a, bonus, -1))
    tl.store(out_ptr + b * S + c, toks, mask=c < S)
    tl.store(acc_ptr + b, a)
    tl.store(bonus_ptr + b, bonus)
    if HAS_SEQ:
        tl.store(nsl_ptr + b, tl.load(seq_ptr + b) + a + 1)


@triton.jit
def _verify_finish_kernel(
    logits_ptr, stride_lb, stride_ls, bt_ptr, stride_tb, nd_ptr, temp_ptr, seed_ptr, pos_ptr,
    dp_ptr, stride_db, stride_ds, seq_ptr, pval_ptr, pidx_ptr, pm_ptr, pz_ptr, thr_ptr,
    acc_ptr, out_ptr, bonus_ptr, nsl_ptr, S, V, NSPLIT,
    HAS_TEMP: tl.constexpr, HAS_DP: tl.constexpr, HAS_SEQ: tl.constexpr,
    NSPLIT_P2: tl.constexpr, S_P2: tl.constexpr, BLOCK: tl.constexpr,
    RAGGED: tl.constexpr = False, cu_ptr=None, T=1,
):
    # The unfolded second launch, grid (B,): kept only for FOLD_FINISH = False, the
    # two-launch reference the tests compare the one-launch path with.
    _finish_request(tl.program_id(0), logits_ptr, stride_lb, stride_ls, bt_ptr, stride_tb,
                    nd_ptr, temp_ptr, seed_ptr, pos_ptr, dp_ptr, stride_db, stride_ds, seq_ptr,
                    pval_ptr, pidx_ptr, pm_ptr, pz_ptr, thr_ptr, acc_ptr, out_ptr, bonus_ptr,
                    nsl_ptr, S, V, NSPLIT, HAS_TEMP, HAS_DP, HAS_SEQ, NSPLIT_P2, S_P2, BLOCK,
                    RAGGED, cu_ptr, T)


BLOCK_V = 1024
# Sampled rows skip the noise of tiles that cannot hold the winner (_stream_best); the
# tests switch it off to compare against the unpruned loop.
PRUNE = True
# Single-program top-k + top-p: top-p's mass passes read top-k's kept set, copied into a
# COMPACT_CAP-element workspace per row by one pass, when it fits (else the row); 0: off.
COMPACT_CAP = 1024
# Threshold search: KWAY candidates per pass over the row, on SEARCH_BLOCK_V-wide tiles
# on a GPU: 128 threads x 8 contiguous elements (_SEARCH_VEC), KWAY per-lane accumulators
# a thread in registers.
KWAY = 16
SEARCH_BLOCK_V = 1024


# Greedy-only calls (temperature None) on a wider tile: 4x LDG.128 per thread per
# iteration (8 KB per 4-warp CTA in flight instead of 2 KB), so that at B*S = 16 the
# ~2.3 CTAs per SM keep >= 16 KB per SM in flight (docs/verify_chain.md, "Greedy").
GREEDY_BLOCK_V = 4096


# Register cap of greedy-only row launches (the 4096 tile): 4 CTAs/SM. Without it ptxas
# takes 162 registers (3 CTAs/SM) for the ragged kernel on sm_100a; capped, it compiles
# like its padded twin (126, no spills), which the cap leaves as it was. Not for the other
# launches: a cap of 128 makes ptxas use more registers there (sampled 54 -> 83 on sm_90a).
GREEDY_MAXNREG = 128


# The threshold search's key space per logits dtype (KEYDT of the kernels, _key_range):
# 16-bit logits are searched on their own bit patterns.
KEY_SPACE = {torch.bfloat16: 1, torch.float16: 2}
# Passes of the KWAY-way search over a whole key space, [key(-inf), key(+inf)]: fp32 8,
# bf16 / fp16 4 (tests/test_verify_chain_split_search.py recomputes them).
SEARCH_PASSES = {0: 8, 1: 4, 2: 4}


def key_space(dtype: torch.dtype) -> int:
    """KEYDT of logits of ``dtype``: 1 bf16, 2 fp16, 0 fp32 (scaled-logit keys)."""
    return KEY_SPACE.get(dtype, 0)


# Split search (issue 13): at small B x S the threshold search runs as graph-static
# launches of grid (rows, n_split) instead of one program per row: search_launches() count
# passes (_search_count_kernel; with top-p alone, one pass for the row max) then, with
# top-p, the mass passes (_search_mass_kernel). SPLIT_SEARCH: None picks from host-known
# sizes (use_split_search), True / False force it (tests).
SPLIT_SEARCH = None


def search_launches(has_topk: bool, has_topp: bool, dtype: torch.dtype) -> tuple:
    """(count, mass) launches of the split search for logits of ``dtype``."""
    n = SEARCH_PASSES[key_space(dtype)]
    return (n if has_topk else 1 if has_topp else 0), (n if has_topp else 0)

# verify_chain is one launch: the rows kernel's last-arriving program of each request runs
# its finish (FOLD). False launches the old pair (rows, then _verify_finish_kernel): a test
# knob, the two-launch reference the one-launch results are compared with bit for bit.
FOLD_FINISH = True
# The rows kernel's folded-finish arguments as a launch without FOLD has them (verify_tree,
# the compile specs).
UNFOLDED = dict(FOLD=False, arr_ptr=None, bt_ptr=None, stride_tb=0, nd_ptr=None, dp_ptr=None,
                stride_db=0, stride_ds=0, seq_ptr=None, acc_ptr=None, out_ptr=None,
                bonus_ptr=None, nsl_ptr=None, HAS_SEQ=False, S_P2=1)


def use_split_search(rows: int, nsplit: int, device: torch.device) -> bool:
    """Spread the threshold search over the row's splits: when B*S rows leave most SMs idle
    (rows * 2 <= SMs) and the row has several splits. Never under the interpreter unless
    forced (SPLIT_SEARCH)."""
    if nsplit < 2:
        return False
    if SPLIT_SEARCH is not None:
        return bool(SPLIT_SEARCH)
    sms = num_sms(device)
    return sms is not None and 2 * rows <= sms


def block_size(V: int, greedy: bool = False) -> int:
    """Vocab tile: BLOCK_V (GREEDY_BLOCK_V for greedy-only calls), or the next power of
    two of a small vocabulary."""
    return min(GREEDY_BLOCK_V if greedy else BLOCK_V, max(16, next_pow2(V)))


def search_block(V: int, device: torch.device) -> int:
    """Tile of the threshold-search passes. The interpreter pays per loop iteration,
    not per element, so it takes the wide tile (only top-p's fp32 summation order differs)."""
    return min(block_size(V), SEARCH_BLOCK_V) if device.type == "cuda" else block_size(V)


def num_splits(rows: int, V: int, device: torch.device, greedy: bool = False) -> int:
    """Vocab splits per row from host-known sizes: enough programs to fill the GPU."""
    n_blocks = cdiv(V, block_size(V, greedy))
    sms = num_sms(device)
    if sms is not None:
        target, cap = 4 * sms, 64
    else:  # interpreter: programs run one after another; keep a few to test the splits
        target, cap = 4, 4
    want = max(1, min(n_blocks, cdiv(target, rows), cap))
    per = cdiv(n_blocks, want)
    return cdiv(n_blocks, per)


def verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                 positions, draft_probs, seq_lens, cu_rows, filter_order, accept_len, out_tokens,
                 bonus, new_seq_lens) -> None:
    """Writes accept_len / out_tokens / bonus / new_seq_lens (shapes in docs/DESIGN.md).

    The kernels index block_tokens and the [B] vectors with unit strides:
    ops.verify_chain hands them over dense (ops._dense). ``cu_rows``: the
    ragged layout (flat ``logits [T, V]``, ``block_tokens [T]``, ``draft_probs
    [T, V]`` read in place, S = out_tokens' width). ``filter_order``: None or
    ``"joint"``.
    """
    with on_device(logits):
        _launch(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
                draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens, cu_rows,
                filter_order == "joint")


def _tree_args(parents, has_temp, S):
    # Greedy rows need no position: the tree's depth walk is compiled in only with sampling.
    if parents is None or not has_temp:
        return {}
    return dict(HAS_TREE=True, par_ptr=parents, stride_pb=S)


def _ragged_args(cu_rows, T):
    return {} if cu_rows is None else dict(RAGGED=True, cu_ptr=cu_rows, T=T)


def rows_pass(logits, temperature, top_k, top_p, seeds, positions, need_mz=False,
              parents=None, cu_rows=None, S=None, joint=False, finish=None) -> dict:
    """Launch 1: the target token of every row ``[B, S, V]`` as per-split partials.

    ``parents`` (int32 ``[B, S]``, verify_tree): row j is a tree node keyed at
    position ``positions[b] + depth(j) + 1``. ``cu_rows`` (int32 ``[B+1]``):
    ``logits`` is flat ``[T, V]`` and ``S`` the rows per request (the partials
    stay ``[B*S]``). ``joint``: SGLang's top-k + top-p order. Returns the
    partial buffers and sizes the finishing kernels take (``dummy``: a buffer
    for unused pointers). ``finish``: the folded finish's kernel arguments
    (``FOLD``: :func:`_launch` builds them; a None pointer becomes ``dummy``),
    so that the last-arriving program of each request finishes it in this
    launch. Launches on the current device (callers run it under ``on_device``).
    """
    if cu_rows is None:
        B, S, V = logits.shape
        stride_lb, stride_ls = logits.stride(0), logits.stride(1)
    else:
        B, V = cu_rows.shape[0] - 1, logits.shape[1]
        stride_lb, stride_ls = 0, logits.stride(0)
    dev = logits.device
    rows = B * S
    has_temp = temperature is not None
    block = block_size(V, greedy=not has_temp)
    nsplit = num_splits(rows, V, dev, greedy=not has_temp)
    chunk = cdiv(cdiv(V, block), nsplit) * block
    f32 = dict(dtype=torch.float32, device=dev)
    pval = torch.empty(rows * nsplit, **f32)
    pidx = torch.empty(rows * nsplit, dtype=torch.int32, device=dev)
    if need_mz:
        pm = torch.empty(rows * nsplit, **f32)
        pz = torch.empty(rows * nsplit, **f32)
        thr = torch.empty(rows, **f32)
    else:
        pm = pz = thr = pval
    dummy = pval
    temp = temperature if has_temp else dummy
    seeds_ = seeds if has_temp else dummy
    pos_ = positions if has_temp else dummy
    has_topk = has_temp and top_k is not None
    has_topp = has_temp and top_p is not None
    extra = _ragged_args(cu_rows, logits.shape[0])
    if joint and has_topk and has_topp:
        extra["JOINT"] = True
    if finish is not None:
        extra.update({n: dummy if v is None else v for n, v in finish.items()},
                     NSPLIT_P2=next_pow2(nsplit))
    sblock = search_block(V, dev)
    keydt = key_space(logits.dtype)
    extra["KEYDT"] = keydt
    if (has_topk or has_topp) and use_split_search(rows, nsplit, dev):
        # Graph-static: search_launches() launches whatever the data; a finished or
        # unfiltered row's programs exit after reading a few words of state.
        ncount, nmass = search_launches(has_topk, has_topp, logits.dtype)
        i64 = dict(dtype=torch.int64, device=dev)
        st = torch.empty(2 * ncount * rows, **i64)
        cnt = torch.empty(ncount * rows * nsplit * KWAY, dtype=torch.int32, device=dev)
        mx = torch.empty(rows * nsplit, **f32)
        pst = torch.empty(3 * max(nmass, 1) * rows, **i64)
        pms = torch.empty(max(nmass, 1) * rows * nsplit * KWAY, **i64)
        pzf = torch.empty(nmass * rows * nsplit, **i64) if extra.get("JOINT") else pms
        rag = _ragged_args(cu_rows, logits.shape[0])
        common = (logits, stride_lb, stride_ls, temp, top_k if has_topk else dummy,
                  top_p if has_topp else dummy, st, cnt, mx)
        for t in range(ncount):
            launch(_search_count_kernel, (rows, nsplit), *common, t, rows, S, V, chunk, nsplit,
                   HAS_TOPK=has_topk, HAS_TOPP=has_topp, KEYDT=keydt, KWAY=KWAY, SBLOCK=sblock,
                   NSPLIT_P2=next_pow2(nsplit), **rag, num_warps=4, enable_fp_fusion=False)
        for u in range(nmass):
            launch(_search_mass_kernel, (rows, nsplit), *common, pst, pms, pzf, u, ncount,
                   rows, S, V, chunk, nsplit, HAS_TOPK=has_topk, KEYDT=keydt, KWAY=KWAY,
                   SBLOCK=sblock, NSPLIT_P2=next_pow2(nsplit), JOINT=bool(extra.get("JOINT")),
                   **rag, num_warps=4, enable_fp_fusion=False)
        extra.update(SEARCH_SPLIT=True, st_ptr=st, cnt_ptr=cnt, mx_ptr=mx, pst_ptr=pst,
                     pms_ptr=pms, pzf_ptr=pzf, NCOUNT=ncount, NMASS=nmass,
                     NSPLIT_P2=next_pow2(nsplit))
    elif has_topk and has_topp and COMPACT_CAP > 0:
        extra.update(CAP=COMPACT_CAP,
                     ws_ptr=torch.empty(rows * COMPACT_CAP, dtype=logits.dtype, device=dev),
                     ctr_ptr=torch.empty(rows, dtype=torch.int32, device=dev))
    launch(_verify_rows_kernel, (rows, nsplit),
        logits, stride_lb, stride_ls, temp,
        top_k if top_k is not None else dummy, top_p if top_p is not None else dummy,
        seeds_, pos_, pval, pidx, pm, pz, thr, S, V, chunk, nsplit,
        HAS_TEMP=has_temp, HAS_TOPK=has_topk, HAS_TOPP=has_topp, NEED_MZ=need_mz, BLOCK=block,
        SBLOCK=sblock, KWAY=KWAY, **_tree_args(parents, has_temp, S), PRUNE=PRUNE,
        **extra, num_warps=4, enable_fp_fusion=False,
        **({} if has_temp else dict(maxnreg=GREEDY_MAXNREG)))
    return dict(pval=pval, pidx=pidx, pm=pm, pz=pz, thr=thr, nsplit=nsplit, block=block,
                dummy=dummy, temp=temp, seeds=seeds_, pos=pos_)


def _launch(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
            draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens, cu_rows=None,
            joint=False) -> None:
    B, S = out_tokens.shape
    if B * S == 0:  # nothing to write (ops.verify_chain returns before; direct calls too)
        return
    ragged = cu_rows is not None
    has_temp = temperature is not None
    has_dp = has_temp and draft_probs is not None and S > 1
    # Strides of block_tokens and draft_probs; flat rows (ragged): row strides only.
    if ragged:
        stride_tb, stride_db, stride_ds = 1, 0, draft_probs.stride(0) if has_dp else 0
    else:
        stride_tb = block_tokens.stride(0)
        stride_db, stride_ds = (draft_probs.stride(0), draft_probs.stride(1)) if has_dp else (0, 0)
    fin = dict(bt_ptr=block_tokens, stride_tb=stride_tb, nd_ptr=num_drafts,
               dp_ptr=draft_probs if has_dp else None, stride_db=stride_db, stride_ds=stride_ds,
               seq_ptr=seq_lens, acc_ptr=accept_len, out_ptr=out_tokens, bonus_ptr=bonus,
               nsl_ptr=new_seq_lens, HAS_SEQ=new_seq_lens is not None, S_P2=next_pow2(S))
    if FOLD_FINISH:
        # One launch: the persistent counters (0 between launches, one per request).
        fin.update(FOLD=True, arr_ptr=_counters(logits.device, B))
        rows_pass(logits, temperature, top_k, top_p, seeds, positions, need_mz=has_dp,
                  cu_rows=cu_rows, S=S, joint=joint, finish=fin)
        return
    rp = rows_pass(logits, temperature, top_k, top_p, seeds, positions, need_mz=has_dp,
                   cu_rows=cu_rows, S=S, joint=joint)
    fin = {n: rp["dummy"] if v is None else v for n, v in fin.items()}
    launch(_verify_finish_kernel, (B,),
        logits, 0 if ragged else logits.stride(0), logits.stride(-2), fin["bt_ptr"],
        stride_tb, num_drafts, rp["temp"], rp["seeds"], rp["pos"], fin["dp_ptr"], stride_db,
        stride_ds, fin["seq_ptr"], rp["pval"], rp["pidx"], rp["pm"], rp["pz"], rp["thr"],
        accept_len, out_tokens, bonus, fin["nsl_ptr"], S, logits.shape[-1], rp["nsplit"],
        HAS_TEMP=has_temp, HAS_DP=has_dp, HAS_SEQ=new_seq_lens is not None,
        NSPLIT_P2=next_pow2(rp["nsplit"]), S_P2=next_pow2(S), BLOCK=rp["block"],
        **_ragged_args(cu_rows, logits.shape[0]), num_warps=4, enable_fp_fusion=False)
