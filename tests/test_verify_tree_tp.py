"""Vocab-parallel verify_tree (tp_group=) against the single-device reference, bit for bit.

Real processes (tests/tp_worker.py's harness: fork + gloo, deadline-joined) on
2, 3 and 4 ranks, one spawn per world size running every case: greedy,
sampling (with greedy requests mixed in), top-k, top-p, top-k + top-p; chain,
star, deep, bushy and short (unused slots) trees, num_nodes; uneven shards, a
shard of width 1, a last shard padded with garbage, a shard wholly in the
padding; ties across shard borders; NaN / all -inf / all NaN rows; node tokens
that are padded ids or outside the vocab. Each rank's outputs must equal the
reference backend on the concatenated unpadded logits, and its collectives
must be exactly ``vocab_parallel.collectives(B, N, ...)`` without draft_probs.
"""

import numpy as np
import pytest
import torch

import dflash_kernels
from dflash_kernels import vocab_parallel as vp
from dflash_kernels.reference.tree_mask import tree_structure
from dflash_kernels.reference.verify_chain import target_tokens
from tp_worker import call_tree, spawn
from helpers import layout_cases, stress_sampler
from tree_cases import random_parents, tree_sampler

NINF, NAN = float("-inf"), float("nan")
KINDS = ("chain", "bushy", "star", "deep", "short")
FIELDS = ("accept_len", "accepted_nodes", "out_tokens", "bonus", "new_seq_lens")

# Shard borders per world size (last = padded width); V is the true vocab.
LAYOUTS = {
    2: [(600, [0, 301, 640]), (250, [0, 250, 256])],                 # uneven; shard 1 all padding
    3: [(499, [0, 1, 250, 512]), (300, [0, 100, 200, 300])],         # width 1, padded; even
    4: [(400, [0, 128, 256, 384, 512]), (333, [0, 90, 91, 333, 340])],
}

MODES = [
    dict(sampled="none"),
    dict(sampled="mixed"),
    dict(sampled="mixed", top_k=True),
    dict(sampled="mixed", top_p=True),
    dict(sampled="mixed", top_k=True, top_p=True),
]


def _border_ties(logits, borders, V):
    """Root rows of requests 1..3: a greedy tie straddling a border (-> the lower id), heavy
    ties everywhere (top-k thresholds tie across borders), the max only right of a border."""
    inner = [b for b in borders[1:-1] if 0 < b < V]
    if not inner or logits.shape[0] < 4:
        return
    b = inner[0]
    logits[1, 0] = -1.0
    logits[1, 0, [b - 1, b]] = 7.0
    logits[2, 0] = torch.arange(V, dtype=torch.float32).remainder(5).to(logits.dtype)
    logits[3, 0] = -2.0
    logits[3, 0, b:] = 3.0


def _node_tokens(kw, V, g, rng, match_frac):
    """Node tokens copying the parent's target token (reference) with probability
    ``match_frac`` (siblings may share it), else random ids; some are the first padded
    id ``V`` or negative (never match)."""
    logits, parents = kw["logits"], kw["parents"]
    B, N = parents.shape
    _, par, depth, _ = tree_structure(parents, kw.get("num_nodes"), ancestors=False)
    row_pos = None if "temperature" not in kw else kw["positions"].view(B, 1) + depth + 1
    t = target_tokens(logits[..., :V], kw.get("temperature"), kw.get("top_k"), kw.get("top_p"),
                      kw.get("seeds"), kw.get("positions"), row_pos)[0]
    r = torch.from_numpy(rng.random((B, N)))
    tokens = torch.randint(0, V, (B, N), generator=g)
    tokens = torch.where(r < match_frac, t.gather(1, par.clamp(min=0)), tokens)
    tokens = torch.where(r > 0.96, torch.tensor(V), tokens)
    tokens = torch.where(r > 0.985, torch.tensor(-3), tokens)
    return tokens


def make_case(B, N, V, *, kinds=KINDS, dtype=torch.float32, sampled="none", top_k=False,
              top_p=False, borders=None, num_nodes=False, match_frac=0.8, gen_seed=0):
    """verify_tree inputs (kwargs; ``logits`` [B, N, V]) with NaN / -inf / tied rows."""
    rng = np.random.default_rng(gen_seed)
    g = torch.Generator().manual_seed(gen_seed)
    logits = (torch.randn(B, N, V, generator=g) * 2.0).to(dtype)
    flat = logits.view(B * N, V)
    if B * N > 4:
        flat[N - 1, ::5] = NAN          # last node row of request 0
        flat[2 * N - 1] = NINF
        flat[-1] = NAN
    if borders is not None:
        _border_ties(logits, borders, V)
    parents = torch.tensor([random_parents(N, kinds[b % len(kinds)], rng) for b in range(B)],
                           dtype=torch.int32)
    kw = dict(logits=logits, parents=parents)
    kw.update(tree_sampler(B, V, g, sampled, top_k, top_p))
    if sampled == "mixed":
        kw["temperature"][0] = 0.9          # request 0 (a chain) samples
    if num_nodes:
        kw["num_nodes"] = torch.randint(0, N + 2, (B,), generator=g, dtype=torch.int32)
    kw["seq_lens"] = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32)
    kw["tree_tokens"] = _node_tokens(kw, V, g, rng, match_frac)
    return kw


def _stress(V, gen_seed):
    """Sampled requests with top-k / top-p corner values (k = 1, V-1, the tied count, off;
    top_p <= 0, tiny, ~1, off) on tied and NaN-holed rows, over small bushy trees and chains."""
    g = torch.Generator().manual_seed(gen_seed)
    B, N = 8, 4
    rows, filters = stress_sampler(V, g)
    kw = dict(logits=rows[:, None, :].expand(B, N, V).contiguous(),
              parents=torch.tensor([[-1, 0, 0, 1]] * 4 + [[-1, 0, 1, 2]] * 4, dtype=torch.int32),
              seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g),
              positions=torch.randint(0, 2 ** 34, (B,), generator=g), **filters)
    kw["tree_tokens"] = _node_tokens(kw, V, g, np.random.default_rng(gen_seed), 0.9)
    return kw


def build_cases(world):
    cases = layout_cases(
        LAYOUTS[world], MODES,
        lambda V, borders, mode, dtype, i: make_case(5, 7, V, dtype=dtype, borders=borders,
                                                     num_nodes=i % 10 == 2,
                                                     gen_seed=100 * world + i, **mode),
        lambda V, borders, li: _stress(V, world + li))
    V, borders = LAYOUTS[world][0]
    cases.append((V, borders, make_case(3, 6, V, kinds=("chain",), sampled="all", top_k=True,
                                        top_p=True, gen_seed=world)))
    cases.append((V, borders, make_case(2, 1, V, sampled="all", top_p=True, gen_seed=world)))  # N = 1
    return cases


def reference(kw):
    return call_tree(kw, backend="reference")


def assert_same(got, want, label):
    for name, a, b in zip(FIELDS, got, want):
        assert (a is None) == (b is None), (label, name)
        if a is not None:
            assert torch.equal(a, b), f"{label} {name}:\n{a}\nwant\n{b}"


def plan_of(kw):
    B, N = kw["tree_tokens"].shape
    return vp.collectives(B, N, temperature="temperature" in kw, top_k="top_k" in kw,
                          top_p="top_p" in kw, draft_probs=False)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_equal_single_device(world, tmp_path):
    cases = build_cases(world)
    per_rank = spawn(world, cases, tmp_path)
    for ci, (V, borders, kw) in enumerate(cases):
        want = reference(kw)
        for rank in range(world):
            got, log = per_rank[rank][ci]
            assert_same(got, want, f"case {ci} (V {V}, borders {borders}, "
                                   f"{sorted(kw)}) rank {rank}")
            assert log == plan_of(kw), (ci, rank, log)
    # The cases walked past the root, in trees that are not chains too.
    accepted = [int(per_rank[0][ci][0][0][b]) for ci in range(len(cases))
                for b in range(cases[ci][2]["parents"].shape[0])]
    assert sum(a > 0 for a in accepted) >= len(accepted) // 3
    assert any(int(per_rank[0][ci][0][0][1]) > 0 for ci in range(len(MODES)))   # a bushy tree


# ---------------------------------------------------------------------------
# Single process: one shard holding the whole vocab (no communication)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_local_shard_radix_widths(bits):
    V = 211
    for mi, mode in enumerate(MODES):
        kw = make_case(5, 6, V, gen_seed=mi, num_nodes=mi == 1, **mode)
        B, N = kw["tree_tokens"].shape
        full = lambda *shape: torch.full(shape, -777, dtype=torch.int32)  # noqa: E731
        out = (full(B), full(B, N), full(B, N), full(B), full(B))
        g = kw.get
        vp.verify_tree_tp(kw["logits"], kw["tree_tokens"], kw["parents"], g("num_nodes"),
                          g("temperature"), g("top_k"), g("top_p"), g("seeds"), g("positions"),
                          g("seq_lens"), *out, group="local", vocab_start=0, vocab_size=V,
                          radix_bits=bits)
        assert_same(out, reference(kw), (mode, bits))


def test_public_op_local_group():
    # Through ops.verify_tree: a padded single shard (vocab_size < width), and B = 0.
    V = 97
    kw = make_case(4, 5, V, sampled="mixed", top_k=True, top_p=True, gen_seed=3)
    padded = dict(kw, logits=torch.cat([kw["logits"], torch.full((4, 5, 7), 1e9)], -1))
    assert_same(call_tree(padded, tp_group="local", vocab_size=V), reference(kw), "padded")
    empty = dict(logits=torch.zeros(0, 3, V), tree_tokens=torch.zeros(0, 3, dtype=torch.int64),
                 parents=torch.zeros(0, 3, dtype=torch.int32))
    assert all(t.numel() == 0 for t in call_tree(empty, tp_group="local", vocab_size=V)
               if t is not None)


def test_validation():
    kw = make_case(2, 4, 50, sampled="all", gen_seed=1)
    logits, tt, par = kw.pop("logits"), kw.pop("tree_tokens"), kw.pop("parents")
    bad = [
        (dict(tp_group="local"), "vocab_size"),
        (dict(tp_group="local", vocab_size=50, vocab_start=-1), "vocab_start"),
        (dict(tp_group="local", vocab_size=50, vocab_start=51), "vocab_start"),
        (dict(tp_group="local", vocab_size=2 ** 23), "vocab_size"),
        (dict(tp_group="local", vocab_size=50, backend="triton"), "backend"),
        (dict(vocab_size=50), "vocab_start, vocab_size"),
        (dict(vocab_start=3), "vocab_start, vocab_size"),
    ]
    for extra, name in bad:
        with pytest.raises(ValueError, match=name):
            dflash_kernels.verify_tree(logits, tt, par, **kw, **extra)


def test_microbench_cli_routes_tp(monkeypatch):
    # `python -m microbench verify --tp N [--tree]` reaches microbench.tp with the flags.
    import microbench.tp
    from microbench.cli import main
    seen = []
    monkeypatch.setattr(microbench.tp, "main", lambda args: seen.append(args) or 0)
    assert main(["verify", "--tp", "3", "--tree", "--modes", "greedy,top_p"]) == 0
    assert (seen[0].tp, seen[0].tree, seen[0].modes) == (3, True, ["greedy", "top_p"])
    assert main(["verify", "--tree"]) == 2                 # --tree without --tp
    assert main(["inject_kv", "--tp", "2"]) == 2
    assert len(seen) == 1


def test_microbench_tree_inputs_and_plan():
    from microbench.tp import TREE_MODES, make_inputs, plan_row
    assert "draft_probs" not in TREE_MODES and "all" not in TREE_MODES
    kw = make_inputs("greedy", 2, 7, 50, 0, tree=True)
    assert kw["parents"].tolist()[0] == [-1, 0, 0, 1, 1, 2, 2]
    res = dflash_kernels.verify_tree(kw.pop("logits"), kw.pop("tree_tokens"), kw.pop("parents"),
                                     **kw)
    # Every node carries its parent's argmax: greedy walks the leftmost path to a leaf.
    assert res.accepted_nodes[:, :3].tolist() == [[1, 3, -1]] * 2
    # docs/tensor_parallel.md's verify_tree table (B 32, N 64, world 8).
    R = 32 * 64
    assert plan_row("greedy", 32, 64, 152064, 8, 8)[:2] == (1, R * 8)
    # the +inf-rows MAX, the row max, 4 + 4 radix passes, the winners
    assert plan_row("top_k+top_p", 32, 64, 152064, 8, 8)[:2] == (
        11, R * 8 + R * 4 + 4 * R * 256 * 4 + 4 * R * 256 * 8 + R * 8) == (11, 25_206_784)
    assert plan_row("top_k+top_p", 32, 64, 152064, 8, 4)[:2] == (19, 3_170_304 + R * 8)
