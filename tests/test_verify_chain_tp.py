"""Vocab-parallel verify_chain (tp_group=) against the single-device reference, bit for bit.

Real processes: torch.multiprocessing (fork; spawn with DFLASH_TP_TEST_START=spawn) + gloo on 2, 3 and 4 ranks, one
spawn per world size running every case (greedy, sampling, top-k, top-p,
top-k + top-p, draft_probs with and without filters; uneven shards, a shard of
width 1, a last shard padded with garbage, a shard wholly in the padding,
ties across shard borders, NaN / -inf rows). Each rank's outputs must equal
the reference backend on the concatenated unpadded logits, and its
collectives must be exactly :func:`vocab_parallel.collectives`. Every spawn
is joined with a deadline, then terminated: no process outlives its test.
"""

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
    return cases


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_equal_single_device(world, tmp_path):
    cases = build_cases(world)
    per_rank = spawn(world, cases, tmp_path)
    for ci, (V, borders, kw) in enumerate(cases):
        want = tuple(run("reference", kw))
        B, S = kw["block_tokens"].shape
        plan = vp.collectives(B, S, temperature="temperature" in kw, top_k="top_k" in kw,
                              top_p="top_p" in kw, draft_probs="draft_probs" in kw)
        for rank in range(world):
            got, log = per_rank[rank][ci]
            for name, a, b in zip(("accept_len", "out_tokens", "bonus", "new_seq_lens"), got, want):
                assert (a is None) == (b is None), (ci, rank, name)
                if a is not None:
                    assert torch.equal(a, b), (f"case {ci} (V {V}, borders {borders}, "
                                               f"{sorted(k for k in kw if kw[k] is not None)}) "
                                               f"rank {rank} {name}:\n{a}\nwant\n{b}")
            assert log == plan, (ci, rank, log, plan)
    # The cases did exercise acceptance and rejection.
    assert any(int(per_rank[0][ci][0][0].sum()) > 0 for ci in range(len(cases)))


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
    B, S = kw["block_tokens"].shape
    out = [torch.full((B,), -777, dtype=torch.int32), torch.full((B, S), -777, dtype=torch.int32),
           torch.full((B,), -777, dtype=torch.int32),
           torch.full((B,), -777, dtype=torch.int32) if kw.get("seq_lens") is not None else None]
    g = lambda n: kw.get(n)
    logits = kw["logits"]
    vp.verify_chain_tp(logits, g("block_tokens"), g("num_drafts"), g("temperature"), g("top_k"),
                       g("top_p"), g("seeds"), g("positions"), g("draft_probs"), g("seq_lens"),
                       *out, group="local", vocab_start=0, vocab_size=V, radix_bits=bits)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_local_shard_radix_widths(bits):
    V = 333
    for mi, mode in enumerate(MODES):
        kw = make_case(5, 4, V, special_rows=True, gen_seed=mi, **mode)
        want = run("reference", kw)
        for a, b in zip(_local(kw, V, bits), want):
            assert (a is None and b is None) or torch.equal(a, b), (mode, bits)
    kw = _stress(V, [0, V], 1)
    for a, b in zip(_local(kw, V, bits), run("reference", kw)):
        assert (a is None and b is None) or torch.equal(a, b), bits


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
