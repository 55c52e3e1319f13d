"""The verify_chain bench suite: its sampled rows (top-k, top-p, both orders,
draft_probs), their byte counts, the FlashInfer baseline's SKIP rows without
flashinfer, and its wiring against a fake ``flashinfer.sampling`` (CPU tensors,
tiny V) that records every call."""

import sys
import types

import pytest
import torch

from microbench import baselines, presets, roofline
from microbench.cli import main
from microbench.runner import run_case
from microbench.suites import verify_chain

CPU = torch.device("cpu")
TINY = presets.PRESETS["tiny"]
SAMPLED = [m for m in verify_chain.MODES if m != "greedy"]
B = 3


def _case(mode, batch=B):
    return verify_chain.build_case("verify_chain", TINY, batch, 9, "fp16", CPU, mode=mode)


def _impl(case, name):
    return next(i for i in case.impls if i.name == name)


@pytest.fixture
def no_flashinfer(monkeypatch):
    # None in sys.modules makes the import fail, installed or not.
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", None)


def _fake_flashinfer(monkeypatch, seeded=True):
    """A ``flashinfer.sampling`` that records (name, args, kwargs) and samples by argmax."""
    calls = []
    sampling = types.ModuleType("flashinfer.sampling")

    def record(name, *args, **kw):
        calls.append((name, args, kw))

    def softmax(logits, temperature=None, enable_pdl=None):
        record("softmax", logits, temperature=temperature)
        return torch.softmax(logits.float() / temperature[:, None], dim=-1)

    def sampler(name):
        if seeded:
            def fn(probs, *params, indices=None, deterministic=True, generator=None,
                   check_nan=False, seed=None, offset=None, filter_apply_order="top_k_first"):
                record(name, probs, *params, seed=seed, offset=offset,
                       filter_apply_order=filter_apply_order)
                return probs.argmax(dim=-1).to(torch.int32)
        else:
            def fn(probs, *params, indices=None, deterministic=True, generator=None,
                   check_nan=False, filter_apply_order="top_k_first"):
                record(name, probs, *params, filter_apply_order=filter_apply_order)
                return probs.argmax(dim=-1).to(torch.int32)
        return fn

    def chain(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num=None,
              maybe_output_emitted_draft_token_num=None, deterministic=True, generator=None,
              seed=None, offset=None):
        record("chain_speculative_sampling", draft_probs, draft_token_ids, target_probs,
               seed=seed, offset=offset)
        b, n = draft_token_ids.shape
        target = target_probs.argmax(dim=-1)
        match = (draft_token_ids.long() == target[:, :n]).to(torch.int32)
        emitted = match.cumprod(dim=1).sum(dim=1).to(torch.int32)
        out = torch.full((b, n + 1), -1, dtype=torch.int32)
        for r in range(b):
            e = int(emitted[r])
            out[r, :e] = draft_token_ids[r, :e]
            out[r, e] = target[r, e]
        return out, match.sum(dim=1).to(torch.int32), emitted

    if not seeded:
        def chain(draft_probs, draft_token_ids, target_probs,  # noqa: F811
                  maybe_output_accepted_token_num=None, maybe_output_emitted_draft_token_num=None,
                  deterministic=True, generator=None, _real=chain):
            return _real(draft_probs, draft_token_ids, target_probs)

    sampling.softmax = softmax
    for name in ("sampling_from_logits", "top_k_sampling_from_probs", "top_p_sampling_from_probs",
                 "top_k_top_p_sampling_from_probs"):
        setattr(sampling, name, sampler(name))
    sampling.chain_speculative_sampling = chain
    package = types.ModuleType("flashinfer")
    package.sampling = sampling
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", sampling)
    return calls


# ------------------------------------------------------------------ the rows

def test_rows_cover_the_filters_both_orders_and_draft_probs():
    assert verify_chain.MODES == ("greedy", "sampled", "top_k", "top_p", "top_k+top_p",
                                  "top_k+top_p_joint", "draft_probs")
    assert main(["verify_chain", "--help"]) == 0
    assert main(["verify_chain", "--modes", "top_k,nosuch", "--device", "cpu"]) == 2
    want = {"top_k": {"top_k": 20}, "top_p": {"top_p": 0.95},
            "top_k+top_p": {"top_k": 20, "top_p": 0.95, "filter_order": "sequential"},
            "top_k+top_p_joint": {"top_k": 20, "top_p": 0.95, "filter_order": "joint"}}
    for mode in verify_chain.MODES:
        case = _case(mode)
        assert case.extra == want.get(mode, {})
        assert case.oracle is not None and case.oracle.name == "reference"


@pytest.mark.parametrize("mode", verify_chain.MODES)
def test_inputs_and_counted_bytes(mode):
    case = _case(mode)
    inp = case.make_inputs()
    S, V = TINY.s, TINY.v
    want = roofline.verify_bytes(batch=B, s=S, v=V, logits_elt=4, token_elt=4,
                                 sampled=mode != "greedy", seq_lens=True)
    flags = baselines.VERIFY_SAMPLERS.get(mode, {})
    if flags.get("top_k"):
        assert inp["top_k"].dtype == torch.int32 and (inp["top_k"] == 20).all()
        want += 4 * B
    if flags.get("top_p"):
        assert inp["top_p"].dtype == torch.float32 and (inp["top_p"] == 0.95).all()
        want += 4 * B
    if flags.get("draft_probs"):
        q = inp["draft_probs"]
        assert q.shape == (B, S - 1, V) and inp["draft_probs_f32"].dtype == torch.float32
        assert torch.allclose(q.sum(-1), torch.ones(B, S - 1))
        # A confident drafter: its own token holds most of the row's mass.
        assert (q.gather(2, inp["block_tokens"][:, 1:, None].long()) > 0.9).all()
        want += B * (S - 1 + V) * 4
    assert case.nbytes == want
    assert set(verify_chain.sampler_args(mode)) <= set(inp) | {"filter_order"}


def test_sampled_rows_run_on_the_cpu_and_match_the_reference(no_flashinfer):
    rows = []
    for mode in SAMPLED:
        rows += run_case(_case(mode, batch=2), CPU, copy_gbps=10.0, reps=2, max_seconds=0.01)
    ours = [r for r in rows if r["kind"] == "ours"]
    assert ours and all(r["status"] == "OK" for r in ours), [(r["mode"], r["check"]) for r in ours]


def test_the_cuda_backend_rows_say_what_it_refuses():
    from dflash_kernels._registry import unsupported_args

    try:
        refused = unsupported_args("verify_chain", "cuda")
    except Exception as exc:       # the extension is not loadable here
        pytest.skip(f"CUDA backend not loadable: {exc}")
    assert verify_chain._refused("cuda", "sampled") == ""
    assert verify_chain._refused("cuda", "greedy") == ""
    for mode, arg in (("top_k", "top_k"), ("top_p", "top_p"), ("draft_probs", "draft_probs"),
                      ("top_k+top_p_joint", "filter_order")):
        if arg in refused:
            assert arg in verify_chain._refused("cuda", mode)
    assert verify_chain._refused("reference", "top_k+top_p_joint") == ""


# ------------------------------------------------------------------ FlashInfer missing

def test_flashinfer_rows_skip_with_the_reason_when_it_is_missing(no_flashinfer):
    assert not [i for i in _case("greedy").impls if i.name == "flashinfer"]
    for mode in SAMPLED:
        case = _case(mode, batch=2)
        fi = _impl(case, "flashinfer")
        assert fi.kind == "baseline" and "not importable" in fi.skip
        rows = run_case(case, CPU, copy_gbps=10.0, reps=2, max_seconds=0.01)
        row = next(r for r in rows if r["impl"] == "flashinfer")
        assert row["status"] == "SKIP" and "not importable" in row["error"]
        assert row["time_ms"] is None


def test_flashinfer_on_the_cpu_is_a_skip_row(monkeypatch):
    _fake_flashinfer(monkeypatch)
    fi = _impl(_case("top_k"), "flashinfer")
    assert "CUDA" in fi.skip and fi.graph_ok


# ------------------------------------------------------------------ FlashInfer wiring (fake)

def _shape(t):
    return (tuple(t.shape), t.dtype)


@pytest.mark.parametrize("mode", SAMPLED)
def test_flashinfer_calls_get_rows_shaped_and_typed_arguments(monkeypatch, mode):
    calls = _fake_flashinfer(monkeypatch)
    case = _case(mode)
    fi = _impl(case, "flashinfer")
    inp = case.make_inputs()
    got = fi.fn(inp)
    S, V = TINY.s, TINY.v
    R = B * S
    names = [c[0] for c in calls]
    assert tuple(names) == baselines.flashinfer_verify_calls(mode)
    steps = torch.arange(1, S + 1)
    row_seeds = inp["seeds"][:, None].expand(B, S).reshape(R)
    row_offsets = (inp["positions"][:, None] + steps).reshape(R)
    flags = baselines.VERIFY_SAMPLERS[mode]
    if mode == "sampled":
        assert names == ["sampling_from_logits"]
        _, (logits,), kw = calls[0]
        assert _shape(logits) == ((R, V), torch.float32)
        assert torch.equal(logits, inp["logits"].reshape(R, V).float())     # T = 1
    else:
        assert names[0] == "softmax"
        _, (logits,), kw0 = calls[0]
        assert _shape(logits) == ((R, V), torch.float32)
        assert _shape(kw0["temperature"]) == ((R,), torch.float32)
    if mode == "draft_probs":
        assert names == ["softmax", "chain_speculative_sampling"]
        _, (q, drafts, target), kw = calls[1]
        assert _shape(q) == ((B, S - 1, V), torch.float32)
        assert q.data_ptr() == inp["draft_probs_f32"].data_ptr()
        assert _shape(drafts) == ((B, S - 1), torch.int32) and drafts.is_contiguous()
        assert torch.equal(drafts, inp["block_tokens"][:, 1:])
        assert _shape(target) == ((B, S, V), torch.float32)
        assert torch.equal(kw["seed"], inp["seeds"])
        assert torch.equal(kw["offset"], inp["positions"] + 1)
    elif mode != "sampled":
        want = {"top_k": "top_k_sampling_from_probs", "top_p": "top_p_sampling_from_probs"}
        name = want.get(mode, "top_k_top_p_sampling_from_probs")
        assert names == ["softmax", name]
        _, (probs, *params), kw = calls[1]
        assert _shape(probs) == ((R, V), torch.float32)
        expect = [("top_k", torch.int32, 20), ("top_p", torch.float32, 0.95)]
        expect = [e for e in expect if flags.get(e[0])]
        assert len(params) == len(expect)
        for p, (_, dtype, value) in zip(params, expect):
            assert _shape(p) == ((R,), dtype)
            assert torch.allclose(p.double(), torch.full((R,), value, dtype=torch.float64))
        if name == "top_k_top_p_sampling_from_probs":
            assert kw["filter_apply_order"] == ("joint" if flags.get("joint") else "top_k_first")
    if mode != "draft_probs":
        assert _shape(kw["seed"]) == ((R,), torch.int64)
        assert torch.equal(kw["seed"], row_seeds) and torch.equal(kw["offset"], row_offsets)
    # Our four outputs, then the library's own tokens.
    assert len(got) == 5
    assert [_shape(t) for t in got[:4]] == [((B,), torch.int32), ((B, S), torch.int32),
                                            ((B,), torch.int32), ((B,), torch.int32)]
    want = case.oracle.fn(case.make_inputs())
    ok, frac, msg = case.compare(got, tuple(t.clone() for t in want))
    assert ok, msg
    assert 0.0 <= frac <= 1.0


def test_flashinfer_rows_run_and_are_checked_by_form(monkeypatch):
    _fake_flashinfer(monkeypatch)
    case = _case("top_k+top_p_joint")
    _impl(case, "flashinfer").skip = ""       # the fake runs on the CPU
    rows = {r["impl"]: r for r in run_case(case, CPU, copy_gbps=10.0, reps=2, max_seconds=0.01)}
    row = rows["flashinfer"]
    assert row["status"] == "OK" and row["check"] == "vs reference" and row["kind"] == "baseline"
    assert 0.0 <= row["max_abs_err"] <= 1.0
    assert rows["reference"]["status"] == "OK"


def test_flashinfer_without_seed_tensors_is_not_graph_captured(monkeypatch):
    calls = _fake_flashinfer(monkeypatch, seeded=False)
    case = _case("draft_probs")
    fi = _impl(case, "flashinfer")
    assert not fi.graph_ok
    fi.fn(case.make_inputs())
    assert [c[0] for c in calls] == ["softmax", "chain_speculative_sampling"]
    case = _case("top_p")
    _impl(case, "flashinfer").fn(case.make_inputs())
    assert "seed" not in calls[-1][2] and "offset" not in calls[-1][2]


@pytest.mark.parametrize("corrupt, message", [
    (lambda o: (o[0], o[1], o[2] + 1, o[3], o[4]), "bonus"),
    (lambda o: (o[0], o[1], o[2], o[3] + 1, o[4]), "new_seq_lens"),
    (lambda o: (o[0], torch.where(torch.arange(o[1].shape[1]) > o[0][:, None], 5, o[1]),
                o[2], o[3], o[4]), "-1"),
    (lambda o: (o[0], o[1][:, :-1], o[2], o[3], o[4]), "shape"),
])
def test_a_malformed_baseline_result_fails_the_form_check(monkeypatch, corrupt, message):
    _fake_flashinfer(monkeypatch)
    case = _case("top_k")
    fi = _impl(case, "flashinfer")
    got = fi.fn(case.make_inputs())
    want = tuple(t.clone() for t in case.oracle.fn(case.make_inputs()))
    assert case.compare(got, want)[0]
    ok, _, msg = case.compare(corrupt(got), want)
    assert not ok and message in msg
    # Ours (four outputs) are compared exactly.
    assert not case.compare((want[0], want[1], want[2] + 1, want[3]), want)[0]
