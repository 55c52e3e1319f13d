"""verify_tree (reference and Triton) against independent per-node loops:
random trees (chains, stars, deep, bushy, unused slots, duplicated sibling
tokens), NaN rows, garbage-prefilled outputs, num_nodes, sgl-kernel's
published golden case, chain-shaped trees == verify_chain, speculative ==
plain decoding, goodness of fit over many seeds, validation errors.

The truth walks each tree in Python: depth from the parent links, the target
token of each node row by an O(V) loop (fp32 scores, fp64 probabilities for
top-p), then the lowest matching child. Only dflash_kernels.noise (the
Philox oracle, tested in test_noise.py) is shared with the code under test.
"""

import numpy as np
import pytest
import torch
from scipy import stats

import dflash_kernels as dk
from helpers import probs64 as _probs64
from tree_cases import random_parents, tree_sampler
from dflash_kernels import noise

NEG_INF = float("-inf")
P_MIN = 1e-3
BACKENDS = ["reference", "triton"]
KINDS = ("chain", "star", "deep", "bushy", "short")


# ---------------------------------------------------------------------------
# Trees and inputs
# ---------------------------------------------------------------------------

def depths(par):
    d = [0] * len(par)
    for i in range(1, len(par)):
        if par[i] >= 0:
            d[i] = d[par[i]] + 1
    return d


def used_slots(par, num_nodes=None):
    n = 1
    while n < len(par) and 0 <= par[n] < n:
        n += 1
    return n if num_nodes is None else min(n, max(1, num_nodes))




def row_token(x, T, top_k, top_p, seed, pos):
    """The target token of one logit row (docs/DESIGN.md), by loops."""
    x = x.astype(np.float32).copy()
    x[np.isnan(x)] = -np.inf
    V = len(x)
    if T is None or not T > 0:
        best = 0
        for i in range(V):
            if x[i] > x[best]:
                best = i
        return best
    s = (x * (np.float32(1.0) / np.float32(T))).astype(np.float32)
    keep = np.ones(V, dtype=bool)
    if top_k is not None and 0 < top_k < V:
        keep &= s >= sorted(s.tolist(), reverse=True)[top_k - 1]
    if top_p is not None and top_p < 1:
        pr = _probs64(s, keep)
        cum, tau = 0.0, 0.0
        for v in sorted(pr.tolist(), reverse=True):
            cum += v
            if cum >= top_p:
                tau = v
                break
        keep &= pr >= tau
    gum = noise.gumbel(seed, pos, torch.arange(V)).numpy()
    score = np.where(keep, s + gum, -np.inf).astype(np.float32)
    best = 0
    for i in range(V):
        if score[i] > score[best]:
            best = i
    return best


def node_targets(kw, b):
    L = kw["logits"].float().cpu().numpy()[b]
    par = kw["parents"][b].tolist()
    d = depths(par)
    get = lambda n: None if kw.get(n) is None else kw[n][b].item()  # noqa: E731
    T, k, p, seed, pos = (get(n) for n in ("temperature", "top_k", "top_p", "seeds", "positions"))
    return [row_token(L[i], T, k, p, seed, None if pos is None else pos + d[i] + 1)
            for i in range(len(par))]


def truth(kw):
    """(accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens) as lists."""
    B, N = kw["tree_tokens"].shape
    V = kw["logits"].shape[-1]
    res = ([], [], [], [], [])
    for b in range(B):
        par = kw["parents"][b].tolist()
        nn = None if kw.get("num_nodes") is None else int(kw["num_nodes"][b])
        n_used = used_slots(par, nn)
        tok = kw["tree_tokens"][b].tolist()
        t = node_targets(kw, b)
        cur, path = 0, []
        while True:
            nxt = [c for c in range(1, n_used) if par[c] == cur and tok[c] == t[cur]]
            if not nxt:
                break
            cur = nxt[0]
            path.append(cur)
        a = len(path)
        bonus = min(max(t[cur], 0), V - 1)
        res[0].append(a)
        res[1].append(path + [-1] * (N - a))
        res[2].append([tok[c] for c in path] + [bonus] + [-1] * (N - a - 1))
        res[3].append(bonus)
        if kw.get("seq_lens") is not None:
            res[4].append(int(kw["seq_lens"][b]) + a + 1)
    return res


def make_case(B, N, V, *, kinds=KINDS, dtype=torch.float32, sampled="none", top_k=False,
              top_p=False, match_frac=0.75, special_rows=False, seq_lens=True, gen_seed=0,
              token_dtype=torch.int64):
    """verify_tree inputs; node tokens copy the parent's truth target token with
    probability ``match_frac`` (siblings may share it: duplicated sibling tokens),
    else a random id, some outside [0, V)."""
    rng = np.random.default_rng(gen_seed)
    g = torch.Generator().manual_seed(gen_seed)
    logits = (torch.randn(B, N, V, generator=g) * 2.0).to(dtype).float()
    if special_rows:
        flat = logits.view(B * N, V)
        flat[0, ::5] = float("nan")
        flat[min(1, B * N - 1)] = NEG_INF
        flat[min(2, B * N - 1)] = float("nan")
        if V > 4:
            flat[min(3, B * N - 1), :] = -1.0
            flat[min(3, B * N - 1), [2, V - 1]] = 4.0
    parents = torch.tensor([random_parents(N, kinds[b % len(kinds)], rng) for b in range(B)],
                           dtype=torch.int32)
    kw = dict(logits=logits.to(dtype), parents=parents,
              tree_tokens=torch.zeros(B, N, dtype=token_dtype))
    kw.update(tree_sampler(B, V, g, sampled, top_k, top_p))
    if seq_lens:
        kw["seq_lens"] = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32)
    tokens = torch.randint(0, V, (B, N), generator=g)
    for b in range(B):
        t = node_targets(kw, b)
        par = parents[b].tolist()
        for i in range(1, N):
            r = rng.random()
            if par[i] >= 0 and r < match_frac:
                tokens[b, i] = t[par[i]]
            elif r > 0.97:
                tokens[b, i] = V + 2 if r > 0.985 else -3
    kw["tree_tokens"] = tokens.to(token_dtype)
    return kw


def run(backend, kw, flat_logits=False):
    """Call the public op with outputs pre-filled with garbage."""
    B, N = kw["tree_tokens"].shape
    full = lambda *s: torch.full(s, -777, dtype=torch.int32)  # noqa: E731
    out = (full(B), full(B, N), full(B, N), full(B), full(B) if "seq_lens" in kw else None)
    kw = dict(kw)
    logits, tt, par = kw.pop("logits"), kw.pop("tree_tokens"), kw.pop("parents")
    if flat_logits:
        logits = logits.reshape(B * N, -1)
    res = dk.verify_tree(logits, tt, par, out=out, backend=backend, **kw)
    for r, o in zip(res, out):
        assert r is o
    return res


def assert_matches_truth(res, kw):
    acc, nodes, toks, bon, nsl = truth(kw)
    assert res.accept_len.tolist() == acc
    assert res.accepted_nodes.tolist() == nodes
    assert res.out_tokens.tolist() == toks
    assert res.bonus.tolist() == bon
    if kw.get("seq_lens") is None:
        assert res.new_seq_lens is None
    else:
        assert res.new_seq_lens.tolist() == nsl


# ---------------------------------------------------------------------------
# Against the loops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, N, V, dtype", [(1, 1, 7, torch.float32), (5, 9, 37, torch.float32),
                                            (5, 13, 50, torch.float16), (3, 33, 11, torch.float32)])
def test_greedy_against_loops(backend, B, N, V, dtype):
    kw = make_case(B, N, V, dtype=dtype, special_rows=True, gen_seed=N * V,
                   token_dtype=torch.int32 if N == 13 else torch.int64)
    res = run(backend, kw, flat_logits=N == 9)
    assert_matches_truth(res, kw)
    assert N == 1 or res.accept_len.sum() > 0        # the case exercises acceptance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, N, V, top_k, top_p", [(5, 7, 29, False, False), (5, 6, 40, True, False),
                                                   (5, 6, 33, False, True), (6, 5, 45, True, True)])
def test_sampled_against_loops(backend, B, N, V, top_k, top_p):
    kw = make_case(B, N, V, sampled="mixed", top_k=top_k, top_p=top_p, special_rows=True,
                   gen_seed=V + B)
    res = run(backend, kw)
    assert_matches_truth(res, kw)
    assert res.accept_len.sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_nodes_wins_over_parents(backend):
    kw = make_case(4, 8, 20, kinds=("chain", "bushy"), match_frac=1.0, gen_seed=4)
    kw["num_nodes"] = torch.tensor([1, 3, 8, 0], dtype=torch.int32)   # 0 counts as 1 (the root)
    res = run(backend, kw)
    assert_matches_truth(res, kw)
    assert res.accept_len.tolist()[0] == 0 and res.accept_len.tolist()[3] == 0
    assert res.accept_len.tolist()[1] == 2                              # chain, every token matches


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_sibling_tokens_take_lowest_slot(backend):
    # Root's children 1, 2, 3 carry the same (matching) token; 2 has a matching child.
    V = 6
    logits = torch.zeros(1, 5, V)
    logits[0, 0, 4] = 5.0          # t_0 = 4
    logits[0, 2, 1] = 5.0          # t_2 = 1
    logits[0, 1, 3] = 5.0          # t_1 = 3
    kw = dict(logits=logits, parents=torch.tensor([[-1, 0, 0, 0, 2]], dtype=torch.int32),
              tree_tokens=torch.tensor([[9, 4, 4, 4, 1]]))
    res = run(backend, kw)
    assert res.accepted_nodes.tolist() == [[1, -1, -1, -1, -1]]
    assert res.out_tokens.tolist() == [[4, 3, -1, -1, -1]]
    assert_matches_truth(res, kw)


def sgl_golden():
    """sgl-kernel test_verify_tree_greedy, translated to parents (node 0 = root)."""
    V = 20
    logits = torch.ones(2, 6, V)
    for b, i, v in [(0, 0, 3), (0, 3, 4), (0, 4, 5), (1, 0, 11), (1, 4, 12)]:
        logits[b, i, v] = 10.0
    low = logits.amax(-1) < 10
    logits[low.nonzero(as_tuple=True) + (torch.full((int(low.sum()),), 18),)] = 10.0
    # retrieve_next_token / next_sibling -> parents: request 0: children(0) = [1, 3],
    # children(1) = [2], children(3) = [4], children(4) = [5]; request 1: children(0) = [4, 1],
    # children(1) = [2], children(2) = [3], children(4) = [5].
    parents = torch.tensor([[-1, 0, 1, 0, 3, 4], [-1, 0, 1, 2, 0, 4]], dtype=torch.int32)
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    return dict(logits=logits, parents=parents, tree_tokens=tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgl_kernel_golden_case(backend):
    res = run(backend, sgl_golden())
    # Published: accept_token_num [3, 2]; accept_index [[0,3,4,5],[6,10,11,-1]] (flat rows,
    # root included); predicts 3,4,5 + bonus 18 and 11,12 + bonus 18.
    assert res.accept_len.tolist() == [3, 2]
    assert res.accepted_nodes.tolist() == [[3, 4, 5, -1, -1, -1], [4, 5, -1, -1, -1, -1]]
    flat = [[6 * b] + [6 * b + n for n in row if n >= 0] for b, row in enumerate(res.accepted_nodes.tolist())]
    assert flat == [[0, 3, 4, 5], [6, 10, 11]]
    assert res.out_tokens.tolist() == [[3, 4, 5, 18, -1, -1], [11, 12, 18, -1, -1, -1]]
    assert res.bonus.tolist() == [18, 18]


# ---------------------------------------------------------------------------
# A chain-shaped tree is verify_chain
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampled, top_k, top_p", [("none", False, False), ("mixed", False, False),
                                                   ("all", True, False), ("all", False, True),
                                                   ("all", True, True)])
def test_chain_tree_equals_verify_chain(backend, sampled, top_k, top_p):
    B, S, V = 5, 6, 41
    kw = make_case(B, S, V, kinds=("chain",), sampled=sampled, top_k=top_k, top_p=top_p,
                   special_rows=True, gen_seed=S + V + top_k + 2 * top_p)
    nd = torch.tensor([5, 0, 3, 5, 1], dtype=torch.int32)
    kw["num_nodes"] = nd + 1
    tree = run(backend, kw)
    ckw = {k: v for k, v in kw.items() if k not in ("parents", "tree_tokens", "num_nodes", "logits")}
    chain = dk.verify_chain(kw["logits"], kw["tree_tokens"], num_drafts=nd, backend=backend, **ckw)
    assert torch.equal(tree.accept_len, chain.accept_len)
    assert torch.equal(tree.out_tokens, chain.out_tokens)
    assert torch.equal(tree.bonus, chain.bonus)
    assert torch.equal(tree.new_seq_lens, chain.new_seq_lens)
    a = tree.accept_len.long()
    want_nodes = torch.where(torch.arange(S) < a[:, None], torch.arange(1, S + 1), -1)
    assert torch.equal(tree.accepted_nodes.long(), want_nodes)
    assert tree.accept_len.sum() > 0


# ---------------------------------------------------------------------------
# Keyed sampling: speculative == plain decoding, goodness of fit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_emits_plain_decoding_tokens(backend):
    B, N, V = 6, 10, 30
    kw = make_case(B, N, V, kinds=("bushy", "deep", "star"), sampled="all", top_k=True,
                   top_p=True, match_frac=0.8, gen_seed=8)
    res = run(backend, kw)
    for b in range(B):
        a = int(res.accept_len[b])
        path = [0] + res.accepted_nodes[b, :a].tolist()
        for k, node in enumerate(path):
            # Plain decoding: a one-node tree at the node's position, on that node's logits.
            one = dict(logits=kw["logits"][b:b + 1, node:node + 1],
                       parents=torch.tensor([[-1]], dtype=torch.int32),
                       tree_tokens=torch.zeros(1, 1, dtype=torch.int64),
                       temperature=kw["temperature"][b:b + 1], seeds=kw["seeds"][b:b + 1],
                       positions=kw["positions"][b:b + 1] + k,
                       top_k=kw["top_k"][b:b + 1], top_p=kw["top_p"][b:b + 1])
            assert run(backend, one).bonus.item() == res.out_tokens[b, k].item()


def softmax64(logits, T):
    s = np.asarray(logits, dtype=np.float64) / T
    p = np.exp(s - s.max())
    return p / p.sum()


def assert_fits(tokens, p, label=""):
    counts = np.bincount(np.asarray(tokens), minlength=len(p))
    assert counts.shape[0] == len(p), f"{label}: token out of range"
    n = counts.sum()
    assert n > 400
    res = stats.chisquare(counts, p * n)
    assert res.pvalue > P_MIN, f"{label}: p-value {res.pvalue:.2e}, counts {counts}, expected {p * n}"


def fit_case(R):
    """R requests of one tree with fixed rows: root children carry tokens 0, 1, 2 (slots
    1, 2, 3); slot 1 has children with tokens 0..3 (slots 4..7)."""
    V = 6
    rows = torch.tensor([[0.5, 1.0, -0.5, 0.2, 0.0, 0.8], [1.2, -0.3, 0.4, 0.9, -1.0, 0.1]])
    logits = torch.zeros(R, 8, V)
    logits[:, 0], logits[:, 1] = rows[0], rows[1]
    par = torch.tensor([-1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32).expand(R, 8).contiguous()
    tok = torch.tensor([99, 0, 1, 2, 0, 1, 2, 3]).expand(R, 8).contiguous()
    g = torch.Generator().manual_seed(5)
    kw = dict(logits=logits, parents=par, tree_tokens=tok, temperature=torch.full((R,), 0.9),
              seeds=torch.arange(R, dtype=torch.int64) * 7919 + 3,
              positions=torch.randint(0, 2 ** 40, (R,), generator=g))
    return kw, rows


def test_fit_sampled_tree():
    # The first emitted token follows p(row 0) whatever the tree; given the walk took
    # slot 1, the second follows p(row 1).
    R = 6000
    kw, rows = fit_case(R)
    res = run("reference", kw)
    p0, p1 = softmax64(rows[0].numpy(), 0.9), softmax64(rows[1].numpy(), 0.9)
    assert_fits(res.out_tokens[:, 0].tolist(), p0, "first token")
    took1 = res.accepted_nodes[:, 0] == 1
    assert_fits(res.out_tokens[took1, 1].tolist(), p1, "second token")
    # Acceptance probability of the first move: p0(0) + p0(1) + p0(2).
    moved = (res.accept_len > 0).float().mean().item()
    q = p0[:3].sum()
    assert abs(moved - q) < 4 * np.sqrt(q * (1 - q) / R)


def test_fit_case_triton_is_reference():
    # The noise is bit-identical across backends: the Triton walk gives the same tokens
    # (so the fit above holds for it), on a slice small enough for the interpreter.
    kw, _ = fit_case(16)
    got, want = run("triton", kw), run("reference", kw)
    for x, y in zip(got[:4], want[:4]):
        assert torch.equal(x, y)
    assert 0 < got.accept_len.sum() < 32


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def test_validation_errors():
    kw = make_case(2, 4, 10, sampled="all", gen_seed=1)
    L, tt, par = kw["logits"], kw["tree_tokens"], kw["parents"]
    bad = [
        (dict(parents=par.long()), "parents"),
        (dict(parents=par[:, :3]), "parents"),
        (dict(tree_tokens=tt.float()), "tree_tokens"),
        (dict(logits=L[:, :3]), "logits"),
        (dict(logits=L.int()), "logits"),
        (dict(num_nodes=torch.ones(3, dtype=torch.int32)), "num_nodes"),
        (dict(seeds=None), "seeds"),
        (dict(temperature=None), "top_k|seeds"),
        (dict(top_k=torch.ones(2)), "top_k"),
        (dict(seq_lens=torch.ones(2, dtype=torch.int64)), "seq_lens"),
        (dict(out=(1, 2)), "out"),
    ]
    for change, name in bad:
        args = dict(kw, **change)
        if change.get("temperature", 1) is None:
            args["top_k"] = torch.ones(2, dtype=torch.int32)
        with pytest.raises(ValueError, match=name):
            dk.verify_tree(args.pop("logits"), args.pop("tree_tokens"), args.pop("parents"),
                           backend="reference", **args)


@pytest.mark.parametrize("arch", [90, 100])
@pytest.mark.parametrize("kernel", ["_verify_rows_kernel", "_verify_tree_walk_kernel"])
def test_tree_kernels_compile_without_spills(kernel, arch):
    from dflash_kernels.triton_backend import verify_tree as tvt
    from microbench.compile import compile_report

    spec = tvt.compile_spec(kernel, N=256)
    module = "verify_chain" if kernel == "_verify_rows_kernel" else "verify_tree"
    rep = compile_report(f"dflash_kernels.triton_backend.{module}", kernel, spec["signature"],
                         spec["constexprs"], arch, spec["num_warps"], spec["num_stages"])
    assert rep["spills"] == 0, rep["spills"]
    assert rep["registers"] <= 128, rep["registers"]


def _tree_step(x, backend):
    """The target's verify pass over a tree: mask, masked attention, verify, keep the path."""
    mask, depth = dk.tree_mask(x["parents"], backend=backend)
    o = dk.block_attention(x["q"], x["kc"][0], x["vc"][0], x["bt"], x["ctx"], block_mask=mask,
                           backend=backend)
    res = dk.verify_tree(x["logits"], x["tokens"], x["parents"], temperature=x["temp"],
                         seeds=x["seeds"], positions=x["pos"], seq_lens=x["seq"], backend=backend)
    # Accepted nodes' K/V (written at ctx - N + node) move to the slots right after the anchor.
    B, N = x["tokens"].shape
    node = res.accepted_nodes.long()
    base = (x["ctx"].long() - N).view(B, 1)
    src = torch.where(node >= 0, base + node, 0).view(-1)
    dst = torch.where(node >= 0, base + 1 + torch.arange(N).view(1, N), -1).view(-1)
    dk.copy_kv(src, dst, x["kc"], x["vc"], backend=backend)
    return mask, depth, o, res.accept_len, res.accepted_nodes, res.out_tokens, res.bonus


def _step_inputs():
    g = torch.Generator().manual_seed(2)
    B, N, V, Hq, Hkv, D, page, L = 2, 6, 30, 2, 1, 64, 4, 2
    r = lambda *s, dt=torch.float16: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    return dict(parents=torch.tensor([[-1, 0, 0, 1, 3, -1], [-1, 0, 1, 1, 2, 0]], dtype=torch.int32),
                q=r(B, N, Hq, D), kc=r(L, 8, page, Hkv, D), vc=r(L, 8, page, Hkv, D),
                bt=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32),
                ctx=torch.tensor([9, 14], dtype=torch.int32), logits=r(B, N, V, dt=torch.float32),
                tokens=torch.randint(0, V, (B, N), generator=g),
                temp=torch.tensor([0.0, 0.7]), seeds=torch.tensor([3, 4]),
                pos=torch.tensor([8, 13]), seq=torch.tensor([9, 14], dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_step_compiles_fullgraph(backend):
    eager_in, compiled_in = _step_inputs(), _step_inputs()
    want = _tree_step(eager_in, backend)
    torch._dynamo.reset()
    got = torch.compile(_tree_step, fullgraph=True, backend="aot_eager")(compiled_in, backend)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(compiled_in["kc"], eager_in["kc"])
