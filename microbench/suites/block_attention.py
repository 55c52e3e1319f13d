"""Suite ``block_attention``: the op over the drafted block over its paged context.

Every request of a case has ``ctx`` context tokens in the paged cache (pages
drawn at random from the pool) and the S block keys passed as
``k_block``/``v_block``. The bench also writes the block keys into the cache
right after the context, so the libraries that read everything from the
cache (FlashInfer, FlashAttention: ``cache_seqlens = ctx + S``) compute the
same attention. Pool pages no request uses, rows past a request's last token,
and block-table columns past its pages are poisoned (NaN, huge ids).

Op ``tree`` (row ``block_attention/tree``): the same case with the block as a
random bushy tree of S nodes (``_tree.random_parents``, fixed seed) and its
packed ancestor bits as ``block_mask``, so it compares directly with the
full-mask row at the same S; the PyTorch baseline passes the dense bool mask
to SDPA; FlashInfer / FlashAttention are not wired (SKIP).
"""

from __future__ import annotations

import math

import torch

from .. import baselines, roofline
from ..case import ACT_DTYPES, FP8_SCALE, Case, Impl, cache_dtype, close
from ..presets import Shape
from . import _tree, our_backends, pick_oracle

OPS = ("block_attention", "tree")
SWEEPS_CTX = True     # the context length changes this suite's work
GARBAGE_PAGE_ID = 2**31 - 1

# (atol, rtol) on the output, by its dtype: fp32-accumulated attention of
# unit-variance inputs, compared after one rounding to the activation dtype.
TOLERANCE = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2), None: (2e-2, 2e-2)}


def _quantize(x, dtype, scale):
    return x if scale is None else (x.float() / scale).clamp(-240, 240).to(dtype)


def make_inputs(shape: Shape, batch: int, ctx: int, dtype: str, device: torch.device, seed: int = 0,
                tree: bool = False):
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    fp8 = cdt != act
    S, Hq, Hkv, D, page = shape.s, shape.hq, shape.hkv, shape.d, shape.page
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    npages = math.ceil((ctx + S) / page)          # each request's pages: context + block
    pool = batch * npages + 1                     # + one page no request uses (poisoned)

    def randn(*size):
        return torch.randn(size, generator=gen, device=device, dtype=act)

    def fp8_exact(x):
        # Values the fp8 cache can hold exactly, so the cached block equals k_block.
        return _quantize(x, cdt, FP8_SCALE).float().mul(FP8_SCALE).to(act) if fp8 else x

    perm = torch.randperm(pool, generator=cpu_gen).to(device=device, dtype=torch.int32)
    used, spare = perm[: batch * npages].view(batch, npages), perm[batch * npages:]
    block_table = torch.cat(
        [used, torch.full((batch, 1), GARBAGE_PAGE_ID, dtype=torch.int32, device=device)], dim=1)
    scale = torch.full((1,), FP8_SCALE, dtype=torch.float32, device=device) if fp8 else None

    def cache():
        c = _quantize(randn(pool, page, Hkv, D), cdt, FP8_SCALE if fp8 else None)
        c[spare.long()] = float("nan")
        return c

    k_cache, v_cache = cache(), cache()
    k_block, v_block = fp8_exact(randn(batch, S, Hkv, D)), fp8_exact(randn(batch, S, Hkv, D))
    # The block after the context (for the cache-reading baselines), NaN after it.
    tok = torch.arange(ctx, npages * page, device=device)
    pages = block_table[:, (tok // page)].long()
    rows = (tok % page).expand_as(pages)
    for c, blk in ((k_cache, k_block), (v_cache, v_block)):
        c[pages[:, :S], rows[:, :S]] = _quantize(blk, cdt, FP8_SCALE if fp8 else None)
        c[pages[:, S:], rows[:, S:]] = float("nan")
    extra = {}
    if tree:
        from dflash_kernels.reference.tree_mask import pack_bits, tree_structure

        anc = tree_structure(_tree.random_parents(batch, S, seed))[3]
        extra = {"block_mask": pack_bits(anc).to(device), "block_anc": anc.to(device)}
    return {
        **extra,
        "q": randn(batch, S, Hq, D), "k_cache": k_cache, "v_cache": v_cache,
        "block_table": block_table,
        "context_lens": torch.full((batch,), ctx, dtype=torch.int32, device=device),
        "k_block": k_block, "v_block": v_block, "k_scale": scale, "v_scale": scale,
        "out": torch.empty(batch, S, Hq, D, dtype=act, device=device),
        "sm_scale": D ** -0.5, "window": shape.window, "ctx": ctx,
        "ctx_pages": math.ceil(ctx / page),
    }


def _ours(backend):
    import dflash_kernels

    def run(inp):
        return dflash_kernels.block_attention(
            inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["context_lens"],
            inp["k_block"], inp["v_block"], sm_scale=inp["sm_scale"], window=inp["window"] or None,
            k_scale=inp["k_scale"], v_scale=inp["v_scale"], out=inp["out"],
            block_mask=inp.get("block_mask"), backend=backend)

    return run


def build_case(op, shape, batch, ctx, dtype, device, *, interpret=False, seed=0):
    act = ACT_DTYPES[dtype]
    cdt = cache_dtype(shape, act)
    fp8 = cdt != act
    tree = op == "tree"
    impls = [Impl(b, "ours", _ours(b)) for b in our_backends(("block_attention",), device, interpret)]
    impls.append(Impl("torch", "baseline", baselines.torch_attention))
    if device.type == "cuda":
        fi = baselines.optional_module("flashinfer")
        if fi is not None:
            why = ("fp8 cache not wired" if fp8 else ("window not wired" if shape.window else "")
                   or ("tree mask not wired" if tree else ""))
            impls.append(Impl("flashinfer", "baseline", baselines.flashinfer_attention(fi),
                              graph_ok=False, skip=why))
        fa = baselines.optional_module("flash_attn_interface", "flash_attn")
        if fa is not None and hasattr(fa, "flash_attn_with_kvcache"):
            impls.append(Impl("flash_attn", "baseline", baselines.flash_attn_attention(fa),
                              skip="fp8 cache not wired" if fp8 else
                              ("tree mask not wired" if tree else "")))
    nbytes = roofline.attention_bytes(
        batch=batch, s=shape.s, hq=shape.hq, hkv=shape.hkv, d=shape.d, ctx=ctx, page=shape.page,
        act=act.itemsize, cache_elt=cdt.itemsize, window=shape.window, fp8_scales=fp8,
        mask_bits=tree)
    return Case(
        suite="block_attention", op=op, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(shape, batch, ctx, dtype, device, seed, tree=tree),
        impls=impls, oracle=pick_oracle(impls), compare=close(TOLERANCE), nbytes=nbytes,
        outputs=("out",), extra={"block_mask": "tree bits" if tree else "full",
                                 "launches": {"triton": "1 (+1 merge when split)"}})
