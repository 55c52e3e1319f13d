"""block_attention with context splits is ONE launch: the split that arrives
last at a (request, KV head, row block) merges the fp32 partials
(docs/block_attention.md "Split merge").

The two-launch result is computed from the same partials (captured from the
launch, which never clears them) with the arithmetic of the old
``_merge_splits_kernel`` in numpy, splits in order 0, 1, ..., in fp32: the
interpreter evaluates the kernel with the same numpy operations, so on CPU the
folded output must match it bit for bit. The partial workspace is NaN-filled
before the launch, so a merge that read a partial before its split wrote it
shows as NaN.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dflash_kernels.triton_backend import _common
from dflash_kernels.triton_backend import block_attention as tri
from helpers import NAN, make_attention_case, run_attention

# Positions of the kernel's arguments in the launch call (after fn, grid).
_PO, _PLSE, _CNT = 11, 12, 14


def _scale_tensor(s, device):
    if s is None or isinstance(s, torch.Tensor):
        return s
    return torch.full((1,), float(s), dtype=torch.float32, device=device)


def _run(case, monkeypatch, num_splits, window=0, with_lse=True, causal=False):
    """(out, lse, [launch args]) of one backend call with garbage-prefilled outputs."""
    calls = []
    real = tri.launch

    def record(fn, grid, *args, **kw):
        if kw["NUM_SPLITS"] > 1:
            args[_PO].fill_(NAN)
            args[_PLSE].fill_(NAN)
        calls.append((grid, args, kw))
        return real(fn, grid, *args, **kw)

    # Every launch leaves the counters at 0 (a wrong merger would leave some at 1).
    assert all(not buf.any() for buf in _common._COUNTERS.values())
    monkeypatch.setattr(tri, "launch", record)
    q = case["q"]
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:3], NAN, dtype=torch.float32, device=q.device) if with_lse else None
    tri.block_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                        case["context_lens"], case["k_block"], case["v_block"], 0.125, window,
                        _scale_tensor(case["k_scale"], q.device),
                        _scale_tensor(case["v_scale"], q.device), out, lse, causal,
                        num_splits=num_splits)
    monkeypatch.setattr(tri, "launch", real)
    return out, lse, calls


def _two_launch_merge(po, plse):
    """The old ``_merge_splits_kernel`` in fp32 numpy: ``(o [rows, D], lse [rows])``."""
    po = po.cpu().numpy()
    plse = plse.cpu().numpy()
    ninf = np.float32(-np.inf)
    m = np.full(plse.shape[1], ninf, np.float32)
    for i in range(plse.shape[0]):
        m = np.maximum(m, plse[i])
    m_safe = np.where(m == ninf, np.float32(0), m)
    acc = np.zeros(po.shape[1:], np.float32)
    den = np.zeros(plse.shape[1], np.float32)
    for i in range(plse.shape[0]):
        w = np.exp2(plse[i] - m_safe)
        acc = acc + w[:, None] * po[i]
        den = den + w
    has_key = den > 0
    den_safe = np.where(has_key, den, np.float32(1))
    o = acc / den_safe[:, None]
    lse = np.where(has_key, (m_safe + np.log2(den_safe)) * np.float32(0.6931471805599453), ninf)
    assert o.dtype == lse.dtype == np.float32
    return torch.from_numpy(o), torch.from_numpy(lse)


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n).to(Y.dtype.element_ty), mask=i < n)


def _cast_as_stored(o, dtype, device):
    """fp32 ``o`` cast to ``dtype`` as a kernel's store casts it (the interpreter's
    fp32 -> bf16 truncates where torch's rounds to nearest)."""
    x = o.to(device).contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


CASES = {
    # name: (num_splits, make_attention_case kwargs, window, with_lse, causal)
    "2.block": (2, dict(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[150, 70]), 0, True, False),
    "3.cached_block": (3, dict(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[190, 70], block=False), 0, True,
                       False),
    "4.block.window": (4, dict(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[260, 90]), 70, True, False),
    "3.fp8.bf16": (3, dict(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[180, 40], dtype=torch.bfloat16,
                           cache_dtype=torch.float8_e4m3fn), 0, True, False),
    "2.causal.no_lse": (2, dict(S=4, Hq=4, Hkv=1, D=64, page_size=1, ctx_lens=[100, 9],
                                block=False), 0, False, True),
    # S*g = 80 rows at D 256: two row blocks, a counter each.
    "2.two_row_blocks": (2, dict(S=5, Hq=16, Hkv=1, D=256, ctx_lens=[70]), 0, True, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_merge_is_the_two_launch_merge(name, monkeypatch, device):
    torch.manual_seed(sum(map(ord, name)))
    ns, kw, window, with_lse, causal = CASES[name]
    case = make_attention_case(device=device, **kw)
    out, lse, calls = _run(case, monkeypatch, ns, window, with_lse, causal)
    assert len(calls) == 1                                   # one launch
    grid, args, kwargs = calls[0]
    assert grid[1] == kwargs["NUM_SPLITS"] == ns
    po, plse, cnt = args[_PO], args[_PLSE], args[_CNT]
    B, S, Hq, D = case["q"].shape
    assert po.shape == (ns, B * S * Hq, D) and plse.shape == (ns, B * S * Hq)

    # Every split wrote its partial (the workspace was NaN before the launch), and the
    # merge is not vacuous: some row combines keys from two or more splits.
    assert not plse.isnan().any() and not po.isnan().any()
    assert ((plse > float("-inf")).sum(0) >= 2).any()
    want_o, want_lse = _two_launch_merge(po, plse)
    want_o = _cast_as_stored(want_o.view(B, S, Hq, D), out.dtype, device)
    want_lse = want_lse.view(B, S, Hq)
    # The merged output is no single split's partial.
    for i in range(ns):
        assert not torch.equal(_cast_as_stored(po[i].view(B, S, Hq, D), out.dtype, device), out), i

    if device == "cpu":
        assert torch.equal(_bits(out), _bits(want_o))
        if with_lse:
            assert torch.equal(_bits(lse), _bits(want_lse.contiguous()))
    else:
        # A GPU's exp2 / log2 / FMA differ from numpy's: the same merge, to rounding.
        torch.testing.assert_close(out.float(), want_o.float(), atol=2e-3, rtol=2e-3)
        if with_lse:
            torch.testing.assert_close(lse, want_lse.to(device), atol=1e-5, rtol=1e-5)

    # Close to the reference.
    ref, ref_lse = run_attention(case, "reference", sm_scale=0.125, window=window or None,
                                 block_mask="causal" if causal else None)
    atol = 3e-2 if kw.get("cache_dtype") is not None else 4e-3
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)
    if with_lse:
        torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)

    # The counters are back at 0, and the buffer is the op's persistent one.
    assert not cnt.any()
    assert any(cnt is buf for buf in _common._COUNTERS.values())
    assert all(not buf.any() for buf in _common._COUNTERS.values())


def test_second_call_same_buffer_same_bits(monkeypatch, device):
    torch.manual_seed(3)
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[150, 70], device=device)
    out1, lse1, calls1 = _run(case, monkeypatch, 3)
    out2, lse2, calls2 = _run(case, monkeypatch, 3)
    assert calls1[0][1][_CNT] is calls2[0][1][_CNT]
    assert not calls2[0][1][_CNT].any()
    assert torch.equal(_bits(out1), _bits(out2)) and torch.equal(_bits(lse1), _bits(lse2))
    assert not out1.isnan().any()


def test_one_split_takes_no_counter(monkeypatch, device):
    torch.manual_seed(4)
    case = make_attention_case(S=4, Hq=8, Hkv=2, D=64, ctx_lens=[150, 70], device=device)
    _, _, calls = _run(case, monkeypatch, 1)
    assert len(calls) == 1 and calls[0][0][1] == 1
    assert calls[0][1][_CNT] is case["context_lens"]          # a placeholder, never read
