"""PyTorch reference of ``build_tree`` (SPEC.md "Trees"), on any device.

Not yet wired as a public op (no schema entry, no Triton kernel): this is the
executable form of SPEC's selection and tie rules, which the fast paths will be
tested against (issue 16).

Selection is best-first over a fixed frontier: ``N - 1`` steps, each a masked
max over the ``[B, N, top_k]`` children of the slots chosen so far. Because a
log-probability is at most 0, a child never outscores its parent, so the
best-first order is the order of decreasing score of the final node set, and
that set is the ``N - 1`` best candidate paths (prefix-closed). Fixed work for
given (B, N, S, top_k), no host synchronisation.

Details fixed here (SPEC leaves them open): unused slots hold token -1,
parent -1, depth 0; slot 0's token is -1 (the caller writes the anchor); NaN
draft logits count as -inf (as in the verify ops).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


class DraftTree(NamedTuple):
    tree_tokens: Tensor   # int64 [B, N]: slot 0 and unused slots -1
    parents: Tensor       # int32 [B, N]: -1 for the root and unused slots
    num_nodes: Tensor     # int32 [B]: used slots, root included (1..N)
    depth: Tensor         # int32 [B, N]: 0 for the root and unused slots


def candidates(draft_logits: Tensor, top_k: int, temperature=None):
    """Per-depth candidates: ``(tokens int64 [B, D, k], logp fp32 [B, D, k])``
    with D = S - 1; rank r is the r-th largest logit, lowest id on ties."""
    x = draft_logits.float().nan_to_num(nan=float("-inf"))
    B, D, V = x.shape
    if temperature is not None:
        t = torch.as_tensor(temperature, dtype=torch.float32, device=x.device)
        x = x / t.reshape(-1, 1, 1).expand(B, 1, 1)
    logp = torch.log_softmax(x, dim=-1)
    # A stable descending sort keeps the lower id first among equal logits.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return order, torch.gather(logp, -1, order)


def build_tree(draft_logits: Tensor, num_nodes_budget: int, *, top_k: int = 8,
               temperature: Optional[Union[float, Tensor]] = None) -> DraftTree:
    """``draft_logits [B, S-1, V]`` (any float dtype) -> :class:`DraftTree` with
    N = ``num_nodes_budget`` slots; see SPEC.md for the selection rules."""
    B, D, V = draft_logits.shape
    N, k = int(num_nodes_budget), int(top_k)
    if N < 1 or not 1 <= k <= V:
        raise ValueError(f"build_tree: need num_nodes_budget >= 1 and 1 <= top_k <= V, "
                         f"got {N} and {k} (V = {V})")
    dev = draft_logits.device
    tok, lp = candidates(draft_logits, k, temperature)
    i64 = torch.int64
    tokens = torch.full((B, N), -1, dtype=i64, device=dev)
    parents = torch.full((B, N), -1, dtype=i64, device=dev)
    depth = torch.zeros((B, N), dtype=i64, device=dev)
    # A slot's children are scored once, when the slot is filled; ``open`` marks
    # the (slot, rank) children that can still be chosen.
    child_score = torch.zeros((B, N, k), dtype=torch.float32, device=dev)
    open_ = torch.zeros((B, N, k), dtype=torch.bool, device=dev)
    if D > 0:
        child_score[:, 0] = lp[:, 0]
        open_[:, 0] = True
    # Tie order among equal scores: shallower, then lower rank, then lower parent slot.
    rank = torch.arange(k, device=dev, dtype=i64).view(1, 1, k)
    slot = torch.arange(N, device=dev, dtype=i64).view(1, N, 1)
    brow = torch.arange(B, device=dev)
    big = (D + 1) * k * N
    for step in range(1, N if D > 0 else 1):           # S = 1: the root alone
        masked = child_score.masked_fill(~open_, float("-inf"))
        best = masked.flatten(1).max(-1).values.view(B, 1, 1)
        tie = open_ & (masked == best)
        code = ((depth.unsqueeze(-1) + 1) * k + rank) * N + slot
        pick = code.masked_fill(~tie, big).flatten(1).argmin(-1)   # [B]
        ok = tie.flatten(1).any(-1)
        p, r = pick // k, pick % k
        open_.view(B, N * k)[brow, pick] = False
        d = depth[brow, p] + 1
        tokens[:, step] = torch.where(ok, tok[brow, d - 1, r], -1)
        parents[:, step] = torch.where(ok, p, -1)
        depth[:, step] = torch.where(ok, d, 0)
        if step < N - 1 and D > 1:
            row = lp[brow, d.clamp(max=D - 1)]                       # [B, k]
            child_score[:, step] = child_score[brow, p, r].unsqueeze(-1) + row
            open_[:, step] = (ok & (d < D)).unsqueeze(-1)
    num_nodes = (parents >= 0).sum(-1).to(torch.int32) + 1
    return DraftTree(tokens, parents.to(torch.int32), num_nodes, depth.to(torch.int32))
