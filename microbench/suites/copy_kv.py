"""Suite ``copy_kv``: keeping the accepted path's K/V after a tree step.

Every request has ``ctx`` committed tokens and the N slots of a random bushy
tree (``_tree.random_parents``, fixed seed) at token indices ``ctx .. ctx+N-1``,
in pages drawn at random from the pool; its accepted path is the root-to-node
path of a node drawn at random (``a_b`` = its depth). The pairs are what an
engine builds for docs/tree.md step 5, flattened to a host-known ``M = B*N``:
``src`` = the slot of token ``ctx + accepted_nodes[k]``, ``dst`` = the slot of
token ``ctx + 1 + k`` for ``k < a_b``, ``dst = -1`` otherwise. Stacked caches
``[L, pool, page, Hkv, D]`` (``layers``, ``hkv``, ``d`` of the preset); the
pool's last page is the engine's padding page, where the PyTorch baseline
(``index_select`` + ``index_copy_`` per layer and cache) sends the skipped
pairs, and is left out of the check. Caches are compared bit for bit.
"""

from __future__ import annotations

import math

import torch

from .. import baselines, roofline
from ..case import ACT_DTYPES, FP8_SCALE, Case, Impl, cache_dtype
from ..presets import Shape
from . import _tree, our_backends, pick_oracle

OPS = ("copy_kv",)
MODES = _tree.node_modes()
SWEEPS_CTX = False    # the context length only moves the slots
LAUNCHES = {"triton": 1}      # counted from the code: every layer, K and V, in one launch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def paths(batch: int, n: int, seed: int):
    """int64 ``[batch, n]`` accepted nodes (the path's slots, root excluded, then -1) and ``a``."""
    par = _tree.random_parents(batch, n, seed).long()
    depth = _tree.depths(par)
    gen = torch.Generator().manual_seed(seed + 3)
    end = torch.randint(0, n, (batch,), generator=gen)
    nodes = torch.full((batch, n), -1, dtype=torch.int64)
    a = depth.gather(1, end[:, None]).squeeze(1)
    for b in range(batch):          # host loop over the inputs only
        node, k = int(end[b]), int(a[b])
        while node > 0:
            k -= 1
            nodes[b, k] = node
            node = int(par[b, node])
    return nodes, a


def make_inputs(shape: Shape, batch: int, n: int, ctx: int, dtype: str, device, seed: int = 0):
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    L, Hkv, D, page = shape.layers, shape.hkv, shape.d, shape.page
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    npages = math.ceil((ctx + n) / page)
    pool = batch * npages + 1                     # + the padding page
    table = torch.randperm(pool - 1, generator=cpu_gen).view(batch, npages)

    def slot(b, t):                               # token index t of request b -> cache slot
        return table[b, t // page] * page + t % page

    nodes, a = paths(batch, n, seed)
    k = torch.arange(n)
    keep = k[None, :] < a[:, None]
    b = torch.arange(batch)[:, None].expand(batch, n)
    src = slot(b, ctx + nodes.clamp(min=0))
    dst = torch.where(keep, slot(b, ctx + 1 + k[None, :].expand(batch, n)), -1)

    def cache():
        c = torch.randn((L, pool, page, Hkv, D), generator=gen, device=device)
        return (c / FP8_SCALE).clamp(-240, 240).to(cdt) if cdt != act else c.to(act)

    return {"src_slots": src.reshape(-1).to(device), "dst_slots": dst.reshape(-1).to(device),
            "k_cache": cache(), "v_cache": cache(),
            "pad_slot": torch.tensor((pool - 1) * page, dtype=torch.int64, device=device),
            "n_kept": int(keep.sum())}


def _caches(inp):
    """The caches without the padding page (what the check compares)."""
    return inp["k_cache"][:, :-1], inp["v_cache"][:, :-1]


def _ours(backend):
    import dflash_kernels

    def run(inp):
        dflash_kernels.copy_kv(inp["src_slots"], inp["dst_slots"], inp["k_cache"], inp["v_cache"],
                               backend=backend)
        return _caches(inp)

    return run


def _torch(inp):
    baselines.torch_copy_kv(inp)
    return _caches(inp)


def equal_bits(got, want):
    """Bit-for-bit equality of the caches (an integer view of their dtype)."""
    for g, w in zip(got, want):
        gi, wi = g.view(_BITS[g.element_size()]), w.view(_BITS[w.element_size()])
        if not torch.equal(gi, wi):
            rows = int((gi != wi).reshape(-1, g.shape[-2] * g.shape[-1]).any(-1).sum())
            return False, None, f"{rows} of {gi.numel() // (g.shape[-2] * g.shape[-1])} rows differ"
    return True, 0.0, ""


def build_case(op, shape, batch, ctx, dtype, device, *, mode="n16", interpret=False, seed=0):
    n = _tree.nodes_of(mode)
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    impls = [Impl(b, "ours", _ours(b)) for b in our_backends(OPS, device, interpret)]
    impls.append(Impl("torch", "baseline", _torch))
    kept = int((paths(batch, n, seed)[1]).sum())
    M = batch * n
    c = _tree.count_device_ops(baselines.torch_copy_kv, make_inputs(
        shape, 1, n, 1, dtype, torch.device("cpu"), seed))
    nbytes = roofline.copy_kv_bytes(m=M, kept=kept, layers=shape.layers, hkv=shape.hkv,
                                    d=shape.d, cache_elt=cdt.itemsize)
    return Case(
        suite="copy_kv", op=op, mode=mode, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(shape, batch, n, ctx, dtype, device, seed),
        impls=impls, oracle=pick_oracle(impls), compare=equal_bits, nbytes=nbytes,
        mutable=("k_cache", "v_cache"),
        extra={"n_nodes": n, "pairs": M, "kept": kept, "staged": M > 16,
               "launches": dict(LAUNCHES), "torch_ops": c["ops"],
               "torch_host_syncs": c["host_syncs"]})
