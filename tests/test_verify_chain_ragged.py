"""verify_chain's engine layouts (SPEC.md "verify_chain: engine layouts and filter
semantics"): the ragged batch of vLLM's samplers (``cu_rows``, ``max_rows``) equals
the padded call token for token, and ``filter_order="joint"`` is SGLang's top-k +
top-p semantics (its test_dflash_sampling_filters.py case, restated), in the
reference and the Triton kernels (interpreter on CPU: tiny shapes).
"""

import numpy as np
import pytest
import torch

import dflash_kernels
from dflash_kernels import _registry, ops
from dflash_kernels.reference import verify_chain as ref
from helpers import (NEG_INF, assert_fits, assert_same_verify, keyed_batch, make_verify_case,
                     run_verify, stress_sampler)

BACKENDS = ["reference", "triton"]
GARBAGE = -777


# ---------------------------------------------------------------------------
# Ragged <-> padded
# ---------------------------------------------------------------------------

def to_ragged(kw, lens, extra_rows=2):
    """The flat form of a padded case: request b keeps its first ``lens[b]`` rows.

    Rows past ``cu_rows[B]`` (an engine's graph padding) are poisoned, and so is
    each request's last ``draft_probs`` row (never read: no draft follows it).
    """
    B, S, V = kw["logits"].shape
    dev = kw["logits"].device
    lens = [int(n) for n in lens]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=dev)
    pick = lambda t: torch.cat([t[b, :lens[b]] for b in range(B)])  # noqa: E731
    logits = pick(kw["logits"])
    bt = pick(kw["block_tokens"])
    pad_l = torch.full((extra_rows, V), float("nan"), dtype=logits.dtype, device=dev)
    pad_l[:, 1] = 1e4                                   # a winner, were it read
    out = {k: v for k, v in kw.items() if k not in ("logits", "block_tokens", "num_drafts",
                                                    "draft_probs")}
    out.update(logits=torch.cat([logits, pad_l]),
               block_tokens=torch.cat([bt, torch.full((extra_rows,), 3, dtype=bt.dtype,
                                                      device=dev)]),
               cu_rows=cu)
    if "draft_probs" in kw:
        dp = kw["draft_probs"]
        rows = []
        for b in range(B):
            poison = torch.full((1, V), float("nan"), dtype=dp.dtype, device=dev)
            rows += [dp[b, :lens[b] - 1], poison]
        rows.append(torch.full((extra_rows, V), float("nan"), dtype=dp.dtype, device=dev))
        out["draft_probs"] = torch.cat(rows)
    return out


def run_ragged(backend, kw, max_rows):
    """The public op on a ragged case, outputs pre-filled with garbage."""
    B = kw["cu_rows"].shape[0] - 1
    dev = kw["cu_rows"].device
    out = (torch.full((B,), GARBAGE, dtype=torch.int32, device=dev),
           torch.full((B, max_rows), GARBAGE, dtype=torch.int32, device=dev),
           torch.full((B,), GARBAGE, dtype=torch.int32, device=dev),
           torch.full((B,), GARBAGE, dtype=torch.int32, device=dev) if "seq_lens" in kw else None)
    kw = dict(kw)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    res = dflash_kernels.verify_chain(logits, bt, out=out, max_rows=max_rows, backend=backend, **kw)
    assert res.out_tokens is out[1]
    return res


def truncated(kw, S):
    """The padded case cut to S rows per request (num_drafts capped at S-1)."""
    out = dict(kw)
    out["logits"] = kw["logits"][:, :S].contiguous()
    out["block_tokens"] = kw["block_tokens"][:, :S].contiguous()
    out["num_drafts"] = kw["num_drafts"].clamp(max=S - 1)
    if "draft_probs" in kw:
        out["draft_probs"] = kw["draft_probs"][:, :S - 1].contiguous()
    return out


MODES = {
    "greedy": dict(sampled="none"),
    "sampled": dict(),
    "filters": dict(top_k=True, top_p=True),
    "draft_probs": dict(draft_probs=True, top_k=True, top_p=True, match_frac=0.4),
    "joint": dict(top_k=True, top_p=True, filter_order="joint"),
}


def mode_case(mode, B, S, V, seed, device):
    opts = dict(MODES[mode])
    order = opts.pop("filter_order", None)
    kw = make_verify_case(B, S, V, special_rows=True, gen_seed=seed, device=device, **opts)
    if order:
        kw["filter_order"] = order
    return kw


# Every mode at one shape on both backends; the second shape (longer blocks) on the
# reference for every mode and on Triton where it adds a code path (draft_probs, joint),
# to keep the interpreter time down.
SHAPES = [(5, 4, 300, 1), (3, 6, 130, 2)]
RAGGED_CASES = [(be, mode, *SHAPES[0]) for be in BACKENDS for mode in MODES] + [
    ("reference", mode, *SHAPES[1]) for mode in MODES] + [
    ("triton", mode, *SHAPES[1]) for mode in ("draft_probs", "joint")]


@pytest.mark.parametrize("backend, mode, B, S, V, seed", RAGGED_CASES)
def test_ragged_equals_padded(backend, mode, B, S, V, seed, device):
    kw = mode_case(mode, B, S, V, seed, device)
    # Random lengths 1..S (the case's num_drafts + 1): one request is the anchor alone.
    nd = kw["num_drafts"].clone()
    nd[-1] = 0
    kw["num_drafts"] = nd
    lens = (nd + 1).tolist()
    want = run_verify(backend, kw)
    rg = to_ragged(kw, lens)
    got = run_ragged(backend, rg, S)
    assert_same_verify(got, want)
    # Wider outputs: the same, then -1.
    wide = run_ragged(backend, rg, S + 2)
    assert torch.equal(wide.out_tokens[:, :S].cpu(), want.out_tokens.cpu())
    assert (wide.out_tokens[:, S:] == -1).all()
    for a, b in zip((wide.accept_len, wide.bonus, wide.new_seq_lens),
                    (want.accept_len, want.bonus, want.new_seq_lens)):
        assert torch.equal(a.cpu(), b.cpu())
    # Narrower outputs: rows past max_rows are ignored, as a padded call cut to max_rows.
    cut = S - 2
    narrow = run_ragged(backend, rg, cut)
    assert_same_verify(narrow, run_verify(backend, truncated(kw, cut)))


@pytest.mark.parametrize("mode", ["greedy", "draft_probs", "joint"])
def test_ragged_triton_equals_reference_with_random_lengths(mode, device):
    B, S, V = 7, 5, 200
    kw = mode_case(mode, B, S, V, 11, device)
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[2] = 1
    rg = to_ragged(kw, lens, extra_rows=3)
    assert_same_verify(run_ragged("triton", rg, S), run_ragged("reference", rg, S))


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_cu_rows_stay_in_bounds(backend, device):
    """Device values are not checked: any cu_rows gives the rows the documented
    clamp picks (reference ragged_rows), never a read outside the tensors."""
    B, S, V = 5, 4, 64
    kw = make_verify_case(B, S, V, draft_probs=True, gen_seed=4, device=device)
    rg = to_ragged(kw, [4, 3, 1, 2, 4], extra_rows=0)
    T = rg["logits"].shape[0]
    rg["cu_rows"] = torch.tensor([-9, 50, 3, 2, T - 1, 2 ** 31 - 1], dtype=torch.int32,
                                 device=device)
    rg["draft_probs"] = torch.nan_to_num(rg["draft_probs"], nan=0.25)
    got = run_ragged(backend, rg, S)
    idx, nd = ref.ragged_rows(rg["cu_rows"], T, S)
    assert nd.tolist() == [3, 0, 0, 3, 0]
    padded = dict(rg)
    del padded["cu_rows"]
    padded.update(logits=rg["logits"][idx], block_tokens=rg["block_tokens"][idx],
                  num_drafts=nd.to(torch.int32), draft_probs=rg["draft_probs"][idx[:, :S - 1]])
    assert_same_verify(got, run_verify("reference", padded))
    assert ((got.out_tokens >= -1) & (got.out_tokens < V)).all()


def test_ragged_empty_batch_and_single_rows(device):
    empty = dflash_kernels.verify_chain(torch.zeros(0, 9, device=device),
                                        torch.zeros(0, dtype=torch.int64, device=device),
                                        cu_rows=torch.zeros(1, dtype=torch.int32, device=device),
                                        max_rows=3)
    assert empty.out_tokens.shape == (0, 3) and empty.accept_len.shape == (0,)
    # Every request the anchor alone: the bonus is each row's argmax.
    logits = torch.randn(4, 9, device=device)
    for backend in BACKENDS:
        res = dflash_kernels.verify_chain(logits, torch.zeros(4, dtype=torch.int32, device=device),
                                          cu_rows=torch.arange(5, dtype=torch.int32, device=device),
                                          max_rows=2, backend=backend)
        assert res.accept_len.tolist() == [0] * 4
        assert res.bonus.tolist() == logits.argmax(-1).tolist()
        assert res.out_tokens[:, 1].tolist() == [-1] * 4


def test_ragged_validation(device):
    V = 11
    logits = torch.randn(6, V, device=device)
    bt = torch.zeros(6, dtype=torch.int64, device=device)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    T = torch.ones(2, device=device)
    key = torch.arange(2, device=device)
    good = dict(cu_rows=cu, max_rows=4)
    dflash_kernels.verify_chain(logits, bt, **good)
    bad = [
        ((logits, bt), dict(cu_rows=cu.long(), max_rows=4), "cu_rows"),
        ((logits, bt), dict(cu_rows=cu.view(1, 3), max_rows=4), "cu_rows"),
        ((logits, bt), dict(cu_rows=cu[:0], max_rows=4), "cu_rows"),
        ((logits, bt), dict(cu_rows=cu), "max_rows"),
        ((logits, bt), dict(cu_rows=cu, max_rows=0), "max_rows"),
        ((logits, bt), dict(cu_rows=cu, max_rows=2.0), "max_rows"),
        ((logits, bt), dict(max_rows=4), "max_rows"),
        ((logits, bt), dict(good, num_drafts=torch.ones(2, dtype=torch.int32, device=device)),
         "num_drafts"),
        ((logits.view(2, 3, V), bt), good, "logits"),
        ((logits[:5], bt), good, "logits"),
        ((logits, bt.view(2, 3)), good, "block_tokens"),
        ((logits[:1], bt[:1]), good, "block_tokens"),
        ((logits, bt), dict(good, temperature=T, seeds=key, positions=key,
                            draft_probs=torch.rand(2, 3, V, device=device)), "draft_probs"),
        ((logits, bt), dict(good, seq_lens=torch.zeros(6, dtype=torch.int32, device=device)),
         "seq_lens"),
        ((logits, bt), dict(good, out=(torch.empty(2, dtype=torch.int32, device=device),
                                       torch.empty(2, 3, dtype=torch.int32, device=device),
                                       torch.empty(2, dtype=torch.int32, device=device), None)),
         "out.out_tokens"),
        ((logits.view(2, 3, V), bt.view(2, 3)), dict(filter_order="nucleus-first"),
         "filter_order"),
    ]
    for args, kw, name in bad:
        with pytest.raises(ValueError, match=name):
            dflash_kernels.verify_chain(*args, **kw)


def test_registry_sees_cu_rows_and_joint(monkeypatch):
    """The optional arguments the registry sees: cu_rows when ragged, filter_order only
    where "joint" changes the kept set (both filters given)."""
    seen = []
    # Eager calls resolve in the registry (given computed where a backend refuses
    # some optional: forced here, so the test does not depend on the cuda backend).
    monkeypatch.setattr(_registry, "_given_matters", lambda op, dev, interpreted: True)
    monkeypatch.setattr(_registry, "_resolve", lambda op, dev, req, env, given, interpreted:
                        seen.append(given) or "reference")
    V = 11
    T, key = torch.ones(2), torch.arange(2)
    k, p = torch.full((2,), 3, dtype=torch.int32), torch.full((2,), 0.5)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    dflash_kernels.verify_chain(torch.randn(3, V), torch.zeros(3, dtype=torch.int64), cu_rows=cu,
                                max_rows=2)
    assert seen[-1] == ("cu_rows",)
    logits, bt = torch.randn(2, 2, V), torch.zeros(2, 2, dtype=torch.int64)
    samp = dict(temperature=T, seeds=key, positions=key)
    dflash_kernels.verify_chain(logits, bt, **samp, top_k=k, filter_order="joint")
    assert "filter_order" not in seen[-1]
    dflash_kernels.verify_chain(logits, bt, **samp, top_k=k, top_p=p)
    assert "filter_order" not in seen[-1]
    dflash_kernels.verify_chain(logits, bt, **samp, top_k=k, top_p=p, filter_order="joint")
    assert seen[-1] == ("temperature", "top_k", "top_p", "seeds", "positions", "filter_order")


def test_cuda_backend_refuses_ragged_and_joint(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    fn, unsupported, reason = _registry._load("verify_chain", "cuda")
    if fn is None:
        pytest.skip(reason)
    assert {"cu_rows", "filter_order"} <= unsupported
    monkeypatch.setattr(_registry, "_device_reason", lambda b, d, i: "")
    _registry._resolve.cache_clear()
    try:
        assert _registry.resolve("verify_chain", "cuda", given=("temperature",)) == "cuda"
        assert _registry.resolve("verify_chain", "cuda", given=("cu_rows",)) == "triton"
        with pytest.raises(dflash_kernels.BackendUnavailableError, match="filter_order"):
            _registry.resolve("verify_chain", "cuda", "cuda", given=("filter_order",))
    finally:
        _registry._resolve.cache_clear()


def test_traced_ragged_joint_call_goes_through_the_custom_op():
    from helpers import op_log

    B, S, V = 3, 3, 40
    kw = to_ragged(make_verify_case(B, S, V, top_k=True, top_p=True, gen_seed=9), [3, 1, 2])
    kw["filter_order"] = "joint"
    eager = run_ragged("reference", kw, S)
    with op_log() as log:
        traced = run_ragged("reference", kw, S)
    assert "dflash.verify_chain.default" in log.ops
    assert_same_verify(eager, traced)


def test_ragged_tensor_parallel_local_shard(device):
    """The vocab-parallel path gathers this rank's flat shard into [B, max_rows] rows:
    one local shard gives the single-device result, in both filter orders."""
    B, S, V = 4, 4, 90
    kw = make_verify_case(B, S, V, draft_probs=True, top_k=True, top_p=True, gen_seed=6,
                          device=device)
    rg = to_ragged(kw, [4, 1, 3, 2])
    for order in ("sequential", "joint"):
        want = run_ragged("reference", dict(rg, filter_order=order), S)
        got = run_ragged(None, dict(rg, tp_group="local", vocab_size=V, filter_order=order), S)
        assert_same_verify(got, want)


# ---------------------------------------------------------------------------
# filter_order="joint" (SGLang) against "sequential" (vLLM)
# ---------------------------------------------------------------------------

# SGLang's case: the nucleus of the full distribution at top_p 0.82 reaches token 3
# (0.35 + 0.25 + 0.20 = 0.80 before it); renormalising to the top-4 set first
# (0.85 of the mass) would cut it, since 0.80 / 0.85 > 0.82.
SGL_PROBS = [0.35, 0.25, 0.20, 0.05, 0.03, 0.03, 0.03, 0.03, 0.03]
SGL_TOP_K, SGL_TOP_P = 4, 0.82


def sgl_row():
    return torch.tensor(SGL_PROBS, dtype=torch.float64).log().float()


def kept(scaled, k, p, joint):
    B = scaled.shape[0]
    return ref.kept_set(scaled.view(B, 1, -1), torch.ones(B, dtype=torch.bool),
                        torch.tensor(k, dtype=torch.int32), torch.tensor(p), joint)[:, 0]


def test_sglang_case_kept_sets():
    row = sgl_row().view(1, -1)
    joint = kept(row, [SGL_TOP_K], [SGL_TOP_P], True)[0]
    seq = kept(row, [SGL_TOP_K], [SGL_TOP_P], False)[0]
    assert joint.tolist() == [True] * 4 + [False] * 5
    assert seq.tolist() == [True] * 3 + [False] * 6
    # The other application order (top-p over the full softmax, then top-k) is the same set.
    p_first = kept(row, [0], [SGL_TOP_P], False)[0] & kept(row, [SGL_TOP_K], [1.0], False)[0]
    assert torch.equal(joint, p_first)


@pytest.mark.parametrize("order, support", [("joint", 4), ("sequential", 3)])
def test_sglang_case_sampled_distribution(order, support):
    """Tokens emitted under each order follow the renormalised kept set (SGLang's expected
    probs for joint: the first four, divided by their mass 0.85)."""
    N = 3000
    kw = keyed_batch(sgl_row().view(1, -1), N, 1.0, top_k=SGL_TOP_K, top_p=SGL_TOP_P)
    res = run_verify("reference", dict(kw, filter_order=order))
    p = np.zeros(len(SGL_PROBS))
    p[:support] = SGL_PROBS[:support]
    assert_fits(res.bonus, p / p.sum(), order)


def test_sglang_case_triton_matches_reference():
    N = 24
    kw = keyed_batch(sgl_row().view(1, -1), N, 1.0, top_k=SGL_TOP_K, top_p=SGL_TOP_P)
    for order in ("joint", "sequential"):
        assert_same_verify(run_verify("triton", dict(kw, filter_order=order)),
                           run_verify("reference", dict(kw, filter_order=order)))


def joint_truth(s, k, p):
    """Independent float64 math: the top-k set intersected with the full distribution's
    nucleus (the smallest prefix, by value, whose probability reaches top_p)."""
    s = np.asarray(s, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)      # NaN counts as -inf
    fin = np.isfinite(s)
    keep = np.ones(len(s), dtype=bool)
    if 0 < k < len(s):
        keep &= s >= np.sort(s)[::-1][k - 1]
    if p < 1 and fin.any():
        w = np.where(fin, np.exp(s - s[fin].max()), 0.0)
        order = np.argsort(-s, kind="stable")
        reach = np.cumsum(w[order]) >= max(p, 0.0) * w.sum()
        tau = s[order[int(np.argmax(reach))]]
        keep &= s >= tau
    return keep


def test_joint_kept_set_against_independent_math():
    g = torch.Generator().manual_seed(3)
    V, R = 97, 40
    rows = torch.randn(R, V, generator=g) * 2.5
    ks = torch.randint(0, 30, (R,), generator=g).tolist()
    ps = (0.05 + 0.94 * torch.rand(R, generator=g)).tolist()
    ps[:3] = [1.0, 0.3, 0.0]
    ks[3] = 0
    # Edge rows: ties at the k-th value and at the nucleus cut, -inf and NaN entries,
    # an all -inf row, k = 1, k past the finite count, top_p tiny and near 1.
    tied = torch.full((V,), -3.0)
    tied[:6] = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    holes = torch.randn(V, generator=g)
    holes[::3] = NEG_INF
    holes[1::7] = float("nan")
    edge = [(tied, 2, 0.6), (tied, 3, 0.5), (tied, 5, 0.9), (tied, 1, 0.9), (holes, 40, 0.7),
            (holes, 80, 0.95), (holes, 1, 0.5), (torch.full((V,), NEG_INF), 5, 0.5),
            (rows[4], 1, 1e-7), (rows[5], 20, 1e-7), (rows[6], 20, 1 - 1e-6),
            (rows[7], V - 1, 1 - 1e-6), (rows[8], 30, 0.999)]
    raw = torch.cat([rows, torch.stack([e[0] for e in edge])])
    ks += [e[1] for e in edge]
    ps += [e[2] for e in edge]
    rows = raw.nan_to_num(nan=NEG_INF)          # what scale_logits hands kept_set
    R = rows.shape[0]
    got = kept(rows, ks, ps, True)
    for i in range(R):
        want = joint_truth(raw[i].tolist(), ks[i], ps[i])
        assert got[i].tolist() == want.tolist(), (i, ks[i], ps[i])
    # The orders really differ on some of these rows (the comparison above can fail).
    assert (got != kept(rows, ks, ps, False)).any(-1).sum() >= 5
    # Without an active top-k (or top-p) both orders keep the same set.
    off = [0] * R
    assert torch.equal(kept(rows, off, ps, True), kept(rows, off, ps, False))
    assert torch.equal(kept(rows, ks, [1.0] * R, True), kept(rows, ks, [1.0] * R, False))
    # Joint never keeps fewer than sequential (its top-p target is the larger fraction).
    assert (kept(rows, ks, ps, True) >= kept(rows, ks, ps, False)).all()


def kernel_thresholds(rows, temp, k, p, joint):
    """The threshold the Triton row pass stores for each row (one request of one row each)."""
    from dflash_kernels.triton_backend import verify_chain as tv
    R, V = rows.shape
    rp = tv.rows_pass(rows.view(R, 1, V), temp, k, p, torch.arange(R, dtype=torch.int64),
                      torch.arange(R, dtype=torch.int64) * 13, need_mz=True, joint=joint)
    return rp["thr"]


@pytest.mark.parametrize("V", [300, 1030])
def test_triton_joint_thresholds_are_the_reference_sets(V):
    g = torch.Generator().manual_seed(V)
    rows, samp = stress_sampler(V, g)
    cont = torch.randn(6, V, generator=g) * 2.0
    last = torch.full((1, V), NEG_INF)
    last[0, :9] = sgl_row()
    rows = torch.cat([rows, cont, last])
    R = rows.shape[0]
    temp = torch.cat([samp["temperature"], torch.ones(R - 8)])
    k = torch.cat([samp["top_k"], torch.tensor([4, 10, 50, 3, V - 1, 0, SGL_TOP_K],
                                               dtype=torch.int32)])
    p = torch.cat([samp["top_p"], torch.tensor([0.5, 0.9, 0.95, 0.2, 0.7, 0.6, SGL_TOP_P])])
    thr = kernel_thresholds(rows, temp, k, p, True)
    x = rows.nan_to_num(nan=NEG_INF)
    scaled = x * (1.0 / temp).view(-1, 1)
    want = ref.kept_set(scaled[:, None], torch.ones(R, dtype=torch.bool), k, p, True)[:, 0]
    assert torch.equal(scaled >= thr[:, None], want)
    assert (want[-1, :4].all() and not want[-1, 4:].any())


@pytest.mark.parametrize("draft_probs", [False, True])
def test_joint_triton_equals_reference(draft_probs, device):
    kw = make_verify_case(4, 3, 500, top_k=True, top_p=True, draft_probs=draft_probs,
                          special_rows=True, match_frac=0.4, gen_seed=21, device=device)
    kw["top_k"] = torch.tensor([5, 40, 0, 12], dtype=torch.int32, device=device)
    kw["top_p"] = torch.tensor([0.9, 0.6, 0.5, 0.3], device=device)
    j = run_verify("reference", dict(kw, filter_order="joint"))
    assert_same_verify(run_verify("triton", dict(kw, filter_order="joint")), j)


def test_ragged_joint_call_under_torch_compile():
    """fullgraph torch.compile of a ragged, joint-filtered call: the custom op's
    schema (``Tensor? cu_rows``, ``str? filter_order``) and fake traces it, and
    the compiled call gives the eager result (tests/test_torch_compile.py pattern)."""
    B, S, V = 3, 3, 40
    kw = to_ragged(make_verify_case(B, S, V, top_k=True, top_p=True, gen_seed=11), [3, 1, 2])
    kw["filter_order"] = "joint"

    def call(logits, block_tokens, cu_rows, temperature, top_k, top_p, seeds, positions):
        r = dflash_kernels.verify_chain(
            logits, block_tokens, cu_rows=cu_rows, max_rows=S, temperature=temperature,
            top_k=top_k, top_p=top_p, seeds=seeds, positions=positions,
            filter_order="joint", backend="reference")
        return r.accept_len, r.out_tokens, r.bonus

    args = [kw[k] for k in ("logits", "block_tokens", "cu_rows", "temperature", "top_k", "top_p",
                            "seeds", "positions")]
    expected = call(*args)
    torch._dynamo.reset()
    got = torch.compile(call, fullgraph=True, backend="aot_eager")(*args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    assert ((expected[1] >= 0).sum(1) == expected[0] + 1).all()    # accepted drafts + bonus
