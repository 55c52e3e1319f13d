"""verify_chain's split top-k search (issue 13): top-k count passes spread over the row's
vocab splits (SEARCH_PASSES launches of _search_count_kernel, then the split stream),
forced on tiny vocabularies with 2..5 splits, token for token against the reference and
the single-program search, on adversarial rows."""

import struct

import pytest
import torch

from dflash_kernels.triton_backend import verify_chain as tv
from helpers import assert_same_verify, make_verify_case, run_verify

NAN, NEG_INF = float("nan"), float("-inf")


def _key(x):
    b = struct.unpack("<i", struct.pack("<f", x))[0]
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def test_search_passes_bound():
    # The worst case of the KWAY-way search over the whole fp32 key range.
    n, passes = _key(float("inf")) - _key(NEG_INF), 0
    while n > 0:
        n = (n + tv.KWAY) // tv.KWAY - 1
        passes += 1
    assert passes <= tv.SEARCH_PASSES


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


@pytest.mark.parametrize("nsplit", [2, 3, 5])
@pytest.mark.parametrize("mode", ["k", "kp", "joint"])
def test_split_search_matches(nsplit, mode, monkeypatch):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = torch.Generator().manual_seed(seed)
    V, S = int(torch.randint(300, 700, (1,), generator=g)), 2
    x, k = _adversarial(V, g, S)
    kw = make_verify_case(6, S, V, draft_probs=True, gen_seed=seed % 1000)
    kw["logits"] = x
    kw["temperature"] = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.9, 1.0])
    kw["top_k"] = k
    if mode != "k":
        kw["top_p"] = torch.tensor([0.999, 1e-6, 0.5, 1.0, 0.9, 0.3])
    if mode == "joint":
        kw["filter_order"] = "joint"
    want = run_verify("reference", kw)
    _force(monkeypatch, nsplit, False)
    single = run_verify("triton", kw)
    _force(monkeypatch, nsplit, True)
    split = run_verify("triton", kw)
    assert_same_verify(split, want)     # seed: printed by pytest's locals on failure
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
