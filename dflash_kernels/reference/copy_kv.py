"""PyTorch reference of ``copy_kv`` (SPEC.md "Trees"), on any device.

Per layer, every source row is gathered first (all reads before any write,
so a source may be another pair's destination), then scattered with one
``index_put_``. Rows are moved as raw bits (an integer view of the cache's
dtype), so fp8 and NaN payloads are copied exactly.

No host sync, no data-dependent shape: a skipped pair (``dst < 0``, or
outside SPEC ``dst >= num_slots``) is redirected to a write that changes
nothing: the first kept pair's (destination, value) again, or, when no pair
is kept, slot 0's own value back to slot 0. Source slots outside
``[0, num_slots)`` (outside SPEC) are clamped.
"""

from __future__ import annotations

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(cache):
    return cache.view(_BITS[cache.element_size()])


def copy_kv(src_slots, dst_slots, k_caches: list, v_caches: list) -> None:
    """Copies every layer's K and V rows ``src_slots[i] -> dst_slots[i]`` (int64 ``[M]``) in place.

    ``k_caches`` / ``v_caches``: lists of L paged caches ``[P, page, Hkv, D]``.
    """
    M = src_slots.shape[0]
    if M == 0:
        return
    P, page = k_caches[0].shape[0], k_caches[0].shape[1]
    n = P * page
    src = src_slots.to(torch.int64).clamp(0, n - 1)
    dst = dst_slots.to(torch.int64)
    keep = (dst >= 0) & (dst < n)
    first = keep.to(torch.int8).argmax()                  # 0 when nothing is kept
    any_keep = keep.any()
    zero = torch.zeros((), dtype=torch.int64, device=src.device)
    # Skipped pairs write (dst[first], value of src[first]) again, or slot 0 onto itself.
    fill_dst = torch.where(any_keep, dst[first], zero)
    fill_src = torch.where(any_keep, src[first], zero)
    dst = torch.where(keep, dst, fill_dst)
    src = torch.where(keep, src, fill_src)
    sp, sr, dp, dr = src // page, src % page, dst // page, dst % page
    for cache in (*k_caches, *v_caches):
        raw = _raw(cache)
        rows = raw[sp, sr]                # [M, Hkv, D]: a copy (advanced indexing), all reads first
        raw.index_put_((dp, dr), rows)
