"""Triton verify_chain against the reference (token for token: the noise is
bit-identical), reproducibility, a goodness-of-fit check on the Triton
backend itself, and a compile check for sm_90 / sm_100.

Under the interpreter every (program x loop iteration) costs milliseconds,
so shapes are small and top-k / top-p rows (one counting pass per bisection
step) are few.
"""

import pytest
import torch
import triton

from dflash_kernels.triton_backend import verify_chain as tv
from helpers import (assert_fits, assert_same_verify, draft_case, draft_repro, edge_verify_case,
                     keyed_batch, make_verify_case, pruning_rows, run_verify, softmax64)
from conftest import HAS_CUDA

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def check_against_reference(kw):
    got = run_verify("triton", kw)
    want = run_verify("reference", kw)
    assert_same_verify(got, want)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, S, V", [(1, 1, 1000), (4, 25, 1000), (3, 4, 8193), (1, 2, 32001)])
def test_greedy(B, S, V, dtype, device):
    kw = make_verify_case(B, S, V, dtype=dtype, sampled="none", special_rows=True, match_frac=0.9,
                          gen_seed=S, device=device)
    check_against_reference(kw)


@pytest.mark.parametrize("B, S, V, dtype", [(5, 4, 1000, torch.float32), (2, 3, 8193, torch.float16),
                                            (1, 2, 32001, torch.float32), (9, 11, 300, torch.float32)])
def test_sampled_mixed(B, S, V, dtype, device):
    kw = make_verify_case(B, S, V, dtype=dtype, special_rows=True, gen_seed=V, device=device)
    check_against_reference(kw)


@pytest.mark.parametrize("top_k, top_p, V", [(True, False, 1000), (False, True, 1000),
                                             (True, True, 2100)])
def test_top_k_top_p(top_k, top_p, V, device):
    kw = make_verify_case(3, 3, V, top_k=top_k, top_p=top_p, special_rows=True, gen_seed=7,
                          device=device)
    check_against_reference(kw)


@pytest.mark.parametrize("B, S, V, dtype, filt", [(4, 4, 1000, torch.float32, False),
                                                  (3, 5, 8193, torch.float16, False),
                                                  (2, 3, 1000, torch.float32, True)])
def test_draft_probs(B, S, V, dtype, filt, device):
    kw = make_verify_case(B, S, V, dtype=dtype, draft_probs=True, top_k=filt, top_p=filt,
                          match_frac=0.3, special_rows=filt, gen_seed=3, device=device)
    check_against_reference(kw)


@pytest.mark.parametrize("nsplit", [2, 3])
def test_forced_vocab_splits(nsplit, device, monkeypatch):
    # Several splits per row regardless of the batch, so the partial reduction
    # (ties across splits, all -inf rows) and the per-split noise offsets are exercised.
    monkeypatch.setattr(tv, "num_splits",
                        lambda rows, V, dev, greedy=False:
                        min(nsplit, triton.cdiv(V, tv.block_size(V, greedy))))
    kw = make_verify_case(4, 3, 2500, draft_probs=True, special_rows=True, match_frac=0.4,
                          gen_seed=nsplit, device=device)
    logits = kw["logits"].clone()
    logits[1, 0] = -3.0
    logits[1, 0, [5, 1030, 2100]] = 4.0            # the same maximum in three splits -> 5
    kw["logits"] = logits
    res = check_against_reference(kw)
    kw2 = dict(kw, temperature=None, seeds=None, positions=None, draft_probs=None)
    kw2 = {k: v for k, v in kw2.items() if v is not None}
    res = check_against_reference(kw2)
    assert int(res.out_tokens[1, 0]) == 5            # accepted draft or bonus: both t_0 = 5


def test_reproducible_and_batch_independent(device):
    kw = make_verify_case(5, 4, 700, draft_probs=True, gen_seed=9, device=device)
    first = run_verify("triton", kw)
    assert_same_verify(first, run_verify("triton", kw))
    order = [3, 0, 4]
    sub = {k: (v[order] if torch.is_tensor(v) else v) for k, v in kw.items()}
    res = run_verify("triton", sub)
    assert_same_verify(res, tuple(None if x is None else x[order] for x in first))


def test_fit_triton_sampling(device):
    # Small: the interpreter runs ~25 ms per request. The larger fits run_verify on the
    # reference, which the Triton kernels match token for token.
    row = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 0.7, 1.2]])
    res = run_verify("triton", keyed_batch(row, 600, 0.8, device=device))
    assert_fits(res.bonus, softmax64(row[0].numpy(), 0.8), "triton plain")


def test_triton_draft_probs_fit_case(device):
    # The reference's lossless case (q with zeros where p > 0), a slice of it.
    kw, p = draft_case(80, "soft", top_k=0, device=device)
    res = run_verify("triton", kw)
    assert_same_verify(res, run_verify("reference", kw))
    assert 0 < res.accept_len.float().mean() < 2


# Compile checks (registers, spills, shared memory, loads, Philox in registers) at the
# production configuration: tests/test_compile_report.py.


def _huge_row_stride(kw, stride):
    """logits and draft_probs as views whose row (dim 1) stride is ``stride`` elements, in one
    lazily allocated buffer (only the rows used are ever touched)."""
    logits, dp = kw["logits"], kw["draft_probs"]
    B, S, V = logits.shape
    buf = torch.empty((S - 1) * stride + 2 * B * V, dtype=logits.dtype, device=logits.device)
    big_l = buf.as_strided((B, S, V), (V, stride, 1))
    big_q = buf.as_strided((B, S - 1, V), (V, stride, 1), B * V)
    big_l.copy_(logits)
    big_q.copy_(dp.to(logits.dtype))
    return dict(kw, logits=big_l, draft_probs=big_q)


def test_row_offsets_past_int32(device):
    # (row * row stride) past 2**31 elements with an int32 stride: the finish
    # kernel's logits / draft_probs row offsets must be 64-bit products. The
    # buffer is ~5 GB of address space (untouched pages cost nothing).
    B, S, V = 2, 9, 48
    stride = 2 ** 31 // (S - 2) + 64            # < 2**31, while (S - 2) * stride > 2**31
    kw = make_verify_case(B, S, V, dtype=torch.float16, sampled="all", draft_probs=True,
                          match_frac=0.9, gen_seed=11, device=device)
    kw["num_drafts"] = torch.full((B,), S - 1, dtype=torch.int32, device=device)
    kw = _huge_row_stride(kw, stride)
    assert kw["logits"].stride(1) < 2 ** 31 <= (S - 2) * kw["logits"].stride(1)
    want = run_verify("reference", kw)
    assert_same_verify(run_verify("triton", kw), want)


def test_strided_vector_inputs(device):
    # Per-request inputs that are column views (stride != 1) and block_tokens
    # transposed, through the public op (which makes them dense for the kernels).
    B, S, V = 5, 4, 300
    kw = make_verify_case(B, S, V, top_k=True, top_p=True, draft_probs=True, gen_seed=5,
                          device=device)
    want = run_verify("reference", kw)
    strided = dict(kw)
    for name in ("num_drafts", "temperature", "top_k", "top_p", "seeds", "positions", "seq_lens"):
        x = kw[name]
        pair = torch.stack([torch.full_like(x, 3), x], 1)          # garbage in column 0
        strided[name] = pair[:, 1]
        assert strided[name].stride(0) == 2
    strided["block_tokens"] = kw["block_tokens"].t().contiguous().t()
    assert strided["block_tokens"].stride(1) == B
    assert_same_verify(run_verify("triton", strided), want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_gpu():
    # Triton launches on the current device; the op must launch on its tensors' one.
    kw = make_verify_case(3, 4, 500, draft_probs=True, gen_seed=2, device="cuda:1")
    with torch.cuda.device(0):
        got = run_verify("triton", kw)
    assert_same_verify(got, run_verify("reference", kw))


# ---------------------------------------------------------------------------
# The K-way threshold search, stressed: exact top-k / top-p thresholds
# ---------------------------------------------------------------------------

NAN, NINF = float("nan"), float("-inf")


def stress_rows(V, gen_seed=0):
    """Rows and per-row (temperature, top_k, top_p) that put the thresholds on ties,
    negative values, -inf / NaN, k = 1 and V - 1, tiny and near-1 top_p."""
    g = torch.Generator().manual_seed(gen_seed)
    levels = torch.randint(-6, 4, (V,), generator=g).float()          # heavy ties everywhere
    cont = torch.randn(V, generator=g) * 2.0
    neg = -40.0 + torch.randn(V, generator=g) * 0.01                  # all negative, close keys
    holes = cont.clone()
    holes[::2] = NAN
    holes[1::7] = NINF
    one_ninf = levels.clone()
    one_ninf[V // 3] = NINF
    nfin = int(torch.isfinite(holes).sum())
    top = int((levels == 3).sum())
    cases = [  # row, T, k, p
        (levels, 1.0, 1, 1.0), (levels, 1.0, V - 1, 1.0), (levels, 0.7, top, 1.0),
        (levels, 1.0, top + 1, 1.0), (levels, 1.3, V // 2, 1.0),
        (levels, 1.0, 0, 1e-7), (levels, 1.0, 0, 0.0), (levels, 1.0, 0, -1.0),
        (levels, 1.0, 0, 1 - 1e-6), (levels, 0.9, 0, 0.5), (levels, 1.0, V // 2, 0.3),
        (neg, 1.0, V // 2, 1.0), (neg, 0.5, 0, 0.5), (neg, 1.0, V - 1, 0.9),
        (holes, 1.0, nfin + 5, 1.0), (holes, 1.0, nfin, 1.0), (holes, 1.0, 3, 0.8),
        (holes, 1.0, 0, 1 - 1e-6), (one_ninf, 1.0, V - 1, 1.0), (one_ninf, 1.0, V - 2, 0.99),
        (cont, 0.8, 37, 0.6), (cont, 1.0, 0, 0.95),
        (torch.full((V,), NINF), 1.0, 5, 0.5), (torch.full((V,), NAN), 1.0, 0, 0.5),
    ]
    rows = torch.stack([c[0] for c in cases])
    temp = torch.tensor([c[1] for c in cases], dtype=torch.float32)
    k = torch.tensor([c[2] for c in cases], dtype=torch.int32)
    p = torch.tensor([c[3] for c in cases], dtype=torch.float32)
    return rows, temp, k, p


def scaled_rows(rows, temp):
    x = rows.float().nan_to_num(nan=NINF, posinf=float("inf"), neginf=NINF)
    return x * (1.0 / temp).view(-1, 1)                 # one fp32 division, then the product


def expected_thresholds(scaled, k, p):
    """Independent float64 math: k-th largest, then top-p as the largest value whose
    kept mass (over the top-k set) reaches p * Z; -inf where nothing is filtered."""
    out = []
    for s, kk, pp in zip(scaled.tolist(), k.tolist(), p.tolist()):
        V = len(s)
        desc = sorted(s, reverse=True)
        thr = desc[kk - 1] if 0 < kk < V else NINF
        if pp < 1.0 and desc[0] > NINF:
            import math
            kept = [v for v in desc if v >= thr]
            m = kept[0]
            z = sum(math.exp(v - m) for v in kept)
            acc, i = 0.0, 0
            while i < len(kept):
                v = kept[i]
                while i < len(kept) and kept[i] == v:           # a whole tie group at once
                    acc += math.exp(kept[i] - m)
                    i += 1
                if acc >= pp * z:
                    thr = v
                    break
        out.append(thr)
    return torch.tensor(out, dtype=torch.float32)


def kernel_thresholds(rows, temp, k, p, sblock):
    """The threshold launch 1 stores for each row (one request of one row per row)."""
    R, V = rows.shape
    block = tv.block_size(V)
    f32 = dict(dtype=torch.float32)
    pval, pm, pz = (torch.empty(R, **f32) for _ in range(3))
    pidx = torch.empty(R, dtype=torch.int32)
    thr = torch.full((R,), 1234.5, **f32)
    seeds = torch.arange(R, dtype=torch.int64)
    pos = torch.arange(R, dtype=torch.int64) * 17
    tv._verify_rows_kernel[(R, 1)](
        rows, V, V, temp, k, p, seeds, pos, pval, pidx, pm, pz, thr, 1, V,
        triton.cdiv(V, block) * block, 1, HAS_TEMP=True, HAS_TOPK=True, HAS_TOPP=True,
        NEED_MZ=True, BLOCK=block, SBLOCK=sblock, KWAY=tv.KWAY, KEYDT=tv.key_space(rows.dtype),
        num_warps=4, enable_fp_fusion=False)
    return thr


@pytest.mark.skipif(HAS_CUDA, reason="launches the kernel on CPU tensors (interpreter)")
@pytest.mark.parametrize("V, sblock, dtype", [
    (1000, None, torch.float32), (1030, None, torch.float32), (300, tv.SEARCH_BLOCK_V, torch.float32),
    (1000, None, torch.bfloat16), (300, tv.SEARCH_BLOCK_V, torch.float16)])
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_search_thresholds_exact(V, sblock, dtype):
    # fp32 rows: keys of the scaled values; bf16 / fp16 rows: the logits' own 16-bit keys,
    # whose candidates near the dtype's max overflow to +inf once scaled (numpy warns).
    from dflash_kernels.reference.verify_chain import kept_set

    rows, temp, k, p = stress_rows(V, gen_seed=V)
    rows = rows.to(dtype)
    thr = kernel_thresholds(rows, temp, k, p, sblock or tv.block_size(V))
    scaled = scaled_rows(rows, temp)
    want = expected_thresholds(scaled, k, p)
    assert torch.equal(thr, want), (thr, want)
    # Same kept sets as the reference's sorted definition.
    keep = kept_set(scaled[:, None], torch.ones(len(rows), dtype=torch.bool), k, p)[:, 0]
    assert torch.equal(scaled >= thr[:, None], keep)
    assert (keep.sum(-1) >= 1).all()


@pytest.mark.parametrize("V, sblock", [(1000, None), (300, tv.SEARCH_BLOCK_V)])
def test_search_stress_tokens(V, sblock, device, monkeypatch):
    # End to end: the stressed rows as requests of S = 2 rows (the second a copy of
    # the first), tokens compared with the reference token for token.
    if sblock is not None:
        monkeypatch.setattr(tv, "search_block", lambda V, dev: sblock)
    rows, temp, k, p = stress_rows(V, gen_seed=V + 1)
    B = len(rows)
    g = torch.Generator().manual_seed(V)
    kw = dict(logits=rows[:, None, :].expand(B, 2, V).contiguous().to(device),
              block_tokens=torch.randint(0, V, (B, 2), generator=g).to(device),
              num_drafts=torch.ones(B, dtype=torch.int32, device=device),
              temperature=temp.to(device), top_k=k.to(device), top_p=p.to(device),
              seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g).to(device),
              positions=torch.randint(0, 2 ** 34, (B,), generator=g).to(device))
    check_against_reference(kw)


# ---------------------------------------------------------------------------
# Edge values (docs/DESIGN.md, "Edge values"): the reference's results exactly
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(top_k=True), dict(top_p=True),
                                  dict(draft_probs=True), dict(top_k=True, top_p=True, draft_probs=True)])
def test_edge_values_match_reference(opts):
    kw = edge_verify_case(**opts)
    assert_same_verify(run_verify("triton", kw), run_verify("reference", kw))


def test_placeholder_draft_repro_matches_reference():
    # Issue 14: reference [7, 11, 13, 2, 0, 0, 0, 14] vs Triton [10, 3, 7, 2, 6, 0, 0, 14]
    # before; now both give t_0, the sample from p (its fit: the reference tests).
    for n in (8, 96):
        kw = draft_repro(n)
        assert_same_verify(run_verify("triton", kw), run_verify("reference", kw))


def test_empty_batch_direct_call():
    # torch.ops.dflash.verify_chain bypasses ops.py's early return.
    z = torch.zeros(0, dtype=torch.int32)
    for V in (50, 5000):
        acc, toks = z.clone(), torch.zeros(0, 4, dtype=torch.int32)
        tv.verify_chain(torch.randn(0, 4, V), torch.zeros(0, 4, dtype=torch.int64), z, None, None,
                        None, None, None, None, None, None, None, acc, toks, z.clone(), None)
        t = torch.ones(0)
        tv.verify_chain(torch.randn(0, 4, V), torch.zeros(0, 4, dtype=torch.int64), z, t,
                        z, t, z.long(), z.long(), torch.randn(0, 3, V), z, None, None, acc, toks,
                        z.clone(), z.clone())


# ---------------------------------------------------------------- pruned sampled rows

def _rows_pass_both(logits, monkeypatch, **kw):
    B = logits.shape[0]
    g = torch.Generator().manual_seed(1)
    args = dict(temperature=torch.ones(B), top_k=None, top_p=None,
                seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g),
                positions=torch.randint(0, 2 ** 34, (B,), generator=g))
    args.update(kw)
    out = []
    for prune in (False, True):
        monkeypatch.setattr(tv, "PRUNE", prune)
        rp = tv.rows_pass(logits, args["temperature"], args["top_k"], args["top_p"], args["seeds"],
                          args["positions"], need_mz=kw.get("need_mz", False))
        out.append(rp)
    return out


@pytest.mark.parametrize("need_mz", [False, True])
def test_pruned_rows_bit_identical(need_mz, monkeypatch):
    """Pruned and unpruned row passes write the same partials bit for bit (scores, ids and,
    with draft_probs, the kept max / sum-exp), one program per row over 9 tiles."""
    V = 8 * tv.BLOCK_V + 1
    logits = pruning_rows(V, tv.BLOCK_V)[:, None, :]
    full, pruned = _rows_pass_both(logits, monkeypatch, need_mz=need_mz)
    assert full["nsplit"] == pruned["nsplit"]
    names = ["pval", "pidx"] + (["pm", "pz", "thr"] if need_mz else [])
    for n in names:
        assert torch.equal(full[n].view(torch.int32), pruned[n].view(torch.int32)), n
    # The winners are where the rows put them (the test rows do what they say).
    idx = full["pidx"].view(7, -1)[:, 0]
    assert idx[1] == 3 and idx[2] == V - 1 and idx[3] == 100 and idx[6] >= tv.BLOCK_V


def test_pruned_rows_split_and_filtered(monkeypatch):
    """Several vocab splits per row (each program prunes its own chunk) and top-k / top-p
    rows (the whole row in split 0, pruning inside the kept set): same partials, and the
    op's tokens equal the reference's."""
    V = 8 * tv.BLOCK_V + 1
    x = pruning_rows(V, tv.BLOCK_V, gen_seed=3)[[1, 5, 6]]
    logits = x[:, None, :]
    full, pruned = _rows_pass_both(logits, monkeypatch, top_k=torch.tensor([0, 50, 0], dtype=torch.int32),
                                   top_p=torch.tensor([1.0, 1.0, 0.9]))
    assert full["nsplit"] > 1
    for n in ("pval", "pidx"):
        assert torch.equal(full[n].view(torch.int32), pruned[n].view(torch.int32)), n
    kw = dict(logits=logits, block_tokens=torch.zeros(3, 1, dtype=torch.long),
              num_drafts=torch.zeros(3, dtype=torch.int32), temperature=torch.ones(3),
              seeds=torch.tensor([5, -7, 11]), positions=torch.tensor([0, 9, 2 ** 33]))
    assert_same_verify(run_verify("triton", kw), run_verify("reference", kw))


def test_pruning_bound_is_load_bearing(monkeypatch):
    """With a noise bound of 0 (wrong: g reaches ~16.6), the pruned loop skips the tile that
    holds the winner of row 6: the rows above do exercise the skip."""
    V = 2 * tv.BLOCK_V
    logits = pruning_rows(V, tv.BLOCK_V)[6:7, None, :].expand(4, 1, V)   # 4 rows: one split each
    full, _ = _rows_pass_both(logits, monkeypatch)
    assert full["nsplit"] == 1
    monkeypatch.setattr(tv, "GUMBEL_MAX", triton.language.constexpr(0.0))
    _, wrong = _rows_pass_both(logits, monkeypatch)
    assert int(full["pidx"][0]) >= tv.BLOCK_V and int(wrong["pidx"][0]) < tv.BLOCK_V
