"""The reference ``build_tree`` against a brute-force enumeration of every
candidate path, sorted by SPEC's key (score desc, then shallower, lower
candidate rank, lower parent slot). Integer-valued logits make exact ties."""

import itertools
import math

import pytest
import torch

from dflash_kernels.reference.build_tree import build_tree


def brute_force(logits, N, k, temperature):
    """Python lists only: all paths of candidates, best-first, slot by slot."""
    D, V = logits.shape
    x = [[(float("-inf") if math.isnan(v) else v / temperature) for v in row]
         for row in logits.tolist()]
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in x]
    cand = [sorted(range(V), key=lambda t: (-x[d][t], t))[:k] for d in range(D)]
    # Exact ties between different paths depend on fp32 rounding, so the scores
    # use torch's fp32 log_softmax (checked against the float64 value here) and
    # are accumulated in fp32 along the path, as the op does.
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    table = torch.log_softmax(torch.tensor(x, dtype=torch.float32), -1)
    lp = [[table[d, cand[d][r]] for r in range(k)] for d in range(D)]
    for d in range(D):
        for r in range(k):
            exact = x[d][cand[d][r]] - lse[d]
            assert lp[d][r].item() == exact or abs(lp[d][r].item() - exact) < 1e-5
    paths = [p for n in range(1, D + 1) for p in itertools.product(range(k), repeat=n)]
    scores = {}
    for p in sorted(paths, key=len):
        parent = scores.get(p[:-1], f32(0.0))
        scores[p] = (parent + lp[len(p) - 1][p[-1]]).float()
    slot_of, out = {(): 0}, []
    remaining = set(paths)
    while len(out) < N - 1 and remaining:
        ready = [p for p in remaining if p[:-1] in slot_of]
        best = min(ready, key=lambda p: (-scores[p].item(), len(p), p[-1], slot_of[p[:-1]]))
        remaining.discard(best)
        slot_of[best] = len(out) + 1
        out.append((cand[len(best) - 1][best[-1]], slot_of[best[:-1]], len(best)))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("B,S,V,k,N", [(3, 4, 7, 3, 9), (2, 3, 5, 2, 16), (2, 5, 11, 4, 23), (1, 2, 4, 4, 3)])
def test_build_tree_matches_enumeration(seed, B, S, V, k, N):
    g = torch.Generator().manual_seed(seed)
    # Small integer logits: many exact ties in logits and in path scores.
    logits = torch.randint(-2, 3, (B, S - 1, V), generator=g).float()
    if seed % 2:
        logits = logits + 0.37 * torch.randn(B, S - 1, V, generator=g)
    if seed == 3:
        logits[0, 0, 1] = float("nan")
    temps = [1.0, 0.7, 1.9][seed % 3]
    t = None if seed == 0 else (temps if seed % 2 else torch.full((B,), temps))
    tree = build_tree(logits, N, top_k=k, temperature=t)
    for b in range(B):
        want = brute_force(logits[b], N, k, 1.0 if t is None else temps)
        n = 1 + len(want)
        assert tree.num_nodes[b].item() == n
        assert tree.tree_tokens[b, 0].item() == -1 and tree.parents[b, 0].item() == -1
        got = [(tree.tree_tokens[b, i].item(), tree.parents[b, i].item(), tree.depth[b, i].item())
               for i in range(1, n)]
        assert got == want
        assert (tree.tree_tokens[b, n:] == -1).all() and (tree.parents[b, n:] == -1).all()
        assert (tree.depth[b, n:] == 0).all()


def test_build_tree_fewer_paths_than_budget():
    logits = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(1))
    tree = build_tree(logits, 16, top_k=2)           # 2 + 4 paths < 15
    assert tree.num_nodes.tolist() == [7, 7]
    assert tree.parents.dtype == torch.int32 and tree.tree_tokens.dtype == torch.int64


def test_build_tree_without_draft_rows_is_the_root_alone():
    tree = build_tree(torch.randn(2, 0, 5), 4, top_k=2)
    assert tree.num_nodes.tolist() == [1, 1]
    assert (tree.parents == -1).all() and (tree.tree_tokens == -1).all()


def test_build_tree_rejects_bad_sizes():
    with pytest.raises(ValueError, match="top_k"):
        build_tree(torch.zeros(1, 2, 3), 4, top_k=4)
