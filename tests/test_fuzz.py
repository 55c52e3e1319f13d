"""Seeded, bounded fuzz of every public op (issue 14).

Two parts, each case ending in a clear ValueError before any launch, or a
correct result:

- malformed calls: a valid tiny call with one argument broken (rank, dtype,
  device meta, strides, shape, a non-tensor, an extreme or non-finite scalar,
  a bad ``out=`` buffer, aliasing between a written and another tensor). A
  ValueError must name the broken argument and leave every output and cache
  bit-identical (nothing launched); an accepted call must match the reference.
- poisoned values: block tables, slots, positions and token ids out of range,
  duplicate slots, NaN and inf rows, fp8 NaN bytes in unused pages; every
  tensor is a view in the middle of a larger allocation filled with random
  bytes whose margins are checked untouched. Triton (interpreter) must match
  the reference, give the same bits when called twice, never write a cache
  row that no winning slot names, and store every winner's row.

Fixed seeds and tiny shapes: 40 s of CPU, 30-90 s wall for this file on this
project's shared 2-core machine (measured: ``time pytest tests/test_fuzz.py``). Inputs are
built on the CPU with fixed seeds and moved to the test device (a GPU where
there is one: microbench/gpu_check.sh runs this file under compute-sanitizer).
"""

import math
import random

import pytest
import torch

import dflash_kernels as dk
from dflash_kernels.reference._common import written_rows
from conftest import DEVICE
from helpers import make_cos_sin

F16, BF16, F32, E4M3 = torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn
I32, I64 = torch.int32, torch.int64
NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "triton")
N_MALFORMED = 150         # broken calls per op
N_POISONED = 12           # poisoned calls per op (each runs reference + Triton twice)
BAD_SCALARS = [NAN, INF, -INF, -1.0, 0.0, 1e39, 2 ** 1100, 1e-50, 2 ** 63, -(2 ** 63)]


# --------------------------------------------------------------- arena

class Arena:
    """Tensors as views in the middle of random-byte allocations, margins checked."""

    def __init__(self, gen):
        self.gen, self.bufs = gen, []

    def put(self, t):
        if t is None:
            return None
        n = t.numel()
        lo = int(torch.randint(1, 40, (1,), generator=self.gen))
        hi = int(torch.randint(1, 40, (1,), generator=self.gen))
        buf = torch.empty(lo + n + hi, dtype=t.dtype)
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=self.gen))
        buf = buf.to(DEVICE)
        view = buf[lo:lo + n].view(t.shape)
        view.copy_(t)
        self.bufs.append((buf, lo, n, buf.clone()))
        return view

    def _random(self, shape, dtype):
        """A random-byte tensor (NaN and inf patterns included) in the arena."""
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            raw = t.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=self.gen))
        return self.put(t)

    def check_margins(self):
        for buf, lo, n, before in self.bufs:
            a, b = buf.view(torch.uint8), before.view(torch.uint8)
            e = buf.element_size()
            assert torch.equal(a[:lo * e], b[:lo * e]), "write before a tensor"
            assert torch.equal(a[(lo + n) * e:], b[(lo + n) * e:]), "write past a tensor"


def to_dev(x):
    """Tensors (also inside lists and tuples) on the test device; views of the
    arena's device buffers stay themselves."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, (list, tuple)):
        return type(x)(to_dev(v) for v in x)
    return x


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


# --------------------------------------------------------------- valid tiny calls

def attention_call(rng, arena=None, poison=False, fp8=False):
    put = arena.put if arena else (lambda t: t)
    B, S, Hq, Hkv, D, page, cols = rng.choice([1, 2, 3]), rng.choice([1, 3]), 2, 1, 64, 4, 4
    num_pages = B * cols + 1
    lens = [rng.randrange(0, cols * page + 1) for _ in range(B)]
    perm = torch.randperm(num_pages).tolist()
    table = torch.empty(B, cols, dtype=I32)
    garbage = [-1, 2 ** 31 - 1, num_pages, -(2 ** 31)]
    for b in range(B):
        for j in range(cols):
            used = j * page < lens[b]
            table[b, j] = perm[b * cols + j] if used or not poison else rng.choice(garbage)
    cdt = E4M3 if fp8 else F16
    kc, vc = (torch.randn(num_pages, page, Hkv, D) for _ in range(2))
    if poison:                                   # NaN in every unused row and page
        used = torch.zeros(num_pages, page, dtype=torch.bool)
        for b in range(B):
            for t in range(lens[b]):
                used[table[b, t // page], t % page] = True
        kc[~used], vc[~used] = NAN, NAN
        # NaN in used V rows too: each reaches only the rows that see its key (a +-inf
        # seen whole gives +-inf in Triton, NaN in the reference: docs/block_attention.md).
        for _ in range(rng.choice([0, 2, 5])):
            b = rng.randrange(B)
            if lens[b]:
                t = rng.randrange(lens[b])
                vc[table[b, t // page], t % page, rng.randrange(Hkv), rng.randrange(D)] = NAN
    kc, vc = kc.to(cdt), vc.to(cdt)
    if fp8 and poison:                           # NaN bytes (0x7F, 0xFF) in unused slots
        for c in (kc, vc):
            c.view(torch.uint8)[~used] = rng.choice([0x7F, 0xFF])
    a = dict(q=put(torch.randn(B, S, Hq, D).to(F16)), k_cache=put(kc), v_cache=put(vc),
             block_table=put(table), context_lens=put(torch.tensor(lens, dtype=I32)))
    if rng.random() < 0.6:
        a.update(k_block=put(torch.randn(B, S, Hkv, D).to(F16)),
                 v_block=put(torch.randn(B, S, Hkv, D).to(F16)))
    a["window"] = rng.choice([None, 1, 2, 5, 2 ** 40])
    if fp8:
        a.update(k_scale=0.5, v_scale=torch.tensor([0.25]))
    a["out"] = arena._random((B, S, Hq, D), F16) if arena else torch.full((B, S, Hq, D), NAN).to(F16)
    a["lse_out"] = arena._random((B, S, Hq), F32) if arena else torch.full((B, S, Hq), NAN)
    a["return_lse"] = True
    return a, ("out", "lse_out")


def fuse_call(rng, arena=None, poison=False):
    put = arena.put if arena else (lambda t: t)
    N, H = rng.choice([1, 3, 5]), 64
    widths = rng.choice([[64], [32, 96], [64, 64, 64]])
    feats = [torch.randn(N, w).to(F16) for w in widths]
    if poison and N > 1:
        feats[0][1, 3] = rng.choice([NAN, INF])         # a NaN / inf row stays in its row
    a = dict(features=[put(f) for f in feats] if len(feats) > 1 else put(feats[0]),
             fc_weight=put((torch.randn(H, sum(widths)) / 8).to(F16)),
             norm_weight=put(torch.randn(H).to(F16)), eps=1e-6)
    a["out"] = arena._random((N, H), F16) if arena else torch.full((N, H), NAN).to(F16)
    return a, ("out",)


def _kv_common(rng, arena, poison, N, L=2, Hkv=2, D=64, page=4, P=3, fp8=False):
    put = arena.put if arena else (lambda t: t)
    num_slots, max_pos = P * page, 20
    slots = torch.randperm(num_slots)[:N].to(I64)
    pos = torch.randint(0, max_pos, (N,))
    if poison:
        for t in range(N):
            r = rng.random()
            if r < 0.15:
                slots[t] = rng.choice([-1, -(2 ** 40), num_slots, num_slots + 3, 2 ** 40])
            elif r < 0.35 and N > 1:
                slots[t] = slots[rng.randrange(N)]      # a duplicate
            if rng.random() < 0.3:
                pos[t] = rng.choice([-1, max_pos, 2 ** 40, -(2 ** 40)])
    cdt = E4M3 if fp8 else F16
    shape = (L, P, page, Hkv, D)
    cache = (lambda: arena._random(shape, cdt)) if arena else (lambda: torch.zeros(shape, dtype=cdt))
    knw = put((1 + 0.1 * torch.randn(L, D)).to(F16)) if rng.random() < 0.5 else None
    a = dict(k_norm_weight=knw, positions=put(pos), slot_mapping=put(slots),
             k_cache=cache(), v_cache=cache(),
             cos_sin_cache=put(make_cos_sin(max_pos, D, "cpu")),
             rope_style=rng.choice(["neox", "gptj"]))
    if fp8:
        a.update(k_scale=0.05, v_scale=torch.tensor([0.04]))
    return a


def inject_call(rng, arena=None, poison=False, fp8=False):
    put = arena.put if arena else (lambda t: t)
    N, L, Hkv, D, H = rng.choice([1, 5, 12]), 2, 2, 64, 32
    a = _kv_common(rng, arena, poison, N, L, Hkv, D, fp8=fp8)
    a.update(hidden=put(torch.randn(N, H).to(F16)),
             kv_weight=put((torch.randn(L, 2, Hkv * D, H) / 6).to(F16)))
    if rng.random() < 0.5:
        a["kv_bias"] = put(torch.randn(L, 2, Hkv * D).to(F16))
    return a, ("k_cache", "v_cache")


def write_call(rng, arena=None, poison=False, fp8=False):
    put = arena.put if arena else (lambda t: t)
    N, L, Hkv, D = rng.choice([1, 5, 12]), 2, 2, 64
    a = _kv_common(rng, arena, poison, N, L, Hkv, D, fp8=fp8)
    a.update(k=put(torch.randn(N, L, Hkv, D).to(F16)), v=put(torch.randn(N, L, Hkv, D).to(F16)))
    return a, ("k_cache", "v_cache")


def verify_call(rng, arena=None, poison=False):
    put = arena.put if arena else (lambda t: t)
    B, S, V = rng.choice([1, 3, 5]), rng.choice([1, 2, 4]), rng.choice([7, 33, 1100])
    logits = torch.randn(B, S, V) * 3
    bt = torch.randint(0, V, (B, S))
    if poison:
        flat = logits.view(B * S, V)
        for r in range(B * S):
            kind = rng.random()
            if kind < 0.1:
                flat[r] = NAN
            elif kind < 0.2:
                flat[r] = -INF
            elif kind < 0.3:
                flat[r, rng.randrange(V)] = INF
            elif kind < 0.4:
                flat[r, ::2] = NAN
        bt.view(-1)[torch.rand(B * S) < 0.2] = rng.choice([-1, V, 2 ** 31 - 1, -(2 ** 31)])
    greedy = logits.nan_to_num(nan=-INF).argmax(-1)
    if S > 1:
        copy = torch.rand(B, S - 1) < 0.6
        bt[:, 1:] = torch.where(copy, greedy[:, :-1], bt[:, 1:])
    a = dict(logits=put(logits), block_tokens=put(bt.to(rng.choice([I32, I64]))),
             num_drafts=put(torch.randint(-2, S + 2, (B,), dtype=I32)))
    if rng.random() < 0.7:
        temps = [INF, 1e-40, 1e-5, 9.9e-6, NAN, 0.0, -1.0, 0.7, 1.3]
        a.update(temperature=put(torch.tensor([rng.choice(temps) for _ in range(B)])),
                 seeds=put(torch.randint(-2 ** 62, 2 ** 62, (B,))),
                 positions=put(torch.randint(0, 2 ** 40, (B,))))
        if rng.random() < 0.4:
            a["top_k"] = put(torch.tensor([rng.choice([-1, 0, 1, 3, V, V + 5]) for _ in range(B)],
                                          dtype=I32))
        if rng.random() < 0.4:
            a["top_p"] = put(torch.tensor([rng.choice([NAN, -0.5, 0.0, 0.3, 0.9, 1.0, 2.0])
                                           for _ in range(B)]))
        if rng.random() < 0.5 and S > 1:
            q = torch.softmax(torch.randn(B, S - 1, V), -1)
            if poison:
                q.view(-1)[torch.rand(q.numel()) < 0.05] = rng.choice([NAN, INF, -1.0])
            a["draft_probs"] = put(q)
    if rng.random() < 0.5:
        a["seq_lens"] = put(torch.randint(0, 1000, (B,), dtype=I32))
    outs = (arena._random((B,), I32) if arena else torch.full((B,), -7, dtype=I32),
            arena._random((B, S), I32) if arena else torch.full((B, S), -7, dtype=I32),
            arena._random((B,), I32) if arena else torch.full((B,), -7, dtype=I32),
            (arena._random((B,), I32) if arena else torch.full((B,), -7, dtype=I32))
            if "seq_lens" in a else None)
    a["out"] = outs
    return a, ("out",)


OPS = {"block_attention": (dk.block_attention, attention_call),
       "fuse_target_features": (dk.fuse_target_features, fuse_call),
       "inject_kv": (dk.inject_kv, inject_call),
       "write_kv": (dk.write_kv, write_call),
       "verify_chain": (dk.verify_chain, verify_call)}
POSITIONAL = {"block_attention": ("q", "k_cache", "v_cache", "block_table", "context_lens"),
              "fuse_target_features": ("features", "fc_weight", "norm_weight"),
              "inject_kv": ("hidden", "kv_weight", "k_norm_weight", "positions", "slot_mapping",
                            "k_cache", "v_cache", "cos_sin_cache"),
              "write_kv": ("k", "v", "k_norm_weight", "positions", "slot_mapping", "k_cache",
                           "v_cache", "cos_sin_cache"),
              "verify_chain": ("logits", "block_tokens")}
SCALARS = {"block_attention": ("sm_scale", "window", "k_scale"), "fuse_target_features": ("eps",),
           "inject_kv": ("eps", "rotary_dim"), "write_kv": ("eps", "rotary_dim"), "verify_chain": ()}


def call(op, a, backend):
    fn = OPS[op][0]
    a = dict(a)
    pos = [a.pop(n) for n in POSITIONAL[op]]
    return fn(*pos, **a, backend=backend)


def written(a, outs):
    """The tensors an op may write (flattened from ``out`` tuples)."""
    res = []
    for name in outs:
        v = a.get(name)
        for t in (v if isinstance(v, (tuple, list)) else [v]):
            if isinstance(t, torch.Tensor):
                res.append(t)
    return res


# --------------------------------------------------------------- malformed calls

DTYPES = [F16, BF16, F32, torch.float64, I32, I64, torch.uint8, E4M3, torch.bool]


def break_tensor(rng, t):
    """(what, broken tensor or non-tensor)."""
    kinds = ["rank_down", "rank_up", "dtype", "meta", "stride", "shape", "not_tensor"]
    kind = rng.choice(kinds)
    if kind == "rank_down" and t.dim() > 0:
        return kind, t[0]
    if kind == "rank_up":
        return kind, t.unsqueeze(0)
    if kind == "dtype":
        return kind, t.to(rng.choice([d for d in DTYPES if d != t.dtype]))
    if kind == "meta":
        return kind, t.to("meta")
    if kind == "stride" and t.dim() >= 1 and t.shape[-1] > 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return kind, wide[..., ::2]
    if kind == "shape" and t.dim() >= 1:
        d = rng.randrange(t.dim())
        return kind, torch.cat([t, t.narrow(d, 0, 1)], d) if t.shape[d] > 0 else t.unsqueeze(d)
    return "not_tensor", [1.0, 2.0]


def malformed_case(op, rng):
    """(args, outputs, broken argument names, what)."""
    a, outs = OPS[op][1](rng)
    a = {k: to_dev(v) for k, v in a.items()}
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    choice = rng.random()
    if choice < 0.2 and SCALARS[op]:
        name = rng.choice(SCALARS[op])
        if name == "k_scale" and "k_scale" not in a:
            name = "sm_scale"
        bad = rng.choice(BAD_SCALARS + ([2 ** 63, 2 ** 31, -5, 65, 63] if name == "rotary_dim" else []))
        if name in ("window", "rotary_dim"):
            bad = bad if isinstance(bad, int) else rng.choice([-1, 2 ** 63, -(2 ** 63), 3])
        a[name] = bad
        return a, outs, (name,), f"{name}={bad!r}"
    if choice < 0.35:                                # aliasing: an output shares memory
        outs_t = [n for n in outs if isinstance(a.get(n), torch.Tensor)]
        if op in ("inject_kv", "write_kv"):
            a["v_cache"] = a["k_cache"]
            return a, outs, ("k_cache", "v_cache"), "k_cache is v_cache"
        if op == "verify_chain":
            o = list(a["out"])
            o[2] = o[0]
            a["out"] = tuple(o)
            return a, outs, ("accept_len", "bonus", "out"), "bonus is accept_len"
        name = outs_t[0]
        src = rng.choice([k for k in tensors if k not in outs and a[k].dtype == a[name].dtype
                          and a[k].numel() >= a[name].numel()] or [name])
        if src == name:
            a[name] = a[name].expand(2, *a[name].shape)[0]
            return a, outs, (name,), "no alias"
        a[name] = a[src].reshape(-1)[:a[name].numel()].view(a[name].shape)
        return a, outs, (name, src), f"{name} aliases {src}"
    if op == "verify_chain" and choice < 0.5:
        o = list(a["out"])
        i = rng.randrange(3)
        what, o[i] = break_tensor(rng, o[i])
        a["out"] = tuple(o)
        return a, outs, ("accept_len", "out_tokens", "bonus", "out"), f"out[{i}] {what}"
    if op == "fuse_target_features" and isinstance(a["features"], list) and choice < 0.5:
        i = rng.randrange(len(a["features"]))
        what, a["features"][i] = break_tensor(rng, a["features"][i])
        return a, outs, ("features",), f"features[{i}] {what}"
    name = rng.choice(tensors)
    what, a[name] = break_tensor(rng, a[name])
    return a, outs, (name,), f"{name} {what}"


@pytest.mark.parametrize("op", list(OPS))
def test_malformed_calls(op):
    rng = random.Random(f"malformed-{op}")
    torch.manual_seed(hash(op) % 1000)
    problems, refused = [], 0
    for i in range(N_MALFORMED):
        a, outs, names, what = malformed_case(op, rng)
        backend = rng.choice(BACKENDS)
        before = [bits(t) for t in written(a, outs) if t.device.type != "meta"]
        try:
            call(op, a, backend)
        except ValueError as e:
            refused += 1
            msg = str(e)
            # Shapes, dtypes and devices are relations between arguments: a broken one
            # may be reported as the other side's mismatch, named in the message.
            relational = what.split()[-1] in ("shape", "dtype", "meta")
            named = any(n in msg for n in (set(a) | set(POSITIONAL[op]) if relational else names))
            if not named:
                problems.append(f"{what} [{backend}]: ValueError not naming {names}: {msg}")
            after = [bits(t) for t in written(a, outs) if t.device.type != "meta"]
            if not all(torch.equal(x, y) for x, y in zip(before, after)):
                problems.append(f"{what} [{backend}]: outputs changed before the ValueError")
            continue
        except Exception as e:  # noqa: BLE001 - any other type is the finding
            problems.append(f"{what} [{backend}]: {type(e).__name__}: {e}")
            continue
        # Accepted: a correct result, i.e. what the reference computes on the same call.
        if backend != "reference" and not any(t.device.type == "meta" for t in written(a, outs)):
            got = [t.clone() for t in written(a, outs)]
            call(op, a, "reference")
            for g, w in zip(got, written(a, outs)):
                if g.dtype.is_floating_point:
                    ok = torch.allclose(g.float(), w.float(), atol=3e-2, rtol=3e-2, equal_nan=True)
                else:
                    ok = torch.equal(g, w)
                if not ok:
                    problems.append(f"{what} [{backend}]: accepted, differs from the reference")
    assert not problems, "\n".join(problems)
    assert N_MALFORMED // 2 < refused < N_MALFORMED      # the mix breaks calls, not all of them


# --------------------------------------------------------------- poisoned values

def _compare(op, got, want, a):
    for g, w in zip(got, want):
        if op in ("inject_kv", "write_kv"):
            assert torch.allclose(g.float(), w.float(), atol=6e-2, rtol=0.13, equal_nan=True)
        elif g.dtype.is_floating_point:
            assert torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2, equal_nan=True)
        else:
            assert torch.equal(g, w)


def _kv_rows_rule(a, before, after):
    """Rows no winning slot names keep their bits; every winner's row is written."""
    slots = a["slot_mapping"]
    kc = a["k_cache"]
    L, P, page = kc.shape[:3]
    win = written_rows(slots, P * page)
    hit = torch.zeros(P * page, dtype=torch.bool, device=slots.device)
    hit[slots[win]] = True
    for b, c in zip(before, after):
        b = b.view(L, P * page, -1)
        c = c.view(L, P * page, -1)
        assert torch.equal(b[:, ~hit], c[:, ~hit]), "a row no winning slot names was written"


@pytest.mark.parametrize("op, variant", [("block_attention", {}), ("block_attention", dict(fp8=True)),
                                         ("fuse_target_features", {}), ("inject_kv", {}),
                                         ("inject_kv", dict(fp8=True)), ("write_kv", {}),
                                         ("verify_chain", {})])
def test_poisoned_values(op, variant):
    rng = random.Random(f"poison-{op}-{sorted(variant)}")
    for i in range(N_POISONED):
        state = rng.getstate()
        runs = []
        for backend in ("reference", "triton", "triton"):
            rng.setstate(state)
            torch.manual_seed(100 + i)
            arena = Arena(torch.Generator().manual_seed(1000 + i))
            a, outs = OPS[op][1](rng, arena, poison=True, **variant)
            a = {k: to_dev(v) for k, v in a.items()}
            before = [bits(t) for t in written(a, outs)]
            call(op, a, backend)
            arena.check_margins()
            after = [bits(t) for t in written(a, outs)]
            if op in ("inject_kv", "write_kv"):
                _kv_rows_rule(a, before, after)
            runs.append(([t.clone() for t in written(a, outs)], after, before, a))
        (ref, _, ref_before, a), (tri, tri_bits, tri_before, _), (_, tri_bits2, _, _) = runs
        # Same random inputs (and sentinels) in every run; Triton is deterministic.
        assert all(torch.equal(x, y) for x, y in zip(ref_before, tri_before))
        assert all(torch.equal(x, y) for x, y in zip(tri_bits, tri_bits2)), "Triton not deterministic"
        _compare(op, tri, ref, a)


def test_empty_calls_write_nothing():
    # B = 0, N = 0: the public functions return before any launch, on every backend.
    with torch.device(DEVICE):  # factories make tensors on the test device
        for backend in BACKENDS:
            out = torch.full((0, 2, 2, 64), NAN, dtype=F16)
            dk.block_attention(torch.zeros(0, 2, 2, 64, dtype=F16), torch.zeros(3, 4, 1, 64, dtype=F16),
                               torch.zeros(3, 4, 1, 64, dtype=F16), torch.zeros(0, 2, dtype=I32),
                               torch.zeros(0, dtype=I32), out=out, backend=backend)
            res = dk.verify_chain(torch.randn(0, 4, 50), torch.zeros(0, 4, dtype=I64), backend=backend)
            assert res.bonus.shape == (0,)
            kc = torch.zeros(2, 3, 4, 2, 64, dtype=F16)
            dk.write_kv(torch.zeros(0, 2, 2, 64, dtype=F16), torch.zeros(0, 2, 2, 64, dtype=F16), None,
                        torch.zeros(0, dtype=I64), torch.zeros(0, dtype=I64), kc, kc.clone(),
                        make_cos_sin(8, 64, DEVICE), backend=backend)
            assert (kc == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_calls_with_empty_shapes(backend):
    # torch.ops.dflash.* bypasses the public early returns: B = 0, N = 0, H = 0,
    # K = 0 and num_pages = 0 must launch nothing harmful and write nothing.
    with torch.device(DEVICE):  # factories make tensors on the test device
        ops = torch.ops.dflash
        z32, z64 = torch.zeros(0, dtype=I32), torch.zeros(0, dtype=I64)
        for B, S, Hq, Hkv, P in ((0, 3, 2, 1, 3), (2, 3, 0, 0, 3), (2, 3, 2, 1, 0)):
            q = torch.randn(B, S, Hq, 64).to(F16)
            kc = torch.randn(P, 4, Hkv, 64).to(F16)
            out, lse = torch.full_like(q, NAN), torch.full((B, S, Hq), NAN)
            kb = torch.randn(B, S, Hkv, 64).to(F16)
            ops.block_attention(q, kc, kc.clone(), torch.full((B, 2), -1, dtype=I32),
                                torch.zeros(B, dtype=I32), kb, kb.clone(), 0.125, 0, None, None,
                                out, lse, False, None, backend)
            assert not out.isnan().any() and not lse.isnan().any()
        for N, H, K in ((0, 64, 64), (3, 0, 64), (3, 64, 0)):
            out = torch.full((N, H), 7.0).to(F16)
            ops.fuse_target_features([torch.randn(N, K).to(F16)], torch.randn(H, K).to(F16),
                                     torch.randn(H).to(F16), 1e-6, out, backend)
            assert (out == 0).all()
        kc = torch.zeros(2, 3, 4, 2, 64, dtype=F16)
        cs = make_cos_sin(8, 64, DEVICE)
        ops.write_kv(torch.zeros(0, 2, 2, 64, dtype=F16), torch.zeros(0, 2, 2, 64, dtype=F16), None,
                     z64, z64, list(kc), list(kc.clone()), cs, 1e-6, True, 64, None, None, backend)
        ops.inject_kv(torch.zeros(0, 32, dtype=F16), torch.zeros(2, 2, 128, 32, dtype=F16), None, None,
                      z64, z64, list(kc), list(kc.clone()), cs, 1e-6, True, 64, None, None, backend)
        assert (kc == 0).all()
        acc, toks, bon = z32.clone(), torch.zeros(0, 4, dtype=I32), z32.clone()
        ops.verify_chain(torch.randn(0, 4, 50), torch.zeros(0, 4, dtype=I64), z32, torch.ones(0), z32,
                         torch.ones(0), z64, z64, torch.rand(0, 3, 50), z32, None, None, acc, toks, bon,
                         z32.clone(), backend)
