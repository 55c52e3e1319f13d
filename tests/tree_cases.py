"""Random draft trees and sampler arguments for the tree tests (test_tree_mask.py,
test_verify_tree.py, test_verify_tree_tp.py)."""

import torch


def random_parents(N, kind, rng):
    """Python list of N parents in SPEC encoding: "chain", "star", "deep" (parent one or
    two slots back), "bushy" (any earlier slot), "short" (bushy, then unused slots -1)."""
    used = N if kind != "short" else int(rng.integers(1, N + 1))
    par = [-1] * N
    for i in range(1, used):
        if kind == "chain":
            par[i] = i - 1
        elif kind == "star":
            par[i] = 0
        elif kind == "deep":
            par[i] = int(rng.integers(max(0, i - 2), i))
        else:  # bushy / short: any earlier slot
            par[i] = int(rng.integers(0, i))
    return par


def tree_sampler(B, V, g, sampled, top_k, top_p):
    """verify_tree sampler kwargs drawn from generator ``g``: none (``sampled="none"``), or
    temperatures (``"mixed"``: ~30% greedy requests), seeds, positions, and top-k (1..12,
    every third off) / top-p (0.3..0.95, every third off) when asked."""
    kw = {}
    if sampled == "none":
        return kw
    temp = 0.3 + 1.5 * torch.rand(B, generator=g)
    if sampled == "mixed":
        temp[torch.rand(B, generator=g) < 0.3] = 0.0
    kw["temperature"] = temp
    kw["seeds"] = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g)
    kw["positions"] = torch.randint(0, 2 ** 34, (B,), generator=g)
    if top_k:
        k = torch.randint(1, min(V, 12) + 1, (B,), generator=g, dtype=torch.int32)
        k[::3] = 0
        kw["top_k"] = k
    if top_p:
        p = 0.3 + 0.65 * torch.rand(B, generator=g)
        p[1::3] = 1.0
        kw["top_p"] = p
    return kw
