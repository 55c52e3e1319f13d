"""norm_rope: the draft block's q and k, per-head RMSNorm + RoPE in place.
Both backends against a float64 pair-by-pair model, the Triton kernel against
write_kv's K epilogue (the same code), strided views of a fused qkv buffer with
sentinels around them, clamped positions, validation and torch.compile."""

import math

import pytest
import torch

import dflash_kernels as dk
from helpers import make_cos_sin, rope_loop

BACKENDS = ["reference", "triton"]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def model(x, pos, w, cos_sin, rotary_dim, neox, eps=1e-6):
    """float64 [N, H, D] from the formula: rms over D, times w, then RoPE pair by pair."""
    x = x.double()
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        p = min(max(int(pos[n]), 0), cos_sin.shape[0] - 1)
        for h in range(x.shape[1]):
            v = x[n, h]
            if w is not None:
                v = v / math.sqrt(float(v.square().mean()) + eps) * w.double()
            out[n, h] = rope_loop(v, p, cos_sin.double(), rotary_dim, neox)
    return out


def _inputs(lead, Hq, Hkv, D, dtype, max_pos=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, Hq, D, generator=g).to(dtype)
    k = torch.randn(*lead, Hkv, D, generator=g).to(dtype)
    pos = torch.randint(0, max_pos, lead, generator=g)
    qw = 1 + 0.3 * torch.randn(D, generator=g)
    kw = 1 + 0.3 * torch.randn(D, generator=g)
    return q, k, pos, qw, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, Hq, Hkv, D, rotary_dim, style, norms, dtype", [
    ((5,), 4, 2, 64, None, "neox", "both", torch.float16),
    ((3,), 2, 1, 128, 64, "neox", "q", torch.bfloat16),       # partial rotary
    ((2, 3), 4, 1, 64, None, "gptj", "k", torch.float16),    # [B, S, H, D]
    ((19,), 3, 3, 64, 32, "gptj", "none", torch.bfloat16),   # more rows than one tile
])
def test_norm_rope_matches_the_formula(backend, lead, Hq, Hkv, D, rotary_dim, style, norms, dtype):
    q, k, pos, qw, kw = _inputs(lead, Hq, Hkv, D, dtype)
    qw = qw if norms in ("both", "q") else None
    kw = kw if norms in ("both", "k") else None
    cs = make_cos_sin(37, rotary_dim or D, "cpu")
    q0, k0 = q.clone(), k.clone()
    out = dk.norm_rope(q, k, pos, cs, q_norm_weight=qw, k_norm_weight=kw, rope_style=style,
                       rotary_dim=rotary_dim, backend=backend)
    assert out[0] is q and out[1] is k
    flat = pos.reshape(-1)
    for x, x0, w in ((q, q0, qw), (k, k0, kw)):
        H = x.shape[-2]
        want = model(x0.reshape(-1, H, D), flat, w, cs, rotary_dim or D, style == "neox")
        torch.testing.assert_close(x.reshape(-1, H, D).double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_triton_equals_reference_and_write_kv_epilogue():
    """One rounding from the same fp32 math: Triton's q and k equal the reference's, and
    its k equals what write_kv stores for the same rows (the shared epilogue)."""
    N, Hq, Hkv, D, dtype = 7, 2, 2, 64, torch.bfloat16
    q, k, pos, qw, kw = _inputs((N,), Hq, Hkv, D, dtype, seed=1)
    cs = make_cos_sin(37, D, "cpu")
    res = {}
    for b in BACKENDS:
        qb, kb = q.clone(), k.clone()
        dk.norm_rope(qb, kb, pos, cs, q_norm_weight=qw, k_norm_weight=kw, backend=b)
        res[b] = (qb, kb)
    for i in (0, 1):   # at most one bf16 ulp apart (rsqrt differs in the last fp32 bit)
        torch.testing.assert_close(res["triton"][i].float(), res["reference"][i].float(),
                                   rtol=2 ** -7, atol=1e-3)
    page = 4
    kc = torch.full((2, page, Hkv, D), 7.0, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.arange(N, dtype=torch.int64)
    dk.write_kv(k[:, None], k[:, None], kw[None], pos, slots, [kc], [vc], cs, backend="triton")
    assert torch.equal(kc.reshape(-1, Hkv, D)[:N], res["triton"][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_of_a_fused_qkv_buffer_and_clamped_positions(backend):
    """q and k as strided views of one [N, (Hq + 2 Hkv) D] projection (with padding
    columns): only their columns change; positions past the table use its last row."""
    N, Hq, Hkv, D, dtype = 6, 2, 1, 64, torch.float16
    g = torch.Generator().manual_seed(2)
    W = (Hq + 2 * Hkv) * D + 8
    qkv = torch.randn(N, W, generator=g).to(dtype)
    before = qkv.clone()
    q = qkv[:, :Hq * D].view(N, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(N, Hkv, D)
    pos = torch.tensor([0, 3, 36, 37, 1000, -4])     # the last three clamp to 36 and 0
    cs = make_cos_sin(37, D, "cpu")
    q0, k0 = q.clone(), k.clone()
    dk.norm_rope(q, k, pos, cs, k_norm_weight=torch.ones(D), backend=backend)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], before[:, (Hq + Hkv) * D:])   # v and padding
    torch.testing.assert_close(q.double(), model(q0, pos, None, cs, D, True), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k.double(), model(k0, pos, torch.ones(D), cs, D, True), rtol=2e-3, atol=2e-3)
    assert not torch.equal(q, q0)


def test_empty_block_is_a_no_op():
    q, k = torch.zeros(0, 2, 64).half(), torch.zeros(0, 1, 64).half()
    dk.norm_rope(q, k, torch.zeros(0, dtype=torch.int64), make_cos_sin(4, 64, "cpu"))


def _bad(**over):
    q, k, pos, qw, _ = _inputs((4,), 2, 1, 64, torch.float16)
    kw = dict(q=q, k=k, positions=pos, cos_sin_cache=make_cos_sin(8, 64, "cpu"))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, match", [
    (dict(q=torch.zeros(4, 2, 64)), "q"),                                  # fp32
    (dict(k=torch.zeros(4, 1, 64, dtype=torch.bfloat16)), "k: expected the dtype"),
    (dict(k=torch.zeros(4, 1, 128, dtype=torch.float16)), "k: expected head dim"),
    (dict(k=torch.zeros(3, 1, 64, dtype=torch.float16)), "k: expected leading dims"),
    (dict(positions=torch.zeros(4, dtype=torch.int32)), "positions"),
    (dict(rotary_dim=63), "rotary_dim"),
    (dict(rope_style="llama"), "rope_style"),
    (dict(q_norm_weight=torch.ones(32)), "q_norm_weight"),
    (dict(eps=0.0), "eps"),
    (dict(cos_sin_cache=torch.zeros(0, 64)), "cos_sin_cache"),
    (dict(q=torch.zeros(4, 2, 128, dtype=torch.float16)[:, :, ::2]), "q"),  # last stride 2
    (dict(q=torch.zeros(4, 3, 2, 64, dtype=torch.float16).transpose(0, 1),
          k=torch.zeros(3, 4, 1, 64, dtype=torch.float16),
          positions=torch.zeros(3, 4, dtype=torch.int64)), "merge"),
])
def test_bad_calls_raise_value_error(over, match):
    kw = _bad(**over)
    with pytest.raises(ValueError, match=match):
        dk.norm_rope(kw.pop("q"), kw.pop("k"), kw.pop("positions"), kw.pop("cos_sin_cache"), **kw)


def test_aliased_q_and_k_are_refused():
    x = torch.zeros(4, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="share memory"):
        dk.norm_rope(x, x[:, :1], torch.zeros(4, dtype=torch.int64), make_cos_sin(8, 64, "cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_rope_under_torch_compile(backend):
    q, k, pos, qw, kw = _inputs((2, 3), 2, 1, 64, torch.float16, seed=4)
    cs = make_cos_sin(37, 64, "cpu")
    want_q, want_k = q.clone(), k.clone()
    dk.norm_rope(want_q, want_k, pos, cs, q_norm_weight=qw, k_norm_weight=kw, backend="reference")

    def step(q, k):
        dk.norm_rope(q, k, pos, cs, q_norm_weight=qw, k_norm_weight=kw, backend=backend)
        return q * 1, k * 1

    torch._dynamo.reset()
    got_q, got_k = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k)
    torch.testing.assert_close(got_q, want_q, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got_k, want_k, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(q, want_q, rtol=2e-3, atol=2e-3)     # in place, compiled too
