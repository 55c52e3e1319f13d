"""PyTorch reference of ``block_attention`` (SPEC.md), on any device.

The executable form of the contract: gathers every request's context K/V from
its pages with index tensors of host-known size (all ``max_pages * page_size``
slots, page ids clamped and masked), appends the block keys when given, and
runs a dense masked softmax in fp32. No host synchronisation.

Edge values (docs/DESIGN.md): a context key that no query row of the block can
see (past the length, or behind every row's window) is never read, so its
block-table entry may be -1 or garbage (freed pages behind a sliding window);
a key a row cannot see never reaches that row, not even as ``0 * NaN``.
"""

from __future__ import annotations

import torch


def _gather_pages(cache, block_table, tok, valid, scale):
    """Context keys or values ``[B, T, Hkv, D]`` fp32, zero at unread slots.

    ``valid`` ``[B, T]`` marks the slots some query row sees. Block-table
    entries are read only where valid (elsewhere page 0 is used) and clamped
    to the cache, so garbage entries (unused or freed pages) are never followed.
    """
    num_pages, page_size = cache.shape[0], cache.shape[1]
    page_idx = (tok // page_size).expand_as(valid)
    rows = (tok % page_size).expand_as(valid)
    pages = torch.gather(block_table.long(), 1, page_idx)
    pages = torch.where(valid, pages, torch.zeros_like(pages)).clamp_(0, num_pages - 1)
    x = cache[pages, rows].float()
    if scale is not None:
        x = x * scale.float().reshape(())
    # Select (not multiply) so that NaN in unused rows of a used page stays out.
    return torch.where(valid[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def block_attention(q, k_cache, v_cache, block_table, context_lens, k_block, v_block,
                    sm_scale: float, window: int, k_scale, v_scale, out, lse,
                    causal: bool = False, mask_bits=None) -> None:
    """Writes ``out`` ``[B, S, Hq, D]`` (q's dtype) and ``lse`` fp32 ``[B, S, Hq]`` (or None).

    q: ``[B, S, Hq, D]``; k_cache/v_cache: ``[num_pages, page_size, Hkv, D]``
    (any strides, q's dtype or fp8 with fp32 1-element ``k_scale``/``v_scale``);
    block_table int32 ``[B, P]``; context_lens int32 ``[B]``; k_block/v_block
    ``[B, S, Hkv, D]`` or None (block already the last S cached tokens).
    ``window`` 0 means none, else a key is visible iff ``|pq - pk| < window``.
    Block mask over the block's own keys (``k_block``, or the last S cached
    keys): full when ``causal`` is False and ``mask_bits`` None, ``j <= i``
    when ``causal``, else bit ``j % 32`` of ``mask_bits[b, i, j // 32]``
    (int32 ``[B, S, ceil(S/32)]``).
    Rows with no visible key give zeros and ``lse = -inf``.
    """
    B, S, Hq, D = q.shape
    if out.numel() == 0 and (lse is None or lse.numel() == 0):
        return  # B, S or H = 0 (direct calls; ops.block_attention returns before)
    Hkv = k_cache.shape[2]
    g = Hq // Hkv
    dev = q.device
    # No pages: no context key (every length is clamped to 0).
    T = block_table.shape[1] * k_cache.shape[1] if k_cache.shape[0] > 0 else 0
    # Lengths beyond the table (outside SPEC) are clamped so nothing past it is read.
    L = context_lens.long().clamp(0, T)                                  # [B]
    tok = torch.arange(T, device=dev)[None, :]                           # [1, T]
    valid = tok < L[:, None]                                             # [B, T]
    kpos = tok.expand(B, T)
    srow = torch.arange(S, device=dev)[None, :]                          # [1, S]
    if k_block is not None:
        kpos = torch.cat([kpos, L[:, None] + srow], dim=1)
        valid = torch.cat([valid, torch.ones((B, S), dtype=torch.bool, device=dev)], dim=1)
        qpos = L[:, None] + srow                                         # [B, S]
    else:
        qpos = L[:, None] - S + srow
    vis = valid[:, None, :].expand(B, S, kpos.shape[1])                  # [B, S, Tk]
    if window > 0:
        vis = vis & ((qpos[:, :, None] - kpos[:, None, :]).abs() < window)
    masked = causal or mask_bits is not None
    if masked:
        # Block key j sits at position q0 + j (q0 = qpos[:, 0]) in both block modes;
        # context keys (j < 0) are unaffected.
        jk = (kpos - qpos[:, :1])[:, None, :].expand(B, S, kpos.shape[1])   # [B, S, Tk]
        jc = jk.clamp(0, S - 1)
        if causal:
            allow = jc <= srow[:, :, None]
        else:
            words = mask_bits.long().gather(2, jc // 32)
            allow = ((words >> (jc % 32)) & 1) == 1
        vis = vis & ((jk < 0) | allow)
    seen = vis[:, :, :T].any(1)                                          # [B, T]: read only these
    k = _gather_pages(k_cache, block_table, tok, seen, k_scale)           # [B, T, Hkv, D]
    v = _gather_pages(v_cache, block_table, tok, seen, v_scale)
    if k_block is not None:
        k = torch.cat([k, k_block.float()], dim=1)
        v = torch.cat([v, v_block.float()], dim=1)

    qf = q.float().reshape(B, S, Hkv, g, D)
    scores = torch.einsum("bshgd,bthd->bhgst", qf, k) * sm_scale          # [B, Hkv, g, S, Tk]
    visb = vis[:, None, None]
    scores = torch.where(visb, scores, torch.full((), float("-inf"), device=dev))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)          # rows with no key
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    # A non-finite V element must reach only the rows that see its key: in the
    # product its p = 0 elsewhere, and 0 x NaN = NaN. Zero it for the product
    # and mark NaN the (row, column) pairs whose visible keys held one.
    bad = ~torch.isfinite(v)                                             # [B, Tk, Hkv, D]
    o = torch.einsum("bhgst,bthd->bhgsd", p, torch.where(bad, torch.zeros((), device=dev), v))
    seen = torch.einsum("bst,bthd->bhsd", vis.float(), bad.float()) > 0   # [B, Hkv, S, D]
    # Rows with no visible key give 0; a NaN key a row sees makes it NaN (denom NaN).
    o = torch.where(denom == 0, torch.zeros_like(o), o / denom)
    o = torch.where(seen[:, :, None], torch.full((), float("nan"), device=dev), o)
    out.copy_(o.permute(0, 3, 1, 2, 4).reshape(B, S, Hq, D))
    if lse is not None:
        row_lse = (m + torch.log(denom)).squeeze(-1)                     # log 0 = -inf
        lse.copy_(row_lse.permute(0, 3, 1, 2).reshape(B, S, Hq))
