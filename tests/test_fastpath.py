"""The host fast path (dflash_kernels/_fastpath.py, csrc/bindings/fastpath.cpp).

A layout the Python checks passed is recognised again without them; any change
of layout, any aliasing of a written tensor, anything the extension does not
model goes back to the Python checks. The whole suite also runs with
DFLASH_KERNELS_FASTPATH_VERIFY=1 (conftest.py): every call let through is
checked in Python as well.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import dflash_kernels as dk
from dflash_kernels import _fastpath, _registry, ops

pytestmark = pytest.mark.skipif(not _fastpath.ENABLED,
                                reason="dflash_kernels._C is not built (pure-Python install)")

F16, I32, I64 = torch.float16, torch.int32, torch.int64


def attention_call():
    B, S, Hq, Hkv, D, P, page = 2, 4, 4, 2, 64, 6, 8
    return dk.block_attention, dict(
        q=torch.randn(B, S, Hq, D, dtype=F16), k_cache=torch.randn(P, page, Hkv, D, dtype=F16),
        v_cache=torch.randn(P, page, Hkv, D, dtype=F16),
        block_table=torch.arange(B * 3, dtype=I32).view(B, 3),
        context_lens=torch.tensor([5, 17], dtype=I32),
        k_block=torch.randn(B, S, Hkv, D, dtype=F16), v_block=torch.randn(B, S, Hkv, D, dtype=F16))


def fuse_call():
    N, H, K = 3, 16, 2
    return dk.fuse_target_features, dict(
        features=[torch.randn(N, H, dtype=F16) for _ in range(K)],
        fc_weight=torch.randn(H, K * H, dtype=F16), norm_weight=torch.randn(H, dtype=F16))


def _kv_common(N, L, Hkv, D):
    return dict(k_norm_weight=torch.randn(L, D, dtype=F16), positions=torch.arange(N, dtype=I64),
                slot_mapping=torch.arange(N, dtype=I64),
                k_cache=torch.zeros(L, 2, 8, Hkv, D, dtype=F16),
                v_cache=torch.zeros(L, 2, 8, Hkv, D, dtype=F16),
                cos_sin_cache=torch.randn(32, D, dtype=torch.float32))


def inject_call():
    N, L, Hkv, D, H = 5, 2, 2, 64, 32
    a = _kv_common(N, L, Hkv, D)
    a.update(hidden=torch.randn(N, H, dtype=F16), kv_weight=torch.randn(L, 2, Hkv * D, H, dtype=F16))
    return dk.inject_kv, a


def write_call():
    N, L, Hkv, D = 5, 2, 2, 64
    a = _kv_common(N, L, Hkv, D)
    a.update(k=torch.randn(N, L, Hkv, D, dtype=F16), v=torch.randn(N, L, Hkv, D, dtype=F16))
    return dk.write_kv, a


def verify_call():
    B, S, V = 3, 4, 50
    return dk.verify_chain, dict(
        logits=torch.randn(B, S, V), block_tokens=torch.zeros(B, S, dtype=I64),
        temperature=torch.ones(B), seeds=torch.zeros(B, dtype=I64),
        positions=torch.zeros(B, dtype=I64), seq_lens=torch.zeros(B, dtype=I32))


CALLS = {"block_attention": attention_call, "fuse_target_features": fuse_call,
         "inject_kv": inject_call, "write_kv": write_call, "verify_chain": verify_call}
CHECKS = {op: f"_check_{op}" for op in CALLS}


@pytest.fixture
def counted(monkeypatch):
    """Per op, how many times its Python checks ran; backends are no-ops and
    VERIFY is off (so a recognised call runs no Python check at all)."""
    _fastpath.forget()
    monkeypatch.setattr(_fastpath, "VERIFY", False)
    monkeypatch.setattr(_registry, "get", lambda op, backend: (lambda *args: None))
    runs = {op: 0 for op in CALLS}
    for op, name in CHECKS.items():
        real = getattr(ops, name)

        def spy(*args, _op=op, _real=real):
            runs[_op] += 1
            return _real(*args)
        monkeypatch.setattr(ops, name, spy)
    yield runs
    _fastpath.forget()


@pytest.mark.parametrize("op", sorted(CALLS))
def test_a_validated_layout_skips_the_python_checks(counted, op):
    fn, kw = CALLS[op]()
    fn(**kw)
    assert counted[op] == 1
    fn(**kw)
    fn, fresh = CALLS[op]()          # new tensors, same layout
    fn(**fresh)
    assert counted[op] == 1


# Each change keeps the call valid but gives another layout: back to Python once.
CHANGES = {
    "dtype": ("block_attention", lambda a: a.update(
        **{k: a[k].to(torch.bfloat16) for k in ("q", "k_cache", "v_cache", "k_block", "v_block")})),
    "shape": ("block_attention", lambda a: a.update(block_table=torch.zeros(2, 4, dtype=I32))),
    "strides": ("block_attention", lambda a: a.update(
        k_cache=torch.randn(8, 6, 2, 64, dtype=F16).transpose(0, 1))),
    "alignment": ("verify_chain", lambda a: a.update(
        seeds=torch.zeros(a["seeds"].numel() + 1, dtype=I64)[1:])),
    "scalar": ("block_attention", lambda a: a.update(sm_scale=0.25)),
    "int": ("block_attention", lambda a: a.update(window=7)),
    "string": ("write_kv", lambda a: a.update(rope_style="gptj")),
    "none": ("write_kv", lambda a: a.update(k_norm_weight=None)),
    "list": ("fuse_target_features", lambda a: a.update(features=a["features"][:1],
                                                          fc_weight=a["fc_weight"][:, :16])),
    "per_layer_caches": ("inject_kv", lambda a: a.update(k_cache=list(a["k_cache"]),
                                                         v_cache=list(a["v_cache"]))),
    "bool": ("block_attention", lambda a: a.update(return_lse=True)),
    "out_given": ("verify_chain", lambda a: a.update(
        out=tuple(torch.empty(s, dtype=I32) for s in ((3,), (3, 4), (3,), (3,))))),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_another_layout_goes_back_to_the_python_checks(counted, change):
    op, edit = CHANGES[change]
    fn, kw = CALLS[op]()
    fn(**kw)
    edit(kw)
    fn(**kw)
    assert counted[op] == 2
    fn(**kw)
    assert counted[op] == 2


def _aliased(op):
    """A call whose layout matches a valid one but whose written tensor shares
    memory with another argument: ``(valid kwargs, aliased kwargs, message)``."""
    fn, kw = CALLS[op]()
    if op == "block_attention":
        return fn, dict(kw, out=torch.empty_like(kw["q"])), dict(kw, out=kw["q"]), "share memory"
    if op == "fuse_target_features":
        N, H = kw["features"][0].shape
        return (fn, dict(kw, out=torch.empty(N, H, dtype=F16)),
                dict(kw, out=kw["features"][1]), "share memory")
    if op in ("inject_kv", "write_kv"):
        return fn, kw, dict(kw, v_cache=kw["k_cache"]), "share memory"
    B, S = kw["block_tokens"].shape
    buf = torch.zeros(64, dtype=I32)
    seq = buf[:B]
    separate = (torch.empty(B, dtype=I32), torch.empty(B, S, dtype=I32), torch.empty(B, dtype=I32),
                torch.empty(B, dtype=I32))
    return (fn, dict(kw, seq_lens=seq, out=separate),
            dict(kw, seq_lens=seq, out=(buf[:B],) + separate[1:]), "share memory")


@pytest.mark.parametrize("op", sorted(CALLS))
def test_aliasing_a_validated_layout_is_refused(counted, op):
    fn, valid, aliased, message = _aliased(op)
    fn(**valid)
    fn(**valid)
    assert counted[op] == 1
    with pytest.raises(ValueError, match=message):
        fn(**aliased)
    assert counted[op] == 2


@pytest.mark.parametrize("value", [np.float64(1e-6), 1e-6], ids=["numpy_float", "float"])
def test_objects_it_does_not_model_always_take_the_python_path(counted, value):
    fn, kw = CALLS["write_kv"]()
    for _ in range(3):
        fn(**kw, eps=value)
    assert counted["write_kv"] == (3 if isinstance(value, np.floating) else 1)


def test_tensor_subclasses_always_take_the_python_path(counted):
    class Sub(torch.Tensor):
        pass

    fn, kw = CALLS["verify_chain"]()
    kw["logits"] = kw["logits"].as_subclass(Sub)
    for _ in range(3):
        fn(**kw)
    assert counted["verify_chain"] == 3


def test_many_layouts_start_the_table_over(counted):
    fn, _ = CALLS["verify_chain"]()
    for V in range(2, 4200):     # more than the table keeps (4096 per op)
        fn(torch.empty(1, 1, V), torch.zeros(1, 1, dtype=I64))
    assert counted["verify_chain"] == 4198
    fn(torch.empty(1, 1, 4199), torch.zeros(1, 1, dtype=I64))
    assert counted["verify_chain"] == 4198


def test_verify_mode_catches_a_fast_path_that_lets_bad_calls_through(monkeypatch):
    class Lying:
        @staticmethod
        def fast_check(op, written, items, key=None, replay=False):
            return True

    monkeypatch.setattr(_fastpath, "_C", Lying)
    monkeypatch.setattr(_fastpath, "VERIFY", True)
    fn, kw = CALLS["verify_chain"]()
    kw["seq_lens"] = kw["seq_lens"].long()
    with pytest.raises(AssertionError, match="seq_lens"):
        fn(**kw)


def test_empty_makes_what_torch_empty_makes():
    like = torch.randn(3, 5, dtype=torch.bfloat16)
    a, b, c = _fastpath.empty(like, _fastpath.KIND_LIKE, (2, 3), (0,), ())
    assert (a.shape, a.dtype, a.is_contiguous()) == ((2, 3), torch.bfloat16, True)
    assert b.shape == (0,) and c.shape == ()
    (i,) = _fastpath.empty(like, _fastpath.KIND_INT32, (4,))
    (f,) = _fastpath.empty(like, _fastpath.KIND_FLOAT32, (4, 1))
    assert (i.dtype, f.dtype, i.device, f.shape) == (I32, torch.float32, like.device, (4, 1))
    assert a.data_ptr() != i.data_ptr()
    with pytest.raises(ValueError, match="negative"):
        _fastpath.empty(like, _fastpath.KIND_INT32, (-1,))


def test_outputs_and_results_match_the_python_path():
    """The same call through the fast path and with it switched off."""
    fn, kw = CALLS["verify_chain"]()
    a = fn(**kw, backend="reference")
    b = fn(**kw, backend="reference")          # recognised layout
    for x, y in zip(a, b):
        assert torch.equal(x, y) and x.dtype == y.dtype and x.shape == y.shape
    fn, kw = CALLS["block_attention"]()
    o1, l1 = fn(**kw, backend="reference", return_lse=True)
    o2, l2 = fn(**kw, backend="reference", return_lse=True)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and l1.dtype == torch.float32


SWITCHES = {
    # the whole fast path off: no extension use at all
    "DFLASH_KERNELS_NO_FASTPATH": "assert not _fastpath.ENABLED and not _fastpath.PLANS;",
    # only call plans off: the checks are still skipped for known layouts
    "DFLASH_KERNELS_NO_CALL_PLANS": "assert _fastpath.ENABLED and not _fastpath.PLANS;",
}


@pytest.mark.parametrize("var", sorted(SWITCHES))
def test_switched_off_by_the_environment(var):
    code = ("import torch, dflash_kernels as dk; from dflash_kernels import _fastpath;"
            + SWITCHES[var] +
            "x = torch.randn(2, 3, 7);"
            "r = [dk.verify_chain(x, torch.zeros(2, 3, dtype=torch.int64)) for _ in range(2)];"
            "assert r[0].out_tokens.shape == (2, 3) and r[0].accept_len.dtype == torch.int32;"
            "assert torch.equal(r[0].out_tokens, r[1].out_tokens);"
            "print('ok')")
    env = {var: "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_tensors_it_cannot_describe_are_not_modelled():
    from dflash_kernels import _C

    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(3, 3)])
    assert _C.fast_check(0, 0, (nested,)) is None
    _C.fast_accept(0, 0, (nested,))                   # remembers nothing, raises nothing
    assert _C.fast_check(0, 0, (nested,)) is None
    assert _C.launch_key((nested,)) is None
    assert _C.launch_key((torch.empty(2, device="meta"),)) is None


def test_a_list_is_not_a_tuple():
    from dflash_kernels import _C

    t = torch.zeros(3)
    assert _C.launch_key(([t, t],)) != _C.launch_key(((t, t),))
    assert _C.launch_key(([t, t],)) == _C.launch_key(([torch.ones(3), torch.ones(3)],))
    assert _C.launch_key((t,)) != _C.launch_key((torch.zeros(3)[0:0],))
    assert _C.launch_key((1,)) != _C.launch_key((True,)) != _C.launch_key((1.0,))


# ---------------------------------------------------------------- call plans

FP8 = torch.float8_e4m3fn


def _fp8_caches(a):
    a.update(k_cache=a["k_cache"].to(FP8), v_cache=a["v_cache"].to(FP8))


# Layouts whose plans use every kind of descriptor: items, items' elements (out=,
# per-layer lists), new lists, outputs, views (2-D logits, tensor scales), constants
# (the default num_drafts, float scales), namedtuple and tuple results.
PLAN_CASES = {
    "block_attention": ("block_attention", lambda a: None),
    "block_attention.lse": ("block_attention", lambda a: a.update(return_lse=True)),
    "block_attention.out": ("block_attention", lambda a: a.update(out=torch.empty_like(a["q"]))),
    "block_attention.fp8_float_scales": ("block_attention", lambda a: (
        _fp8_caches(a), a.update(k_scale=0.5, v_scale=0.25))),
    "block_attention.fp8_tensor_scales": ("block_attention", lambda a: (
        _fp8_caches(a), a.update(k_scale=torch.tensor(0.5), v_scale=torch.tensor([0.25])))),
    "fuse.list": ("fuse_target_features", lambda a: None),
    "fuse.tensor": ("fuse_target_features", lambda a: a.update(
        features=torch.cat(a["features"], 1))),
    "inject_kv": ("inject_kv", lambda a: None),
    "inject_kv.layer_lists": ("inject_kv", lambda a: a.update(
        k_cache=list(a["k_cache"]), v_cache=list(a["v_cache"]))),
    "write_kv": ("write_kv", lambda a: None),
    "write_kv.fp8": ("write_kv", lambda a: (_fp8_caches(a), a.update(k_scale=2.0, v_scale=0.5))),
    "verify_chain": ("verify_chain", lambda a: None),
    "verify_chain.rows_2d": ("verify_chain", lambda a: a.update(
        logits=a["logits"].flatten(0, 1))),
    "verify_chain.greedy_no_seq_lens": ("verify_chain", lambda a: [
        a.pop(k) for k in ("temperature", "seeds", "positions", "seq_lens")]),
    "verify_chain.out": ("verify_chain", lambda a: a.update(out=dk.VerifyOutput(
        *(torch.empty(s, dtype=I32) for s in ((3,), (3, 4), (3,), (3,)))))),
}


@pytest.fixture
def spied(monkeypatch):
    """Backends are a spy that records where it was called from: ``validate``
    when the extension ran the layout's plan, ``_run`` on the Python path."""
    _fastpath.forget()
    calls = []

    def spy(*args):
        calls.append((sys._getframe(1).f_code.co_name, args))
    monkeypatch.setattr(_registry, "get", lambda op, backend: spy)
    yield calls
    _fastpath.forget()


def _plan_call(case):
    op, edit = PLAN_CASES[case]
    fn, kw = CALLS[op]()
    edit(kw)
    return op, fn, kw


def _same_construction(op, got, want, passed):
    """The backend arguments a plan built (``got``) are what the Python path
    builds (``want``) for the same call: the caller's objects where it passes
    them, the same views of them, new outputs of the same layout, the same
    constants and scalars."""
    schema = getattr(torch.ops.dflash, op).default._schema
    # The custom op's schema ends with the chosen backend's name, which backends do not take.
    written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments][:-1]
    assert len(got) == len(want) == len(written)

    def same(g, w, is_out):
        assert type(g) is type(w), (g, w)
        if isinstance(w, torch.Tensor):
            assert (g.shape, g.stride(), g.dtype, g.device) == (w.shape, w.stride(), w.dtype, w.device)
            if id(w) in passed:
                assert g is w
            elif any(w.data_ptr() == p.data_ptr() for p in passed.values()):
                assert g.data_ptr() == w.data_ptr() and g is not w      # a view, made per call
            elif is_out:
                assert g is not w and g.is_contiguous() and g.data_ptr() % 16 == 0
            else:
                assert g is w or torch.equal(g, w)                      # a constant
        elif isinstance(w, list):
            assert len(g) == len(w)
            for x, y in zip(g, w):
                same(x, y, is_out)
        else:
            assert g == w or (g is None and w is None)

    for g, w, is_out in zip(got, want, written):
        same(g, w, is_out)


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_a_plan_builds_the_python_paths_call(spied, monkeypatch, case):
    op, fn, kw = _plan_call(case)
    fn(**kw)
    assert [w for w, _ in spied] == ["_run"]                 # validated, plan recorded
    op, fn, kw = _plan_call(case)                            # new tensors, same layout
    passed = {id(t): t for v in kw.values()
              for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)}
    got_result = fn(**kw)
    where, got = spied[-1]
    assert where == "validate"                               # the plan ran
    monkeypatch.setattr(_fastpath, "PLANS", False)
    want_result = fn(**kw)
    where, want = spied[-1]
    assert where == "_run"
    _same_construction(op, got, want, passed)
    # The result: the same structure, made of the objects the backend was handed.
    assert type(got_result) is type(want_result)
    flat = lambda r: list(r) if isinstance(r, tuple) else [r]
    handed = [id(a) for a in got]
    for g, w in zip(flat(got_result), flat(want_result)):
        assert (g is None) == (w is None)
        if g is not None:
            assert id(g) in handed and g.shape == w.shape and g.dtype == w.dtype


def test_plans_give_the_python_paths_results():
    for op in ("verify_chain", "block_attention", "write_kv"):
        fn, kw = CALLS[op]()
        if op == "verify_chain":
            first = fn(**kw, backend="reference")
            planned = fn(**kw, backend="reference")
        elif op == "block_attention":
            first = fn(**kw, backend="reference", return_lse=True)
            planned = fn(**kw, backend="reference", return_lse=True)
        else:
            fn(**kw, backend="reference")
            first = (kw["k_cache"].clone(), kw["v_cache"].clone())
            kw["k_cache"].zero_(), kw["v_cache"].zero_()
            fn(**kw, backend="reference")
            planned = (kw["k_cache"], kw["v_cache"])
        assert type(first) is type(planned)
        for x, y in zip(first, planned):
            assert x is not y and torch.equal(x, y) and x.dtype == y.dtype


def test_one_calls_outputs_share_an_allocation_but_no_byte(spied):
    fn, kw = CALLS["verify_chain"]()
    fn(**kw)
    r = fn(**kw)
    assert spied[-1][0] == "validate"
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in r)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(lo % 64 == 0 for lo, _ in spans)
    for t in r:
        t.fill_(7)
    r.accept_len.fill_(-1)
    assert (r.out_tokens == 7).all() and (r.bonus == 7).all() and (r.new_seq_lens == 7).all()


def test_a_shared_scale_is_not_planned_but_runs_right(spied):
    """k_scale and v_scale the same tensor at recording: which of the two items a
    view came from is ambiguous, so the layout gets no plan (and is never
    mistaken later); recorded from separate tensors, a plan serves a shared one."""
    op, fn, kw = _plan_call("write_kv.fp8")
    shared = torch.tensor(2.0)
    for _ in range(3):
        fn(**dict(kw, k_scale=shared, v_scale=shared))
    assert [w for w, _ in spied] == ["_run"] * 3
    _fastpath.forget()
    spied.clear()
    fn(**dict(kw, k_scale=torch.tensor(2.0), v_scale=torch.tensor(0.5)))
    fn(**dict(kw, k_scale=shared, v_scale=shared))
    assert [w for w, _ in spied] == ["_run", "validate"]
    k_arg, v_arg = spied[-1][1][-2:]
    assert k_arg.data_ptr() == v_arg.data_ptr() == shared.data_ptr()


def test_strided_small_inputs_never_run_a_plan(spied):
    fn, kw = CALLS["verify_chain"]()
    kw["seeds"] = torch.zeros(2 * 3, dtype=I64)[::2]
    for _ in range(3):
        fn(**kw)
    assert [w for w, _ in spied] == ["_run"] * 3
    assert all(a[6].is_contiguous() for _, a in spied)      # made dense, a copy per call


def test_a_changed_backend_environment_goes_back_to_python(spied, monkeypatch):
    fn, kw = CALLS["write_kv"]()
    fn(**kw)
    fn(**kw)
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    fn(**kw)
    monkeypatch.delenv(_registry.ENV_VAR)
    fn(**kw)
    assert [w for w, _ in spied] == ["_run", "validate", "_run", "validate"]


def test_no_plan_runs_under_the_profiler_a_dispatch_mode_or_nvtx(spied, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    fn, kw = CALLS["write_kv"]()
    fn(**kw)
    fn(**kw)
    assert spied[-1][0] == "validate"
    with torch.autograd.profiler.profile():
        fn(**kw)
    with Seen():
        fn(**kw)
    assert any("dflash.write_kv" in o for o in Seen.ops)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: None)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    ops.set_nvtx(True)
    try:
        fn(**kw)
        fn(**kw)
    finally:
        ops.set_nvtx(False)
    assert "validate" not in [w for w, _ in spied[2:]]
    fn(**kw)
    fn(**kw)
    assert [w for w, _ in spied[-2:]] == ["_run", "validate"]


def test_a_plan_holds_its_backend_and_passes_on_its_exceptions(spied, monkeypatch):
    fn, kw = CALLS["verify_chain"]()
    fn(**kw)

    def failing(*args):
        raise RuntimeError("backend says no")
    monkeypatch.setattr(_registry, "get", lambda op, backend: failing)
    fn(**kw)                      # the plan runs the function it recorded (forget() to change it)
    assert [w for w, _ in spied] == ["_run", "validate"]
    _fastpath.forget(plans_only=True)
    with pytest.raises(RuntimeError, match="backend says no"):
        fn(**kw)                  # the Python path records the new function, then runs it
    with pytest.raises(RuntimeError, match="backend says no"):
        fn(**kw)                  # the plan runs it: its exception propagates
    monkeypatch.setattr(_registry, "get", lambda op, backend: lambda *a: None)
    _fastpath.forget(plans_only=True)
    assert fn(**kw).accept_len.shape == (3,)


def test_a_call_that_returns_early_records_nothing_for_the_next(spied, monkeypatch):
    """An empty block returns before ops._run with its record pending: the next
    call of the op (another layout, strided: it records nothing) must not find
    it pending while it builds its own arguments."""
    fn, kw = CALLS["block_attention"]()
    empty = dict(kw, q=kw["q"][:0], block_table=kw["block_table"][:0],
                 context_lens=kw["context_lens"][:0], k_block=kw["k_block"][:0],
                 v_block=kw["v_block"][:0])
    for _ in range(2):
        assert fn(**empty).shape[0] == 0
    assert _fastpath._PENDING is not None and _fastpath._PENDING[3][0] is empty["q"]
    seen = []
    real_empty = _fastpath.empty

    def watching(*a):
        seen.append(_fastpath._PENDING)
        return real_empty(*a)
    monkeypatch.setattr(_fastpath, "empty", watching)
    strided = dict(kw, context_lens=torch.tensor([5, 0, 17, 0], dtype=I32)[::2])
    fn(**strided)
    fn(**strided)
    assert seen == [None, None]
    assert [w for w, _ in spied] == ["_run", "_run"]
    assert fn(**empty).shape[0] == 0
    assert len(spied) == 2                          # the empty layout still reaches no backend


def test_kept_tensors_are_made_once_per_key_and_device():
    made = []

    def make():
        made.append(1)
        return torch.full((2,), 3, dtype=I32)

    dev = torch.device("cpu")
    a = _fastpath.kept(("test", 1), dev, make)
    assert _fastpath.kept(("test", 1), dev, make) is a and len(made) == 1
    assert _fastpath.kept(("test", 2), dev, make) is not a and len(made) == 2
    assert _fastpath._CONSTANTS[id(a)] is a
    # the default num_drafts and a float scale are kept tensors
    assert ops._all_drafts(3, 5, dev) is ops._all_drafts(3, 5, dev)
    from dflash_kernels._validation import scale_tensor
    assert scale_tensor(0.75, dev) is scale_tensor(0.75, dev) and scale_tensor(0.75, dev).item() == 0.75


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (streams)")
def test_a_plan_holding_a_kept_constant_runs_only_on_its_stream(spied):
    """A float scale's kept tensor is filled on the stream of its first use; on
    another stream the call takes the Python path, which keeps another."""
    op, fn, kw = _plan_call("write_kv.fp8")
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    fn(**kw)
    fn(**kw)
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        fn(**kw)
        fn(**kw)
    fn(**kw)
    assert [w for w, _ in spied] == ["_run", "validate", "_run", "_run", "validate"]
    assert spied[0][1][-2] is spied[1][1][-2]
    assert spied[2][1][-2] is not spied[0][1][-2]


def test_allocation_errors_are_raised_as_torch_raises_them():
    huge = (2 ** 44,)
    with pytest.raises(Exception) as want:
        torch.empty(huge, dtype=I32)
    with pytest.raises(Exception) as got:
        _fastpath.empty(torch.zeros(1), _fastpath.KIND_INT32, huge, (3,))
    assert type(got.value) is type(want.value)
