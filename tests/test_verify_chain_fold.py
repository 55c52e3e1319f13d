"""verify_chain in one launch (issue 11): the rows kernel's last-arriving program of each
request runs its finish (FOLD). On every path that used the rows + finish pair (greedy,
sampled point mass, draft_probs, top-k / top-p, the split top-k search, ragged rows, the
joint filter order) the one-launch outputs equal, bit for bit, the reference's and those of
the old pair (``FOLD_FINISH = False``: rows, then _verify_finish_kernel), with 2-3 vocab
splits forced on small odd shapes, the outputs pre-filled with garbage and the partial
workspace poisoned; the arrival counters are all 0 after each call, and a second call gives
the same bits. Interpreter on CPU: tiny shapes."""

import pytest
import torch

from dflash_kernels.triton_backend import verify_chain as tv
from helpers import assert_same_verify, make_verify_case, run_verify
from test_verify_chain_ragged import run_ragged, to_ragged

GARBAGE_F, GARBAGE_I = float("nan"), -123456789


class _PoisonedTorch:
    """``torch`` for verify_chain's module: its workspace (partials, thresholds, split-search
    state) comes back filled with garbage, so a finish that read a partial before it was
    stored would not see the value a previous call left in the allocator's block."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, dtype=torch.float32, device=None):
        fill = GARBAGE_F if dtype.is_floating_point else GARBAGE_I
        return torch.full(shape, fill, dtype=dtype, device=device)


def _force(monkeypatch, nsplit, split_search=False):
    # 256-wide tiles for every call (greedy-only too), so V ~ 300-1000 has 2-4 tiles.
    monkeypatch.setattr(tv, "BLOCK_V", 256)
    monkeypatch.setattr(tv, "GREEDY_BLOCK_V", 256)
    monkeypatch.setattr(tv, "num_splits", lambda rows, V, dev, greedy=False:
                        min(nsplit, -(-V // tv.block_size(V, greedy))))
    monkeypatch.setattr(tv, "SPLIT_SEARCH", split_search)
    monkeypatch.setattr(tv, "torch", _PoisonedTorch())


def _traced(call, monkeypatch, dev):
    """``call()``'s result and the kernels it launched; the counters are 0 afterwards."""
    names = []
    real = tv.launch

    def spy(fn, grid, *args, **kwargs):
        names.append(fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__)
        return real(fn, grid, *args, **kwargs)

    monkeypatch.setattr(tv, "launch", spy)
    res = call()
    monkeypatch.setattr(tv, "launch", real)
    cnt = tv._counters(torch.device(dev), 1)
    assert int(cnt.count_nonzero()) == 0, cnt[cnt != 0]
    return res, names


def _check(call_ref, call_tri, monkeypatch, dev, nsplit, split_search=False):
    want = call_ref()
    _force(monkeypatch, nsplit, split_search)
    monkeypatch.setattr(tv, "FOLD_FINISH", False)
    two, two_names = _traced(call_tri, monkeypatch, dev)
    monkeypatch.setattr(tv, "FOLD_FINISH", True)
    one, one_names = _traced(call_tri, monkeypatch, dev)
    again, _ = _traced(call_tri, monkeypatch, dev)
    # The pair really ran twice as a pair, and the fold as one rows launch (the split
    # search's count and mass launches stay in both).
    count = []
    if split_search:
        nc, nm = tv.search_launches(True, True, torch.float32)
        count = ["_search_count_kernel"] * nc + ["_search_mass_kernel"] * nm
    assert two_names == count + ["_verify_rows_kernel", "_verify_finish_kernel"], two_names
    assert one_names == count + ["_verify_rows_kernel"], one_names
    assert_same_verify(one, want)
    assert_same_verify(one, two)
    assert_same_verify(again, one)
    return one


def _accept_all(kw, b):
    """Request b is greedy and its drafts are its targets (all accepted), so its bonus comes
    from its last row, whose winner is planted in the last split: the last partial the
    interpreter stores (programs run row by row, split by split)."""
    S, V = kw["block_tokens"].shape[1], kw["logits"].shape[-1]
    if "temperature" in kw:
        kw["temperature"][b] = 0.0
    kw["logits"][b, S - 1, V - 3] = 100.0
    tok = kw["logits"][b].float().nan_to_num(nan=float("-inf")).argmax(-1)
    kw["block_tokens"][b, 1:] = tok[:-1].to(kw["block_tokens"].dtype)
    kw["num_drafts"][b] = S - 1


CASES = {
    # name: (make_verify_case arguments, V, forced splits)
    "greedy": (dict(sampled="none", special_rows=True, match_frac=0.8), 700, 3),
    "sampled": (dict(special_rows=True, match_frac=0.6), 517, 2),
    "draft_probs": (dict(draft_probs=True, match_frac=0.4), 611, 3),
    "topk_topp_draft_probs": (dict(draft_probs=True, top_k=True, top_p=True, special_rows=True,
                                   match_frac=0.4), 389, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fold_matches_reference_and_pair(name, device, monkeypatch):
    args, V, nsplit = CASES[name]
    kw = make_verify_case(3, 5, V, gen_seed=V, device=device, **args)
    _accept_all(kw, 2)
    _check(lambda: run_verify("reference", kw), lambda: run_verify("triton", kw),
           monkeypatch, device, nsplit)


def test_fold_split_search(device, monkeypatch):
    # The split search (fp32 logits, top-k and top-p): its count and mass launches stay,
    # rows + finish fold.
    # Request 0: top-k alone; 1: greedy, all accepted; 2: top-k and top-p (every filtered
    # row streamed over the splits).
    V = 523
    kw = make_verify_case(3, 5, V, sampled="all", top_k=True, top_p=True, draft_probs=True,
                          match_frac=0.5, gen_seed=11, device=device)
    kw["top_k"] = torch.tensor([3, 0, 40], dtype=torch.int32, device=device)
    kw["top_p"] = torch.tensor([1.0, 1.0, 0.6], device=device)
    _accept_all(kw, 1)
    _check(lambda: run_verify("reference", kw), lambda: run_verify("triton", kw),
           monkeypatch, device, 3, split_search=True)


def test_fold_joint(device, monkeypatch):
    kw = make_verify_case(3, 5, 353, sampled="all", top_k=True, top_p=True, match_frac=0.5,
                          gen_seed=5, device=device)
    kw["top_k"] = torch.tensor([7, 30, 2], dtype=torch.int32, device=device)
    kw["top_p"] = torch.tensor([0.6, 0.9, 0.3], device=device)
    kw["filter_order"] = "joint"
    _accept_all(kw, 2)
    _check(lambda: run_verify("reference", kw), lambda: run_verify("triton", kw),
           monkeypatch, device, 2)


@pytest.mark.parametrize("mode", ["greedy", "draft_probs"])
def test_fold_ragged(mode, device, monkeypatch):
    # Request lengths 5, 2, 4 of max_rows 5: the padding rows' programs arrive too.
    V = 457
    args = dict(sampled="none") if mode == "greedy" else dict(draft_probs=True, top_k=True)
    kw = make_verify_case(3, 5, V, match_frac=0.6, gen_seed=13, device=device, **args)
    _accept_all(kw, 0)
    rk = to_ragged(kw, [5, 2, 4])
    _check(lambda: run_ragged("reference", rk, 5), lambda: run_ragged("triton", rk, 5),
           monkeypatch, device, 2)
