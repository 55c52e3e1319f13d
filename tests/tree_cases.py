"""Random draft trees for the tree tests (test_tree_mask.py, test_verify_tree.py)."""


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
