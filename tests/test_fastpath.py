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
        def fast_check(op, written, items):
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


def test_switched_off_by_the_environment():
    code = ("import torch, dflash_kernels as dk; from dflash_kernels import _fastpath;"
            "assert not _fastpath.ENABLED;"
            "r = dk.verify_chain(torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.int64));"
            "assert r.out_tokens.shape == (2, 3) and r.accept_len.dtype == torch.int32;"
            "print('ok')")
    env = {"DFLASH_KERNELS_NO_FASTPATH": "1", "PATH": "/usr/bin:/bin"}
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
