"""Vocab-parallel verification: each rank holds a vocab shard of the logits.

The protocol (docs/tensor_parallel.md): every rank computes per-row partial
results over its shard with the reference's math, exchanges only those with
``torch.distributed.all_reduce`` (a fixed list of collectives for given
arguments, see :func:`collectives`), and finishes with the reference's
acceptance code, so every rank writes the same outputs, bit for bit those of
the single-device op on the concatenated (unpadded) logits:

- argmax / Gumbel-max: the noise is keyed by the GLOBAL vocab id, so the
  row's winner is the max over shards of ``(score, -global id)``, packed in
  one int64 (order-preserving fp32 key in the high word, ``2**32-1 - id`` in
  the low word) and reduced with MAX: lowest id on exact ties, as argmax.
- top-k / top-p thresholds: an MSB-first radix search over the 32-bit
  order-preserving key of the scaled logits, ``32 / radix_bits`` passes, each
  a per-row histogram (counts for top-k, fixed-point masses for top-p)
  summed across ranks; it finds exactly the k-th largest value and the
  largest value whose kept mass reaches ``top_p * Z``. ``filter_order="joint"``
  (SGLang) takes that target from the full row's mass instead of the top-k
  set's: the full mass rides as one extra column in the first top-p pass, so
  joint makes the same number of collectives as sequential.
- masses are the reference's integer fixed point
  (:func:`~dflash_kernels.reference.verify_chain.token_mass`), so ``Z`` and
  every mass are exact integer sums whatever the shard layout.
- ``p(x)``, ``q(x)`` of a draft come from the rank owning ``x`` (other ranks
  send a sentinel; MAX picks the owner's bits).

No host sync, no data-dependent shapes: the collectives are in-place
all_reduces of per-row buffers, capturable in CUDA graphs with NCCL.
A tree row is a chain row (per-row seed and position): ``verify_tree`` reuses
:func:`row_winners` with the node positions, then the reference's walk.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .reference import verify_chain as ref
from .reference.tree_mask import tree_structure
from .reference.verify_tree import walk

__all__ = ["RADIX_BITS", "Comm", "collectives", "filter_rows", "token_keys", "unpack_ids",
           "verify_chain_tp", "f32_key", "key_f32", "payload_bytes", "check_tp_args"]

NEG_INF = float("-inf")
# Bits per radix pass: 8 -> 4 passes per threshold, 256 bins a row (fewer collectives,
# each one latency-bound at these sizes); 4 -> 8 passes of 16 bins.
RADIX_BITS = 8
_INT64_MIN = -(2 ** 63)
_LOW32 = 0xFFFFFFFF

# When a list, every collective appends (op, dtype, shape): tests and the microbench count them.
collective_log: Optional[list] = None


class Comm:
    """In-place all_reduces over a process group; ``group="local"`` reduces
    nothing (one shard holding the whole vocab, for single-process checks)."""

    def __init__(self, group):
        self.group = group

    def _reduce(self, t: Tensor, op) -> Tensor:
        if collective_log is not None:
            collective_log.append((str(op).split(".")[-1], t.dtype, tuple(t.shape)))
        if self.group != "local":
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def max_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def sum_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)


def check_tp_args(vocab_start, vocab_size, V_local: int, backend) -> None:
    """Host-side checks of the vocab-parallel arguments (ValueError naming the argument)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size: required (an int, the true vocab) with tp_group, got {vocab_size!r}")
    if not 1 <= vocab_size <= ref.MAX_VOCAB:
        raise ValueError(f"vocab_size: expected 1 .. {ref.MAX_VOCAB} (exact int64 masses), got {vocab_size}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    if vocab_start + V_local >= 2 ** 31:
        raise ValueError(f"vocab_start: shard [{vocab_start}, {vocab_start + V_local}) "
                         "past 2**31 ids")
    if vocab_start > vocab_size:
        raise ValueError(f"vocab_start: {vocab_start} past vocab_size {vocab_size} "
                         "(shards are contiguous and cover [0, vocab_size))")
    if backend not in (None, "reference"):
        raise ValueError(f"backend: the vocab-parallel path runs the reference math on each "
                         f"shard; expected None or 'reference', got {backend!r}")


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------

def f32_key(x: Tensor) -> Tensor:
    """int64 order-preserving key of fp32 values (not NaN), in the int32 range.

    ``-0.0`` is canonicalised to ``+0.0`` first (``x + 0``), so values that
    compare equal get equal keys.
    """
    b = (x.float() + 0.0).contiguous().view(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(torch.int64)


def key_f32(k: Tensor) -> Tensor:
    """Inverse of :func:`f32_key` (k in the int32 range)."""
    b = k.to(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _pack(value: Tensor, gid: Tensor) -> Tensor:
    """int64 ``(key(value), -gid)`` that MAX orders by value, then lowest id."""
    return (f32_key(value) << 32) | (_LOW32 - gid)


def unpack_ids(packed: Tensor) -> Tuple[Tensor, Tensor]:
    """(fp32 value, int64 global id) of reduced :func:`token_keys`."""
    return key_f32(packed >> 32), _LOW32 - (packed & _LOW32)


def _local_best(score: Tensor, vocab_start: int) -> Tensor:
    # max(dim) returns the first maximum: lowest local (so global) id on ties.
    v, i = score.max(-1)
    return _pack(v, i + vocab_start)


# --------------------------------------------------------------------------
# Radix threshold search
# --------------------------------------------------------------------------

def radix_select(keys: Tensor, weight: Tensor, target: Callable[..., Tensor], comm: Comm,
                 bits: int = RADIX_BITS, extra: Optional[Tensor] = None):
    """Largest key ``v`` with ``sum(weight[keys >= v]) >= target``, per row, across ranks.

    keys: int64 ``[R, n]`` (:func:`f32_key`); weight: int32 / int64 ``[R, n]``
    (>= 0; 0 for ids that must not count). ``target(total)`` maps the row's
    total weight (known after the first pass) to an int64 target ``[R]``
    (clamped to >= 1, so the key found is always some element's).
    ``32 / bits`` passes, each one SUM of ``[R, 2**bits]`` weights.
    ``extra``: a per-row partial ``[R]`` (weight's dtype) summed across ranks
    as one more column of the first pass's histogram (``[R, 2**bits + 1]``,
    no extra collective); the target is then ``target(total, extra_sum)``.

    Returns ``(found [R] bool, key [R] int64, mass_ge [R] int64, total [R] int64)``:
    ``mass_ge = sum(weight[keys >= key])``; ``found`` False where even the total
    misses the target (then key / mass_ge are meaningless).
    """
    if 32 % bits:
        raise ValueError(f"radix_bits: expected a divisor of 32, got {bits}")
    R = keys.shape[0]
    nb = 1 << bits
    uk = keys + 2 ** 31                                   # unsigned order, [0, 2**32)
    prefix = torch.zeros(R, dtype=torch.int64, device=keys.device)
    above = torch.zeros_like(prefix)                      # weight strictly above the prefix range
    zero = torch.zeros((), dtype=weight.dtype, device=keys.device)
    found = tgt = total = last = None
    for shift in range(32 - bits, -1, -bits):
        hi = shift + bits
        match = (uk >> hi) == (prefix >> hi).unsqueeze(1)
        first_pass = tgt is None
        width = nb + 1 if first_pass and extra is not None else nb
        buf = torch.zeros((R, width), dtype=weight.dtype, device=keys.device)
        hist = buf[:, :nb]
        hist.scatter_add_(1, (uk >> shift) & (nb - 1), torch.where(match, weight, zero))
        if width > nb:
            buf[:, nb] = extra
        comm.sum_(buf)
        suffix = hist.flip(-1).cumsum(-1, dtype=torch.int64).flip(-1)   # weight in bucket >= j
        if first_pass:
            total = suffix[:, 0]
            tgt = (target(total) if extra is None else target(total, buf[:, nb].to(torch.int64)))
            tgt = tgt.clamp_min(1)
        ok = above.unsqueeze(1) + suffix >= tgt.unsqueeze(1)  # non-increasing in j: a prefix
        n_ok = ok.sum(-1)
        if found is None:
            found = n_ok > 0
        bk = (n_ok - 1).clamp_min(0)
        nxt = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], 1)
        above = above + nxt.gather(1, bk.unsqueeze(1)).squeeze(1)
        last = hist.gather(1, bk.unsqueeze(1)).squeeze(1).to(torch.int64)
        prefix = prefix | (bk << shift)
    return found, prefix - 2 ** 31, above + last, total


# --------------------------------------------------------------------------
# Per-row shard results
# --------------------------------------------------------------------------

class Rows(NamedTuple):
    """A shard's rows after filtering (``[R, Vl]`` unless noted)."""
    scaled: Tensor            # fp32 logits * (1/T); NaN and padded ids -inf
    keep: Tensor              # bool: the top-k / top-p kept set
    g: Tensor                 # fp32 Gumbel noise of the global ids
    m: Optional[Tensor]       # fp32 [R, 1] global max of the kept set (0 without finite)
    Z: Optional[Tensor]       # int64 [R, 1] exact mass of the kept set


def filter_rows(scaled: Tensor, valid: Tensor, vocab_start: int, vocab_size: int,
                sampled: Tensor, top_k: Optional[Tensor], top_p: Optional[Tensor],
                seeds: Tensor, pos: Tensor, comm: Comm, *, need_mass: bool,
                bits: int = RADIX_BITS, joint: bool = False) -> Rows:
    """Top-k / top-p kept sets and Gumbel noise of R sampled-or-not rows of a shard.

    scaled: fp32 ``[R, Vl]`` (NaN and padded ids already -inf); valid: bool
    ``[Vl]`` (id < vocab_size); sampled ``[R]`` bool, top_k int ``[R]``,
    top_p fp32 ``[R]``, seeds / pos int64 ``[R]`` (pos: the position of the
    token being decided). ``need_mass``: also return the max and exact mass
    of the kept set (for p(x) / residuals). Collectives, in order: one MAX of
    ``[R]`` fp32 (the max, when top_p or need_mass), top-k's count passes,
    top-p's mass passes, one SUM of ``[R]`` int64 (Z, when need_mass without
    top_p).

    ``joint`` (SGLang's order, the reference's ``kept_set(..., joint=True)``;
    only with both top_k and top_p): a row whose top-k is active takes the
    top-p target ``clamp(ceil(top_p * Z_full), 1, Z_full)`` from its FULL
    mass ``Z_full`` (summed in the first top-p pass's extra column) and keeps
    its whole top-k set when that target reaches the top-k mass.
    """
    R, Vl = scaled.shape
    keep = torch.ones_like(scaled, dtype=torch.bool)
    m = Z = None
    if top_p is not None or need_mass:
        # The kept set always holds the row max (top-k and top-p keep it): no filter needed.
        mx = comm.max_(scaled.amax(-1).contiguous())
        m = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).unsqueeze(1)
    k_active = None
    if top_k is not None:
        k = top_k.to(torch.int64)
        k_active = sampled & (k > 0) & (k < vocab_size)
        keys = f32_key(scaled)
        cnt = valid.to(torch.int32).unsqueeze(0).expand(R, Vl)
        _, kk, _, _ = radix_select(keys, cnt, lambda total: k.clamp(1, vocab_size), comm, bits)
        kth = torch.where(k_active, key_f32(kk), NEG_INF).unsqueeze(1)
        keep &= scaled >= kth
    if top_p is not None:
        active = sampled & (top_p < 1)
        masked = torch.where(keep, scaled, NEG_INF)
        w = ref.token_mass(masked, m)
        if joint and k_active is not None:
            # m is the full row's max (the top-k set holds it): the full row's masses are
            # the reference's token_mass(scaled, m), padded ids -inf (0).
            z_full = ref.token_mass(scaled, m).sum(-1)

            def target(total, z_full):
                t_full = ref.top_p_target(top_p, z_full)
                # A target at or past the top-k mass keeps the whole top-k set: total + 1
                # is never reached (found False), so tau stays -inf and Z the top-k mass.
                t_joint = torch.where(t_full >= total, total + 1, t_full)
                return torch.where(k_active, t_joint, ref.top_p_target(top_p, total))

            found, tk, ge, total = radix_select(f32_key(masked), w, target, comm, bits,
                                                extra=z_full)
        else:
            found, tk, ge, total = radix_select(
                f32_key(masked), w, lambda total: ref.top_p_target(top_p, total), comm, bits)
        on = active & found
        tau = torch.where(on, key_f32(tk), NEG_INF).unsqueeze(1)
        keep &= scaled >= tau
        Z = torch.where(on, ge, total).unsqueeze(1)
    elif need_mass:
        masked = torch.where(keep, scaled, NEG_INF)
        Z = comm.sum_(ref.token_mass(masked, m).sum(-1)).unsqueeze(1)
    g = ref.gumbel_rows(seeds, pos, Vl, start=vocab_start)
    return Rows(scaled, keep, g, m, Z)


def scale_logits(x: Tensor, inv_t: Tensor, gid: Tensor, comm: Comm) -> Tensor:
    """The reference's :func:`~dflash_kernels.reference.verify_chain.scale_logits` on a
    shard: ``x * inv_t`` with +inf kept and NaN products -inf, and a row holding a
    +inf on any rank becomes a point mass on its lowest global +inf id. One MAX of
    ``[R]`` int64 (the negated first +inf id of each rank)."""
    s = torch.where(x == float("inf"), x, x * inv_t)
    s = s.masked_fill(torch.isnan(s), NEG_INF)
    is_inf = s == float("inf")
    first_local = gid[is_inf.to(torch.int8).argmax(-1)]
    sentinel = torch.full((), _INT64_MIN, dtype=torch.int64, device=s.device)
    glob = comm.max_(torch.where(is_inf.any(-1), -first_local, sentinel))
    has = glob > _INT64_MIN
    point = torch.where(gid.unsqueeze(0) == (-glob).unsqueeze(1), 0.0, NEG_INF)
    return torch.where(has.unsqueeze(1), point, s)


def token_keys(x: Tensor, rows: Optional[Rows], sampled: Optional[Tensor],
               vocab_start: int) -> Tensor:
    """Local int64 ``[R]`` packed winners: argmax of ``x`` (greedy rows) or the
    Gumbel-max over the kept set (sampled rows); MAX-reduce, then :func:`unpack_ids`."""
    if rows is None:
        return _local_best(x, vocab_start)
    score = torch.where(rows.keep, rows.scaled + rows.g, NEG_INF)
    return _local_best(torch.where(sampled.unsqueeze(1), score, x), vocab_start)


def shard_rows(logits: Tensor, vocab_start: int, vocab_size: int) -> Tuple[Tensor, Tensor]:
    """fp32 ``[R, Vl]`` rows of a ``[B, S, Vl]`` logits shard (NaN and padded ids -inf)
    and bool ``[Vl]`` valid (global id ``< vocab_size``)."""
    B, S, Vl = logits.shape
    gid = torch.arange(vocab_start, vocab_start + Vl, device=logits.device, dtype=torch.int64)
    valid = gid < vocab_size
    x = logits.float().reshape(B * S, Vl)
    return x.masked_fill(torch.isnan(x) | ~valid, NEG_INF), valid


def row_winners(x: Tensor, valid: Tensor, temperature, top_k, top_p, seeds, pos, comm: Comm, *,
                vocab_start: int, vocab_size: int, need_mass: bool, bits: int,
                joint: bool = False):
    """Local packed winners int64 ``[R]`` of the target token of every row of B
    requests (``R = B*S``, rows request-major, from :func:`shard_rows`), and the
    filtered :class:`Rows` (None without ``temperature``). MAX-reduce the
    winners, then :func:`unpack_ids`.

    Per-request arguments are ``[B]``; ``pos`` int64 ``[B, S]`` is the position
    of the token each row decides (chain: ``positions + j + 1``; tree:
    ``positions + depth(i) + 1``), None without ``temperature``.
    Collectives: one MAX (rows holding +inf, :func:`scale_logits`), then those
    of :func:`filter_rows` (none when greedy). ``joint``: :func:`filter_rows`.
    """
    if temperature is None:
        return _local_best(x, vocab_start), None
    B, S = pos.shape
    R = B * S
    sampled_b = ref.is_sampled(temperature)
    inv_t = torch.where(sampled_b, 1.0 / temperature, torch.ones_like(temperature))
    rep = lambda v: None if v is None else v.view(B, 1).expand(B, S).reshape(R)  # noqa: E731
    sampled = rep(sampled_b)
    gid = torch.arange(vocab_start, vocab_start + x.shape[1], device=x.device, dtype=torch.int64)
    scaled = scale_logits(x, rep(inv_t).unsqueeze(1), gid, comm)
    rows = filter_rows(scaled, valid, vocab_start, vocab_size, sampled, rep(top_k), rep(top_p),
                       rep(seeds), pos.reshape(R), comm, need_mass=need_mass, bits=bits,
                       joint=joint)
    return token_keys(x, rows, sampled, vocab_start), rows


# --------------------------------------------------------------------------
# verify_chain
# --------------------------------------------------------------------------

def collectives(B: int, S: int, *, temperature: bool, top_k: bool, top_p: bool,
                draft_probs: bool, radix_bits: Optional[int] = None,
                joint: bool = False) -> List[Tuple[str, torch.dtype, tuple]]:
    """The all_reduces one ``verify_chain`` call makes, in order: ``(op, dtype, shape)``.

    Host-known: depends only on which optional arguments are given and B, S.
    ``verify_tree`` with N node slots makes those of ``(B, N)`` without ``draft_probs``.
    ``joint`` (``filter_order="joint"``): with top_k and top_p, the first top-p
    pass is ``[R, 2**radix_bits + 1]`` (the full row's mass in the extra
    column); the same number of collectives as sequential.
    """
    R = B * S
    radix_bits = radix_bits or RADIX_BITS
    dp = draft_probs and temperature and S > 1
    out = []
    if not temperature:
        return [("MAX", torch.int64, (R,))]
    passes = 32 // radix_bits
    out.append(("MAX", torch.int64, (R,)))            # rows holding +inf (scale_logits)
    if top_p or dp:
        out.append(("MAX", torch.float32, (R,)))
    if top_k:
        out += [("SUM", torch.int32, (R, 1 << radix_bits))] * passes
    if top_p:
        first = (1 << radix_bits) + (1 if joint and top_k else 0)
        out.append(("SUM", torch.int64, (R, first)))
        out += [("SUM", torch.int64, (R, 1 << radix_bits))] * (passes - 1)
    elif dp:
        out.append(("SUM", torch.int64, (R,)))
    if dp:
        out.append(("SUM", torch.int64, (B * (S - 1),)))   # the residuals' masses
    out.append(("MAX", torch.int64, (R + 3 * B * (S - 1),) if dp else (R,)))
    return out


def payload_bytes(plan) -> int:
    """Bytes of the buffers a :func:`collectives` plan all-reduces (per rank, per call)."""
    return sum(torch.empty((), dtype=d).element_size() * int(torch.Size(shape).numel())
               for _, d, shape in plan)


def verify_chain_tp(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                    positions, draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens,
                    *, group, vocab_start: int, vocab_size: int,
                    radix_bits: Optional[int] = None, joint: bool = False) -> None:
    """verify_chain on a vocab shard: same arguments as the reference backend
    (``logits [B, S, Vl]``, ``draft_probs [B, S-1, Vl]`` shards of global ids
    ``vocab_start ..``), outputs bit for bit those of the single-device op on
    the concatenated logits ``[..., :vocab_size]``, on every rank.
    ``joint``: ``filter_order="joint"`` (:func:`filter_rows`; the reference's
    ``filter_order="joint"``), collectives :func:`collectives` with ``joint``.

    ``group``: a ``torch.distributed`` process group (or ``"local"``: no
    communication, for a single shard covering the vocab).
    """
    comm = Comm(group)
    radix_bits = radix_bits or RADIX_BITS
    B, S, Vl = logits.shape
    dev = logits.device
    R = B * S
    x, valid = shard_rows(logits, vocab_start, vocab_size)
    need = temperature is not None and draft_probs is not None and S > 1
    pos = None
    if temperature is not None:
        pos = positions.view(B, 1) + torch.arange(S, device=dev).view(1, S) + 1
    keys, rows = row_winners(x, valid, temperature, top_k, top_p, seeds, pos, comm,
                             vocab_start=vocab_start, vocab_size=vocab_size, need_mass=need,
                             bits=radix_bits, joint=joint)
    dp = None
    if not need:
        t = unpack_ids(comm.max_(keys))[1].view(B, S)
    else:
        n = B * (S - 1)
        first = lambda v: v.view(B, S, *v.shape[1:])[:, :-1].reshape(n, *v.shape[1:])
        masked = torch.where(first(rows.keep), first(rows.scaled), NEG_INF)
        p = ref.probs(masked, first(rows.m), first(rows.Z))            # [n, Vl]
        q = draft_probs.float().reshape(n, Vl)
        drafts = block_tokens[:, 1:].to(torch.int64).reshape(n)
        own = (drafts >= vocab_start) & (drafts < vocab_start + Vl) & (drafts < vocab_size)
        xi = (drafts - vocab_start).clamp(0, Vl - 1).unsqueeze(1)
        sentinel = torch.full((), _INT64_MIN, dtype=torch.int64, device=dev)
        pxk = torch.where(own, f32_key(p.gather(1, xi).squeeze(1)), sentinel)
        qxk = torch.where(own, f32_key(q.gather(1, xi).squeeze(1)), sentinel)
        d = p - q
        r_pos = (d > 0) & valid                       # NaN compares False
        r = torch.where(r_pos, d, torch.zeros((), device=dev))
        r_score = torch.where(r_pos, torch.log(torch.where(r_pos, r, 1.0)) + first(rows.g),
                              NEG_INF)
        # The residual's exact fixed-point mass (the reference's rule: below
        # RESIDUAL_EPS, or an out-of-vocab draft, the bonus is t from p).
        r_mass = comm.sum_(ref.residual_mass(r).sum(-1))
        use_r = (drafts >= 0) & (drafts < vocab_size) & (r_mass >= ref.residual_floor())
        # One MAX for tokens, residual winners and the owners' p(x), q(x).
        red = comm.max_(torch.cat([keys, _local_best(r_score, vocab_start), pxk, qxk]))
        t = unpack_ids(red[:R])[1].view(B, S)
        r_val, r_id = unpack_ids(red[R:R + n])
        residual_tok = torch.where(use_r & (r_val > NEG_INF), r_id, t[:, :-1].reshape(n))
        dec = lambda k: torch.where(k == _INT64_MIN, torch.zeros((), device=dev),
                                    key_f32(torch.where(k == _INT64_MIN, 0, k)))
        px, qx = dec(red[R + n:R + 2 * n]), dec(red[R + 2 * n:])
        dp = (px.view(B, S - 1), qx.view(B, S - 1), residual_tok.view(B, S - 1))
    ref.finish(vocab_size, block_tokens, num_drafts, temperature, seeds, positions, seq_lens,
               t, dp, accept_len, out_tokens, bonus, new_seq_lens)


# --------------------------------------------------------------------------
# verify_tree
# --------------------------------------------------------------------------

def verify_tree_tp(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds,
                   positions, seq_lens, accept_len, accepted_nodes, out_tokens, bonus,
                   new_seq_lens, *, group, vocab_start: int, vocab_size: int,
                   radix_bits: Optional[int] = None) -> None:
    """verify_tree on a vocab shard: same arguments as the reference backend
    (``logits [B, N, Vl]``, the shard of global ids ``vocab_start ..``),
    outputs bit for bit those of the single-device op on the concatenated
    logits ``[..., :vocab_size]``, on every rank.

    Node rows are chain rows whose noise sits at ``positions[b] + depth(i) + 1``;
    only their winners (and the filters' per-row partials) cross ranks, then
    every rank walks the tree itself. Collectives: :func:`collectives` of
    ``(B, N)`` without ``draft_probs``. ``group`` as :func:`verify_chain_tp`.
    """
    comm = Comm(group)
    B, N, _ = logits.shape
    if B == 0:
        return          # every rank sees the same B: none reduces anything (as verify_chain)
    used, par, depth, _ = tree_structure(parents, num_nodes, ancestors=False)
    x, valid = shard_rows(logits, vocab_start, vocab_size)
    pos = None if temperature is None else positions.view(B, 1) + depth + 1
    keys, _ = row_winners(x, valid, temperature, top_k, top_p, seeds, pos, comm,
                          vocab_start=vocab_start, vocab_size=vocab_size, need_mass=False,
                          bits=radix_bits or RADIX_BITS)
    t = unpack_ids(comm.max_(keys))[1].view(B, N)
    walk(vocab_size, tree_tokens, used, par, t, seq_lens, accept_len, accepted_nodes, out_tokens,
         bonus, new_seq_lens)
