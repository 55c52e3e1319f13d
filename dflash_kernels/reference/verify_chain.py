"""verify_chain in PyTorch: the executable form of SPEC.md + docs/DESIGN.md.

Runs on any device without host synchronisation: every row's candidates are
computed, then selected with ``torch.where`` / ``gather``; the first mismatch
comes from a cumulative product.

Details fixed here (beyond DESIGN.md):
- a request is sampled iff ``temperature[b] >= SAMPLING_EPS`` (NaN: greedy);
  ``inv_t = 1 / T`` is one fp32 division, ``scaled = logit * inv_t`` with
  +inf logits kept +inf and NaN products (``-inf * 0`` at T = +inf) as -inf;
  a row with a +inf scaled logit is a point mass on its lowest +inf id;
- a token's probability mass is integer fixed point (:func:`token_mass`,
  ``round(exp(s - m) * 2**40)``), so the softmax normaliser ``Z`` and every
  top-p cumulative mass are exact integer sums, independent of summation
  order: the vocab-parallel path (:mod:`dflash_kernels.vocab_parallel`)
  reduces the same integers across ranks and gets the same bits;
- top-p keeps ``scaled >= tau``, ``tau`` the largest scaled logit whose kept
  mass (over the top-k set) reaches ``T = clamp(ceil(top_p * Z), 1, Z)``
  (fp64 product): the sorted definition of DESIGN.md with exact masses;
- ``num_drafts`` is clamped to ``[0, S-1]``; a draft id outside ``[0, V)``
  never matches (point mass) and is rejected under the ``draft_probs`` rule,
  with the bonus drawn from p; so is a residual of mass below RESIDUAL_EPS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import noise
from .._rules import RESIDUAL_EPS, SAMPLING_EPS

NEG_INF = float("-inf")
# Fraction bits of the fixed-point token mass: exp(s - m) <= 1 becomes an integer <= 2**40,
# so a row of up to 2**22 tokens sums below 2**62 in int64, exactly.
MASS_BITS = 40
MAX_VOCAB = 1 << 22
# Rows per chunk of Philox noise, so that the int64 temporaries stay small.
_NOISE_ELEMS = 1 << 22


def gumbel_rows(seeds: Tensor, pos: Tensor, V: int, start: int = 0) -> Tensor:
    """fp32 ``[N, V]`` stream-0 Gumbel noise of N rows keyed by (seeds[n], pos[n], vocab id).

    Column c is vocab id ``start + c`` (a vocab shard's global ids).
    """
    N = seeds.shape[0]
    out = torch.empty((N, V), dtype=torch.float32, device=seeds.device)
    ids = torch.arange(start, start + V, dtype=torch.int64, device=seeds.device)
    step = max(1, _NOISE_ELEMS // max(V, 1))
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        out[lo:hi] = noise.gumbel(seeds[lo:hi, None], pos[lo:hi, None], ids[None, :],
                                  noise.STREAM_GUMBEL)
    return out


def kept_set(scaled: Tensor, sampled: Tensor, top_k, top_p, joint: bool = False) -> Tensor:
    """bool ``[B, S, V]``: the tokens the top-k and top-p filters keep (all for rows without them).

    Sequential (vLLM): top-p over the distribution renormalised to the top-k
    set. ``joint`` (SGLang): the top-k set intersected with the top-p nucleus
    of the full distribution: a row whose top-k is active keeps its top-k set
    when the full-distribution target ``clamp(ceil(top_p * Z_full), 1, Z_full)``
    reaches the top-k mass, else the largest ``tau`` whose top-k mass reaches
    that target (the nucleus then lies inside the top-k set). Rows without an
    active top-k are filtered identically in both orders.
    """
    B, S, V = scaled.shape
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k_active = None
    if top_k is not None:
        k = top_k.to(torch.int64)
        k_active = sampled & (k > 0) & (k < V)
        desc = scaled.sort(dim=-1, descending=True).values
        kth = desc.gather(-1, (k.clamp(1, V) - 1).view(B, 1, 1).expand(B, S, 1))
        keep &= ~k_active.view(B, 1, 1) | (scaled >= kth)
    if top_p is not None:
        active = (sampled & (top_p < 1)).view(B, 1)
        masked = torch.where(keep, scaled, NEG_INF)
        m = row_max(masked)
        w = token_mass(masked, m)
        z_kept = w.sum(-1)
        target = top_p_target(top_p.view(B, 1), z_kept)
        if joint and k_active is not None:
            # The kept set holds the row max, so m is the full row's too.
            t_full = top_p_target(top_p.view(B, 1), token_mass(scaled, m).sum(-1))
            ka = k_active.view(B, 1)
            target = torch.where(ka, t_full, target)
            active = active & ~(ka & (t_full >= z_kept))
        desc, order = masked.sort(dim=-1, descending=True)
        reach = w.gather(-1, order).cumsum(-1) >= target.unsqueeze(-1)
        # The first index reaching the target; none (no finite kept logit) -> the last (-inf).
        first = torch.where(reach.any(-1), reach.to(torch.int8).argmax(-1),
                            torch.full_like(reach[..., 0], V - 1, dtype=torch.int64))
        tau = desc.gather(-1, first.unsqueeze(-1))
        keep &= ~active.unsqueeze(-1) | (scaled >= tau)
    return keep


def row_max(masked: Tensor) -> Tensor:
    """``[..., 1]`` max of each row, 0 for a row without a finite value."""
    m = masked.amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def token_mass(masked: Tensor, m: Tensor) -> Tensor:
    """int64 fixed-point mass ``round(exp(masked - m) * 2**MASS_BITS)`` (0 for -inf).

    ``exp(.) <= 1`` times a power of two is exact in fp32, so the integer is a
    deterministic function of the element: sums of it are exact in any order.
    """
    return torch.round(torch.exp(masked - m) * float(2 ** MASS_BITS)).to(torch.int64)


def top_p_target(top_p: Tensor, Z: Tensor) -> Tensor:
    """int64 mass top-p must reach: ``clamp(ceil(top_p * Z), 1, Z)`` (fp64 product; 1 when Z = 0).

    ``top_p >= 1`` or NaN (filter off) gives Z; ``top_p <= 0`` gives 1 (the
    most probable token and its ties).
    """
    tp = torch.where(top_p < 1, top_p, torch.ones_like(top_p)).to(torch.float64)
    t = torch.ceil(tp * Z.to(torch.float64)).clamp_min(1.0).to(torch.int64)
    return torch.where(Z > 0, torch.minimum(t, Z), torch.ones_like(Z))


def probs(masked: Tensor, m: Tensor, Z: Tensor) -> Tensor:
    """fp32 ``exp(masked - m) / z`` with ``z = fp32(Z) * 2**-MASS_BITS`` (0 where Z = 0).

    ``Z`` is the row's exact integer mass (``[..., 1]``): every device and every
    vocab shard divides by the same fp32 ``z``.
    """
    z = Z.to(torch.float32) * float(2.0 ** -MASS_BITS)
    e = torch.exp(masked - m)
    return torch.where(Z > 0, e / torch.where(Z > 0, z, 1.0), torch.zeros_like(e))


def softmax_kept(scaled: Tensor, keep: Tensor) -> Tensor:
    """fp32 softmax of ``scaled`` over ``keep`` (zero elsewhere, all zero without a finite logit).

    The normaliser is the exact fixed-point sum of :func:`token_mass`.
    """
    masked = torch.where(keep, scaled, NEG_INF)
    m = row_max(masked)
    return probs(masked, m, token_mass(masked, m).sum(-1, keepdim=True))


def is_sampled(temperature: Tensor) -> Tensor:
    """bool ``[B]``: the requests that sample (fp32 ``T >= SAMPLING_EPS``; NaN: greedy)."""
    return temperature >= SAMPLING_EPS


def scale_logits(x: Tensor, inv_t: Tensor) -> Tensor:
    """``x * inv_t`` (x without NaN) under the edge rules of docs/DESIGN.md.

    +inf logits stay +inf (at T = +inf too), NaN products (``-inf * 0``) are
    -inf, and a row holding a +inf (a +inf logit, or overflow at a tiny T) is
    replaced by a point mass on its lowest +inf id (0 there, -inf elsewhere),
    so that top-k, top-p, the softmax and the Gumbel-max all pick that id.
    """
    s = torch.where(x == float("inf"), x, x * inv_t)
    s = s.masked_fill(torch.isnan(s), NEG_INF)
    is_inf = s == float("inf")
    first = is_inf.to(torch.int8).argmax(-1, keepdim=True)
    ids = torch.arange(s.shape[-1], device=s.device)
    point = torch.where(ids == first, 0.0, NEG_INF)
    return torch.where(is_inf.any(-1, keepdim=True), point, s)


def target_tokens(logits: Tensor, temperature, top_k, top_p, seeds, positions, row_pos=None,
                  joint: bool = False):
    """Per row (b, j): ``(t, scaled, keep, gumbel)``; ``t`` int64 ``[B, S]``.

    The noise of row (b, j) is keyed by position ``positions[b] + j + 1``, or
    by ``row_pos[b, j]`` (int64 ``[B, S]``) when given (a tree row j sits at
    ``positions[b] + depth(j) + 1``). ``scaled``, ``keep`` and ``gumbel`` are
    None when no request samples (``temperature`` None).
    """
    B, S, V = logits.shape
    x = logits.float()
    x = x.masked_fill(torch.isnan(x), NEG_INF)
    # argmax returns the first maximum: lowest index on ties, 0 for an all -inf row.
    t = x.argmax(-1)
    if temperature is None:
        return t, None, None, None
    sampled = is_sampled(temperature)
    inv_t = torch.where(sampled, 1.0 / temperature, torch.ones_like(temperature))
    scaled = scale_logits(x, inv_t.view(B, 1, 1))
    keep = kept_set(scaled, sampled, top_k, top_p, joint)
    if row_pos is None:
        rows = torch.arange(S, device=logits.device, dtype=torch.int64)
        row_pos = positions.view(B, 1) + rows.view(1, S) + 1
    pos = row_pos.reshape(-1)
    g = gumbel_rows(seeds.view(B, 1).expand(B, S).reshape(-1), pos, V).view(B, S, V)
    score = torch.where(keep, scaled + g, NEG_INF)
    t = torch.where(sampled.view(B, 1), score.argmax(-1), t)
    return t, scaled, keep, g


def ragged_rows(cu_rows: Tensor, T: int, S: int):
    """``(idx [B, S], nd [B])`` int64 of a ragged batch: request b's row j is flat
    row ``idx[b, j] = start + min(j, nd)``, its drafts ``nd``, from
    ``start = clamp(cu_rows[b], 0, T-1)`` and
    ``nd = clamp(cu_rows[b+1] - start - 1, 0, min(S-1, T-1-start))``: for a
    well-formed ``cu_rows`` (``0 <= cu_rows[b] < cu_rows[b+1] <= T``) the rows
    it owns, capped at S; for any other values still rows inside ``[0, T)``.
    """
    c = cu_rows.to(torch.int64)
    start = c[:-1].clamp(0, max(T - 1, 0))
    nd = torch.minimum((c[1:] - start - 1).clamp(0, S - 1), T - 1 - start).clamp_min(0)
    j = torch.arange(S, device=cu_rows.device, dtype=torch.int64).view(1, S)
    return start.view(-1, 1) + torch.minimum(j, nd.view(-1, 1)), nd


def padded_from_ragged(cu_rows, S, logits, block_tokens, num_drafts, draft_probs):
    """The padded form ``[B, S, ...]`` of a ragged call (one gather; the Triton
    kernels read the flat rows in place). ``draft_probs [T, V]`` rows pair with
    the logits rows (row r: q of the draft that row r decides)."""
    idx, nd = ragged_rows(cu_rows, logits.shape[0], S)
    dp = None if draft_probs is None else draft_probs[idx[:, :S - 1]]
    nd = torch.minimum(num_drafts.to(torch.int64).clamp(0, S - 1), nd).to(torch.int32)
    return logits[idx], block_tokens[idx], nd, dp


def verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                 positions, draft_probs, seq_lens, cu_rows, filter_order, accept_len,
                 out_tokens, bonus, new_seq_lens) -> None:
    """Writes accept_len / out_tokens / bonus / new_seq_lens (shapes in docs/DESIGN.md).

    ``cu_rows`` (int32 ``[B+1]``) given: ``logits [T, V]``, ``block_tokens [T]``
    and ``draft_probs [T, V]`` are flat (:func:`ragged_rows`), ``num_drafts``
    further caps each request's drafts. ``filter_order``: None (sequential)
    or ``"joint"`` (:func:`kept_set`).
    """
    if cu_rows is not None:
        logits, block_tokens, num_drafts, draft_probs = padded_from_ragged(
            cu_rows, out_tokens.shape[1], logits, block_tokens, num_drafts, draft_probs)
    B, S, V = logits.shape
    dev = logits.device
    t, scaled, keep, g = target_tokens(logits, temperature, top_k, top_p, seeds, positions,
                                       joint=filter_order == "joint")
    drafts = block_tokens[:, 1:].to(torch.int64)             # [B, S-1]
    dp = None
    if draft_probs is not None and S > 1:
        p = softmax_kept(scaled[:, :-1], keep[:, :-1])       # [B, S-1, V]
        q = draft_probs.float()
        in_vocab = (drafts >= 0) & (drafts < V)
        xi = drafts.clamp(0, V - 1).unsqueeze(-1)
        zero = torch.zeros((), device=dev)
        px = torch.where(in_vocab, p.gather(-1, xi).squeeze(-1), zero)
        qx = torch.where(in_vocab, q.gather(-1, xi).squeeze(-1), zero)
        # Residual max(p - q, 0) at every row (NaN as 0); only the first rejected one is
        # used. A draft outside the vocabulary, or a residual of mass < RESIDUAL_EPS
        # (rounding noise of p ~ q), gives t_{j-1}, the sample from p. The mass is
        # summed in fixed point (exact in any order, as the vocab-parallel path sums it).
        d = p - q
        r_pos = d > 0                                         # NaN compares False
        r = torch.where(r_pos, d, zero)
        r_score = torch.where(r_pos, torch.log(torch.where(r_pos, r, 1.0)) + g[:, :-1], NEG_INF)
        use_r = in_vocab & (residual_mass(r).sum(-1) >= residual_floor())
        residual_tok = torch.where(use_r, r_score.argmax(-1), t[:, :-1])
        dp = (px, qx, residual_tok)
    finish(V, block_tokens, num_drafts, temperature, seeds, positions, seq_lens, t, dp,
           accept_len, out_tokens, bonus, new_seq_lens)


def residual_mass(r: Tensor) -> Tensor:
    """int64 fixed-point ``round(r * 2**MASS_BITS)`` of residual probabilities ``r`` in [0, 1]."""
    return torch.round(r * float(2 ** MASS_BITS)).to(torch.int64)


def residual_floor() -> int:
    """RESIDUAL_EPS in the units of :func:`residual_mass`."""
    return round(RESIDUAL_EPS * 2 ** MASS_BITS)


def finish(V, block_tokens, num_drafts, temperature, seeds, positions, seq_lens, t, dp,
           accept_len, out_tokens, bonus, new_seq_lens) -> None:
    """Acceptance, bonus and outputs from the per-row results.

    ``t`` int64 ``[B, S]``: the target token of every row. ``dp``: None, or
    ``(px, qx, residual_tok)`` ``[B, S-1]`` of the ``draft_probs`` rule
    (p(x), q(x) of each draft and the residual's Gumbel-max, ``t`` where the
    residual is all zero). Shared with the vocab-parallel path, whose per-row
    results are the same bits.
    """
    B, S = block_tokens.shape
    dev = block_tokens.device
    bt = block_tokens.to(torch.int64)
    nd = num_drafts.to(torch.int64).clamp(0, S - 1)
    cols = torch.arange(1, S, device=dev, dtype=torch.int64)
    drafts = bt[:, 1:]                                        # [B, S-1]
    # Row j-1 decides draft j.
    accept = drafts == t[:, :-1]
    use_dp = None
    if dp is not None:
        px, qx, residual_tok = dp
        use_dp = is_sampled(temperature)
        u = noise.uniform(seeds.view(B, 1), positions.view(B, 1) + cols.view(1, -1), 0,
                          noise.STREAM_ACCEPT)
        accept = torch.where(use_dp.view(B, 1), u * qx < px, accept)
    run = (accept & (cols.view(1, -1) <= nd.view(B, 1))).to(torch.int64)
    a = run.cumprod(-1).sum(-1) if S > 1 else torch.zeros(B, dtype=torch.int64, device=dev)
    bon = t.gather(1, a.view(B, 1)).squeeze(1)
    if use_dp is not None:
        rejected = a < nd
        res_a = residual_tok.gather(1, a.clamp(max=S - 2).view(B, 1)).squeeze(1)
        bon = torch.where(use_dp & rejected, res_a, bon)
    bon = bon.clamp(0, V - 1)
    shifted = torch.cat([drafts.clamp(0, V - 1), torch.zeros_like(bt[:, :1])], dim=1)
    c = torch.arange(S, device=dev, dtype=torch.int64).view(1, S)
    a2 = a.view(B, 1)
    toks = torch.where(c < a2, shifted, torch.where(c == a2, bon.view(B, 1), -1))
    accept_len.copy_(a.to(torch.int32))
    bonus.copy_(bon.to(torch.int32))
    out_tokens.copy_(toks.to(torch.int32))
    if new_seq_lens is not None:
        new_seq_lens.copy_((seq_lens.to(torch.int64) + a + 1).to(torch.int32))
