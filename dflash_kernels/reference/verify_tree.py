"""PyTorch reference of ``verify_tree`` (SPEC.md "Trees"), on any device.

The target token of every node row comes from verify_chain's reference
(:func:`..verify_chain.target_tokens`) with the noise keyed by the node's
position ``positions[b] + depth(i) + 1``; the walk then runs N - 1 fixed
steps over the batch (no host sync), each moving every still-alive request
to its lowest used child whose token equals the current node's target token.
"""

from __future__ import annotations

import torch

from .tree_mask import tree_structure
from .verify_chain import target_tokens


def verify_tree(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds,
                positions, seq_lens, accept_len, accepted_nodes, out_tokens, bonus,
                new_seq_lens) -> None:
    """Writes accept_len / accepted_nodes / out_tokens / bonus / new_seq_lens (docs/tree.md)."""
    B, N, V = logits.shape
    used, par, depth, _ = tree_structure(parents, num_nodes, ancestors=False)
    row_pos = None if temperature is None else positions.view(B, 1) + depth + 1
    t = target_tokens(logits, temperature, top_k, top_p, seeds, positions, row_pos)[0]
    walk(V, tree_tokens, used, par, t, seq_lens, accept_len, accepted_nodes, out_tokens, bonus,
         new_seq_lens)


def walk(V, tree_tokens, used, par, t, seq_lens, accept_len, accepted_nodes, out_tokens, bonus,
         new_seq_lens) -> None:
    """The walk and the outputs from the per-node target tokens.

    ``t`` int64 ``[B, N]`` (ids in ``[0, V)``); ``used`` / ``par`` from
    :func:`tree_structure`. Shared with the vocab-parallel path, whose ``t``
    is the same bits.
    """
    B, N = tree_tokens.shape
    dev = tree_tokens.device
    tok = tree_tokens.to(torch.int64)
    idx = torch.arange(N, device=dev, dtype=torch.int64).view(1, N)
    cur = torch.zeros((B,), dtype=torch.int64, device=dev)
    alive = torch.ones((B,), dtype=torch.bool, device=dev)
    a = torch.zeros((B,), dtype=torch.int64, device=dev)
    nodes = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    for step in range(N - 1):
        t_cur = t.gather(1, cur.view(B, 1))
        cand = used & (par == cur.view(B, 1)) & (tok == t_cur)
        c = torch.where(cand, idx, N).amin(-1)
        alive = alive & (c < N)
        nodes[:, step] = torch.where(alive, c, -1)
        cur = torch.where(alive, c, cur)
        a += alive.to(torch.int64)
    bon = t.gather(1, cur.view(B, 1)).squeeze(1).clamp(0, V - 1)
    path_tok = tok.gather(1, nodes.clamp(min=0))
    a2 = a.view(B, 1)
    toks = torch.where(idx < a2, path_tok, torch.where(idx == a2, bon.view(B, 1), -1))
    accept_len.copy_(a.to(torch.int32))
    accepted_nodes.copy_(nodes.to(torch.int32))
    out_tokens.copy_(toks.to(torch.int32))
    bonus.copy_(bon.to(torch.int32))
    if new_seq_lens is not None:
        new_seq_lens.copy_((seq_lens.to(torch.int64) + a + 1).to(torch.int32))
