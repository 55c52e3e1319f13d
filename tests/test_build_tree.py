"""The reference ``build_tree`` against a brute-force enumeration of every
candidate path, sorted by SPEC's key (score desc, then shallower, lower
candidate rank, lower parent slot). Integer-valued logits make exact ties."""

import itertools
import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter: log(0), inf - inf in discarded lanes
import torch

import dflash_kernels as dk
from dflash_kernels.reference.build_tree import candidates


def build_tree(logits, N, top_k, temperature=None, backend="reference"):
    return dk.build_tree(logits, N, top_k=top_k, temperature=temperature, backend=backend)


def brute_force(logits, N, k, temperature):
    """Python lists only: all paths of candidates, best-first, slot by slot."""
    D, V = logits.shape
    raw = [[(float("-inf") if math.isnan(v) else v) for v in row] for row in logits.tolist()]
    x = [[v / temperature for v in row] for row in raw]
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in x]
    # Candidates by the raw logit, lowest id on ties.
    cand = [sorted(range(V), key=lambda t: (-raw[d][t], t))[:k] for d in range(D)]
    # Exact ties between different paths depend on fp32 rounding, so the scores
    # use the reference's fp32 log-probabilities (checked against the float64
    # value here) and are accumulated in fp32 along the path, as the op does:
    # what is tested is the selection and its tie rules.
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    t = torch.full((1,), temperature, dtype=torch.float32)
    tok, lpt = candidates(logits.unsqueeze(0), k, t)
    assert tok[0].tolist() == cand
    lp = [[lpt[0, d, r] for r in range(k)] for d in range(D)]
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("B,S,V,k,N", [(3, 4, 7, 3, 9), (2, 3, 5, 2, 16), (2, 5, 11, 4, 23), (1, 2, 4, 4, 3)])
def test_build_tree_matches_enumeration(backend, seed, B, S, V, k, N):
    g = torch.Generator().manual_seed(seed)
    # Small integer logits: many exact ties in logits and in path scores.
    logits = torch.randint(-2, 3, (B, S - 1, V), generator=g).float()
    if seed % 2:
        logits = logits + 0.37 * torch.randn(B, S - 1, V, generator=g)
    if seed == 3:
        logits[0, 0, 1] = float("nan")
    temps = [1.0, 0.7, 1.9][seed % 3]
    t = None if seed == 0 else (temps if seed % 2 else torch.full((B,), temps))
    tree = build_tree(logits, N, top_k=k, temperature=t, backend=backend)
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


def _same(a, b):
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x.long(), y.long()), name


@pytest.mark.parametrize("B,S,V,k,N,dtype", [
    (2, 5, 301, 4, 37, torch.float32), (2, 3, 129, 8, 48, torch.bfloat16),
    (1, 7, 67, 2, 70, torch.float16), (3, 2, 40, 5, 9, torch.bfloat16)])
def test_build_tree_triton_matches_reference(B, S, V, k, N, dtype):
    g = torch.Generator().manual_seed(B * 1000 + V)
    logits = (3 * torch.randn(B, S - 1, V, generator=g)).to(dtype)
    temp = torch.tensor([0.6, 1.3, 2.0][:B])
    for t in (None, temp):
        _same(build_tree(logits, N, k, t, "triton"), build_tree(logits, N, k, t, "reference"))


def test_build_tree_edge_values_agree():
    """NaN (-inf), +inf (a point mass), rows without a finite logit, -0.0 == +0.0,
    and tiny / NaN temperatures (1e-5), on both backends."""
    V = 70
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, V, generator=g)
    x[0, 0, :] = float("-inf")
    x[0, 1, 7] = float("nan")
    x[0, 1, 3] = float("inf")
    x[0, 1, 60] = float("inf")
    x[1, :, :] = float("nan")
    x[2, 0, :] = 0.0
    x[2, 0, ::3] = -0.0
    x[3, 2, 9] = 1e38                 # overflows to +inf once scaled by 1 / 1e-5
    temp = torch.tensor([1.0, 0.5, float("nan"), 1e-9])
    ref = build_tree(x, 20, 3, temp, "reference")
    _same(build_tree(x, 20, 3, temp, "triton"), ref)
    assert ref.num_nodes.tolist() == [20] * 4
    # Row (0, 1): the two +inf ids, lowest first, each with log-probability -log 2.
    tok, lp = candidates(x[:1], 3, temp[:1])
    assert tok[0, 1, :2].tolist() == [3, 60]
    assert lp[0, 1, :2].tolist() == [torch.tensor(-math.log(2)).item()] * 2 and lp[0, 1, 2].item() == float("-inf")
    # No finite logit anywhere: ids 0, 1, 2 at every depth, all scores -inf; tie order.
    assert ref.tree_tokens[1, 1:4].tolist() == [0, 1, 2]
    assert ref.parents[1, 1:4].tolist() == [0, 0, 0] and ref.depth[1, 4].item() == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_build_tree_out_buffers_and_small_cases(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 33, generator=g)
    want = build_tree(logits, 11, 3, None, "reference")
    out = (torch.full((3, 11), 99, dtype=torch.int32), torch.full((3, 11), 99, dtype=torch.int32),
           torch.full((3,), 99, dtype=torch.int32), torch.full((3, 11), 99, dtype=torch.int32))
    got = dk.build_tree(logits, 11, top_k=3, out=out, backend=backend)
    assert all(a is b for a, b in zip(got, out))
    _same(got, want)
    # A Python float temperature is the same as a tensor of it.
    _same(dk.build_tree(logits, 11, top_k=3, temperature=0.7, backend=backend),
          build_tree(logits, 11, 3, torch.full((3,), 0.7), "reference"))
    one = dk.build_tree(logits, 1, top_k=3, backend=backend)
    assert one.num_nodes.tolist() == [1, 1, 1] and one.tree_tokens.tolist() == [[-1]] * 3
    empty = dk.build_tree(logits[:0], 5, top_k=3, backend=backend)
    assert empty.tree_tokens.shape == (0, 5)
    root = dk.build_tree(logits[:, :0], 5, top_k=3, backend=backend)
    assert root.num_nodes.tolist() == [1, 1, 1] and (root.parents == -1).all()
    chain = dk.build_tree(logits, 5, top_k=1, backend=backend)      # top_k 1: the argmax chain
    assert chain.parents[:, 1:].tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(chain.tree_tokens[:, 1:], logits.argmax(-1))


@pytest.mark.parametrize("bad,match", [
    (dict(num_nodes_budget=0), "num_nodes_budget"), (dict(num_nodes_budget=5000), "num_nodes_budget"),
    (dict(top_k=0), "top_k"), (dict(top_k=34), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=torch.ones(2)), "temperature"),
    (dict(temperature=torch.ones(3, dtype=torch.float64)), "temperature"),
    (dict(draft_logits=torch.zeros(3, 4, 33, dtype=torch.int32)), "draft_logits"),
    (dict(draft_logits=torch.zeros(3, 33)), "draft_logits"),
    (dict(out=(torch.zeros(3, 6, dtype=torch.int64),) * 2), "out"),
])
def test_build_tree_rejects_bad_calls(bad, match):
    a = dict(draft_logits=torch.zeros(3, 4, 33), num_nodes_budget=6, top_k=3)
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        dk.build_tree(a.pop("draft_logits"), a.pop("num_nodes_budget"), **a)


def test_build_tree_refuses_aliased_outputs_and_tp():
    x = torch.zeros(2, 3, 20)
    buf = torch.zeros(2, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="out.parents"):
        dk.build_tree(x, 6, top_k=2, out=(buf, buf, torch.zeros(2, dtype=torch.int32),
                                          torch.zeros(2, 6, dtype=torch.int32)))
    with pytest.raises(NotImplementedError, match="vocab-parallel"):
        dk.build_tree(x, 6, top_k=2, tp_group=object(), vocab_size=20)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_build_tree_under_torch_compile(backend):
    logits = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3))
    temp = torch.tensor([0.9, 1.4])
    want = build_tree(logits, 9, 4, temp, "reference")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: tuple(dk.build_tree(x, 9, top_k=4, temperature=t,
                                                        backend=backend)),
                       fullgraph=True, backend="aot_eager")
    _same(type(want)(*fn(logits, temp)), want)
