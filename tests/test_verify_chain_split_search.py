"""verify_chain's split threshold search (issue 13): top-k count passes and top-p mass
passes spread over the row's vocab splits (search_launches() launches of
_search_count_kernel / _search_mass_kernel, then the split stream), forced on tiny
vocabularies with 2..5 splits, token for token against the reference and the single-program
search, on adversarial rows, in each key space (fp32 keys of the scaled logits; bf16 / fp16
logits' own 16-bit keys). Also the single-program search's packed count (_kway_hist) and
its compacted top-p (top-k's kept set in a per-row workspace, _compact)."""

import struct

import pytest
import torch
import triton
import triton.language as tl

from dflash_kernels.triton_backend import verify_chain as tv
from helpers import assert_same_verify, make_verify_case, run_verify

NAN, NEG_INF = float("nan"), float("-inf")
# (-inf bits, +inf bits, pattern width) of each key space's dtype.
_INF_BITS = {0: (0xFF800000, 0x7F800000, 32), 1: (0xFF80, 0x7F80, 16), 2: (0xFC00, 0x7C00, 16)}


def _ordered(bits, width):
    """The order-preserving key of a float's bit pattern (sign-extended, magnitude flipped
    for negatives), as the kernels define it."""
    b = bits - (1 << width) if bits >> (width - 1) else bits
    return b ^ ((b >> (width - 1)) & ((1 << (width - 1)) - 1))


@pytest.mark.parametrize("space", [0, 1, 2])
def test_search_passes_bound(space):
    # The KWAY-way search over a whole key space, [key(-inf), key(+inf)], ends in exactly
    # SEARCH_PASSES passes (the split search launches that many; fewer would leave a range).
    neg, pos, width = _INF_BITS[space]
    lo, hi = _ordered(neg, width), _ordered(pos, width)
    n, passes = hi - lo, 0
    while n > 0:
        # power-of-two buckets: width 2**sh, sh the least multiple of 4 with n >> sh < 16
        sh = 0
        while n >> sh >= tv.KWAY:
            sh += 4
        n = (1 << sh) - 1
        passes += 1
    assert passes == tv.SEARCH_PASSES[space]
    consts = {0: (tv._KEY_LO, tv._KEY_HI), 1: (tv._KEY16_LO_BF16, tv._KEY16_HI_BF16),
              2: (tv._KEY16_LO_FP16, tv._KEY16_HI_FP16)}[space]
    assert (lo, hi) == tuple(int(getattr(c, "value", c)) for c in consts)


@triton.jit
def _cand_kernel(out_ptr, LO, N, KEYDT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    key = (LO + i).to(tl.int64)
    tl.store(out_ptr + i, tv._cand(key, 1.0, KEYDT), mask=i < N)


@pytest.mark.parametrize("space, dtype", [(1, torch.bfloat16), (2, torch.float16)])
def test_16_bit_keys_are_the_dtype_values_in_order(space, dtype):
    # Every key of the 16-bit spaces, -inf .. +inf, gives its own pattern's value (exactly,
    # via fp32), in increasing order: the search's candidates are logits of that dtype.
    assert tv.key_space(dtype) == space
    neg, pos, width = _INF_BITS[space]
    lo, hi = _ordered(neg, width), _ordered(pos, width)
    n = hi - lo + 1
    out = torch.empty(n)
    _cand_kernel[(1,)](out, lo, n, KEYDT=space, BLOCK=triton.next_power_of_2(n))
    keys = torch.arange(lo, hi + 1, dtype=torch.int32)
    bits = (keys ^ ((keys >> 15) & 0x7FFF)).to(torch.int16)
    want = bits.view(dtype).float()
    assert torch.equal(out, want)
    assert (out[1:] >= out[:-1]).all() and out[0] == NEG_INF and out[-1] == float("inf")
    # Only +-0 share a value: every other step goes strictly up.
    assert int((out[1:] == out[:-1]).sum()) == 1


@triton.jit
def _hist_kernel(x_ptr, lh_ptr, out_ptr, V, KEYDT: tl.constexpr, BLOCK: tl.constexpr):
    ge, m = tv._kway_hist(x_ptr, V, 1.0, tl.load(lh_ptr), tl.load(lh_ptr + 1), tv.KWAY, BLOCK,
                          KEYDT)
    tl.store(out_ptr + tl.arange(0, tv.KWAY), ge)


def _floats(keys, space):
    """The values of search keys (int64 tensor) in a key space: the kernels' key map inverted."""
    _, _, width = _INF_BITS[space]
    bits = keys ^ ((keys >> (width - 1)) & ((1 << (width - 1)) - 1))
    if space == 0:
        return bits.to(torch.int32).view(torch.float32)
    return bits.to(torch.int16).view(torch.bfloat16 if space == 1 else torch.float16)


@pytest.mark.parametrize("space", [0, 1])
def test_packed_count_far_keys(space):
    # The packed count (_kway_hist) per candidate lo + j << sh: #(key >= it), against plain
    # integer math, on ranges from the whole key space down to 16 keys at a large key, with
    # keys far below lo: an fp32 key 2**32 - 2**30 - 3 below lo narrowed to int32 before
    # its sign was read landed in bucket 3.
    neg, pos, width = _INF_BITS[space]
    klo, khi = _ordered(neg, width), _ordered(pos, width)
    g = torch.Generator().manual_seed(13 + space)
    top = khi - 2 ** (width - 1) // 64          # a large finite key (fp32: about 1.7e38)
    ranges = [(klo, khi), (0, khi), (top, top + 15), (top - 4000, top)]
    for lo, hi in ranges:
        keys = torch.randint(klo, khi + 1, (300,), generator=g)
        near = lo + torch.randint(-20, 40, (60,), generator=g)
        keys = torch.cat([keys, near.clamp(klo, khi)])
        if space == 0:      # int32-truncated distances 2**30 + 3 and 5, and 3 * 2**30 + 1
            keys = torch.cat([keys, torch.tensor([lo - 2**32 + 2**30 + 3, lo - 3 * 2**30 + 5,
                                                  lo - 2**32 + 2**31 + 1])])
        keys = keys[(keys >= klo) & (keys <= khi)]
        x = _floats(keys, space)
        out = torch.empty(tv.KWAY, dtype=torch.int32)
        lh = torch.tensor([lo, hi], dtype=torch.int64)
        _hist_kernel[(1,)](x, lh, out, x.numel(), KEYDT=space, BLOCK=64)
        sh = 0
        while (hi - lo) >> sh >= tv.KWAY:
            sh += 4
        want = [int((keys >= lo + (j << sh)).sum()) for j in range(tv.KWAY)]
        assert out.tolist() == want, (lo, hi)


def _force(monkeypatch, nsplit, split):
    monkeypatch.setattr(tv, "BLOCK_V", 128)
    monkeypatch.setattr(tv, "num_splits", lambda rows, V, dev, greedy=False:
                        min(nsplit, -(-V // tv.block_size(V, greedy))))
    monkeypatch.setattr(tv, "SPLIT_SEARCH", split)


def _adversarial(V, g, S):
    """Rows [B, S, V] (B = 6) and per-request top_k / top_p / temperature: ties at the k-th
    value across splits, -inf holes, a NaN row, k = 1, k = V-1, top-k alone and with top-p
    (tiny, 0.999), the tied maximum in the last split only."""
    B = 6
    x = torch.randn(B, S, V, generator=g)
    lv = torch.randint(-3, 3, (V,), generator=g).float()
    x[0] = lv                                   # ties everywhere
    x[1, :, ::3] = NEG_INF                      # -inf holes
    x[2, 0] = NAN                               # a NaN row
    x[3] = -5.0
    x[3, :, V - 7:] = 2.0                       # the top values only in the last split
    x[4, :, 1::2] = NEG_INF
    k = torch.tensor([int((lv == 2).sum()), 1, 7, 4, V - 1, int(torch.randint(2, V, (1,), generator=g))],
                     dtype=torch.int32)
    return x, k


F32, BF16 = torch.float32, torch.bfloat16


def _adversarial_case(mode, dtype):
    """verify_chain's arguments on :func:`_adversarial` rows (fresh seed, V 300..700, S 2)
    with the filters of ``mode`` (k, p, kp, joint), the reference's result and the seed."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = torch.Generator().manual_seed(seed)
    V, S = int(torch.randint(300, 700, (1,), generator=g)), 2
    x, k = _adversarial(V, g, S)
    kw = make_verify_case(6, S, V, draft_probs=True, gen_seed=seed % 1000)
    kw["logits"] = x.to(dtype)
    kw["temperature"] = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.9, 1.0])
    if mode != "p":
        kw["top_k"] = k
    if mode != "k":
        kw["top_p"] = torch.tensor([0.999, 1e-6, 0.5, 1.0, 0.9, 0.3])
    if mode == "joint":
        kw["filter_order"] = "joint"
    return kw, run_verify("reference", kw), seed


# Every mode in both key spaces, 2 / 3 / 5 splits spread over them (interpreter time).
@pytest.mark.parametrize("mode, dtype, nsplit", [
    ("k", F32, 2), ("k", BF16, 5), ("p", F32, 3), ("p", BF16, 2), ("kp", F32, 5),
    ("kp", BF16, 3), ("joint", F32, 3), ("joint", BF16, 2)])
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_split_search_matches(nsplit, mode, dtype, monkeypatch):
    # (bf16 keys near the dtype's max scaled by 1/T > 1 overflow to +inf in fp32, as on a
    # GPU: numpy warns.)
    kw, want, seed = _adversarial_case(mode, dtype)     # seed: pytest's locals on failure
    _force(monkeypatch, nsplit, False)
    single = run_verify("triton", kw)
    _force(monkeypatch, nsplit, True)
    split = run_verify("triton", kw)
    assert_same_verify(split, want)
    assert_same_verify(split, single)


def _thr(x, k, nsplit, split, monkeypatch):
    _force(monkeypatch, nsplit, split)
    B, S, V = x.shape
    rp = tv.rows_pass(x, torch.ones(B), k, None, torch.zeros(B, dtype=torch.int64),
                      torch.zeros(B, dtype=torch.int64), need_mz=True)
    return rp["thr"].view(B, S)


@pytest.mark.parametrize("nsplit", [2, 4])
def test_split_thresholds_exact_and_combine_load_bearing(nsplit, monkeypatch):
    # The kept set's threshold equals the single-program one, bit for bit; and on these
    # rows split 0's counts alone would give another threshold (the top values sit past
    # split 0), so a combine that dropped the other splits fails here.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    V = 1000
    x = torch.randn(3, 1, V, generator=g) - 10.0
    x[:, 0, 600:640] = torch.randint(0, 3, (3, 40), generator=g).float()
    x[1, 0, 700::5] = NEG_INF
    k = torch.tensor([5, 1, 39], dtype=torch.int32)
    a = _thr(x, k, nsplit, False, monkeypatch)
    b = _thr(x, k, nsplit, True, monkeypatch)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    want = torch.sort(x[:, 0], dim=1, descending=True).values[torch.arange(3), k.long() - 1]
    assert torch.equal(a[:, 0], want)
    chunk0 = x[:, 0, : -(-(-(-V // 128)) // nsplit) * 128]   # _force: 128-wide tiles
    assert ((chunk0 >= want[:, None]).sum(1) < k).all()   # split 0 alone: too few above


def _thr_p(x, k, p, nsplit, split, monkeypatch, joint=False):
    _force(monkeypatch, nsplit, split)
    B, S, V = x.shape
    z = torch.zeros(B, dtype=torch.int64)
    rp = tv.rows_pass(x, torch.ones(B), k, p, z, z, need_mz=True, joint=joint)
    return rp["thr"].view(B, S)


@pytest.mark.parametrize("nsplit, dtype, with_k", [(2, F32, False), (4, F32, True),
                                                   (4, BF16, False), (2, BF16, True)])
def test_split_top_p_thresholds_exact_and_combine_load_bearing(nsplit, dtype, with_k,
                                                                monkeypatch):
    # Top-p's threshold from the split mass passes equals the single program's bit for bit
    # and the reference's kept set (integer masses: exact over any split); the rows' mass
    # sits past split 0, so split 0's masses alone would end on another threshold.
    from dflash_kernels.reference.verify_chain import kept_set

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    V = 1000
    x = torch.randn(4, 1, V, generator=g) - 8.0
    x[:, 0, 600:680] = torch.randn(4, 80, generator=g)
    x[1, 0, 700::5] = NEG_INF
    x[2, 0, 640:660] = 0.5                      # a tie group on the boundary
    x = x.to(dtype)
    k = torch.tensor([0, 50, 70, 0], dtype=torch.int32) if with_k else None
    p = torch.tensor([0.5, 0.9, 0.3, 1e-6])
    a = _thr_p(x, k, p, nsplit, False, monkeypatch)
    b = _thr_p(x, k, p, nsplit, True, monkeypatch)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    s = x[:, 0].float()
    keep = kept_set(s[:, None], torch.ones(4, dtype=torch.bool), k, p)[:, 0]
    assert torch.equal(s >= b, keep)
    chunk0 = s[:, : -(-(-(-V // 128)) // nsplit) * 128]
    assert (chunk0 < b).all()                   # split 0 holds no kept token


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_joint_thresholds(dtype, monkeypatch):
    # SGLang's order: the whole row's mass (per-split int64 sums) sets the target.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    V = 700
    x = (torch.randn(3, 1, V, generator=g) * 2.0).to(dtype)
    k = torch.tensor([5, 300, 40], dtype=torch.int32)
    p = torch.tensor([0.9, 0.4, 0.99])
    a = _thr_p(x, k, p, 3, False, monkeypatch, joint=True)
    b = _thr_p(x, k, p, 3, True, monkeypatch, joint=True)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_search_verify_tree(dtype, monkeypatch):
    # verify_tree shares the row pass: with the split search forced its tokens are the
    # reference's and those of the single-program search.
    from test_verify_tree import make_case, run

    kw = make_case(4, 6, 389, sampled="mixed", top_k=True, top_p=True, special_rows=True,
                   gen_seed=23, dtype=dtype)
    want = run("reference", kw)
    _force(monkeypatch, 3, False)
    single = run("triton", kw)
    _force(monkeypatch, 3, True)
    split = run("triton", kw)
    for w, a, b in zip(want, single, split):
        if w is not None:
            assert torch.equal(b, w) and torch.equal(b, a)


# Top-k + top-p in one program: top-p's mass passes over top-k's kept set compacted into the
# row's workspace (COMPACT_CAP), or over the row when it does not fit (cap 3) or is off (0).
@pytest.mark.parametrize("cap, mode, dtype", [(1024, "kp", F32), (1024, "joint", BF16),
                                              (3, "kp", BF16), (3, "joint", F32),
                                              (0, "kp", F32)])
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_compacted_top_p_matches(cap, mode, dtype, monkeypatch):
    kw, want, seed = _adversarial_case(mode, dtype)     # seed: pytest's locals on failure
    _force(monkeypatch, 2, False)
    monkeypatch.setattr(tv, "COMPACT_CAP", cap)
    assert_same_verify(run_verify("triton", kw), want)


def test_compaction_holds_top_k_kept_set(monkeypatch):
    # The workspace the mass passes read: each row's logits with a scaled value >= top-k's
    # threshold (the sorted k-th scaled value), bit for bit (in atomic-slot order: compared
    # sorted), then -inf up to a multiple of 8.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    B, S, V, cap = 3, 2, 500, 64
    x = torch.randn(B, S, V, generator=g).to(torch.bfloat16)
    x[0, :, 100:110] = 3.0                      # ties at the k-th value: 10 kept, k 4
    k = torch.tensor([4, 1, 40], dtype=torch.int32)
    temp = torch.tensor([1.0, 0.7, 1.3])
    seen = {}
    real = tv.launch

    def spy(kernel, grid, *args, **kw):
        if kw.get("CAP"):
            seen["ws"] = kw["ws_ptr"]
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(tv, "launch", spy)
    monkeypatch.setattr(tv, "COMPACT_CAP", cap)
    _force(monkeypatch, 1, False)
    z = torch.zeros(B, dtype=torch.int64)
    rp = tv.rows_pass(x, temp, k, torch.full((B,), 0.9), z, z, need_mz=True)
    ws = seen["ws"].view(B, S, cap)
    for b in range(B):
        for j in range(S):
            s = x[b, j].float() * (1.0 / temp[b])
            kth = torch.sort(s, descending=True).values[int(k[b]) - 1]
            kept = x[b, j][s >= kth]
            assert (s >= rp["thr"].view(B, S)[b, j]).sum() <= kept.numel()   # top-p within
            assert int(k[b]) <= kept.numel() <= cap
            n = kept.numel()
            got = torch.sort(ws[b, j, :n].view(torch.int16)).values
            assert torch.equal(got, torch.sort(kept.view(torch.int16)).values)
            n8 = min(-(-n // 8) * 8, cap)
            assert (ws[b, j, n:n8] == NEG_INF).all()


@pytest.mark.parametrize("joint, dtype", [(False, BF16), (True, F32)])
def test_compacted_thresholds_exact(joint, dtype, monkeypatch):
    # Kept-set thresholds with the compacted mass passes equal the whole-row passes' bit for
    # bit, on rows where top-p cuts inside top-k's set (so every survivor's mass counts).
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    B, S, V = 8, 2, 400
    x = torch.randn(B, S, V, generator=g) * 4
    x[::2, :, -1] = x.max() + 1                 # the max last in row order: the last survivor
    x = x.to(dtype)
    k = torch.randint(8, 60, (B,), generator=g, dtype=torch.int32)
    p = torch.rand(B, generator=g) * 0.5 + 0.05
    temp = torch.rand(B, generator=g) + 0.5
    z = torch.zeros(B, dtype=torch.int64)
    _force(monkeypatch, 1, False)
    thr = {}
    for cap in (1024, 0):
        monkeypatch.setattr(tv, "COMPACT_CAP", cap)
        thr[cap] = tv.rows_pass(x, temp, k, p, z, z, need_mz=True, joint=joint)["thr"]
    assert torch.equal(thr[1024].view(torch.int32), thr[0].view(torch.int32))
    s = x.float() * (1.0 / temp).view(B, 1, 1)
    kth = torch.sort(s, dim=-1, descending=True).values.gather(-1, (k.long() - 1).view(B, 1, 1)
                                                              .expand(B, S, 1))
    n_p, n_k = (s >= thr[0].view(B, S, 1)).sum(-1), (s >= kth).sum(-1)
    assert (n_p < n_k).float().mean() > 0.5     # top-p inside top-k on most rows
