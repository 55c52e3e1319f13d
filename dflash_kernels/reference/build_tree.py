"""PyTorch reference of ``build_tree`` (SPEC.md "Trees"), on any device.

Selection is best-first: ``N - 1`` steps, each a max over the frontier of
children of the slots chosen so far. A log-probability is at most 0, so a
child never outscores its parent and the best-first order is the order of
decreasing score of the final node set: that set is the ``N - 1`` best
candidate paths (prefix-closed). Fixed work for given (B, N, S, top_k), no
host synchronisation.

Edge values (docs/tree.md, "build_tree"), applied identically by the Triton
kernel: NaN draft logits count as -inf; the scaled logits are
``z = x * (1 / T)`` in fp32 with ``T`` raised to at least ``SAMPLING_EPS``
(NaN too); a row where some ``z`` is +inf is a point mass on those ids
(log-probability ``-log(count)``); a row with no finite ``z`` has every
log-probability -inf. Candidates are ranked by the raw logit (lowest id on
ties), scores are fp32 sums along the path, ``lse = m + log(sum(exp(z - m)))``.
Unused slots hold token -1, parent -1, depth 0; slot 0's token is -1 (the
caller writes the anchor).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._rules import SAMPLING_EPS


class DraftTree(NamedTuple):
    """Result of :func:`dflash_kernels.build_tree`.

    tree_tokens: int64 ``[B, N]``: each slot's token; slot 0 and unused slots -1.
    parents: int32 ``[B, N]``: -1 for the root and unused slots.
    num_nodes: int32 ``[B]``: used slots, root included (1..N).
    depth: int32 ``[B, N]``: 0 for the root and unused slots.
    """
    tree_tokens: Tensor
    parents: Tensor
    num_nodes: Tensor
    depth: Tensor


def inverse_temperature(temperature: Optional[Tensor], B: int, device) -> Tensor:
    """fp32 ``[B, 1, 1]`` ``1 / max(T, SAMPLING_EPS)`` (NaN counts as tiny); 1 for None."""
    if temperature is None:
        return torch.ones((B, 1, 1), dtype=torch.float32, device=device)
    t = temperature.to(torch.float32).reshape(B, 1, 1)
    t = torch.where(t >= SAMPLING_EPS, t, torch.full_like(t, SAMPLING_EPS))
    return 1.0 / t


def candidates(draft_logits: Tensor, top_k: int, temperature: Optional[Tensor] = None):
    """Per-depth candidates: ``(tokens int64 [B, D, k], logp fp32 [B, D, k])``
    with D = S - 1; rank r is the r-th largest logit, lowest id on ties."""
    x = draft_logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"),
                                        neginf=float("-inf"))
    B, D, V = x.shape
    z = x * inverse_temperature(temperature, B, x.device)
    inf = torch.isposinf(z)
    n_inf = inf.sum(-1, keepdim=True)
    m = z.masked_fill(inf, float("-inf")).amax(-1, keepdim=True)
    finite_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(z.masked_fill(inf, float("-inf")) - finite_m).sum(-1, keepdim=True)
    logp = z - (finite_m + torch.log(s))
    logp = torch.where(torch.isfinite(m), logp, torch.full_like(logp, float("-inf")))
    point = torch.where(inf, -torch.log(n_inf.float()), torch.full_like(z, float("-inf")))
    logp = torch.where(n_inf > 0, point, logp)
    # A stable descending sort keeps the lower id first among equal logits.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return order, torch.gather(logp, -1, order)


def build_tree(draft_logits: Tensor, top_k: int, temperature: Optional[Tensor],
               tree_tokens: Tensor, parents: Tensor, num_nodes: Tensor, depth: Tensor) -> None:
    """Writes the :class:`DraftTree` of ``draft_logits [B, S-1, V]`` (any float
    dtype) into ``tree_tokens`` (int32/int64 ``[B, N]``), ``parents``,
    ``num_nodes`` and ``depth`` (int32); ``temperature``: fp32 ``[B]`` or None.
    The public op has checked the arguments (``1 <= top_k <= V``)."""
    B, D, V = draft_logits.shape
    N, k = tree_tokens.shape[1], int(top_k)
    dev = draft_logits.device
    tok, lp = candidates(draft_logits, k, temperature)
    i64 = torch.int64
    tokens = torch.full((B, N), -1, dtype=i64, device=dev)
    par = torch.full((B, N), -1, dtype=i64, device=dev)
    dep = torch.zeros((B, N), dtype=i64, device=dev)
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
        code = ((dep.unsqueeze(-1) + 1) * k + rank) * N + slot
        pick = code.masked_fill(~tie, big).flatten(1).argmin(-1)   # [B]
        ok = tie.flatten(1).any(-1)
        p, r = pick // k, pick % k
        open_.view(B, N * k)[brow, pick] = False
        d = dep[brow, p] + 1
        tokens[:, step] = torch.where(ok, tok[brow, d - 1, r], -1)
        par[:, step] = torch.where(ok, p, -1)
        dep[:, step] = torch.where(ok, d, 0)
        if step < N - 1 and D > 1:
            row = lp[brow, d.clamp(max=D - 1)]                       # [B, k]
            child_score[:, step] = child_score[brow, p, r].unsqueeze(-1) + row
            open_[:, step] = (ok & (d < D)).unsqueeze(-1)
    tree_tokens.copy_(tokens)
    parents.copy_(par)
    num_nodes.copy_((par >= 0).sum(-1) + 1)
    depth.copy_(dep)
