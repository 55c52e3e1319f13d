"""Test helpers shared by several test modules (test modules import only from
here, never from each other).

- KV caches (inject_kv, write_kv; also test_cuda_ops.py): cache layouts with
  sentinel fills, slots, RoPE tables, a float64 per-token loop model, and the
  Triton-vs-reference write comparison.
- block_attention: a case builder with poisoned pages and table entries, and
  the public call with garbage-prefilled outputs.
- verify_chain: a case builder, the public call with garbage-prefilled outputs,
  result comparison and goodness-of-fit helpers.
- Compile checks of Triton kernels for sm_90 / sm_100 without a GPU.
"""

import math

import numpy as np
import torch
from scipy import stats

import dflash_kernels
from dflash_kernels._dtypes import FP8_MAX

INT_VIEW = {1: torch.uint8, 2: torch.int16}
NAN = float("nan")
NEG_INF = float("-inf")
P_MIN = 1e-3  # goodness-of-fit rejection threshold (fixed seeds: deterministic)


# ---------------- KV caches: inputs

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


def make_inject_inputs(device, act, *, L, N, H, Hkv, D, bias, knorm, rotary_dim, max_pos,
                       num_slots, n_invalid, all_invalid_prefix, skipped_pos):
    """inject_kv's inputs ``(hidden, kv_weight, kv_bias, k_norm_weight, positions,
    slots, cos_sin)``; the rows with a negative slot get position ``skipped_pos``
    (never read: out of the table's range)."""
    hidden = torch.randn(N, H, device=device).to(act)
    kv_weight = (torch.randn(L, 2, Hkv * D, H, device=device) / math.sqrt(H)).to(act)
    kv_bias = torch.randn(L, 2, Hkv * D, device=device).to(act) if bias else None
    k_norm_weight = (1 + 0.2 * torch.randn(L, D, device=device)) if knorm else None
    positions = torch.randint(0, max_pos, (N,), device=device)
    slots = make_slots(N, num_slots, n_invalid, device, all_invalid_prefix)
    positions[slots < 0] = skipped_pos
    cos_sin = make_cos_sin(max_pos, rotary_dim or D, device)
    return hidden, kv_weight, kv_bias, k_norm_weight, positions, slots, cos_sin


def snapshot(caches):
    return [c.clone() for c in caches]


# ---------------- KV caches: float64 loop model

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


# ---------------- KV caches: Triton against the reference

def assert_same_writes(got, want, before, slots, page_size, act):
    """Rows at valid slots close to the reference's; every other element of every
    cache bit-identical to the sentinel fill."""
    slots = slots.cpu()
    valid = slots[slots >= 0]
    for layer, (g, w, b) in enumerate(zip(got, want, before)):
        g, w, b = g.cpu(), w.cpu(), b.cpu()
        written = torch.zeros(g.shape[:2], dtype=torch.bool)
        written[valid // page_size, valid % page_size] = True
        iv = INT_VIEW[g.element_size()]
        assert torch.equal(g.view(iv)[~written], b.view(iv)[~written]), \
            f"layer {layer}: elements outside the valid slots changed"
        gw, ww = g[written].float(), w[written].float()
        # fp8: summation order may move a value across a rounding boundary: one ulp.
        rtol, atol = tolerances(g.dtype, act)
        torch.testing.assert_close(gw, ww, rtol=rtol, atol=atol, msg=lambda m: f"layer {layer}: {m}")


def clone_layout(k, v, k_list, v_list):
    """A second set of caches with the same layout and bits (for the reference run)."""
    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.clone(memory_format=torch.preserve_format)
        return [c.clone() for c in x]
    k2, v2 = clone(k), clone(v)
    k2_list = list(k2.unbind(0)) if isinstance(k2, torch.Tensor) else k2
    v2_list = list(v2.unbind(0)) if isinstance(v2, torch.Tensor) else v2
    return k2, v2, k2_list, v2_list


def run_both(fn, device, args_before, args_after, *, L, P, page, Hkv, D, layout, cache_dtype,
             slots, act, **kw):
    """``fn(*args_before, k_cache, v_cache, *args_after, **kw)`` through Triton and
    the reference on two copies of sentinel-filled caches; the writes must agree."""
    k, v, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    k_ref, v_ref, k_ref_list, v_ref_list = clone_layout(k, v, k_list, v_list)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    fn(*args_before, k, v, *args_after, backend="triton", **kw)
    fn(*args_before, k_ref, v_ref, *args_after, backend="reference", **kw)
    assert_same_writes(k_list, k_ref_list, k_before, slots, page, act)
    assert_same_writes(v_list, v_ref_list, v_before, slots, page, act)


# ---------------- block_attention

def _cdiv(a, b):
    return -(-a // b)


def make_attention_case(B=None, S=4, Hq=4, Hkv=1, D=64, page_size=16, ctx_lens=(5,), *,
                        dtype=torch.float16, cache_dtype=None, block=True, layout="nhd",
                        scale_kind="float", device="cpu", spare_pages=2, extra_cols=2):
    """Random inputs with poisoned unused cache rows/pages and garbage table entries.

    Pages are owned by one request each, in random order. Rows past a
    request's length in its last page and every spare page hold NaN; table
    entries past the used pages hold -1, huge ids, the page count, or ids of
    the NaN spare pages. ``layout``: "nhd", "hnd" (permuted view) or
    "combined" (k/v slices of one ``[2, P, page, Hkv, D]`` tensor).
    """
    ctx_lens = list(ctx_lens)
    B = len(ctx_lens) if B is None else B
    assert len(ctx_lens) == B
    cache_dtype = cache_dtype or dtype
    n_used = [_cdiv(L, page_size) for L in ctx_lens]
    P = max(n_used + [1]) + extra_cols
    num_pages = sum(n_used) + spare_pages
    perm = torch.randperm(num_pages).tolist()
    spare = perm[sum(n_used):]
    garbage = [-1, 2 ** 31 - 1, num_pages, num_pages + 1000] + spare
    table = torch.empty(B, P, dtype=torch.int32)
    nxt = 0
    for b in range(B):
        for j in range(P):
            if j < n_used[b]:
                table[b, j] = perm[nxt]
                nxt += 1
            else:
                table[b, j] = garbage[(b + j) % len(garbage)]

    fp8 = cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    k_scale = 0.25 if fp8 else None
    v_scale = 0.5 if fp8 else None

    def cache_values(scale):
        x = torch.randn(num_pages, page_size, Hkv, D)
        if scale is not None:
            x = x / scale
        for b, L in enumerate(ctx_lens):
            if n_used[b] and L % page_size:
                x[table[b, n_used[b] - 1], L % page_size:] = NAN
        for p in spare:
            x[p] = NAN
        return x.to(cache_dtype)

    kv = [cache_values(k_scale), cache_values(v_scale)]
    if layout == "nhd":
        k_cache, v_cache = [x.to(device) for x in kv]
    elif layout == "hnd":
        caches = []
        for x in kv:
            base = torch.empty(num_pages, Hkv, page_size, D, dtype=cache_dtype, device=device)
            base.copy_(x.permute(0, 2, 1, 3))
            caches.append(base.permute(0, 2, 1, 3))
        k_cache, v_cache = caches
    elif layout == "combined":
        base = torch.stack(kv).to(device)
        k_cache, v_cache = base[0], base[1]
    else:
        raise AssertionError(layout)
    if fp8 and scale_kind == "tensor":
        k_scale = torch.tensor([k_scale], dtype=torch.float32, device=device)
        v_scale = torch.tensor([v_scale], dtype=torch.float32, device=device)

    q = torch.randn(B, S, Hq, D).to(dtype).to(device)
    kb = vb = None
    if block:
        kb = torch.randn(B, S, Hkv, D).to(dtype).to(device)
        vb = torch.randn(B, S, Hkv, D).to(dtype).to(device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table.to(device),
                context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                k_block=kb, v_block=vb, k_scale=k_scale, v_scale=v_scale)


def run_attention(case, backend, sm_scale=None, window=None, **kw):
    """The public op with garbage-prefilled ``out`` and ``lse_out``."""
    q = case["q"]
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:3], NAN, dtype=torch.float32, device=q.device)
    res = dflash_kernels.block_attention(
        q, case["k_cache"], case["v_cache"], case["block_table"], case["context_lens"],
        case["k_block"], case["v_block"], sm_scale=sm_scale, window=window,
        k_scale=case["k_scale"], v_scale=case["v_scale"], out=out, return_lse=True,
        lse_out=lse, backend=backend, **kw)
    assert res[0] is out and res[1] is lse
    return out, lse


def attention_lens(page, S, block):
    """Context lengths 0, 1, around one page and past two pages; each plus S when
    the block's keys are not passed as k_block / v_block."""
    base = [0, 1, page - 1, page + 1, 2 * page + 3]
    return base if block else [L + S for L in base]


# ---------------- verify_chain

def make_verify_case(B, S, V, *, dtype=torch.float32, sampled="mixed", top_k=False,
                     top_p=False, draft_probs=False, seq_lens=True, match_frac=0.7,
                     special_rows=False, gen_seed=0, device="cpu"):
    """Random verify_chain inputs as a kwargs dict (``logits``, ``block_tokens`` first).

    Drafts copy the greedy token of the previous row with probability
    ``match_frac`` (so greedy requests accept some), else random ids, some
    outside ``[0, V)``. ``num_drafts`` covers 0..S-1. ``special_rows`` puts
    NaN, all -inf, all NaN and tied rows in.
    """
    g = torch.Generator().manual_seed(gen_seed)
    logits = (torch.randn(B, S, V, generator=g) * 2.0).to(dtype).float()
    if special_rows:
        n = B * S
        flat = logits.view(n, V)
        flat[0 % n, ::7] = float("nan")
        flat[1 % n] = NEG_INF
        flat[2 % n] = float("nan")
        if V > 3:
            flat[3 % n, :] = -1.0
            flat[3 % n, [1, V - 2]] = 5.0                     # greedy tie -> index 1
            flat[4 % n, ::3] = NEG_INF
            flat[5 % n, 0] = NEG_INF
            flat[5 % n, V - 1] = 50.0
    greedy_tok = logits.nan_to_num(nan=NEG_INF).argmax(-1)
    bt = torch.randint(0, V, (B, S), generator=g)
    copy = torch.rand(B, S - 1, generator=g) < match_frac
    bt[:, 1:] = torch.where(copy, greedy_tok[:, :-1], bt[:, 1:])
    odd = torch.rand(B, S - 1, generator=g) < 0.05
    bt[:, 1:] = torch.where(odd, torch.tensor(V + 3), bt[:, 1:])
    if S > 1:
        bt[0, 1] = -5 if B * S > 1 else bt[0, 1]
    nd = torch.randint(0, S, (B,), generator=g, dtype=torch.int32)
    nd[0] = S - 1
    if B > 2:
        nd[1] = 0
    kw = dict(logits=logits.to(dtype).to(device), block_tokens=bt.to(device),
              num_drafts=nd.to(device))
    if sampled != "none":
        if sampled == "all":
            temp = 0.3 + 1.5 * torch.rand(B, generator=g)
        else:
            temp = torch.where(torch.rand(B, generator=g) < 0.35, torch.tensor(0.0),
                               0.3 + 1.5 * torch.rand(B, generator=g))
            temp[0] = 0.8
        kw["temperature"] = temp.to(device)
        kw["seeds"] = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g).to(device)
        kw["positions"] = torch.randint(0, 2 ** 34, (B,), generator=g).to(device)
        if top_k:
            k = torch.randint(1, min(V, 40) + 1, (B,), generator=g, dtype=torch.int32)
            k[torch.rand(B, generator=g) < 0.25] = 0
            kw["top_k"] = k.to(device)
        if top_p:
            p = 0.2 + 0.75 * torch.rand(B, generator=g)
            p[torch.rand(B, generator=g) < 0.25] = 1.0
            kw["top_p"] = p.to(device)
        if draft_probs and S > 1:
            q = torch.softmax(torch.randn(B, S - 1, V, generator=g) * 2, -1)
            q[q < 0.2 / V] = 0.0                               # zeros where p > 0
            kw["draft_probs"] = q.to(dtype).to(device)
    if seq_lens:
        kw["seq_lens"] = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32).to(device)
    return kw


def stress_sampler(V, g):
    """8 logit rows ``[8, V]`` (tied levels, NaN / -inf holes, all -inf) and their sampler
    kwargs (temperature, top_k, top_p) with top-k / top-p corner values: k = 1, V-1, the
    count of the tied maximum, off; top_p <= 0, tiny, ~1, off. Seeds and positions are
    the caller's."""
    levels = torch.randint(-4, 3, (V,), generator=g).float()
    holes = torch.randn(V, generator=g) * 2
    holes[::2] = NAN
    holes[1::5] = NEG_INF
    rows = torch.stack([levels, levels, levels, holes, levels, holes, torch.full((V,), NEG_INF),
                        levels])
    return rows, dict(temperature=torch.tensor([1.0, 0.7, 1.3, 1.0, 1.0, 0.9, 1.0, 1.0]),
                      top_k=torch.tensor([1, V - 1, int((levels == 2).sum()), 3, 0, 0, 5, V // 2],
                                         dtype=torch.int32),
                      top_p=torch.tensor([1.0, 0.99, 1.0, 0.8, 0.0, 1 - 1e-6, 0.5, -1.0]))


def layout_cases(layouts, modes, make, stress):
    """Vocab-parallel test cases ``(V, borders, kwargs)``: ``make(V, borders, mode, dtype, i)``
    for every layout x mode (dtype cycling fp32 / fp16 / bf16, ``i = 10 * layout + mode``),
    then ``stress(V, borders, layout)`` once per layout."""
    cases = []
    for li, (V, borders) in enumerate(layouts):
        for mi, mode in enumerate(modes):
            dtype = (torch.float32, torch.float16, torch.bfloat16)[(li + mi) % 3]
            cases.append((V, borders, make(V, borders, mode, dtype, 10 * li + mi)))
        cases.append((V, borders, stress(V, borders, li)))
    return cases


def pruning_rows(V, tile, gen_seed=0):
    """Adversarial sampled rows [7, V] (fp32, T = 1): flat (nothing pruned), peaked at the
    start (everything after the first ``tile`` pruned) and at the end (nothing pruned before
    it), NaN / -inf lanes, all -inf, tiles graded around the noise bound (~16.6), and a
    row whose winner lies past the first tile with logits only 3 above it (a bound below
    the noise's spread would prune it)."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(7, V, generator=g)
    x[0] = 1.0
    x[1, 3] = 40.0
    x[2, V - 1] = 40.0
    x[3, ::5] = float("nan")
    x[3, 1024:3000] = NEG_INF
    x[3, 100] = 30.0
    x[4] = NEG_INF
    b = tile
    x[5, :b] = 0.1 * x[5, :b]
    for t, d in enumerate([-10.0, -14.0, -16.5, -16.7, -17.0, -17.5, -20.0, -3.0]):
        x[5, (t + 1) * b:(t + 2) * b] = d + 1e-3 * x[5, (t + 1) * b:(t + 2) * b]
    x[6, :b] = 0.0
    x[6, b:] = 3.0
    return x


def run_verify(backend, kw):
    """Call the public op with outputs pre-filled with garbage."""
    B, S = kw["block_tokens"].shape
    dev = kw["block_tokens"].device
    out = (torch.full((B,), -777, dtype=torch.int32, device=dev),
           torch.full((B, S), -777, dtype=torch.int32, device=dev),
           torch.full((B,), -777, dtype=torch.int32, device=dev),
           torch.full((B,), -777, dtype=torch.int32, device=dev) if "seq_lens" in kw else None)
    kw = dict(kw)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    res = dflash_kernels.verify_chain(logits, bt, out=out, backend=backend, **kw)
    assert res.accept_len is out[0] and res.out_tokens is out[1] and res.bonus is out[2]
    return res


def assert_same_verify(a, b):
    """Two verify_chain results equal field by field (None where both lack one)."""
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert torch.equal(x.cpu(), y.cpu())


def softmax64(logits, T=1.0, top_k=0, top_p=1.0):
    """Target distribution of DESIGN.md computed in float64 from a 1-D logit row."""
    s = np.asarray(logits, dtype=np.float64) / T
    keep = np.ones(len(s), dtype=bool)
    if 0 < top_k < len(s):
        keep &= s >= np.sort(s)[::-1][top_k - 1]
    p = np.where(keep, np.exp(s - s[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.sort(p)[::-1]
        m = int(np.searchsorted(np.cumsum(order), top_p))
        keep &= p >= order[min(m, len(p) - 1)]
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def assert_fits(tokens, p, label=""):
    """Chi-square goodness of fit of int tokens against distribution p; zero-p tokens never drawn."""
    tokens = torch.as_tensor(tokens).cpu().long()
    V = len(p)
    counts = torch.bincount(tokens, minlength=V).numpy()
    assert counts.shape[0] == V, f"{label}: token out of range"
    n = counts.sum()
    assert n > 500
    zero = p == 0
    assert counts[zero].sum() == 0, f"{label}: drew tokens of probability 0: {counts}"
    expected = p[~zero] * n
    if expected.size == 1:
        return                                  # one possible token, checked above
    res = stats.chisquare(counts[~zero], expected)
    assert res.pvalue > P_MIN, f"{label}: p-value {res.pvalue:.2e}, counts {counts}, expected {p * n}"


def keyed_batch(logit_rows, N, T, *, top_k=0, top_p=1.0, device="cpu", seed0=0):
    """N requests sharing the same logit rows, each with its own (seed, position)."""
    S, V = logit_rows.shape
    g = torch.Generator().manual_seed(seed0)
    kw = dict(logits=logit_rows.expand(N, S, V).to(device),
              block_tokens=torch.zeros(N, S, dtype=torch.int64, device=device),
              temperature=torch.full((N,), T, device=device),
              seeds=(torch.arange(N, dtype=torch.int64) * 7919 + seed0).to(device),
              positions=torch.randint(0, 2 ** 40, (N,), generator=g).to(device))
    if top_k:
        kw["top_k"] = torch.full((N,), top_k, dtype=torch.int32, device=device)
    if top_p < 1:
        kw["top_p"] = torch.full((N,), top_p, device=device)
    return kw


def draft_case(N, q_kind, *, dtype=torch.float32, device="cpu", V=8, top_k=5):
    """S = 3 requests with fixed logit rows, drafts drawn from q, and the target p rows."""
    rows = torch.tensor([[0.3, 1.2, -0.4, 0.8, 2.0, -1.0, 0.1, 0.5],
                         [1.5, -0.2, 0.4, 0.0, 0.9, 1.1, -0.8, 0.2]])[:, :V]
    T = 0.8
    p = [softmax64(r.numpy(), T, top_k) for r in rows]
    if q_kind == "mismatch":
        # q puts mass where p is 0 (outside top-k) and none on some p > 0 tokens.
        q = torch.tensor([[0.3, 0.0, 0.1, 0.0, 0.2, 0.25, 0.15, 0.0],
                          [0.0, 0.2, 0.2, 0.3, 0.0, 0.0, 0.3, 0.0]])
    elif q_kind == "equal":
        q = torch.tensor(np.stack(p), dtype=torch.float32)
    elif q_kind == "onehot":
        q = torch.zeros(2, V)
        q[0, 1] = 1.0
        q[1, 5] = 1.0
    else:
        q = torch.softmax(torch.tensor([[0.0, 1.0, 0.5, -1.0, 0.2, 0.0, 1.5, -0.3],
                                        [1.0, 0.0, -0.5, 0.3, 0.6, -1.0, 0.0, 0.4]]), -1)
    q = q.to(dtype)
    g = torch.Generator().manual_seed(3)
    drafts = torch.stack([torch.multinomial(q[i].float(), N, replacement=True, generator=g)
                          for i in range(2)], 1)
    kw = keyed_batch(torch.cat([rows, rows[:1]]), N, T, top_k=top_k, device=device, seed0=17)
    kw["block_tokens"] = torch.cat([torch.zeros(N, 1, dtype=torch.int64), drafts], 1).to(device)
    kw["draft_probs"] = q.expand(N, 2, V).to(device)
    return kw, p


# ---------------- compile checks (no GPU)

MMA = {90: "wgmma.mma_async", 100: "tcgen05.mma"}


def assert_compiles_to_tensor_cores(module, spec, arch):
    """Compile ``spec`` (a backend's ``compile_spec()``) of ``module`` for
    ``sm_{arch}`` with the 16-divisibility Triton's launcher gives aligned
    arguments at run time (without it the report describes unvectorized,
    unpipelined code that never runs); assert tensor-core MMAs, a pipelined K
    loop, no spills and shared memory within 227 KB. Returns the report."""
    from microbench.compile import compile_report

    rep = compile_report(module, spec["kernel"], spec["signature"], spec["constexprs"], arch,
                         num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                         divisibility={n: 16 for n in spec["divisible_by_16"]})
    assert MMA[arch] in rep["ptx"]
    assert "cp.async" in rep["ptx"], "the K loop is not pipelined"
    assert rep["spills"] == 0, rep
    assert rep["shared"] <= 227 * 1024
    return rep


# ---------------- verify_chain: edge values (docs/DESIGN.md, "Edge values")

INF = float("inf")


def edge_verify_case(*, top_k=False, top_p=False, draft_probs=False, device="cpu"):
    """One request per edge rule, V = 8, S = 3, as make_verify_case's kwargs.

    Temperatures +inf (rows with -inf ids), 1e-40 (greedy: the T -> 0 limit),
    just above / below SAMPLING_EPS, NaN and 0.9; rows with +inf logits (at ids
    3 and 6) greedy, sampled and at T = +inf; huge finite logits whose scaled
    value overflows. Drafts copy the greedy token of the previous row for most
    requests, and include -1 and V; draft_probs close to p in some requests.
    """
    V, S = 8, 3
    g = torch.Generator().manual_seed(14)
    temps = [INF, 1e-40, 1e-5, 9.99e-6, NAN, 0.9, 1.0, INF, 0.0, 0.5, 0.9, INF]
    B = len(temps)
    logits = torch.randn(B, S, V, generator=g) * 2
    logits[0, :, 0] = NEG_INF                                  # T = inf: uniform over ids 1..7
    logits[0, 1, 4] = NAN
    logits[1, :] = torch.tensor([0.0, 1, 5, 2, -1, 0, 0, 0])   # T = 1e-40: greedy id 2
    for b in (6, 7, 8, 10):                                    # +inf at ids 3 and 6
        logits[b, :, 3] = INF
        logits[b, :, 6] = INF
    logits[9, :, 2] = 3e38                                     # 3e38 / 0.5 overflows to +inf
    logits[9, :, 5] = 3.1e38
    logits[11, :, 1:] = NEG_INF                                # T = inf, one finite id
    greedy = logits.nan_to_num(nan=NEG_INF).argmax(-1)
    bt = torch.randint(0, V, (B, S), generator=g)
    bt[:, 1:] = greedy[:, :-1]
    bt[2, 1], bt[5, 1], bt[10, 2] = -1, V, -1
    kw = dict(logits=logits.to(device), block_tokens=bt.to(device),
              num_drafts=torch.full((B,), S - 1, dtype=torch.int32, device=device),
              temperature=torch.tensor(temps, dtype=torch.float32, device=device),
              seeds=torch.arange(B, dtype=torch.int64, device=device) * 7919,
              positions=torch.arange(B, dtype=torch.int64, device=device) * 3)
    if top_k:
        kw["top_k"] = torch.tensor([3, 0, 2] * (B // 3), dtype=torch.int32, device=device)
    if top_p:
        kw["top_p"] = torch.tensor([0.5, 1.0, 0.9, 0.3] * (B // 4), device=device)
    if draft_probs:
        q = torch.softmax(torch.randn(B, S - 1, V, generator=g), -1)
        near = torch.softmax(logits[:, :-1].nan_to_num(nan=NEG_INF).clamp(-1e30, 1e30), -1)
        q[::2] = near[::2]                                     # q ~ p: residual is rounding noise
        kw["draft_probs"] = q.to(device)
    return kw


def draft_repro(n=8, device="cpu"):
    """Issue 14's repro: a placeholder draft -1 with q = softmax of row 0 (~ p).
    ``n`` requests; L from seed 0 for the first 8 (one fixed row past 8)."""
    V = 16
    torch.manual_seed(0)
    L = torch.randn(min(n, 8), 2, V)
    if n > 8:
        L = L[:1].expand(n, 2, V).clone()
    q = torch.softmax(L[:, :1], -1)
    return dict(logits=L.to(device), block_tokens=torch.tensor([[0, -1]] * n, device=device),
                num_drafts=torch.ones(n, dtype=torch.int32, device=device),
                temperature=torch.ones(n, device=device),
                seeds=torch.arange(n, dtype=torch.int64, device=device),
                positions=torch.zeros(n, dtype=torch.int64, device=device),
                draft_probs=q.to(device))


# ---------------- KV caches: edge values (docs/DESIGN.md, "Edge values")

def kv_edge_inputs(N, num_slots, max_pos, device, seed=14):
    """``(slots, positions, clean_slots, clean_positions)``, N >= 10.

    ``slots``: distinct valid slots except one at num_slots, one at 2**40, one
    at -2**40 and duplicates (tokens 5 and N-2 share a slot, tokens 6, 7 and
    N-1 another); ``positions`` include -1, max_pos, +-2**40. The clean pair is
    what the rules make of them: skipped / losing tokens at -1, positions
    clamped; a backend must write exactly what it writes for the clean pair.
    """
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:N].to(torch.int64)
    slots[1], slots[2], slots[3] = num_slots, 2 ** 40, -2 ** 40
    slots[5] = slots[N - 2]
    slots[6] = slots[7] = slots[N - 1]
    pos = torch.randint(0, max_pos, (N,), generator=g)
    pos[0], pos[4], pos[N - 1], pos[N - 2] = -1, max_pos, 2 ** 40, -2 ** 40
    clean = slots.clone()
    clean[[1, 2, 3, 5, 6, 7]] = -1
    return slots.to(device), pos.to(device), clean.to(device), pos.clamp(0, max_pos - 1).to(device)


def assert_kv_edge_rules(write, device, *, N=12, L=2, P=3, page=8, Hkv=2, D=64, max_pos=40,
                         cache_dtype=torch.float16):
    """``write(slots, positions, k_cache, v_cache)`` with the poisoned slots and
    positions of :func:`kv_edge_inputs` stores exactly what it stores with the
    clean ones, into sentinel-filled stacked caches, and nothing else."""
    slots, pos, clean, cpos = kv_edge_inputs(N, P * page, max_pos, device)
    caches = []
    for s, p in ((slots, pos), (clean, cpos)):
        torch.manual_seed(0)
        kc, vc, _, _ = make_caches("stacked", L, P, page, Hkv, D, cache_dtype, device)
        write(s, p, kc, vc)
        caches.append((kc, vc))
    for got, want in zip(caches[0], caches[1]):
        iv = INT_VIEW[got.element_size()]
        assert torch.equal(got.view(iv), want.view(iv))
    # The winners' rows were written (not left at the sentinel).
    torch.manual_seed(0)
    kc0, _, _, _ = make_caches("stacked", L, P, page, Hkv, D, cache_dtype, device)
    for t in (N - 2, N - 1):
        s = int(clean[t])
        iv = INT_VIEW[kc0.element_size()]
        assert not torch.equal(caches[0][0][:, s // page, s % page].view(iv),
                               kc0[:, s // page, s % page].view(iv))


# ---------------- block_attention: edge values (docs/DESIGN.md, "Edge values")

def window_cases(*, window=6, S=4, page=4, ctx_lens=(0, 3, 13, 22), block=True, dtype=torch.float16,
                 device="cpu"):
    """``(clean, freed, nan_kv, seen_by)`` for a sliding window.

    ``freed``: ``clean`` with every page that holds no key inside any query
    row's window freed: its table entry -1 or garbage, its data NaN.
    ``nan_kv``: ``clean`` with K and V NaN at the oldest key of each request
    that row 0 sees (rows >= 1 do not see it); ``seen_by[b]``: the rows that
    see it (a list; empty for requests without such a key).
    """
    torch.manual_seed(7)
    clean = make_attention_case(S=S, Hq=4, Hkv=2, D=64, page_size=page, ctx_lens=ctx_lens,
                                block=block, dtype=dtype, device=device)
    kc, vc, bt = clean["k_cache"], clean["v_cache"], clean["block_table"]
    freed = dict(clean, k_cache=kc.clone(), v_cache=vc.clone(), block_table=bt.clone())
    nan_kv = dict(clean, k_cache=kc.clone(), v_cache=vc.clone())
    garbage = [-1, 2 ** 31 - 1, -7, kc.shape[0] + 5]
    seen_by = []
    for b, L in enumerate(ctx_lens):
        q0 = L if block else L - S                    # position of query row 0
        oldest = max(q0 - window + 1, 0)               # the oldest key any row sees
        for j in range(_cdiv(L, page)):
            if (j + 1) * page <= oldest:               # every key of page j is behind the window
                pg = int(bt[b, j])
                freed["k_cache"][pg] = NAN
                freed["v_cache"][pg] = NAN
                freed["block_table"][b, j] = garbage[(b + j) % len(garbage)]
        if 0 < q0 - window + 1 < L:                    # a context key only row 0 sees
            t = q0 - window + 1
            pg, r = int(bt[b, t // page]), t % page
            nan_kv["k_cache"][pg, r] = NAN
            nan_kv["v_cache"][pg, r] = NAN
            seen_by.append([0])
        else:
            seen_by.append([])
    return clean, freed, nan_kv, seen_by


def kv_edge_writer(op, backend, device):
    """``write(slots, positions, k_cache, v_cache)`` for :func:`assert_kv_edge_rules`:
    the public ``op`` ("inject_kv" or "write_kv") on fixed random inputs (N = 12)."""
    cos_sin = make_cos_sin(40, 64, device)
    if op == "write_kv":
        k, v = torch.randn(2, 12, 2, 2, 64, device=device).to(torch.float16)
        return lambda s, p, kc, vc: dflash_kernels.write_kv(k, v, None, p, s, kc, vc, cos_sin,
                                                            backend=backend)
    hidden = torch.randn(12, 32, device=device).to(torch.float16)
    w = (torch.randn(2, 2, 2 * 64, 32, device=device) / 6).to(torch.float16)
    return lambda s, p, kc, vc: dflash_kernels.inject_kv(hidden, w, None, p, s, kc, vc, cos_sin,
                                                         backend=backend)


def probs64(s32, keep):
    """float64 softmax of fp32 scores over ``keep`` (zeros without a finite kept score):
    the independent truth of the verify tests."""
    s = np.where(keep, s32.astype(np.float64), -np.inf)
    m = s.max()
    if not np.isfinite(m):
        return np.zeros_like(s)
    e = np.exp(s - m)
    return e / e.sum()


def op_log():
    """A TorchDispatchMode that records the ops dispatched inside it (``.ops``, as strings)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return OpLog()
