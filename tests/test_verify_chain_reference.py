"""verify_chain reference against independent per-row loops, goodness-of-fit
tests of the emitted tokens, reproducibility, and speculative == plain decoding.

The truth here walks each request row by row in numpy (fp32 scores, fp64
probabilities). ``make_case``, ``run`` and the goodness-of-fit helpers are
shared with test_verify_chain_triton.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import dflash_kernels
from dflash_kernels import noise

NEG_INF = float("-inf")
P_MIN = 1e-3  # goodness-of-fit rejection threshold (fixed seeds: deterministic)


# ---------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------

def make_case(B, S, V, *, dtype=torch.float32, sampled="mixed", top_k=False, top_p=False,
              draft_probs=False, seq_lens=True, match_frac=0.7, special_rows=False,
              gen_seed=0, device="cpu"):
    """Random verify_chain inputs as a kwargs dict (``logits``, ``block_tokens`` first).

    Drafts copy the greedy token of the previous row with probability
    ``match_frac`` (so greedy requests accept some), else random ids, some
    outside ``[0, V)``. ``num_drafts`` covers 0..S-1. ``special_rows`` puts
    NaN, all -inf, all NaN and tied rows in.
    """
    g = torch.Generator().manual_seed(gen_seed)
    logits = (torch.randn(B, S, V, generator=g) * 2.0).to(dtype).float()
    if special_rows:
        n = B * S
        flat = logits.view(n, V)
        flat[0 % n, ::7] = float("nan")
        flat[1 % n] = NEG_INF
        flat[2 % n] = float("nan")
        if V > 3:
            flat[3 % n, :] = -1.0
            flat[3 % n, [1, V - 2]] = 5.0                     # greedy tie -> index 1
            flat[4 % n, ::3] = NEG_INF
            flat[5 % n, 0] = NEG_INF
            flat[5 % n, V - 1] = 50.0
    greedy_tok = logits.nan_to_num(nan=NEG_INF).argmax(-1)
    bt = torch.randint(0, V, (B, S), generator=g)
    copy = torch.rand(B, S - 1, generator=g) < match_frac
    bt[:, 1:] = torch.where(copy, greedy_tok[:, :-1], bt[:, 1:])
    odd = torch.rand(B, S - 1, generator=g) < 0.05
    bt[:, 1:] = torch.where(odd, torch.tensor(V + 3), bt[:, 1:])
    if S > 1:
        bt[0, 1] = -5 if B * S > 1 else bt[0, 1]
    nd = torch.randint(0, S, (B,), generator=g, dtype=torch.int32)
    nd[0] = S - 1
    if B > 2:
        nd[1] = 0
    kw = dict(logits=logits.to(dtype).to(device), block_tokens=bt.to(device),
              num_drafts=nd.to(device))
    if sampled != "none":
        if sampled == "all":
            temp = 0.3 + 1.5 * torch.rand(B, generator=g)
        else:
            temp = torch.where(torch.rand(B, generator=g) < 0.35, torch.tensor(0.0),
                               0.3 + 1.5 * torch.rand(B, generator=g))
            temp[0] = 0.8
        kw["temperature"] = temp.to(device)
        kw["seeds"] = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g).to(device)
        kw["positions"] = torch.randint(0, 2 ** 34, (B,), generator=g).to(device)
        if top_k:
            k = torch.randint(1, min(V, 40) + 1, (B,), generator=g, dtype=torch.int32)
            k[torch.rand(B, generator=g) < 0.25] = 0
            kw["top_k"] = k.to(device)
        if top_p:
            p = 0.2 + 0.75 * torch.rand(B, generator=g)
            p[torch.rand(B, generator=g) < 0.25] = 1.0
            kw["top_p"] = p.to(device)
        if draft_probs and S > 1:
            q = torch.softmax(torch.randn(B, S - 1, V, generator=g) * 2, -1)
            q[q < 0.2 / V] = 0.0                               # zeros where p > 0
            kw["draft_probs"] = q.to(dtype).to(device)
    if seq_lens:
        kw["seq_lens"] = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32).to(device)
    return kw


def run(backend, kw):
    """Call the public op with outputs pre-filled with garbage."""
    B, S = kw["block_tokens"].shape
    dev = kw["block_tokens"].device
    out = (torch.full((B,), -777, dtype=torch.int32, device=dev),
           torch.full((B, S), -777, dtype=torch.int32, device=dev),
           torch.full((B,), -777, dtype=torch.int32, device=dev),
           torch.full((B,), -777, dtype=torch.int32, device=dev) if "seq_lens" in kw else None)
    kw = dict(kw)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    res = dflash_kernels.verify_chain(logits, bt, out=out, backend=backend, **kw)
    assert res.accept_len is out[0] and res.out_tokens is out[1] and res.bonus is out[2]
    return res


# ---------------------------------------------------------------------------
# Independent truth: loops over requests and rows
# ---------------------------------------------------------------------------

def _probs64(s32, keep):
    s = np.where(keep, s32.astype(np.float64), -np.inf)
    m = s.max()
    if not np.isfinite(m):
        return np.zeros_like(s)
    e = np.exp(s - m)
    return e / e.sum()


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
        sampled = T is not None and T[b] > 0
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
            s = (x * inv).astype(np.float32)
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
                r = np.maximum(prob[j - 1] - dp[b, j - 1].astype(np.float64), 0.0)
                if (r > 0).any():
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


def assert_same(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert torch.equal(x.cpu(), y.cpu())


# ---------------------------------------------------------------------------
# Goodness of fit
# ---------------------------------------------------------------------------

def softmax64(logits, T=1.0, top_k=0, top_p=1.0):
    """Target distribution of DESIGN.md computed in float64 from a 1-D logit row."""
    s = np.asarray(logits, dtype=np.float64) / T
    keep = np.ones(len(s), dtype=bool)
    if 0 < top_k < len(s):
        keep &= s >= np.sort(s)[::-1][top_k - 1]
    p = np.where(keep, np.exp(s - s[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.sort(p)[::-1]
        m = int(np.searchsorted(np.cumsum(order), top_p))
        keep &= p >= order[min(m, len(p) - 1)]
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def assert_fits(tokens, p, label=""):
    """Chi-square goodness of fit of int tokens against distribution p; zero-p tokens never drawn."""
    tokens = torch.as_tensor(tokens).cpu().long()
    V = len(p)
    counts = torch.bincount(tokens, minlength=V).numpy()
    assert counts.shape[0] == V, f"{label}: token out of range"
    n = counts.sum()
    assert n > 500
    zero = p == 0
    assert counts[zero].sum() == 0, f"{label}: drew tokens of probability 0: {counts}"
    expected = p[~zero] * n
    if expected.size == 1:
        return                                  # one possible token, checked above
    res = stats.chisquare(counts[~zero], expected)
    assert res.pvalue > P_MIN, f"{label}: p-value {res.pvalue:.2e}, counts {counts}, expected {p * n}"


def keyed_batch(logit_rows, N, T, *, top_k=0, top_p=1.0, device="cpu", seed0=0):
    """N requests sharing the same logit rows, each with its own (seed, position)."""
    S, V = logit_rows.shape
    g = torch.Generator().manual_seed(seed0)
    kw = dict(logits=logit_rows.expand(N, S, V).to(device),
              block_tokens=torch.zeros(N, S, dtype=torch.int64, device=device),
              temperature=torch.full((N,), T, device=device),
              seeds=(torch.arange(N, dtype=torch.int64) * 7919 + seed0).to(device),
              positions=torch.randint(0, 2 ** 40, (N,), generator=g).to(device))
    if top_k:
        kw["top_k"] = torch.full((N,), top_k, dtype=torch.int32, device=device)
    if top_p < 1:
        kw["top_p"] = torch.full((N,), top_p, device=device)
    return kw


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "B, S, V, dtype",
    [(1, 1, 7, torch.float32), (4, 5, 1000, torch.float32), (3, 4, 8193, torch.float16),
     (6, 8, 33, torch.bfloat16), (2, 16, 50, torch.float32)])
def test_greedy_against_loops(B, S, V, dtype):
    kw = make_case(B, S, V, dtype=dtype, sampled="none", special_rows=True, gen_seed=B * S)
    res = run("reference", kw)
    assert_matches_truth(res, kw)
    assert res.accept_len.sum() > 0 or S == 1      # the case exercises acceptance


@pytest.mark.parametrize(
    "B, S, V, top_k, top_p, special",
    [(5, 4, 37, False, False, True), (6, 3, 1000, True, False, False),
     (6, 3, 64, False, True, True), (8, 4, 100, True, True, False)])
def test_sampled_against_loops(B, S, V, top_k, top_p, special):
    kw = make_case(B, S, V, top_k=top_k, top_p=top_p, special_rows=special, gen_seed=V)
    assert_matches_truth(run("reference", kw), kw)


@pytest.mark.parametrize("dtype, top_k", [(torch.float32, False), (torch.float16, True)])
def test_draft_probs_against_loops(dtype, top_k):
    kw = make_case(8, 5, 50, dtype=dtype, draft_probs=True, top_k=top_k, match_frac=0.3,
                   gen_seed=11)
    res = run("reference", kw)
    assert_matches_truth(res, kw)


def test_num_drafts_zero_and_full_batch():
    kw = make_case(4, 6, 20, sampled="none", match_frac=1.0)
    kw["num_drafts"] = torch.tensor([0, 5, 2, 0], dtype=torch.int32)
    res = run("reference", kw)
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
        res = run("reference", kw)
        assert res.accept_len.tolist() == [3]
        if temp is None:
            assert res.bonus.tolist() == [1]
        assert res.out_tokens[0, :3].tolist() == [0, 0, 7]


def test_top_k_keeps_ties_at_threshold():
    # k = 2 with three tokens tied at the 2nd largest logit: all four are kept.
    row = torch.tensor([[3.0, 2.0, -1.0, 2.0, 2.0, 0.5, -2.0, 1.0]])
    kw = keyed_batch(row, 4000, 1.0, top_k=2)
    res = run("reference", kw)
    p = softmax64(row[0].numpy(), top_k=4)      # same set as the tied top-2
    assert_fits(res.bonus, p, "top-k ties")


@pytest.mark.parametrize("T", [0.7, 1.6])
def test_fit_plain_sampling(T):
    row = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 0.7, 1.2, -0.5, 0.1]])
    res = run("reference", keyed_batch(row, 10000, T))
    assert (res.accept_len == 0).all()
    assert_fits(res.bonus, softmax64(row[0].numpy(), T), f"T={T}")


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.7), (6, 0.6), (0, 0.0)])
def test_fit_top_k_top_p(top_k, top_p):
    row = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 0.7, 1.2, -0.5, 0.1, 0.9, -0.2]])
    res = run("reference", keyed_batch(row, 10000, 0.9, top_k=top_k, top_p=top_p))
    p = softmax64(row[0].numpy(), 0.9, top_k, top_p)
    assert_fits(res.bonus, p, f"top_k={top_k} top_p={top_p}")


def draft_case(N, q_kind, *, dtype=torch.float32, device="cpu", V=8, top_k=5):
    """S = 3 requests with fixed logit rows, drafts drawn from q, and the target p rows."""
    rows = torch.tensor([[0.3, 1.2, -0.4, 0.8, 2.0, -1.0, 0.1, 0.5],
                         [1.5, -0.2, 0.4, 0.0, 0.9, 1.1, -0.8, 0.2]])[:, :V]
    T = 0.8
    p = [softmax64(r.numpy(), T, top_k) for r in rows]
    if q_kind == "mismatch":
        # q puts mass where p is 0 (outside top-k) and none on some p > 0 tokens.
        q = torch.tensor([[0.3, 0.0, 0.1, 0.0, 0.2, 0.25, 0.15, 0.0],
                          [0.0, 0.2, 0.2, 0.3, 0.0, 0.0, 0.3, 0.0]])
    elif q_kind == "equal":
        q = torch.tensor(np.stack(p), dtype=torch.float32)
    elif q_kind == "onehot":
        q = torch.zeros(2, V)
        q[0, 1] = 1.0
        q[1, 5] = 1.0
    else:
        q = torch.softmax(torch.tensor([[0.0, 1.0, 0.5, -1.0, 0.2, 0.0, 1.5, -0.3],
                                        [1.0, 0.0, -0.5, 0.3, 0.6, -1.0, 0.0, 0.4]]), -1)
    q = q.to(dtype)
    g = torch.Generator().manual_seed(3)
    drafts = torch.stack([torch.multinomial(q[i].float(), N, replacement=True, generator=g)
                          for i in range(2)], 1)
    kw = keyed_batch(torch.cat([rows, rows[:1]]), N, T, top_k=top_k, device=device, seed0=17)
    kw["block_tokens"] = torch.cat([torch.zeros(N, 1, dtype=torch.int64), drafts], 1).to(device)
    kw["draft_probs"] = q.expand(N, 2, V).to(device)
    return kw, p


@pytest.mark.parametrize("q_kind, dtype", [("mismatch", torch.float32), ("equal", torch.float32),
                                           ("onehot", torch.float32), ("soft", torch.float16)])
def test_fit_draft_probs_lossless(q_kind, dtype):
    kw, p = draft_case(12000, q_kind, dtype=dtype)
    res = run("reference", kw)
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
    kw = make_case(6, 5, 300, top_k=True, top_p=True, gen_seed=5)
    first = run("reference", kw)
    assert_same(first, run("reference", kw))
    for b in range(6):
        one = {k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}
        res = run("reference", one)
        assert_same(res, tuple(None if x is None else x[b:b + 1] for x in first))


@pytest.mark.parametrize("top_k, top_p", [(False, False), (True, True)])
def test_speculative_equals_plain_decoding(top_k, top_p):
    B, S, V = 5, 6, 200
    kw = make_case(B, S, V, top_k=top_k, top_p=top_p, gen_seed=21)
    kw.pop("seq_lens")
    plain = []
    for j in range(S):
        one = dict(kw, logits=kw["logits"][:, j:j + 1], block_tokens=kw["block_tokens"][:, :1],
                   positions=kw["positions"] + j, num_drafts=torch.zeros(B, dtype=torch.int32))
        plain.append(run("reference", one).bonus)
    plain = torch.stack(plain, 1)                               # token at position pos + j + 1
    # Drafts = the sampler's own tokens: everything is accepted, tokens match.
    own = dict(kw, block_tokens=torch.cat([kw["block_tokens"][:, :1], plain[:, :-1]], 1),
               num_drafts=torch.full((B,), S - 1, dtype=torch.int32))
    res = run("reference", own)
    assert res.accept_len.tolist() == [S - 1] * B
    assert torch.equal(res.out_tokens, plain.int())
    # Random drafts: the accepted prefix and the bonus are plain decoding's tokens.
    res = run("reference", kw)
    for b in range(B):
        a = int(res.accept_len[b])
        assert res.out_tokens[b, :a + 1].tolist() == plain[b, :a + 1].tolist()
