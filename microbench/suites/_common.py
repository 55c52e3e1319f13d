"""What the suites of the KV-injection ops (fuse_target_features, inject_kv,
write_kv) share: their inputs, implementations, tolerances and byte counts.

Tokens come in the dense ``[B*S]`` layout an engine keeps for CUDA graphs:
request b commits ``c_b`` tokens (drawn once per case, 1..S) at positions
``ctx + j``; its other S - c_b rows have slot -1. The slots are the request's
next cache rows, in pages drawn at random from the pool. The pool's last page
is the engine's padding page: the PyTorch baseline sends rejected rows there
(as SGLang sends padding to slot 0), so it is left out of the check.

Ops: ``fuse_target_features``, ``inject_kv``, ``write_kv``, and
``injection`` (fuse_target_features then inject_kv: the whole step, a row of
the inject_kv suite).
"""

from __future__ import annotations

import math

import torch

from .. import baselines, roofline
from ..case import ACT_DTYPES, FP8_SCALE, Case, Impl, cache_dtype, close
from ..presets import Shape
from . import our_backends, pick_oracle

EPS = 1e-6
_OUR_OPS = {"injection": ("fuse_target_features", "inject_kv"),
            "fuse_target_features": ("fuse_target_features",),
            "inject_kv": ("inject_kv",), "write_kv": ("write_kv",)}

# (atol, rtol) by the compared tensor's dtype. fp8 caches are compared in
# stored units (value / FP8_SCALE): rtol is one step of the format (3 mantissa
# bits for e4m3, 2 for e5m2), since two correct implementations may round a
# value near a midpoint differently; atol is the bf16 atol in stored units,
# for the baseline's intermediate roundings to the activation dtype.
TOLERANCE = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2),
             torch.float8_e4m3fn: (2e-2 / FP8_SCALE, 0.13),
             torch.float8_e5m2: (2e-2 / FP8_SCALE, 0.26)}


def committed(shape: Shape, batch: int, seed: int):
    """Tokens committed per request this step (anchor + accepted drafts), 1..S."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(1, shape.s + 1, (batch,), generator=gen)


def cos_sin(max_pos: int, rotary_dim: int, theta: float, device):
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device)


def make_inputs(op, shape: Shape, batch: int, ctx: int, dtype: str, device, seed: int = 0):
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    fp8 = cdt != act
    S, H, L, Hkv, D, page, K = shape.s, shape.h, shape.layers, shape.hkv, shape.d, shape.page, shape.k
    N = batch * S
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0):
        return torch.randn(size, generator=gen, device=device, dtype=act) * std

    inp = {"eps": EPS}
    if op in ("injection", "fuse_target_features"):
        inp["features"] = randn(N, K * H)
        inp["fc_weight"] = randn(H, K * H, std=(K * H) ** -0.5)
        inp["norm_weight"] = 1 + randn(H, std=0.1)
        inp["hidden_out"] = torch.empty(N, H, dtype=act, device=device)
        if op == "fuse_target_features":
            return inp
    if op == "inject_kv":
        inp["hidden"] = randn(N, H)
    if op in ("injection", "inject_kv"):
        inp["kv_weight"] = randn(L, 2, Hkv * D, H, std=H ** -0.5)
    if op == "write_kv":
        inp["k"], inp["v"] = randn(N, L, Hkv, D), randn(N, L, Hkv, D)
    inp["k_norm_weight"] = 1 + randn(L, D, std=0.1)

    # Slots: request b's rows ctx..ctx+S-1 live in its ppr pages.
    ppr = math.ceil((ctx % page + S) / page)
    pool = batch * ppr + 1
    pages = torch.randperm(pool - 1, generator=cpu_gen).view(batch, ppr)
    off = ctx % page + torch.arange(S)
    slot = pages[:, off // page] * page + off % page                 # [B, S]
    keep = torch.arange(S)[None, :] < committed(shape, batch, seed)[:, None]
    inp["slot_mapping"] = torch.where(keep, slot, torch.full_like(slot, -1)).reshape(N).to(device)
    inp["positions"] = (ctx + torch.arange(S)).repeat(batch).to(device)
    inp["pad_slot"] = torch.tensor((pool - 1) * page, dtype=torch.int64, device=device)
    inp["cos_sin_cache"] = cos_sin(ctx + S, D, shape.rope_theta, device)
    inp["n_valid"] = int(keep.sum())

    def cache():
        c = torch.randn((L, pool, page, Hkv, D), generator=gen, device=device)
        return (c / FP8_SCALE).clamp(-240, 240).to(cdt) if fp8 else c.to(act)

    inp["k_cache"], inp["v_cache"] = cache(), cache()
    scale = torch.full((1,), FP8_SCALE, dtype=torch.float32, device=device) if fp8 else None
    inp["k_scale"] = inp["v_scale"] = scale
    return inp


def _caches(inp):
    """The caches without the padding page (what the check compares)."""
    return inp["k_cache"][:, :-1], inp["v_cache"][:, :-1]


def _ours(op, backend):
    import dflash_kernels as dk

    def fuse(inp):
        return dk.fuse_target_features(inp["features"], inp["fc_weight"], inp["norm_weight"],
                                       eps=inp["eps"], out=inp["hidden_out"], backend=backend)

    def inject(inp, hidden):
        dk.inject_kv(hidden, inp["kv_weight"], inp["k_norm_weight"], inp["positions"],
                     inp["slot_mapping"], inp["k_cache"], inp["v_cache"], inp["cos_sin_cache"],
                     eps=inp["eps"], k_scale=inp["k_scale"], v_scale=inp["v_scale"], backend=backend)
        return _caches(inp)

    def write(inp):
        dk.write_kv(inp["k"], inp["v"], inp["k_norm_weight"], inp["positions"], inp["slot_mapping"],
                    inp["k_cache"], inp["v_cache"], inp["cos_sin_cache"], eps=inp["eps"],
                    k_scale=inp["k_scale"], v_scale=inp["v_scale"], backend=backend)
        return _caches(inp)

    return {"injection": lambda inp: inject(inp, fuse(inp)),
            "fuse_target_features": fuse,
            "inject_kv": lambda inp: inject(inp, inp["hidden"]),
            "write_kv": write}[op]


_TORCH = {"injection": baselines.torch_injection, "fuse_target_features": baselines.torch_fuse,
          "inject_kv": baselines.torch_inject_kv, "write_kv": baselines.torch_write_kv}


def _torch(op):
    fn = _TORCH[op]
    if op == "fuse_target_features":
        return fn
    return lambda inp: (fn(inp), _caches(inp))[1]


def build_case(suite, op, shape, batch, ctx, dtype, device, *, interpret=False, seed=0):
    """The case of ``op`` (one of _OUR_OPS) in ``suite``."""
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    fp8 = cdt != act
    impls = [Impl(b, "ours", _ours(op, b)) for b in our_backends(_OUR_OPS[op], device, interpret)]
    impls.append(Impl("torch", "baseline", _torch(op)))
    N = batch * shape.s
    n_valid = int(committed(shape, batch, seed).sum())
    common = dict(n=N, n_valid=n_valid, layers=shape.layers, hkv=shape.hkv, d=shape.d,
                  act=act.itemsize, cache_elt=cdt.itemsize, rotary_dim=shape.d,
                  norm_elt=act.itemsize, fp8_scales=fp8)
    if op == "fuse_target_features":
        nbytes = roofline.fuse_bytes(n=N, h=shape.h, k=shape.k, act=act.itemsize, norm_elt=act.itemsize)
    elif op == "injection":
        nbytes = roofline.injection_bytes(h=shape.h, k=shape.k, **common)
    elif op == "inject_kv":
        nbytes = roofline.inject_kv_bytes(h=shape.h, **common)
    else:
        nbytes = roofline.write_kv_bytes(**common)
    mutable = () if op == "fuse_target_features" else ("k_cache", "v_cache")
    outputs = ("hidden_out",) if op in ("injection", "fuse_target_features") else ()
    return Case(
        suite=suite, op=op, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(op, shape, batch, ctx, dtype, device, seed),
        impls=impls, oracle=pick_oracle(impls), compare=close(TOLERANCE), nbytes=nbytes,
        mutable=mutable, outputs=outputs, extra={"n_tokens": N, "n_valid": n_valid})
