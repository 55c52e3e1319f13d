"""verify_chain reference against independent per-row loops, goodness-of-fit
tests of the emitted tokens, reproducibility, and speculative == plain decoding.

The truth here walks each request row by row in numpy (fp32 scores, fp64
probabilities). The case builder, the call and the goodness-of-fit helpers
are in tests/helpers.py.
"""

import numpy as np
import pytest
import torch

from dflash_kernels import noise
from dflash_kernels._rules import RESIDUAL_EPS, SAMPLING_EPS
from helpers import (INF, NEG_INF, probs64 as _probs64, assert_fits, assert_same_verify, draft_case, draft_repro,
                     edge_verify_case, keyed_batch, make_verify_case, run_verify, softmax64)


# ---------------------------------------------------------------------------
# Independent truth: loops over requests and rows
# ---------------------------------------------------------------------------



def truth(kw):
    """(accept_len, out_tokens, bonus, new_seq_lens) as Python lists."""
    L = kw["logits"].float().cpu().numpy()
    bt = kw["block_tokens"].cpu().tolist()
    nd = kw["num_drafts"].cpu().tolist()
    B, S, V = L.shape
    T = kw.get("temperature")
    get = lambda name: None if kw.get(name) is None else kw[name].cpu().tolist()
    T, top_k, top_p, seeds, pos = (get(n) for n in ("temperature", "top_k", "top_p", "seeds",
                                                   "positions"))
    dp = kw.get("draft_probs")
    dp = None if dp is None else dp.float().cpu().numpy()
    acc, toks, bon, nsl = [], [], [], []
    for b in range(B):
        sampled = T is not None and np.float32(T[b]) >= np.float32(SAMPLING_EPS)
        t, prob, noise_rows = [], [], []
        for j in range(S):
            x = L[b, j].copy()
            x[np.isnan(x)] = -np.inf
            if not sampled:
                best = 0
                for i in range(V):
                    if x[i] > x[best]:
                        best = i
                t.append(best)
                continue
            inv = np.float32(1.0) / np.float32(T[b])
            with np.errstate(invalid="ignore", over="ignore"):
                s = np.where(x == np.inf, x, (x * inv).astype(np.float32))
            s[np.isnan(s)] = -np.inf
            if (s == np.inf).any():        # point mass on the lowest +inf id
                s = np.where(np.arange(V) == int(np.argmax(s == np.inf)), 0.0, -np.inf)
                s = s.astype(np.float32)
            keep = np.ones(V, dtype=bool)
            if top_k is not None and 0 < top_k[b] < V:
                kth = sorted(s.tolist(), reverse=True)[top_k[b] - 1]
                keep &= s >= kth
            if top_p is not None and top_p[b] < 1:
                pr = _probs64(s, keep)
                cum, tau = 0.0, 0.0
                for v in sorted(pr.tolist(), reverse=True):
                    cum += v
                    if cum >= top_p[b]:
                        tau = v
                        break
                keep &= pr >= tau
            gum = noise.gumbel(seeds[b], pos[b] + j + 1, torch.arange(V)).numpy()
            score = np.where(keep, s + gum, -np.inf).astype(np.float32)
            best = 0
            for i in range(V):
                if score[i] > score[best]:
                    best = i
            t.append(best)
            prob.append(_probs64(s, keep))
            noise_rows.append(gum)
        a, bonus = 0, None
        for j in range(1, nd[b] + 1):
            x = bt[b][j]
            if dp is not None and sampled:
                ok = 0 <= x < V
                px = prob[j - 1][x] if ok else 0.0
                qx = float(dp[b, j - 1, x]) if ok else 0.0
                u = float(noise.uniform(seeds[b], pos[b] + j, 0, 1))
                if u * qx < px:
                    a += 1
                    continue
                with np.errstate(invalid="ignore"):
                    r = prob[j - 1] - dp[b, j - 1].astype(np.float64)
                r = np.where(r > 0, r, 0.0)
                if ok and r.sum() >= RESIDUAL_EPS:
                    sc = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)) + noise_rows[j - 1], -np.inf)
                    bonus = int(np.argmax(sc))
                else:
                    bonus = t[j - 1]
                break
            if x != t[j - 1]:
                break
            a += 1
        if bonus is None:
            bonus = t[a]
        acc.append(a)
        bon.append(bonus)
        toks.append([bt[b][c + 1] for c in range(a)] + [bonus] + [-1] * (S - a - 1))
        if kw.get("seq_lens") is not None:
            nsl.append(int(kw["seq_lens"][b]) + a + 1)
    return acc, toks, bon, (nsl or None)


def assert_matches_truth(res, kw):
    acc, toks, bon, nsl = truth(kw)
    assert res.accept_len.cpu().tolist() == acc
    assert res.bonus.cpu().tolist() == bon
    assert res.out_tokens.cpu().tolist() == toks
    if nsl is None:
        assert res.new_seq_lens is None
    else:
        assert res.new_seq_lens.cpu().tolist() == nsl


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "B, S, V, dtype",
    [(1, 1, 7, torch.float32), (4, 5, 1000, torch.float32), (3, 4, 8193, torch.float16),
     (6, 8, 33, torch.bfloat16), (2, 16, 50, torch.float32)])
def test_greedy_against_loops(B, S, V, dtype):
    kw = make_verify_case(B, S, V, dtype=dtype, sampled="none", special_rows=True, gen_seed=B * S)
    res = run_verify("reference", kw)
    assert_matches_truth(res, kw)
    assert res.accept_len.sum() > 0 or S == 1      # the case exercises acceptance


@pytest.mark.parametrize(
    "B, S, V, top_k, top_p, special",
    [(5, 4, 37, False, False, True), (6, 3, 1000, True, False, False),
     (6, 3, 64, False, True, True), (8, 4, 100, True, True, False)])
def test_sampled_against_loops(B, S, V, top_k, top_p, special):
    kw = make_verify_case(B, S, V, top_k=top_k, top_p=top_p, special_rows=special, gen_seed=V)
    assert_matches_truth(run_verify("reference", kw), kw)


@pytest.mark.parametrize("dtype, top_k", [(torch.float32, False), (torch.float16, True)])
def test_draft_probs_against_loops(dtype, top_k):
    kw = make_verify_case(8, 5, 50, dtype=dtype, draft_probs=True, top_k=top_k, match_frac=0.3,
                          gen_seed=11)
    res = run_verify("reference", kw)
    assert_matches_truth(res, kw)


def test_num_drafts_zero_and_full_batch():
    kw = make_verify_case(4, 6, 20, sampled="none", match_frac=1.0)
    kw["num_drafts"] = torch.tensor([0, 5, 2, 0], dtype=torch.int32)
    res = run_verify("reference", kw)
    assert res.accept_len.tolist() == [0, 5, 2, 0]        # every draft is the greedy token
    assert (res.out_tokens[0, 1:] == -1).all() and (res.out_tokens[3, 1:] == -1).all()
    assert_matches_truth(res, kw)


def test_nan_and_empty_rows():
    V = 10
    logits = torch.randn(1, 4, V)
    logits[0, 0] = float("nan")                 # no finite logit -> token 0
    logits[0, 1] = NEG_INF
    logits[0, 2, :] = float("nan")
    logits[0, 2, 7] = 1.0                       # only finite entry -> 7
    logits[0, 3] = torch.tensor([0.0, 3, 3, 1, 3, 0, 0, 0, 0, 0])   # ties -> 1
    bt = torch.tensor([[4, 0, 0, 7]])
    for temp in (None, 0.9):
        kw = dict(logits=logits, block_tokens=bt)
        if temp is not None:
            kw.update(temperature=torch.tensor([temp]), seeds=torch.tensor([5]),
                      positions=torch.tensor([9]))
        res = run_verify("reference", kw)
        assert res.accept_len.tolist() == [3]
        if temp is None:
            assert res.bonus.tolist() == [1]
        assert res.out_tokens[0, :3].tolist() == [0, 0, 7]


def test_top_k_keeps_ties_at_threshold():
    # k = 2 with three tokens tied at the 2nd largest logit: all four are kept.
    row = torch.tensor([[3.0, 2.0, -1.0, 2.0, 2.0, 0.5, -2.0, 1.0]])
    kw = keyed_batch(row, 4000, 1.0, top_k=2)
    res = run_verify("reference", kw)
    p = softmax64(row[0].numpy(), top_k=4)      # same set as the tied top-2
    assert_fits(res.bonus, p, "top-k ties")


@pytest.mark.parametrize("T", [0.7, 1.6])
def test_fit_plain_sampling(T):
    row = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 0.7, 1.2, -0.5, 0.1]])
    res = run_verify("reference", keyed_batch(row, 10000, T))
    assert (res.accept_len == 0).all()
    assert_fits(res.bonus, softmax64(row[0].numpy(), T), f"T={T}")


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.7), (6, 0.6), (0, 0.0)])
def test_fit_top_k_top_p(top_k, top_p):
    row = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 0.7, 1.2, -0.5, 0.1, 0.9, -0.2]])
    res = run_verify("reference", keyed_batch(row, 10000, 0.9, top_k=top_k, top_p=top_p))
    p = softmax64(row[0].numpy(), 0.9, top_k, top_p)
    assert_fits(res.bonus, p, f"top_k={top_k} top_p={top_p}")


@pytest.mark.parametrize("q_kind, dtype", [("mismatch", torch.float32), ("equal", torch.float32),
                                           ("onehot", torch.float32), ("soft", torch.float16)])
def test_fit_draft_probs_lossless(q_kind, dtype):
    kw, p = draft_case(12000, q_kind, dtype=dtype)
    res = run_verify("reference", kw)
    a = res.accept_len
    # The first emitted token (accepted draft or bonus) follows p0 whatever q is.
    assert_fits(res.out_tokens[:, 0], p[0], f"{q_kind}: first token")
    # Given the first draft accepted, the second emitted token follows p1.
    sel = a >= 1
    assert_fits(res.out_tokens[sel, 1], p[1], f"{q_kind}: second token")
    if q_kind == "equal":
        assert a.float().mean() > 1.8           # q == p accepts (almost) always
    if q_kind == "mismatch":
        assert 0 < a.float().mean() < 1.5


def test_reproducible_and_batch_independent():
    kw = make_verify_case(6, 5, 300, top_k=True, top_p=True, gen_seed=5)
    first = run_verify("reference", kw)
    assert_same_verify(first, run_verify("reference", kw))
    for b in range(6):
        one = {k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}
        res = run_verify("reference", one)
        assert_same_verify(res, tuple(None if x is None else x[b:b + 1] for x in first))


@pytest.mark.parametrize("top_k, top_p", [(False, False), (True, True)])
def test_speculative_equals_plain_decoding(top_k, top_p):
    B, S, V = 5, 6, 200
    kw = make_verify_case(B, S, V, top_k=top_k, top_p=top_p, gen_seed=21)
    kw.pop("seq_lens")
    plain = []
    for j in range(S):
        one = dict(kw, logits=kw["logits"][:, j:j + 1], block_tokens=kw["block_tokens"][:, :1],
                   positions=kw["positions"] + j, num_drafts=torch.zeros(B, dtype=torch.int32))
        plain.append(run_verify("reference", one).bonus)
    plain = torch.stack(plain, 1)                               # token at position pos + j + 1
    # Drafts = the sampler's own tokens: everything is accepted, tokens match.
    own = dict(kw, block_tokens=torch.cat([kw["block_tokens"][:, :1], plain[:, :-1]], 1),
               num_drafts=torch.full((B,), S - 1, dtype=torch.int32))
    res = run_verify("reference", own)
    assert res.accept_len.tolist() == [S - 1] * B
    assert torch.equal(res.out_tokens, plain.int())
    # Random drafts: the accepted prefix and the bonus are plain decoding's tokens.
    res = run_verify("reference", kw)
    for b in range(B):
        a = int(res.accept_len[b])
        assert res.out_tokens[b, :a + 1].tolist() == plain[b, :a + 1].tolist()


# ---------------------------------------------------------------------------
# Edge values (docs/DESIGN.md, "Edge values")
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(top_k=True), dict(top_p=True),
                                  dict(top_k=True, top_p=True, draft_probs=True)])
def test_edge_values_against_loops(opts):
    kw = edge_verify_case(**opts)
    res = run_verify("reference", kw)
    assert_matches_truth(res, kw)
    bonus = res.bonus.tolist()
    assert bonus[1] == 2                        # T = 1e-40: greedy, the T -> 0 limit
    assert bonus[6] == bonus[7] == bonus[8] == 3   # +inf ids 3, 6: the lowest, any T / top-k / top-p
    assert bonus[9] == 2                        # scaled overflow to +inf: the lowest such id
    assert bonus[11] == 0                       # T = inf with one finite id


def test_infinite_temperature_is_uniform_over_finite_ids():
    row = torch.tensor([[NEG_INF, 1.0, -3.0, 9.0, float("nan"), 0.5, 2.0, -1.0]])
    res = run_verify("reference", keyed_batch(row, 4000, INF))
    p = np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype=np.float64) / 6
    assert_fits(res.bonus, p, "T=inf")


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.3), (5, 0.5)])
def test_inf_logit_is_a_point_mass(top_k, top_p):
    row = torch.tensor([[0.0, 50.0, INF, 1.0, INF, 3.0]])
    res = run_verify("reference", keyed_batch(row, 64, 0.7, top_k=top_k, top_p=top_p))
    assert (res.bonus == 2).all()


def test_placeholder_draft_bonus_follows_p():
    # Issue 14's repro: draft -1 is rejected and the bonus is t_0, a sample from p
    # (before: a sample of the rounding noise of max(p - q, 0)).
    kw = draft_repro(8)
    res = run_verify("reference", kw)
    assert res.accept_len.tolist() == [0] * 8
    plain = dict(kw, draft_probs=None, num_drafts=torch.zeros(8, dtype=torch.int32))
    assert res.bonus.tolist() == run_verify("reference", plain).bonus.tolist()   # t_0
    kw = draft_repro(20000)
    res = run_verify("reference", kw)
    assert_fits(res.bonus, softmax64(kw["logits"][0, 0].numpy()), "placeholder draft")


def test_residual_below_threshold_gives_sample_from_p():
    # q = p except q[x] = p[x] + 5e-6 at a draft x of p ~ 1e-6: rejected at u > ~1/6,
    # and the residual is noise (0 < mass << RESIDUAL_EPS): the bonus is t_0.
    V, N = 16, 256
    row = torch.zeros(2, V)
    row[:, 5] = -14.0                           # p[5] ~ 1e-6 / 15
    p = torch.softmax(row[0], -1)
    noise_ = 1 + 3e-7 * torch.randn(V, generator=torch.Generator().manual_seed(3))
    q = (p * noise_).float()                    # ulp-level differences: residual > 0 somewhere
    q[5] += 5e-6
    kw = keyed_batch(row, N, 1.0)
    kw.update(block_tokens=torch.tensor([[0, 5]] * N), num_drafts=torch.ones(N, dtype=torch.int32),
              draft_probs=q.view(1, 1, V).expand(N, 1, V))
    res = run_verify("reference", kw)
    rejected = res.accept_len == 0
    assert rejected.sum() > N // 2
    plain = run_verify("reference", dict(kw, draft_probs=None, num_drafts=torch.zeros(N, dtype=torch.int32)))
    assert torch.equal(res.bonus[rejected], plain.bonus[rejected])
    assert 0 < float(torch.clamp(p - q, min=0).sum()) < RESIDUAL_EPS
