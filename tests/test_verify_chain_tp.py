"""Vocab-parallel verify_chain (tp_group=) against the single-device reference, bit for bit.

Real processes: torch.multiprocessing (fork; spawn with DFLASH_TP_TEST_START=spawn) + gloo on 2, 3 and 4 ranks, one
spawn per world size running every case (greedy, sampling, top-k, top-p,
top-k + top-p, draft_probs with and without filters; uneven shards, a shard of
width 1, a last shard padded with garbage, a shard wholly in the padding,
ties across shard borders, NaN / -inf rows). Each rank's outputs must equal
the reference backend on the concatenated unpadded logits, and its
collectives must be exactly :func:`vocab_parallel.collectives`. Every spawn
is joined with a deadline, then terminated: no process outlives its test.

``filter_order="joint"`` (SGLang's top-k + top-p) runs in the same spawns: the
random modes with both filters, and :func:`_joint_rows`, rows built around a
shard border where the full row's top-p target reaches the top-k mass (the
row keeps its top-k set) and where it does not (the nucleus lies inside the
top-k set), with top-k / top-p off, NaN / -inf and greedy rows beside them;
each joint case also runs as "sequential", and the two must differ.
"""

import math
import time

import pytest
import torch
import torch.multiprocessing as mp

import dflash_kernels
from dflash_kernels import vocab_parallel as vp
from dflash_kernels.reference import verify_chain as ref
import tp_worker
from tp_worker import spawn
from helpers import layout_cases, make_verify_case as make_case, run_verify as run, stress_sampler

NINF, NAN = float("-inf"), float("nan")

# Shard borders per world size (last = padded width); V is the true vocab.
LAYOUTS = {
    2: [(1000, [0, 437, 1024]), (300, [0, 299, 320])],
    3: [(997, [0, 384, 768, 1152]), (500, [0, 1, 250, 512])],
    4: [(700, [0, 192, 384, 576, 768]), (500, [0, 200, 201, 500, 520])],
}

MODES = [
    dict(sampled="none"),
    dict(),
    dict(top_k=True),
    dict(top_p=True),
    dict(top_k=True, top_p=True),
    dict(draft_probs=True),
    dict(draft_probs=True, top_k=True),
    dict(draft_probs=True, top_k=True, top_p=True),
]


def _border_ties(kw, borders, V):
    """Rows whose greedy max / top-k threshold ties straddle a shard border."""
    logits = kw["logits"]
    B, S, _ = logits.shape
    flat = logits.view(B * S, V)
    inner = [b for b in borders[1:-1] if 0 < b < V]
    if not inner or B * S < 9:
        return
    b = inner[0]
    flat[6] = -1.0
    flat[6, [b - 1, b]] = 7.0                           # greedy tie -> b - 1 (lowest id)
    flat[7] = torch.arange(V, dtype=torch.float32).remainder(5).to(flat.dtype)  # heavy ties
    flat[8] = -2.0
    flat[8, b:] = 3.0                                   # max only on the right of a border


def _stress(V, borders, gen_seed):
    """Sampled rows with top-k / top-p corner values (k = 1, V-1, ties, top_p <= 0, tiny, ~1)."""
    g = torch.Generator().manual_seed(gen_seed)
    B, S = 8, 2
    rows, filters = stress_sampler(V, g)
    kw = dict(logits=rows[:, None, :].expand(B, S, V).contiguous(),
              block_tokens=torch.randint(0, V, (B, S), generator=g),
              num_drafts=torch.ones(B, dtype=torch.int32), **filters,
              seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g),
              positions=torch.randint(0, 2 ** 34, (B,), generator=g))
    return kw


# SGLang's test row (tests/test_verify_chain_ragged.py): top-4, top_p 0.82 keeps 4 in joint
# order, 3 in sequential order.
SGL_PROBS = [0.35, 0.25, 0.20, 0.05, 0.03, 0.03, 0.03, 0.03, 0.03]


def _joint_rows(V, borders, gen_seed, *, draft_probs=False, dtype=torch.float32):
    """Sampled requests whose top-k / top-p sets straddle the first inner shard border b
    (S = 3 rows per request, all the request's logit row; drafts from its top tokens).

    Per request (logit row, temperature, top_k, top_p), each twice with other seeds:
    the full row's target reaching the top-k mass (joint keeps the top-k set,
    sequential cuts it; one with the k-th value tied across b), the target inside the
    top-k set (joint's nucleus is larger than sequential's; one with tied masses at the
    nucleus' edge), top-p off, top-k off (0 and >= V), NaN / -inf holes, all -inf,
    all NaN, and a greedy request with both filters given.
    """
    g = torch.Generator().manual_seed(gen_seed)
    inner = [b for b in borders[1:-1] if 0 < b < V]
    b = inner[0]
    ids = [(b + o) % V for o in (0, -1, 1, -2, 2, 3, -3, 4, 5)]   # ids[1] | b | ids[0], ids[2]
    flat = torch.randn(V, generator=g) * 0.1

    def placed(vals, rest):
        r = torch.full((V,), rest) if isinstance(rest, float) else rest.clone()
        r[ids[:len(vals)]] = torch.tensor(vals, dtype=torch.float32)
        return r

    L = lambda ps: [math.log(x) for x in ps]  # noqa: E731
    holes = torch.randn(V, generator=g) * 2
    holes[::3] = NAN
    holes[1::4] = NINF
    rows = [
        (placed([1.5, 1.0, 0.5], flat), 1.0, 3, 0.7),            # reaches: joint 3, seq 2
        (placed(L(SGL_PROBS), NINF), 1.0, 6, 0.82),              # inside: joint 4, seq 3
        (placed(L(SGL_PROBS), NINF), 1.0, 4, 0.82),              # SGLang's row: joint 4, seq 3
        (placed([3.0, 2.0, 2.0], -1.0), 1.0, 2, 0.5),            # k-th tied across b: reaches
        (placed(L([0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]), NINF), 1.0, 5, 0.75),  # tied edge
        (placed([2.0, 1.0, 0.5, 0.4, 0.3], flat), 0.8, 5, 1.0),  # top-p off
        (placed(L(SGL_PROBS), flat - 3.0), 1.0, 0, 0.5),         # top-k off
        (placed(L(SGL_PROBS), NINF), 1.3, V, 0.6),               # top-k >= V: off
        (holes, 1.0, 7, 0.4),                                    # NaN / -inf holes
        (torch.full((V,), NINF), 1.0, 2, 0.5),
        (torch.full((V,), NAN), 1.0, 3, 0.5),
        (placed([1.5, 1.0, 0.5], flat), 0.0, 3, 0.7),            # greedy
    ]
    rows = rows + rows
    B, S = len(rows), 3
    logits = torch.stack([r[0] for r in rows])[:, None, :].expand(B, S, V).to(dtype).contiguous()
    top = torch.tensor(ids[:4])
    bt = top[torch.randint(0, 4, (B, S), generator=g)]
    kw = dict(logits=logits, block_tokens=bt,
              num_drafts=torch.full((B,), S - 1, dtype=torch.int32),
              temperature=torch.tensor([r[1] for r in rows]),
              top_k=torch.tensor([r[2] for r in rows], dtype=torch.int32),
              top_p=torch.tensor([r[3] for r in rows]),
              seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g),
              positions=torch.randint(0, 2 ** 34, (B,), generator=g),
              seq_lens=torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32),
              filter_order="joint")
    if draft_probs:
        q = torch.softmax(torch.randn(B, S - 1, V, generator=g), -1)
        q[..., ids[:4]] += 0.2                                 # drafts the target may keep
        q = q / q.sum(-1, keepdim=True)
        q[q < 0.2 / V] = 0.0
        kw["draft_probs"] = q.to(dtype)
    return kw


def _joint_modes(world, V, borders, li):
    """Joint cases of one layout: random rows (with and without draft_probs) and
    :func:`_joint_rows` (fp32 and a half dtype, draft_probs)."""
    half = (torch.float16, torch.bfloat16)[li % 2]
    out = []
    for i, dp in enumerate((False, True)):
        kw = make_case(4, 3, V, dtype=half if dp else torch.float32, special_rows=True,
                       gen_seed=500 * world + 10 * li + i, top_k=True, top_p=True, draft_probs=dp)
        _border_ties(kw, borders, V)
        out.append(dict(kw, filter_order="joint"))
    out.append(_joint_rows(V, borders, 700 * world + li))
    out.append(_joint_rows(V, borders, 800 * world + li, draft_probs=True, dtype=half))
    return out


def build_cases(world):
    def one(V, borders, mode, dtype, i):
        kw = make_case(4, 3, V, dtype=dtype, special_rows=True, gen_seed=100 * world + i, **mode)
        _border_ties(kw, borders, V)
        return kw

    cases = layout_cases(LAYOUTS[world], MODES, one,
                         lambda V, borders, li: _stress(V, borders, world + li))
    V, borders = LAYOUTS[world][0]
    cases.append((V, borders, make_case(3, 1, V, top_k=True, top_p=True, gen_seed=world)))   # S = 1
    cases.append((V, borders, make_case(1, 5, V, draft_probs=True, sampled="all",
                                        match_frac=0.9, gen_seed=world)))                 # B = 1
    for li, (V, borders) in enumerate(LAYOUTS[world]):
        for kw in _joint_modes(world, V, borders, li):
            cases.append((V, borders, kw))
            cases.append((V, borders, dict(kw, filter_order="sequential")))   # its twin
    return cases


def _plan(kw):
    B, S = kw["block_tokens"].shape
    return vp.collectives(B, S, temperature="temperature" in kw, top_k="top_k" in kw,
                          top_p="top_p" in kw, draft_probs="draft_probs" in kw,
                          joint=kw.get("filter_order") == "joint")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_equal_single_device(world, tmp_path):
    cases = build_cases(world)
    per_rank = spawn(world, cases, tmp_path)
    joint_differs = []
    for ci, (V, borders, kw) in enumerate(cases):
        want = tuple(run("reference", kw))
        plan = _plan(kw)
        for rank in range(world):
            got, log = per_rank[rank][ci]
            for name, a, b in zip(("accept_len", "out_tokens", "bonus", "new_seq_lens"), got, want):
                assert (a is None) == (b is None), (ci, rank, name)
                if a is not None:
                    assert torch.equal(a, b), (f"case {ci} (V {V}, borders {borders}, "
                                               f"{sorted(k for k in kw if kw[k] is not None)}) "
                                               f"rank {rank} {name}:\n{a}\nwant\n{b}")
            assert log == plan, (ci, rank, log, plan)
        if kw.get("filter_order") == "joint":
            # The next case is its "sequential" twin: did the order change any output?
            twin = per_rank[0][ci + 1][0]
            joint_differs.append(any(not torch.equal(a, b)
                                     for a, b in zip(per_rank[0][ci][0][:3], twin[:3])))
    # The cases did exercise acceptance and rejection.
    assert any(int(per_rank[0][ci][0][0].sum()) > 0 for ci in range(len(cases)))
    # Joint is not sequential on the TP path (so the joint cases are not vacuous): each
    # layout's joint cases are (random, random + draft_probs, built, built + draft_probs)
    # (_joint_modes), and every built one changes some output.
    assert len(joint_differs) == 4 * len(LAYOUTS[world]), joint_differs
    assert all(d for i, d in enumerate(joint_differs) if i % 4 >= 2), joint_differs


def test_hung_rank_is_killed(tmp_path):
    # The harness itself: a rank that never returns fails the test at its deadline and is gone.
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="still running"):
        spawn(2, [], tmp_path, target=tp_worker.hang, timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert not [p for p in mp.active_children() if p.is_alive()]


# ---------------------------------------------------------------------------
# Single process: one shard holding the whole vocab (no communication)
# ---------------------------------------------------------------------------

def _local(kw, V, bits):
    joint = kw.get("filter_order") == "joint"
    B, S = kw["block_tokens"].shape
    out = [torch.full((B,), -777, dtype=torch.int32), torch.full((B, S), -777, dtype=torch.int32),
           torch.full((B,), -777, dtype=torch.int32),
           torch.full((B,), -777, dtype=torch.int32) if kw.get("seq_lens") is not None else None]
    g = lambda n: kw.get(n)
    logits = kw["logits"]
    vp.verify_chain_tp(logits, g("block_tokens"), g("num_drafts"), g("temperature"), g("top_k"),
                       g("top_p"), g("seeds"), g("positions"), g("draft_probs"), g("seq_lens"),
                       *out, group="local", vocab_start=0, vocab_size=V, radix_bits=bits,
                       joint=joint)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_local_shard_radix_widths(bits):
    V = 333
    for mi, mode in enumerate(MODES):
        kw = make_case(5, 4, V, special_rows=True, gen_seed=mi, **mode)
        want = run("reference", kw)
        for a, b in zip(_local(kw, V, bits), want):
            assert (a is None and b is None) or torch.equal(a, b), (mode, bits)
    for kw in (dict(make_case(5, 4, V, special_rows=True, gen_seed=9, top_k=True, top_p=True,
                              draft_probs=True), filter_order="joint"),
               _joint_rows(V, [0, 100, V], 2)):
        want = run("reference", kw)
        for a, b in zip(_local(kw, V, bits), want):
            assert (a is None and b is None) or torch.equal(a, b), ("joint", bits)
    kw = _stress(V, [0, V], 1)
    for a, b in zip(_local(kw, V, bits), run("reference", kw)):
        assert (a is None and b is None) or torch.equal(a, b), bits


def _scaled_rows(kw):
    """One row per request of a :func:`_joint_rows` case, scaled as the reference does."""
    x = kw["logits"][:, 0].float()
    x = x.masked_fill(torch.isnan(x), NINF)
    T = kw["temperature"]
    sampled = ref.is_sampled(T)
    inv_t = torch.where(sampled, 1.0 / T, torch.ones_like(T))
    return ref.scale_logits(x, inv_t[:, None]), sampled


@pytest.mark.parametrize("bits", [4, 8])
def test_joint_kept_sets_local(bits):
    """filter_rows(joint=True) on one shard: the reference's joint kept set and its exact
    mass on every row of the built cases, which hold both joint branches (the target
    reaching the top-k mass, and a nucleus inside the top-k set), each differing from
    sequential."""
    V, borders = 500, [0, 200, 201, 500, 520]
    kw = _joint_rows(V, borders, 5)
    scaled, sampled = _scaled_rows(kw)
    B = scaled.shape[0]
    k, p = kw["top_k"], kw["top_p"]
    rows = vp.filter_rows(scaled, torch.ones(V, dtype=torch.bool), 0, V, sampled, k, p,
                          kw["seeds"], kw["positions"], vp.Comm("local"), need_mass=True,
                          bits=bits, joint=True)
    want = ref.kept_set(scaled[:, None], sampled, k, p, joint=True)[:, 0]
    seq = ref.kept_set(scaled[:, None], sampled, k, p, joint=False)[:, 0]
    topk = ref.kept_set(scaled[:, None], sampled, k, None)[:, 0]
    assert torch.equal(rows.keep, want)
    m = ref.row_max(torch.where(want, scaled, NINF))
    assert torch.equal(rows.Z, ref.token_mass(torch.where(want, scaled, NINF), m).sum(-1, keepdim=True))
    differs = (want != seq).any(-1)
    reaches = differs & (want == topk).all(-1)
    inside = differs & ~(want == topk).all(-1)
    assert int(reaches.sum()) >= 2 and int(inside.sum()) >= 2, (reaches, inside)
    # Sequential through the same code gives the sequential set (the flag is what changes it).
    rows_seq = vp.filter_rows(scaled, torch.ones(V, dtype=torch.bool), 0, V, sampled, k, p,
                              kw["seeds"], kw["positions"], vp.Comm("local"), need_mass=True,
                              bits=bits, joint=False)
    assert torch.equal(rows_seq.keep, seq)


def test_joint_plan():
    """Joint adds no collective: the first top-p pass carries the full row's mass."""
    B, S = 3, 4
    for dp in (False, True):
        for bits in (4, 8):
            flags = dict(temperature=True, top_k=True, top_p=True, draft_probs=dp, radix_bits=bits)
            seq, joint = vp.collectives(B, S, **flags), vp.collectives(B, S, **flags, joint=True)
            assert len(joint) == len(seq) == (12 if dp else 11) + (8 if bits == 4 else 0)
            diff = [i for i, (a, b) in enumerate(zip(seq, joint)) if a != b]
            first = 2 + 32 // bits                      # +inf MAX, row max, top-k passes
            assert diff == [first] and joint[first] == ("SUM", torch.int64, (B * S, (1 << bits) + 1))
            assert vp.payload_bytes(joint) == vp.payload_bytes(seq) + 8 * B * S
    # Without both filters joint is sequential (ops passes the flag only with both).
    for kw in (dict(top_k=True, top_p=False), dict(top_k=False, top_p=True)):
        f = dict(temperature=True, draft_probs=False, **kw)
        assert vp.collectives(B, S, **f, joint=True) == vp.collectives(B, S, **f)


def test_radix_select_matches_sort():
    g = torch.Generator().manual_seed(0)
    R, n = 7, 257
    x = (torch.randint(-5, 5, (R, n), generator=g).float() * 0.5)
    x[0, ::3] = NINF
    x[1] = NINF
    x[2, 5] = -0.0
    keys = vp.f32_key(x)
    k = torch.tensor([1, 5, 17, n, 2, 100, 256])
    found, kk, ge, total = vp.radix_select(keys, torch.ones(R, n, dtype=torch.int32),
                                           lambda tot: k, vp.Comm("local"))
    desc = x.sort(-1, descending=True).values
    assert found.all() and (total == n).all()
    assert torch.equal(vp.key_f32(kk), desc.gather(1, (k - 1)[:, None]).squeeze(1))
    assert torch.equal(ge, (x >= vp.key_f32(kk)[:, None]).sum(-1))
    # Masses: the largest value whose mass reaches the target.
    w = torch.randint(0, 1000, (R, n), generator=g)
    tgt = torch.tensor([1, 500, 10 ** 5, 1, 3, 7, 10 ** 9])
    found, mk, ge, total = vp.radix_select(keys, w, lambda tot: tgt, vp.Comm("local"))
    for r in range(R):
        vals = sorted(set(x[r].tolist()), reverse=True)
        best = next((v for v in vals if int(w[r][x[r] >= v].sum()) >= int(tgt[r])), None)
        assert bool(found[r]) == (best is not None), r
        if best is not None:
            assert float(vp.key_f32(mk[r])) == best, r
            assert int(ge[r]) == int(w[r][x[r] >= best].sum())


def test_keys_order_and_ties():
    v = torch.tensor([NINF, -3.5, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    k = vp.f32_key(v)
    assert (k[1:] >= k[:-1]).all() and k[2] == k[3]
    assert torch.equal(vp.key_f32(k), v + 0.0)
    ids = torch.tensor([9, 3, 4, 2, 8, 1, 0])
    vals, got = vp.unpack_ids(vp._pack(torch.tensor([1.0, 1.0, 0.5, -0.0, 0.0, NINF, NINF]), ids))
    assert torch.equal(got, ids)
    # MAX of packed keys: highest value, then lowest id.
    packed = vp._pack(torch.tensor([2.0, 2.0, 1.0]), torch.tensor([7, 3, 1]))
    assert int(vp.unpack_ids(packed.max().view(1))[1]) == 3


def test_top_p_target_edges():
    Z = torch.tensor([0, 1, 10, 2 ** 61, 2 ** 61 + 12345, 100])
    tp = torch.tensor([0.5, 0.5, -1.0, 0.9999999, 0.3, float("nan")])
    T = ref.top_p_target(tp, Z)
    assert T.tolist()[:3] == [1, 1, 1] and T[5] == 100
    assert (T <= torch.where(Z > 0, Z, 1)).all() and (T >= 1).all()


def test_validation():
    kw = make_case(2, 3, 50, gen_seed=1)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    bad = [
        (dict(tp_group="local"), "vocab_size"),
        (dict(tp_group="local", vocab_size=50, vocab_start=-1), "vocab_start"),
        (dict(tp_group="local", vocab_size=50, vocab_start=51), "vocab_start"),
        (dict(tp_group="local", vocab_size=0), "vocab_size"),
        (dict(tp_group="local", vocab_size=50, backend="triton"), "backend"),
        (dict(vocab_size=50), "vocab_start, vocab_size"),
        (dict(vocab_start=3), "vocab_start, vocab_size"),
    ]
    for extra, name in bad:
        with pytest.raises(ValueError, match=name):
            dflash_kernels.verify_chain(logits, bt, **kw, **extra)


def test_bytes_per_step_table():
    """The documented cost model (docs/tensor_parallel.md) at B 32, S 16, V 152064, world 8."""
    B, S, V = 32, 16, 152064
    gather = B * S * V * 2
    assert gather == 155_713_536
    rows = {}
    for name, kw in [("greedy", dict(temperature=False, top_k=False, top_p=False, draft_probs=False)),
                     ("top_k_top_p_dp", dict(temperature=True, top_k=True, top_p=True,
                                             draft_probs=True))]:
        plan = vp.collectives(B, S, **kw)
        rows[name] = (len(plan), vp.payload_bytes(plan))
    assert rows["greedy"] == (1, B * S * 8)
    # 1 (+inf rows) + 1 (max) + 4 + 4 (radix passes) + 1 (residual masses) + 1 (winners)
    assert rows["top_k_top_p_dp"][0] == 12
    assert rows["top_k_top_p_dp"][1] < gather / 20        # 6.3 MB at radix 8 vs 155.7 MB


def test_microbench_plan_rows():
    from microbench.tp import plan_row
    n, ours, gather = plan_row("top_k+top_p", 32, 16, 152064, 8, 4)
    assert (n, gather) == (19, 32 * 16 * 152064 * 2 * 7 // 8)
    assert ours == 512 * 8 + 512 * 4 + 8 * 512 * 16 * 4 + 8 * 512 * 16 * 8 + 512 * 8
