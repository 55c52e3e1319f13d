"""The KV-injection reference against independent float64 loop math.

The helpers here (cache layouts, sentinel fills, the loop model) are also used
by test_inject_triton.py.
"""

import math

import pytest
import torch

import dflash_kernels

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
INT_VIEW = {1: torch.uint8, 2: torch.int16}

CACHE_LAYOUTS = ("stacked", "stacked_hnd", "combined", "views", "separate")


# ---------------------------------------------------------------- inputs

def sentinel_fill(t):
    """Random bits (NaN and inf patterns included) in every element."""
    it = t.view(INT_VIEW[t.element_size()])
    info = torch.iinfo(it.dtype)
    it.copy_(torch.randint(info.min, info.max, it.shape, dtype=it.dtype))
    return t


def make_caches(layout, L, P, page, Hkv, D, dtype, device):
    """(k_cache, v_cache, k_list, v_list): the public arguments and their L per-layer views.

    stacked: one [L, P, page, Hkv, D] tensor each; stacked_hnd: a permuted
    [L, P, Hkv, page, D] allocation; combined: k and v are the halves of one
    [2, L, ...] tensor; views: lists of per-layer views of one [L, 2, ...]
    allocation (uniform layer stride); separate: lists of separate
    allocations (no common stride).
    """
    def alloc(*shape):
        return sentinel_fill(torch.empty(shape, dtype=dtype, device=device))

    if layout == "stacked":
        k, v = alloc(L, P, page, Hkv, D), alloc(L, P, page, Hkv, D)
    elif layout == "stacked_hnd":
        k = alloc(L, P, Hkv, page, D).permute(0, 1, 3, 2, 4)
        v = alloc(L, P, Hkv, page, D).permute(0, 1, 3, 2, 4)
    elif layout == "combined":
        both = alloc(2, L, P, page, Hkv, D)
        k, v = both[0], both[1]
    elif layout == "views":
        both = alloc(L, 2, P, page, Hkv, D)
        k, v = [both[i, 0] for i in range(L)], [both[i, 1] for i in range(L)]
    elif layout == "separate":
        k = _irregular([alloc(P, page, Hkv, D) for _ in range(L)])
        v = _irregular([alloc(P, page, Hkv, D) for _ in range(L)])
    else:
        raise AssertionError(layout)
    k_list = list(k.unbind(0)) if isinstance(k, torch.Tensor) else k
    v_list = list(v.unbind(0)) if isinstance(v, torch.Tensor) else v
    return k, v, k_list, v_list


def _irregular(caches):
    """Order separate allocations so that (for L >= 3) no single layer stride
    reaches them all: a kernel must then use per-layer base pointers."""
    def uniform(cs):
        p = [c.data_ptr() for c in cs]
        return all(p[i] - p[0] == i * (p[1] - p[0]) for i in range(len(p)))
    if len(caches) >= 3 and uniform(caches):
        caches[-1], caches[-2] = caches[-2], caches[-1]
    assert len(caches) < 3 or not uniform(caches)
    return caches


def make_slots(N, num_slots, n_invalid, device, all_invalid_prefix=0):
    """Distinct slots in [0, num_slots), with n_invalid rows (and a leading run) set negative."""
    slots = torch.randperm(num_slots)[:N].to(torch.int64)
    bad = torch.randperm(N)[:n_invalid]
    slots[bad] = -1 - torch.randint(0, 3, (len(bad),))
    slots[:all_invalid_prefix] = -1
    return slots.to(device)


def make_cos_sin(max_pos, rotary_dim, device, base=10000.0):
    half = rotary_dim // 2
    inv = 1.0 / base ** (torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], 1).float().to(device)


def snapshot(caches):
    return [c.clone() for c in caches]


# ---------------------------------------------------------------- loop model

def rope_loop(x, pos, cos_sin, rotary_dim, neox):
    """RoPE of one head vector (float64) written from the formula, pair by pair."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        c, s = float(cos_sin[pos, i]), float(cos_sin[pos, half + i])
        out[a] = x[a] * c - x[b] * s
        out[b] = x[b] * c + x[a] * s
    return out


def model_rows(k_rows, v_rows, k_norm_weight, positions, slots, cos_sin, eps, rotary_dim, neox):
    """{(layer, slot): (k [Hkv, D], v [Hkv, D])} in float64 from per-token, per-head loops.

    ``k_rows(t, l, h)`` / ``v_rows(t, l, h)`` give the float64 pre-norm head vectors.
    """
    expect = {}
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        pos = int(positions[t])
        for layer in range(k_rows.L):
            ks, vs = [], []
            for h in range(k_rows.Hkv):
                k = k_rows(t, layer, h)
                if k_norm_weight is not None:
                    ms = sum(float(e) ** 2 for e in k) / len(k)
                    k = k / math.sqrt(ms + eps) * k_norm_weight[layer].double()
                ks.append(rope_loop(k, pos, cos_sin, rotary_dim, neox))
                vs.append(v_rows(t, layer, h))
            expect[(layer, slot)] = (torch.stack(ks), torch.stack(vs))
    return expect


class ProjRows:
    """Head vectors of hidden @ W[l, kv].T + b, one dot product per output element."""

    def __init__(self, hidden, kv_weight, kv_bias, kv, Hkv, D):
        self.h, self.w, self.b, self.kv = hidden.double().cpu(), kv_weight.double().cpu(), kv_bias, kv
        if kv_bias is not None:
            self.b = kv_bias.double().cpu()
        self.L, self.Hkv, self.D = kv_weight.shape[0], Hkv, D

    def __call__(self, t, layer, h):
        out = torch.empty(self.D, dtype=torch.float64)
        for d in range(self.D):
            o = h * self.D + d
            out[d] = torch.dot(self.w[layer, self.kv, o], self.h[t])
            if self.b is not None:
                out[d] += self.b[layer, self.kv, o]
        return out


class GivenRows:
    """Head vectors read from k or v ``[N, L, Hkv, D]`` (write_kv)."""

    def __init__(self, x):
        self.x = x.double().cpu()
        self.L, self.Hkv = x.shape[1], x.shape[2]

    def __call__(self, t, layer, h):
        return self.x[t, layer, h].clone()


def check_caches(after, before, expect, idx, scale, page_size, rtol, atol):
    """Rows in ``expect`` match (dequantized) within tolerance; every other element
    of every cache is bit-identical to ``before``. ``idx`` 0 for K, 1 for V."""
    for layer, (a, b) in enumerate(zip(after, before)):
        a, b = a.cpu(), b.cpu()
        written = torch.zeros(a.shape[:2], dtype=torch.bool)
        for (lyr, slot), rows in expect.items():
            if lyr != layer:
                continue
            p, r = divmod(slot, page_size)
            written[p, r] = True
            want = rows[idx]
            got = a[p, r].double()
            if a.dtype in FP8_MAX:
                m = FP8_MAX[a.dtype]
                want = (want / scale).clamp(-m, m)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                                       msg=lambda s: f"layer {layer} slot {slot}: {s}")
        iv = INT_VIEW[a.element_size()]
        keep = ~written
        assert torch.equal(a.view(iv)[keep], b.view(iv)[keep]), f"layer {layer}: unaddressed rows changed"


def tolerances(cache_dtype, act_dtype):
    if cache_dtype == torch.float8_e4m3fn:
        return 2 ** -3, 2 ** -8      # one e4m3 ulp (3 mantissa bits), subnormal step 2**-9
    if cache_dtype == torch.float8_e5m2:
        return 2 ** -2, 2 ** -15
    return (2e-3, 2e-3) if act_dtype == torch.float16 else (1.6e-2, 1.6e-2)


# ---------------------------------------------------------------- tests

def _inject_case(device, *, L, N, page, Hkv, D, H, layout, neox, rotary_dim, bias, knorm,
                 cache_dtype=torch.float16, act=torch.float16, n_invalid=2, all_invalid_prefix=0,
                 backend="reference", P=None):
    P = P or (N // page + 3)
    hidden = torch.randn(N, H, device=device).to(act)
    kv_weight = (torch.randn(L, 2, Hkv * D, H, device=device) / math.sqrt(H)).to(act)
    kv_bias = torch.randn(L, 2, Hkv * D, device=device).to(act) if bias else None
    k_norm_weight = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    max_pos = 97
    positions = torch.randint(0, max_pos, (N,), device=device)
    slots = make_slots(N, P * page, n_invalid, device, all_invalid_prefix)
    positions[slots < 0] = 10 ** 9          # skipped rows may carry anything
    cos_sin = make_cos_sin(max_pos, rotary_dim or D, device)
    kc, vc, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    fp8 = cache_dtype in FP8_MAX
    k_scale, v_scale = (0.03, torch.tensor([0.02], device=device)) if fp8 else (None, None)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    dflash_kernels.inject_kv(hidden, kv_weight, k_norm_weight, positions, slots, kc, vc, cos_sin,
                             kv_bias=kv_bias, rope_style="neox" if neox else "gptj",
                             rotary_dim=rotary_dim, k_scale=k_scale, v_scale=v_scale,
                             backend=backend)
    return dict(hidden=hidden, kv_weight=kv_weight, kv_bias=kv_bias, k_norm_weight=k_norm_weight,
                positions=positions, slots=slots, cos_sin=cos_sin, k_list=k_list, v_list=v_list,
                k_before=k_before, v_before=v_before, k_scale=k_scale, v_scale=v_scale,
                Hkv=Hkv, D=D, page=page, neox=neox, rotary_dim=rotary_dim or D,
                cache_dtype=cache_dtype, act=act)


def _check_against_model(c, k_rows, v_rows, eps=1e-6):
    expect = model_rows(k_rows, v_rows, c["k_norm_weight"], c["positions"].cpu(), c["slots"].cpu(),
                        c["cos_sin"].cpu().double(), eps, c["rotary_dim"], c["neox"])
    rtol, atol = tolerances(c["cache_dtype"], c["act"])
    ks, vs = (None if s is None else float(s) for s in (c["k_scale"], c["v_scale"]))
    check_caches(c["k_list"], c["k_before"], expect, 0, ks, c["page"], rtol, atol)
    check_caches(c["v_list"], c["v_before"], expect, 1, vs, c["page"], rtol, atol)


@pytest.mark.parametrize(
    "L, N, page, layout, neox, rotary_dim, bias, knorm",
    [
        (2, 7, 16, "stacked", True, None, True, True),
        (2, 7, 16, "stacked_hnd", False, None, False, True),
        (3, 5, 1, "separate", True, 32, False, False),
        (1, 6, 16, "views", False, 48, True, False),
        (2, 7, 1, "combined", True, 16, True, True),
    ],
)
def test_inject_kv_reference_matches_loops(device, L, N, page, layout, neox, rotary_dim, bias, knorm):
    c = _inject_case(device, L=L, N=N, page=page, Hkv=2, D=64, H=24, layout=layout, neox=neox,
                     rotary_dim=rotary_dim, bias=bias, knorm=knorm)
    _check_against_model(c, ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 0, 2, 64),
                         ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 1, 2, 64))


@pytest.mark.parametrize(
    "cache_dtype, layout, neox",
    [
        (torch.float8_e4m3fn, "stacked", True),
        (torch.float8_e4m3fn, "separate", False),
        (torch.float8_e5m2, "views", True),
    ],
)
def test_inject_kv_reference_fp8(device, cache_dtype, layout, neox):
    c = _inject_case(device, L=2, N=6, page=16, Hkv=2, D=64, H=24, layout=layout, neox=neox,
                     rotary_dim=None, bias=True, knorm=True, cache_dtype=cache_dtype)
    _check_against_model(c, ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 0, 2, 64),
                         ProjRows(c["hidden"], c["kv_weight"], c["kv_bias"], 1, 2, 64))


def test_fp8_saturates_to_max_finite(device):
    """Values far past the format's range are stored as +-max, never NaN/inf."""
    c = _inject_case(device, L=1, N=4, page=16, Hkv=1, D=64, H=8, layout="stacked", neox=True,
                     rotary_dim=None, bias=False, knorm=False, cache_dtype=torch.float8_e4m3fn,
                     n_invalid=0)
    # k_scale 0.03 with |v| up to ~3 stays in range; rerun V with a tiny scale to saturate.
    kc, vc, k_list, v_list = make_caches("stacked", 1, 3, 16, 1, 64, torch.float8_e4m3fn, device)
    dflash_kernels.inject_kv(c["hidden"], c["kv_weight"], None, c["positions"], c["slots"], kc, vc,
                             c["cos_sin"], k_scale=1.0, v_scale=1e-6, backend="reference")
    v_true = c["hidden"].float() @ c["kv_weight"][0, 1].float().T          # [N, D]
    slots = c["slots"]
    stored = v_list[0][slots // 16, slots % 16, 0].float()
    big = v_true.abs() / 1e-6 > 448
    assert big.any()
    assert torch.equal(stored[big], 448.0 * v_true[big].sign())
    assert torch.isfinite(stored).all()


def test_no_valid_slot_leaves_caches_bit_identical(device):
    c = _inject_case(device, L=2, N=5, page=16, Hkv=2, D=64, H=16, layout="stacked", neox=True,
                     rotary_dim=None, bias=True, knorm=True, n_invalid=5)
    for after, before in zip(c["k_list"] + c["v_list"], c["k_before"] + c["v_before"]):
        assert torch.equal(after.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("neox, rotary_dim, knorm, page, cache_dtype", [
    (True, None, True, 16, torch.float16),
    (False, 32, False, 1, torch.float16),
    (True, 48, True, 16, torch.float8_e4m3fn),
])
def test_write_kv_reference_matches_loops(device, neox, rotary_dim, knorm, page, cache_dtype):
    L, N, Hkv, D = 2, 7, 2, 64
    P = N // page + 2
    k = torch.randn(N, L, Hkv, D, device=device).half()
    v = torch.randn(N, L, Hkv, D, device=device).half()
    k_norm_weight = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    positions = torch.randint(0, 50, (N,), device=device)
    slots = make_slots(N, P * page, 2, device)
    cos_sin = make_cos_sin(50, rotary_dim or D, device)
    kc, vc, k_list, v_list = make_caches("stacked_hnd", L, P, page, Hkv, D, cache_dtype, device)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    fp8 = cache_dtype in FP8_MAX
    scales = dict(k_scale=0.05, v_scale=0.04) if fp8 else {}
    dflash_kernels.write_kv(k, v, k_norm_weight, positions, slots, kc, vc, cos_sin,
                            rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
                            backend="reference", **scales)
    expect = model_rows(GivenRows(k), GivenRows(v), k_norm_weight, positions.cpu(), slots.cpu(),
                        cos_sin.cpu().double(), 1e-6, rotary_dim or D, neox)
    rtol, atol = tolerances(cache_dtype, torch.float16)
    check_caches(k_list, k_before, expect, 0, scales.get("k_scale"), page, rtol, atol)
    check_caches(v_list, v_before, expect, 1, scales.get("v_scale"), page, rtol, atol)


def fuse_model(parts, fc_weight, norm_weight, eps):
    """float64, one output element at a time."""
    N, H = parts[0].shape[0], fc_weight.shape[0]
    x = torch.cat([p.double().cpu() for p in parts], 1)
    w = fc_weight.double().cpu()
    out = torch.empty(N, H, dtype=torch.float64)
    for n in range(N):
        y = torch.tensor([float(torch.dot(x[n], w[j])) for j in range(H)], dtype=torch.float64)
        r = 1.0 / math.sqrt(float((y * y).sum()) / H + eps)
        out[n] = y * r * norm_weight.double().cpu()
    return out


@pytest.mark.parametrize("widths, concatenated", [((16, 16, 16), True), ((16, 24, 8), False),
                                                  ((40,), False)])
def test_fuse_target_features_reference(device, widths, concatenated):
    N, H = 5, 16
    parts = [torch.randn(N, w, device=device).half() for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / 4).half()
    norm_weight = 1 + 0.3 * torch.randn(H, device=device)
    out = torch.full((N, H), float("nan"), dtype=torch.float16, device=device)
    feats = torch.cat(parts, 1) if concatenated else parts
    got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, eps=1e-5, out=out,
                                              backend="reference")
    assert got is out
    torch.testing.assert_close(out.double().cpu(), fuse_model(parts, fc_weight, norm_weight, 1e-5),
                               rtol=2e-3, atol=2e-3)
