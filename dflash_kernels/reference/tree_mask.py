"""PyTorch reference of ``tree_mask`` (SPEC.md "Trees"), on any device.

Also the tree bookkeeping every tree op shares (:func:`tree_structure`):
which slots are used, the cleaned parent of each slot, its depth and its
ancestor-or-self set. No host synchronisation: N (the slot budget) is
host-known and every loop runs over it.

Details fixed here (SPEC leaves them open; docs/tree.md):
- slot 0 is always used (the root). Slot ``i > 0`` is used iff every slot
  ``1..i`` has a parent in ``[0, slot)``: the first slot whose parent is -1
  (or, outside SPEC, not below it) ends the used slots. With ``num_nodes``,
  slots at or past ``clamp(num_nodes[b], 1, N)`` are unused too.
- an unused slot sees only itself, has depth 0 and no parent.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tree_structure(parents: Tensor, num_nodes=None, ancestors: bool = True):
    """``(used bool [B, N], parent int64 [B, N] (-1 root/unused), depth int64 [B, N],
    anc bool [B, N, N] or None)``; ``anc[b, i, j]``: j is an ancestor of i or i itself."""
    B, N = parents.shape
    dev = parents.device
    par = parents.to(torch.int64)
    idx = torch.arange(N, device=dev, dtype=torch.int64)
    ok = (par >= 0) & (par < idx)
    ok[:, 0] = True
    used = ok.to(torch.int64).cumprod(-1).bool()
    if num_nodes is not None:
        used &= idx.view(1, N) < num_nodes.to(torch.int64).clamp(min=1).view(B, 1)
    par = torch.where(used, par, -1)
    par[:, 0] = -1
    depth = torch.zeros((B, N), dtype=torch.int64, device=dev)
    anc = None
    if ancestors:
        anc = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N).clone()
    # Parents come first, so one pass in slot order sees every parent finished.
    for i in range(1, N):
        p = par[:, i]
        has = p >= 0
        pc = p.clamp(min=0)
        depth[:, i] = torch.where(has, depth.gather(1, pc.view(B, 1)).squeeze(1) + 1, 0)
        if anc is not None:
            prow = anc.gather(1, pc.view(B, 1, 1).expand(B, 1, N)).squeeze(1)
            anc[:, i] |= prow & has.view(B, 1)
    return used, par, depth, anc


def pack_bits(anc: Tensor) -> Tensor:
    """bool ``[B, R, N]`` -> int32 ``[B, R, ceil(N/32)]``: bit ``j % 32`` of word ``j // 32``."""
    B, R, N = anc.shape
    W = (N + 31) // 32
    pad = torch.zeros((B, R, W * 32), dtype=torch.int64, device=anc.device)
    pad[..., :N] = anc.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=anc.device) << torch.arange(
        32, dtype=torch.int64, device=anc.device)
    words = (pad.view(B, R, W, 32) * weights).sum(-1)               # 0 .. 2**32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def tree_mask(parents, mask, depth) -> None:
    """Writes ``mask`` int32 ``[B, N, ceil(N/32)]`` and ``depth`` int32 ``[B, N]``.

    ``parents``: int32 ``[B, N]`` (SPEC encoding).
    """
    _, _, d, anc = tree_structure(parents)
    mask.copy_(pack_bits(anc))
    depth.copy_(d.to(torch.int32))
