"""Public operations of dflash_kernels (see SPEC.md and docs/DESIGN.md).

Each public function validates its arguments on the host (raising
``ValueError`` that names the argument: the public function owns the contract),
normalises them, allocates missing outputs, and calls the custom op
``torch.ops.dflash.<op>`` generated from the schema table
(:mod:`dflash_kernels._schema`). The custom ops only mutate their output
arguments and return nothing, so ``torch.compile`` functionalises them and CUDA
graphs capture them with static buffers. The op runs the backend that
:mod:`dflash_kernels._registry` picks for the call.

Every public function takes ``backend=None | "reference" | "triton" | "cuda"``.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.autograd.profiler as _profiler
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _fastpath, _registry, _schema
from ._dtypes import ACT_DTYPES
from ._validation import (
    check_cache_dtype,
    check_float,
    check_head_dim,
    check_int,
    check_no_overlap,
    check_scale,
    check_tensor,
    check_vector,
    scale_tensor,
)

__all__ = [
    "norm_rope",
    "DraftTree",
    "TreeVerifyOutput",
    "build_tree",
    "VerifyOutput",
    "copy_kv",
    "tree_mask",
    "verify_tree",
    "set_nvtx",
    "block_attention",
    "fuse_target_features",
    "inject_kv",
    "write_kv",
    "verify_chain",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str, backend: Optional[str], given: tuple) -> str:
    # Host-only decision, made once per trace under torch.compile.
    return _registry.resolve(op, device_type, backend, given)


_LIB = torch.library.Library("dflash", "FRAGMENT")


def _define(op: _schema.OpSchema):
    """``torch.ops.dflash.<op>``: the schema plus ``str backend``, returning nothing."""

    def impl(*args):
        # args: the schema's arguments, then the backend chosen on the host.
        _registry.get(op.name, args[-1])(*args[:-1])

    def fake(*args):
        return None

    _LIB.define(f"{op.name}({op.schema}, str backend) -> ()")
    # One Python kernel for every device: the backend, not the dispatch key,
    # decides what runs (the registry already matched it to the device).
    _LIB.impl(op.name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dflash::{op.name}", fake, lib=_LIB)
    return getattr(torch.ops.dflash, op.name).default


_OVERLOADS = {name: _define(op) for name, op in _schema.OPS.items()}
_OPTIONAL = {name: op.optional for name, op in _schema.OPS.items()}


def _run(op: str, device_type: str, backend: Optional[str], *args, result=None) -> None:
    """Run ``op`` (arguments in schema order) on the backend that can take this
    call: the registry sees which optional inputs are given. ``result``: what the
    public function returns (a call plan records it, _fastpath.record).

    Traced (torch.compile, a dispatch mode such as FakeTensorMode, jit.trace)
    or profiled, the call is ``torch.ops.dflash.<op>``, so graphs and traces
    see one opaque mutating op. Plain eager calls skip the dispatcher's round
    trip into Python (about 0.5 us per argument, 10 us for verify_chain) and
    call the backend directly: the same function the op's kernel calls.
    """
    if (_profiler._is_profiler_enabled or _is_compiling() or _get_current_dispatch_mode() is not None
            or _tracing_state() is not None):
        given = tuple([name for i, name in _OPTIONAL[op] if args[i] is not None])
        _OVERLOADS[op](*args, _resolve(op, device_type, backend, given))
        return
    chosen = _registry.resolve_call(op, device_type, backend, args, _OPTIONAL[op])
    if _fastpath._PENDING is not None and not _NVTX:
        _fastpath.record(_fastpath.OPS.get(op), _registry.get(op, chosen), args, result)
    if _NVTX:
        torch.cuda.nvtx.range_push(f"dflash::{op} [{chosen}]")
        try:
            _registry.get(op, chosen)(*args)
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        _registry.get(op, chosen)(*args)


_NVTX = (os.environ.get("DFLASH_KERNELS_NVTX") or "0") != "0"
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state


def set_nvtx(enabled: bool) -> None:
    """Wrap every eager op call in an NVTX range ``dflash::<op> [<backend>]``
    (for Nsight Systems). Off by default, and free when off (one flag test);
    ``DFLASH_KERNELS_NVTX=1`` turns it on at import. Traced calls appear as
    the custom op ``dflash::<op>`` instead."""
    global _NVTX
    _NVTX = bool(enabled)
    _fastpath.forget(plans_only=True)      # plans skip the ranges


def _dense(*tensors):
    """Small index / per-request inputs made dense for the backends.

    They may arrive as strided views (a column of an engine's state tensor, a
    scalar expanded over the batch); ``.contiguous()`` is free for dense ones
    and a device copy (no host sync, graph-capturable) otherwise.
    """
    return tuple(None if t is None else t.contiguous() for t in tensors)


# --------------------------------------------------------------------------
# block_attention
# --------------------------------------------------------------------------

def block_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
    k_block: Optional[Tensor] = None, v_block: Optional[Tensor] = None, *,
    sm_scale: Optional[float] = None, window: Optional[int] = None,
    k_scale=None, v_scale=None, out: Optional[Tensor] = None, return_lse: bool = False,
    lse_out: Optional[Tensor] = None, block_mask=None, backend: Optional[str] = None,
):
    """Attention of a block of S query rows over its paged context and its own keys.

    Args:
        q: ``[B, S, Hq, D]`` fp16/bf16, q_norm and RoPE applied. D in 64, 128, 256.
        k_cache, v_cache: paged caches ``[num_pages, page_size, Hkv, D]``, any
            strides with a unit last stride; q's dtype, or fp8 (e4m3fn / e5m2)
            with ``k_scale`` / ``v_scale`` (float or 1-element fp32 tensor).
        block_table: int32 ``[B, max_pages]``; entries past a request's pages
            are never read.
        context_lens: int32 ``[B]``, context tokens in the cache per request.
        k_block, v_block: ``[B, S, Hkv, D]`` in q's dtype (the block's own
            keys, k_norm and RoPE applied), or both None when the block's K/V
            are already the last S cached tokens.
        sm_scale: softmax scale, default ``D ** -0.5``.
        window: keys at distance ``>= window`` from a query are masked.
        block_mask: which of the block's own keys (``k_block``, or the last S
            cached keys) block row i sees: None / ``"full"`` all (the drafter),
            ``"causal"`` keys ``j <= i`` (a chain), or int32 ``[B, S, ceil(S/32)]``
            packed bits, bit ``j % 32`` of word ``j // 32`` of row (b, i) (a
            tree, see :func:`tree_mask`). Context keys are unaffected.
        out: optional ``[B, S, Hq, D]`` output buffer in q's dtype.
        return_lse: also return fp32 ``[B, S, Hq]`` natural-log LSE of the
            scaled logits (``-inf`` for rows with no visible key); ``lse_out``
            is an optional buffer for it.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.
    """
    items = (q, k_cache, v_cache, block_table, context_lens, k_block, v_block, sm_scale, window,
             k_scale, v_scale, out, return_lse, lse_out, block_mask)
    fast = _fastpath.validate(_FAST_BLOCK_ATTENTION, _WRITTEN_BLOCK_ATTENTION, items,
                              _check_block_attention, backend)
    if fast.__class__ is tuple:
        return fast[0]
    dev = q.device
    B, S, Hq, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    if window is None:
        window = 0
    elif window >= block_table.shape[1] * k_cache.shape[1] + S:
        # Wider than any query and key can be apart: no window (and an int
        # that fits the kernels' arguments whatever the caller passed).
        window = 0
    else:
        window = int(window)
    if k_scale is not None:
        k_scale, v_scale = scale_tensor(k_scale, dev), scale_tensor(v_scale, dev)
    if block_mask is None:
        causal, mask_bits = False, None
    else:
        causal = isinstance(block_mask, str) and block_mask == "causal"
        mask_bits = block_mask if isinstance(block_mask, torch.Tensor) else None
    if out is None:
        out = _fastpath.empty(q, _fastpath.KIND_LIKE, (B, S, Hq, D))[0]
    lse = None
    if return_lse:
        lse = lse_out if lse_out is not None else (
            _fastpath.empty(q, _fastpath.KIND_FLOAT32, (B, S, Hq))[0])
    if B * S * Hq * D == 0:
        return (out, lse) if return_lse else out
    if fast is not True:
        block_table, context_lens, mask_bits = _dense(block_table, context_lens, mask_bits)
    result = (out, lse) if return_lse else out
    _run("block_attention", dev.type, backend, q, k_cache, v_cache, block_table, context_lens,
         k_block, v_block, sm_scale, window, k_scale, v_scale, out, lse, causal, mask_bits,
         result=result)
    return result


_FAST_BLOCK_ATTENTION = _fastpath.OPS["block_attention"]
_WRITTEN_BLOCK_ATTENTION = _fastpath.written_mask(11, 13)  # out, lse_out


def _check_block_attention(q, k_cache, v_cache, block_table, context_lens, k_block, v_block,
                           sm_scale, window, k_scale, v_scale, out, return_lse, lse_out,
                           block_mask) -> None:
    """block_attention's contract: a ValueError naming the argument, else nothing."""
    check_tensor("q", q, ndim=4, dtypes=ACT_DTYPES, last_contiguous=True)
    dev = q.device
    B, S, Hq, D = q.shape
    check_head_dim("q", D)
    check_tensor("k_cache", k_cache, ndim=4, device=dev, last_contiguous=True)
    check_tensor("v_cache", v_cache, ndim=4, device=dev, shape=tuple(k_cache.shape),
                 last_contiguous=True)
    check_cache_dtype("k_cache", k_cache, q.dtype)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache: expected the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: expected head dim {D} (from q) in dim 3, got shape {list(k_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q: the number of query heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
    if block_table.shape[0] != B:
        raise ValueError(f"block_table: expected {B} rows (the batch of q), got shape {list(block_table.shape)}")
    check_vector("context_lens", context_lens, torch.int32, B, dev)
    if (k_block is None) != (v_block is None):
        raise ValueError("k_block, v_block: pass both or neither")
    if k_block is not None:
        check_tensor("k_block", k_block, dtypes=(q.dtype,), device=dev, shape=(B, S, Hkv, D),
                     last_contiguous=True)
        check_tensor("v_block", v_block, dtypes=(q.dtype,), device=dev, shape=(B, S, Hkv, D),
                     last_contiguous=True)
    if sm_scale is not None:
        check_float("sm_scale", sm_scale, positive=True)
    if window is not None:
        check_int("window", window, minimum=1)
    k_scale = check_scale("k_scale", k_scale, k_cache, dev)
    v_scale = check_scale("v_scale", v_scale, v_cache, dev)
    causal, mask_bits = _block_mask(block_mask, B, S, dev)
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=dev, shape=(B, S, Hq, D), contiguous=True)
    if return_lse:
        if lse_out is not None:
            check_tensor("lse_out", lse_out, dtypes=(torch.float32,), device=dev,
                         shape=(B, S, Hq), contiguous=True)
    elif lse_out is not None:
        raise ValueError("lse_out: only valid with return_lse=True")
    if out is not None or lse_out is not None:
        check_no_overlap((("out", out), ("lse_out", lse_out)),
                         (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                          ("block_table", block_table), ("context_lens", context_lens),
                          ("k_block", k_block), ("v_block", v_block), ("k_scale", k_scale),
                          ("v_scale", v_scale), ("block_mask", mask_bits)))


def _block_mask(block_mask, B, S, dev):
    """``(causal, mask_bits)`` of the backend interface: full (False, None),
    causal (True, None), bits (False, int32 [B, S, ceil(S/32)])."""
    if block_mask is None or (isinstance(block_mask, str) and block_mask == "full"):
        return False, None
    if isinstance(block_mask, str) and block_mask == "causal":
        return True, None
    if isinstance(block_mask, torch.Tensor):
        check_tensor("block_mask", block_mask, dtypes=(torch.int32,), device=dev,
                     shape=(B, S, (S + 31) // 32))
        return False, block_mask
    raise ValueError(f"block_mask: expected None, \"full\", \"causal\" or an int32 "
                     f"[{B}, {S}, {(S + 31) // 32}] tensor of packed bits, got {block_mask!r}")


# --------------------------------------------------------------------------
# fuse_target_features
# --------------------------------------------------------------------------

def fuse_target_features(
    features: Union[Tensor, Sequence[Tensor]], fc_weight: Tensor, norm_weight: Tensor, *,
    eps: float = 1e-6, out: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tensor:
    """Context feature of the drafter: ``rms_norm(features @ fc_weight.T) * norm_weight``.

    Args:
        features: ``[N, K*H]`` fp16/bf16 (K captured target layers, concatenated)
            or a list of K tensors ``[N, H_i]`` (no concatenation is made).
        fc_weight: ``[H, K*H]`` in the features' dtype (``nn.Linear`` layout).
        norm_weight: ``[H]`` (fp16, bf16 or fp32).
        out: optional ``[N, H]`` buffer in the features' dtype.

    Returns:
        ``[N, H]`` in the features' dtype.
    """
    items = (features, fc_weight, norm_weight, eps, out)
    fast = _fastpath.validate(_FAST_FUSE, _WRITTEN_FUSE, items, _check_fuse_target_features,
                              backend)
    if fast.__class__ is tuple:
        return fast[0]
    parts = [features] if isinstance(features, torch.Tensor) else list(features)
    if out is None:
        out = _fastpath.empty(parts[0], _fastpath.KIND_LIKE, (parts[0].shape[0], fc_weight.shape[0]))[0]
    if out.numel() == 0:
        return out
    _run("fuse_target_features", out.device.type, backend, parts, fc_weight, norm_weight,
         float(eps), out, result=out)
    return out


_FAST_FUSE = _fastpath.OPS["fuse_target_features"]
_WRITTEN_FUSE = _fastpath.written_mask(4)  # out


def _check_fuse_target_features(features, fc_weight, norm_weight, eps, out) -> None:
    """fuse_target_features' contract: a ValueError naming the argument, else nothing."""
    if isinstance(features, torch.Tensor):
        check_tensor("features", features, ndim=2, dtypes=ACT_DTYPES, last_contiguous=True)
        parts = [features]
    elif isinstance(features, (list, tuple)) and len(features) > 0:
        parts = list(features)
        check_tensor("features[0]", parts[0], ndim=2, dtypes=ACT_DTYPES, last_contiguous=True)
        for i, f in enumerate(parts[1:], 1):
            check_tensor(f"features[{i}]", f, ndim=2, dtypes=(parts[0].dtype,),
                         device=parts[0].device, shape=(parts[0].shape[0], None), last_contiguous=True)
    else:
        raise ValueError("features: expected a 2-D tensor or a non-empty list of 2-D tensors")
    dtype, dev, N = parts[0].dtype, parts[0].device, parts[0].shape[0]
    width = sum(p.shape[1] for p in parts)
    check_tensor("fc_weight", fc_weight, ndim=2, dtypes=(dtype,), device=dev, last_contiguous=True)
    if fc_weight.shape[1] != width:
        raise ValueError(f"fc_weight: expected {width} input columns (the features' total width), "
                         f"got shape {list(fc_weight.shape)}")
    H = fc_weight.shape[0]
    check_tensor("norm_weight", norm_weight, dtypes=FLOAT_DTYPES, device=dev, shape=(H,))
    check_float("eps", eps, positive=True)
    if out is not None:
        check_tensor("out", out, dtypes=(dtype,), device=dev, shape=(N, H), contiguous=True)
        check_no_overlap((("out", out),),
                         [(f"features[{i}]", p) for i, p in enumerate(parts)]
                         + [("fc_weight", fc_weight), ("norm_weight", norm_weight)])


# --------------------------------------------------------------------------
# inject_kv / write_kv
# --------------------------------------------------------------------------

def _layer_caches(name, cache, L, dev):
    """Split a stacked ``[L, P, page, Hkv, D]`` cache or check a list of L caches."""
    if isinstance(cache, torch.Tensor):
        check_tensor(name, cache, ndim=5, device=dev, last_contiguous=True)
        if cache.shape[0] != L:
            raise ValueError(f"{name}: expected {L} layers in dim 0, got shape {list(cache.shape)}")
        return list(cache.unbind(0))
    if not isinstance(cache, (list, tuple)):
        raise ValueError(f"{name}: expected a [L, num_pages, page_size, Hkv, D] tensor or a list of L caches")
    if len(cache) != L:
        raise ValueError(f"{name}: expected {L} per-layer caches, got {len(cache)}")
    first = check_tensor(f"{name}[0]", cache[0], ndim=4, device=dev, last_contiguous=True)
    for i, c in enumerate(cache[1:], 1):
        check_tensor(f"{name}[{i}]", c, ndim=4, dtypes=(first.dtype,), device=dev,
                     shape=tuple(first.shape))
        if c.stride() != first.stride():
            raise ValueError(f"{name}[{i}]: expected the strides of {name}[0] {first.stride()}, got {c.stride()}")
    return list(cache)


def _cache_parts(name, cache):
    """The tensors of a stacked cache (one) or of a list of per-layer caches, named."""
    if isinstance(cache, torch.Tensor):
        return [(name, cache)]
    return [(f"{name}[{i}]", c) for i, c in enumerate(cache)]


def _check_rope(rope_style, rotary_dim, D, cos_sin_cache, dev) -> int:
    """The RoPE arguments shared by inject_kv, write_kv and norm_rope; the rotary dim."""
    if rope_style not in ("neox", "gptj"):
        raise ValueError(f"rope_style: expected 'neox' or 'gptj', got {rope_style!r}")
    rotary_dim = D if rotary_dim is None else check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim > D or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even number <= head dim {D}, got {rotary_dim}")
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=dev,
                 shape=(None, rotary_dim), last_contiguous=True)
    return rotary_dim


def _check_kv_common(act_dtype, dev, N, L, Hkv, D, k_norm_weight, positions, slot_mapping,
                     k_cache, v_cache, cos_sin_cache, rope_style, rotary_dim, k_scale, v_scale, eps,
                     reads):
    """Checks shared by inject_kv and write_kv. ``reads``: the op's own
    ``(name, tensor)`` inputs; returned with the shared ones, for
    :func:`_check_cache_overlap` once everything is checked."""
    k_caches = _layer_caches("k_cache", k_cache, L, dev)
    v_caches = _layer_caches("v_cache", v_cache, L, dev)
    kc, vc = k_caches[0], v_caches[0]
    if Hkv is None:
        Hkv = kc.shape[2]
    check_head_dim("k_cache", kc.shape[3])
    if D is not None and kc.shape[3] != D:
        raise ValueError(f"k_cache: expected head dim {D}, got shape {list(kc.shape)}")
    D = kc.shape[3]
    if kc.shape[2] != Hkv:
        raise ValueError(f"k_cache: expected {Hkv} KV heads in dim 2 (per layer), got shape {list(kc.shape)}")
    if tuple(vc.shape) != tuple(kc.shape):
        raise ValueError(f"v_cache: expected the per-layer shape of k_cache {list(kc.shape)}, got {list(vc.shape)}")
    check_cache_dtype("k_cache", kc, act_dtype)
    if vc.dtype != kc.dtype:
        raise ValueError(f"v_cache: expected the dtype of k_cache ({kc.dtype}), got {vc.dtype}")
    if k_norm_weight is not None:
        check_tensor("k_norm_weight", k_norm_weight, dtypes=FLOAT_DTYPES, device=dev, shape=(L, D))
    check_vector("positions", positions, torch.int64, N, dev)
    check_vector("slot_mapping", slot_mapping, torch.int64, N, dev)
    rotary_dim = _check_rope(rope_style, rotary_dim, D, cos_sin_cache, dev)
    k_scale = check_scale("k_scale", k_scale, kc, dev)
    v_scale = check_scale("v_scale", v_scale, vc, dev)
    eps = check_float("eps", eps, positive=True)
    reads = list(reads) + [("k_norm_weight", k_norm_weight), ("positions", positions),
                           ("slot_mapping", slot_mapping), ("cos_sin_cache", cos_sin_cache),
                           ("k_scale", k_scale), ("v_scale", v_scale)]
    return k_caches, v_caches, rotary_dim, k_scale, v_scale, eps, reads


def _check_cache_overlap(k_cache, v_cache, reads):
    """The caches written in place overlap neither each other nor any input."""
    check_no_overlap(_cache_parts("k_cache", k_cache) + _cache_parts("v_cache", v_cache), reads)



def inject_kv(
    hidden: Tensor, kv_weight: Tensor, k_norm_weight: Optional[Tensor], positions: Tensor,
    slot_mapping: Tensor, k_cache, v_cache, cos_sin_cache: Tensor, *,
    kv_bias: Optional[Tensor] = None, eps: float = 1e-6, rope_style: str = "neox",
    rotary_dim: Optional[int] = None, k_scale=None, v_scale=None, backend: Optional[str] = None,
) -> None:
    """Project context features to every draft layer's K/V and write them into the caches.

    For each layer l and token t with ``slot_mapping[t] >= 0``:
    ``k = rope(rms_norm_per_head(hidden[t] @ W_k[l].T + b_k[l]) * k_norm_weight[l])``,
    ``v = hidden[t] @ W_v[l].T + b_v[l]``, written at slot ``slot_mapping[t]``.

    Args:
        hidden: ``[N, H]`` fp16/bf16 context features.
        kv_weight: ``[L, 2, Hkv*D, H]`` in hidden's dtype (K at index 0, V at 1).
        k_norm_weight: ``[L, D]`` or None (no K norm).
        positions: int64 ``[N]`` absolute positions (RoPE).
        slot_mapping: int64 ``[N]`` cache slots; negative slots are skipped
            (the positions of skipped rows are never read and may hold anything).
        k_cache, v_cache: ``[L, num_pages, page_size, Hkv, D]`` or a list of L
            ``[num_pages, page_size, Hkv, D]`` caches (same shape, dtype and
            strides), in hidden's dtype or fp8 with ``k_scale`` / ``v_scale``.
            With the Triton backend, per-layer caches that are not views of one
            allocation at a uniform stride are addressed through a device table
            of base pointers built (and cached) on the first call: make that
            call before capturing a CUDA graph. (The CUDA ``write_kv`` passes
            the pointers as kernel arguments and needs no such call.)
        cos_sin_cache: fp32 ``[max_position, rotary_dim]``, cos then sin halves.
        kv_bias: ``[L, 2, Hkv*D]`` or None.
        rope_style: ``"neox"`` (rotate halves) or ``"gptj"`` (interleaved pairs).
        rotary_dim: rotated dims (default D); the rest pass through.

    The caches are written in place; nothing is returned.
    """
    items = (hidden, kv_weight, k_norm_weight, positions, slot_mapping, k_cache, v_cache,
             cos_sin_cache, kv_bias, eps, rope_style, rotary_dim, k_scale, v_scale)
    fast = _fastpath.validate(_FAST_INJECT_KV, _WRITTEN_KV, items, _check_inject_kv, backend)
    if fast.__class__ is tuple:
        return
    _run_kv("inject_kv", fast, backend, (hidden, kv_weight, kv_bias), *items[2:8], *items[9:])


_FAST_INJECT_KV = _fastpath.OPS["inject_kv"]
_FAST_WRITE_KV = _fastpath.OPS["write_kv"]
_WRITTEN_KV = _fastpath.written_mask(5, 6)  # k_cache, v_cache (both ops)


def _run_kv(op, fast, backend, head, k_norm_weight, positions, slot_mapping, k_cache, v_cache,
            cos_sin_cache, eps, rope_style, rotary_dim, k_scale, v_scale):
    """Run validated inject_kv / write_kv arguments (``head``: the op's own leading
    inputs) in the backends' form: cache lists, the rotary dim, scale tensors."""
    if head[0].shape[0] == 0:
        return
    dev = head[0].device
    # A stacked cache goes to the backends as a list of one 5-D tensor (docs/DESIGN.md,
    # "The backend interface"): no per-layer views made per call.
    k_caches = [k_cache] if isinstance(k_cache, torch.Tensor) else list(k_cache)
    v_caches = [v_cache] if isinstance(v_cache, torch.Tensor) else list(v_cache)
    rotary_dim = k_caches[0].shape[-1] if rotary_dim is None else int(rotary_dim)
    if fast is not True:
        positions, slot_mapping, cos_sin_cache = _dense(positions, slot_mapping, cos_sin_cache)
    _run(op, dev.type, backend, *head, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
         cos_sin_cache, float(eps), rope_style == "neox", rotary_dim, scale_tensor(k_scale, dev),
         scale_tensor(v_scale, dev))


def _check_inject_kv(hidden, kv_weight, k_norm_weight, positions, slot_mapping, k_cache, v_cache,
                     cos_sin_cache, kv_bias, eps, rope_style, rotary_dim, k_scale, v_scale) -> None:
    """inject_kv's contract: a ValueError naming the argument, else nothing."""
    check_tensor("hidden", hidden, ndim=2, dtypes=ACT_DTYPES, last_contiguous=True)
    dev, (N, H) = hidden.device, hidden.shape
    check_tensor("kv_weight", kv_weight, ndim=4, dtypes=(hidden.dtype,), device=dev,
                 last_contiguous=True)
    L = kv_weight.shape[0]
    if L < 1 or kv_weight.shape[1] != 2 or kv_weight.shape[3] != H:
        raise ValueError(f"kv_weight: expected shape [L, 2, Hkv*D, {H}], got {list(kv_weight.shape)}")
    k_caches, v_caches, rotary_dim, k_scale, v_scale, eps, reads = _check_kv_common(
        hidden.dtype, dev, N, L, None, None, k_norm_weight, positions, slot_mapping,
        k_cache, v_cache, cos_sin_cache, rope_style, rotary_dim, k_scale, v_scale, eps,
        (("hidden", hidden), ("kv_weight", kv_weight), ("kv_bias", kv_bias)))
    Hkv, D = k_caches[0].shape[2], k_caches[0].shape[3]
    if kv_weight.shape[2] != Hkv * D:
        raise ValueError(f"kv_weight: expected {Hkv * D} = Hkv*D output rows (from the caches) in dim 2, "
                         f"got shape {list(kv_weight.shape)}")
    if kv_bias is not None:
        check_tensor("kv_bias", kv_bias, dtypes=FLOAT_DTYPES, device=dev, shape=(L, 2, Hkv * D))
    _check_cache_overlap(k_cache, v_cache, reads)


def write_kv(
    k: Tensor, v: Tensor, k_norm_weight: Optional[Tensor], positions: Tensor, slot_mapping: Tensor,
    k_cache, v_cache, cos_sin_cache: Tensor, *, eps: float = 1e-6, rope_style: str = "neox",
    rotary_dim: Optional[int] = None, k_scale=None, v_scale=None, backend: Optional[str] = None,
) -> None:
    """:func:`inject_kv` without the projection: K norm, RoPE, quantize, scatter.

    Args:
        k, v: ``[N, L, Hkv, D]`` fp16/bf16 projected keys and values.
        Everything else as in :func:`inject_kv`.
    """
    items = (k, v, k_norm_weight, positions, slot_mapping, k_cache, v_cache, cos_sin_cache, eps,
             rope_style, rotary_dim, k_scale, v_scale)
    fast = _fastpath.validate(_FAST_WRITE_KV, _WRITTEN_KV, items, _check_write_kv, backend)
    if fast.__class__ is tuple:
        return
    _run_kv("write_kv", fast, backend, (k, v), *items[2:])


def _check_write_kv(k, v, k_norm_weight, positions, slot_mapping, k_cache, v_cache, cos_sin_cache,
                    eps, rope_style, rotary_dim, k_scale, v_scale) -> None:
    """write_kv's contract: a ValueError naming the argument, else nothing."""
    check_tensor("k", k, ndim=4, dtypes=ACT_DTYPES, last_contiguous=True)
    dev, (N, L, Hkv, D) = k.device, k.shape
    check_tensor("v", v, dtypes=(k.dtype,), device=dev, shape=(N, L, Hkv, D), last_contiguous=True)
    k_caches, v_caches, rotary_dim, k_scale, v_scale, eps, reads = _check_kv_common(
        k.dtype, dev, N, L, Hkv, D, k_norm_weight, positions, slot_mapping,
        k_cache, v_cache, cos_sin_cache, rope_style, rotary_dim, k_scale, v_scale, eps,
        (("k", k), ("v", v)))
    _check_cache_overlap(k_cache, v_cache, reads)


def _heads_view(name, x, lead):
    """``x [N, H, D]`` or ``[B, S, H, D]`` as an ``[N, H, D]`` view of the same memory."""
    check_tensor(name, x, dtypes=ACT_DTYPES, last_contiguous=True)
    if x.dim() != len(lead) + 2:
        raise ValueError(f"{name}: expected {len(lead) + 2} dims ({'[N, H, D]' if len(lead) == 1 else '[B, S, H, D]'}, "
                         f"as positions), got shape {list(x.shape)}")
    if tuple(x.shape[:len(lead)]) != tuple(lead):
        raise ValueError(f"{name}: expected leading dims {list(lead)} (positions' shape), got shape {list(x.shape)}")
    if x.dim() == 4:
        if x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) != x.shape[1] * x.stride(1):
            raise ValueError(f"{name}: its [B, S] dims must merge into one without a copy (the op "
                             f"writes in place); got strides {x.stride()}")
        x = x.as_strided((x.shape[0] * x.shape[1], x.shape[2], x.shape[3]),
                         (x.stride(1) if x.shape[1] > 1 else x.stride(0), x.stride(2), x.stride(3)))
    return x


def norm_rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, *,
              q_norm_weight: Optional[Tensor] = None, k_norm_weight: Optional[Tensor] = None,
              eps: float = 1e-6, rope_style: str = "neox", rotary_dim: Optional[int] = None,
              backend: Optional[str] = None):
    """Per-head RMSNorm (when a weight is given) then RoPE of a draft block's q and
    k, in place, in one launch: the math of inject_kv's K epilogue.

    Args:
        q: ``[N, Hq, D]`` or ``[B, S, Hq, D]`` fp16/bf16, unit last stride (any other
            strides: a view of a fused qkv projection works).
        k: the same with Hkv heads (the same dtype, D and leading dims).
        positions: int64 ``[N]`` or ``[B, S]``; values outside the table are
            clamped into it (as write_kv).
        cos_sin_cache: fp32 ``[max_pos, rotary_dim]`` (cos, then sin).
        q_norm_weight, k_norm_weight: ``[D]`` or None (no norm of that tensor).
        eps, rope_style ("neox" or "gptj"), rotary_dim (even, <= D; None: D).

    Returns:
        ``(q, k)``, the same tensors, overwritten.
    """
    check_tensor("positions", positions, dtypes=(torch.int64,))
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions: expected [N] or [B, S], got shape {list(positions.shape)}")
    dev = positions.device
    lead = tuple(positions.shape)
    q3 = _heads_view("q", q, lead)
    k3 = _heads_view("k", k, lead)
    for name, x in (("q", q), ("k", k)):
        if x.device != dev:
            raise ValueError(f"{name}: expected device {dev}, got {x.device}")
    if k.dtype != q.dtype:
        raise ValueError(f"k: expected the dtype of q ({q.dtype}), got {k.dtype}")
    D = q3.shape[2]
    check_head_dim("q", D)
    if k3.shape[2] != D:
        raise ValueError(f"k: expected head dim {D} (q's), got shape {list(k.shape)}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            check_tensor(name, w, dtypes=FLOAT_DTYPES, device=dev, shape=(D,))
    rotary_dim = _check_rope(rope_style, rotary_dim, D, cos_sin_cache, dev)
    if cos_sin_cache.shape[0] < 1:
        raise ValueError("cos_sin_cache: expected at least one position row")
    eps = check_float("eps", eps, positive=True)
    check_no_overlap((("q", q), ("k", k)),
                     (("positions", positions), ("cos_sin_cache", cos_sin_cache),
                      ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)))
    if q3.shape[0] > 0:
        positions, qw, kw = _dense(positions.reshape(-1), q_norm_weight, k_norm_weight)
        _run("norm_rope", dev.type, backend, q3, k3, positions, cos_sin_cache, qw, kw, eps,
             rope_style == "neox", rotary_dim)
    return q, k


# --------------------------------------------------------------------------
# verify_chain
# --------------------------------------------------------------------------



def _all_drafts(B: int, S: int, dev: torch.device) -> Tensor:
    """The default ``num_drafts`` (S-1 everywhere). A read-only input, so eager
    calls share one tensor per shape, device and stream (``_fastpath.kept``: no
    fill per call), never freed (a captured CUDA graph may hold its address).
    Never kept when made during graph capture or tracing."""
    if _is_compiling():
        return torch.full((B,), S - 1, dtype=torch.int32, device=dev)
    return _fastpath.kept(("num_drafts", B, S), dev, lambda: torch.full(
        (B,), S - 1, dtype=torch.int32, device=dev))


def _check_row_logits(logits, B, R, dev, letter):
    """``[B, R, V]`` logits (a ``[B*R, V]`` input viewed so): one row per block
    token or tree node, V >= 1."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, device=dev, last_contiguous=True)
    if logits.dim() == 2:
        if logits.shape[0] != B * R:
            raise ValueError(f"logits: expected {B * R} = B*{letter} rows, got shape {list(logits.shape)}")
        logits = logits.view(B, R, logits.shape[1])
    elif logits.dim() != 3 or tuple(logits.shape[:2]) != (B, R):
        raise ValueError(f"logits: expected shape [{B}, {R}, V] or [{B * R}, V], got {list(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError("logits: expected a vocabulary of at least one token")
    return logits


class VerifyOutput(NamedTuple):
    """Result of :func:`verify_chain`.

    accept_len: int32 ``[B]`` accepted drafts per request.
    out_tokens: int32 ``[B, S]`` accepted drafts, then the bonus, then -1.
    bonus: int32 ``[B]`` the target's token after the accepted drafts.
    new_seq_lens: int32 ``[B]`` ``seq_lens + accept_len + 1``, or None.
    """
    accept_len: Tensor
    out_tokens: Tensor
    bonus: Tensor
    new_seq_lens: Optional[Tensor]


_FILTER_ORDERS = ("sequential", "joint")


def _check_ragged(logits, block_tokens, cu_rows, max_rows, num_drafts):
    """``(B, S, logits)`` of a ragged call (SPEC "verify_chain: engine layouts"):
    ``logits [T, V]``, ``block_tokens [T]``, ``cu_rows`` int32 ``[B+1]``,
    ``max_rows`` the S of the outputs. The values of ``cu_rows`` stay on the
    device: the backends clamp them (reference ``ragged_rows``)."""
    check_tensor("block_tokens", block_tokens, ndim=1, dtypes=INDEX_DTYPES)
    dev = block_tokens.device
    check_tensor("cu_rows", cu_rows, ndim=1, dtypes=(torch.int32,), device=dev)
    if cu_rows.shape[0] < 1:
        raise ValueError("cu_rows: expected B+1 >= 1 entries (cu_rows[0] = 0)")
    B = cu_rows.shape[0] - 1
    S = check_int("max_rows", max_rows, minimum=1)
    if num_drafts is not None:
        raise ValueError("num_drafts: not used with cu_rows (request b verifies its "
                         "cu_rows[b+1] - cu_rows[b] - 1 drafts)")
    T = block_tokens.shape[0]
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, device=dev, last_contiguous=True)
    if logits.shape[0] != T:
        raise ValueError(f"logits: expected {T} rows (one per block_tokens entry), "
                         f"got shape {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits: expected a vocabulary of at least one token")
    if T < B:
        raise ValueError(f"block_tokens: {T} rows for {B} requests (each owns at least its anchor)")
    return B, S


def verify_chain(
    logits: Tensor, block_tokens: Tensor, *, num_drafts: Optional[Tensor] = None,
    temperature: Optional[Tensor] = None, top_k: Optional[Tensor] = None,
    top_p: Optional[Tensor] = None, seeds: Optional[Tensor] = None,
    positions: Optional[Tensor] = None, draft_probs: Optional[Tensor] = None,
    seq_lens: Optional[Tensor] = None, out=None, backend: Optional[str] = None,
    tp_group=None, vocab_start: int = 0, vocab_size: Optional[int] = None,
    cu_rows: Optional[Tensor] = None, max_rows: Optional[int] = None,
    filter_order: str = "sequential",
) -> VerifyOutput:
    """Accept the longest agreeing prefix of each drafted block, plus a bonus token.

    Args:
        logits: ``[B, S, V]`` or ``[B*S, V]`` fp32/bf16/fp16; row (b, j) is the
            target's distribution after block token j. Ragged: ``[T, V]``.
        block_tokens: int32/int64 ``[B, S]``: the anchor, then S-1 drafts.
            Ragged: ``[T]``, request b's anchor then drafts at rows
            ``cu_rows[b] .. cu_rows[b+1]-1``.
        num_drafts: int32 ``[B]`` drafts to verify per request (default S-1;
            not with ``cu_rows``).
        temperature: fp32 ``[B]``; rows with ``T < 1e-5`` (``SAMPLING_EPS``, NaN
            too) are greedy. None: all greedy.
        top_k: int32 ``[B]`` (``<= 0`` or ``>= V``: off). Needs temperature.
        top_p: fp32 ``[B]`` (``>= 1``: off). Needs temperature.
        seeds, positions: int64 ``[B]``, the noise key (seed, position of the
            anchor); required with temperature.
        draft_probs: ``[B, S-1, V]`` draft distributions (fp32/bf16/fp16), for
            the rejection rule; None for point-mass drafts. Needs temperature.
            Ragged: ``[T, V]``, row r the draft distribution of the token
            that logits row r decides (the next row's token); each request's
            last row is never read.
        seq_lens: int32 ``[B]``; gives ``new_seq_lens = seq_lens + accept_len + 1``.
        out: optional ``VerifyOutput`` (or 4-tuple) of output buffers;
            ``new_seq_lens`` may be None when ``seq_lens`` is None.
        tp_group, vocab_start, vocab_size: vocab-parallel verification
            (docs/tensor_parallel.md): ``logits`` / ``draft_probs`` are this
            rank's shard of global ids ``vocab_start ..``; ``vocab_size`` the
            true vocab (required). Every rank gets the single-device result.
        cu_rows, max_rows: the ragged layout of vLLM's samplers
            (``cu_num_logits``): int32 ``[B+1]`` row offsets on the device and
            the host-known S of the outputs, which keep the ``[B, max_rows]``
            shape. Request b verifies ``min(cu_rows[b+1] - cu_rows[b], max_rows) - 1``
            drafts, derived on the device. ``cu_rows`` is not read on the
            host: values outside ``0 <= cu_rows[b] < cu_rows[b+1] <= T``
            give unspecified outputs but never a read outside the tensors
            (docs/verify_chain.md, "Ragged batches"); rows past
            ``cu_rows[B]`` (an engine's graph padding) are never read.
        filter_order: ``"sequential"`` (vLLM: top-p over the distribution
            renormalised to the top-k set) or ``"joint"`` (SGLang's DFlash
            sampling verify: the top-k set intersected with the top-p
            nucleus of the full distribution). Only matters with both
            top_k and top_p.

    Returns:
        :class:`VerifyOutput`. The noise scheme is in docs/DESIGN.md.
    """
    fast = _fastpath.validate(
        _FAST_VERIFY_CHAIN, _WRITTEN_VERIFY_CHAIN,
        (logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
         draft_probs, seq_lens, out, backend, tp_group, vocab_start, vocab_size, cu_rows, max_rows,
         filter_order), _check_verify_chain)
    if fast.__class__ is tuple:
        return fast[0]
    ragged = cu_rows is not None
    dev = block_tokens.device
    if ragged:
        B, S = cu_rows.shape[0] - 1, max_rows
    else:
        B, S = block_tokens.shape
        if logits.dim() == 2:
            logits = logits.view(B, S, logits.shape[1])
    if num_drafts is None:
        num_drafts = _all_drafts(B, S, dev)
    if out is None:
        if seq_lens is None:
            accept_len, out_tokens, bonus = _fastpath.empty(
                block_tokens, _fastpath.KIND_INT32, (B,), (B, S), (B,))
            new_seq_lens = None
        else:
            accept_len, out_tokens, bonus, new_seq_lens = _fastpath.empty(
                block_tokens, _fastpath.KIND_INT32, (B,), (B, S), (B,), (B,))
    else:
        accept_len, out_tokens, bonus, new_seq_lens = out
        if seq_lens is None:
            new_seq_lens = None
    if B == 0:
        return VerifyOutput(accept_len, out_tokens, bonus, new_seq_lens)
    if fast is not True:
        block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions, seq_lens, cu_rows = (
            _dense(block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions, seq_lens,
                   cu_rows))
    # "joint" goes to the backends only where it differs from "sequential" (both filters
    # given): the registry then routes around backends that lack it.
    joint = "joint" if filter_order == "joint" and top_k is not None and top_p is not None else None
    if tp_group is not None:
        if ragged:
            # The shard protocol works on [B, S] rows: one gather of this rank's shard.
            from .reference.verify_chain import padded_from_ragged
            logits, block_tokens, num_drafts, draft_probs = padded_from_ragged(
                cu_rows, S, logits, block_tokens, num_drafts, draft_probs)
        # Collectives cannot run inside the custom op: the shard protocol calls them itself.
        from .vocab_parallel import verify_chain_tp
        verify_chain_tp(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                        positions, draft_probs, seq_lens, accept_len, out_tokens, bonus,
                        new_seq_lens, group=tp_group, vocab_start=vocab_start,
                        vocab_size=vocab_size, joint=joint is not None)
        return VerifyOutput(accept_len, out_tokens, bonus, new_seq_lens)
    result = VerifyOutput(accept_len, out_tokens, bonus, new_seq_lens)
    _run("verify_chain", dev.type, backend, logits, block_tokens, num_drafts, temperature, top_k,
         top_p, seeds, positions, draft_probs, seq_lens, cu_rows, joint, accept_len, out_tokens,
         bonus, new_seq_lens, result=result)
    return result


_FAST_VERIFY_CHAIN = _fastpath.OPS["verify_chain"]
_WRITTEN_VERIFY_CHAIN = _fastpath.written_mask(10)  # out


def _check_verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                        positions, draft_probs, seq_lens, out, backend, tp_group, vocab_start,
                        vocab_size, cu_rows, max_rows, filter_order) -> None:
    """verify_chain's contract: a ValueError naming the argument, else nothing."""
    ragged = cu_rows is not None
    if ragged:
        B, S = _check_ragged(logits, block_tokens, cu_rows, max_rows, num_drafts)
        dev = block_tokens.device
        V = logits.shape[1]
    else:
        if max_rows is not None:
            raise ValueError("max_rows: only used with cu_rows")
        check_tensor("block_tokens", block_tokens, ndim=2, dtypes=INDEX_DTYPES)
        dev = block_tokens.device
        B, S = block_tokens.shape
        if S < 1:
            raise ValueError("block_tokens: expected at least one column (the anchor)")
        logits = _check_row_logits(logits, B, S, dev, "S")
        V = logits.shape[2]
    if filter_order not in _FILTER_ORDERS:
        raise ValueError(f"filter_order: expected one of {_FILTER_ORDERS}, got {filter_order!r}")
    if tp_group is not None:
        from .vocab_parallel import check_tp_args
        check_tp_args(vocab_start, vocab_size, V, backend)
    elif vocab_start != 0 or vocab_size is not None:
        raise ValueError("vocab_start, vocab_size: only used with tp_group")
    if num_drafts is not None:
        check_vector("num_drafts", num_drafts, torch.int32, B, dev)
    if temperature is None and draft_probs is not None:
        raise ValueError("draft_probs: only used with temperature; pass temperature (<= 0 for greedy rows)")
    _check_sampling(B, dev, temperature, top_k, top_p, seeds, positions)
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=FLOAT_DTYPES, device=dev,
                     shape=tuple(logits.shape) if ragged else (B, S - 1, V), last_contiguous=True)
    if seq_lens is not None:
        check_vector("seq_lens", seq_lens, torch.int32, B, dev)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 4:
            raise ValueError("out: expected a VerifyOutput or a 4-tuple "
                             "(accept_len, out_tokens, bonus, new_seq_lens)")
        accept_len, out_tokens, bonus, new_seq_lens = out
        i32 = (torch.int32,)
        check_vector("out.accept_len", accept_len, torch.int32, B, dev, contiguous=True)
        check_tensor("out.out_tokens", out_tokens, dtypes=i32, device=dev, shape=(B, S), contiguous=True)
        check_vector("out.bonus", bonus, torch.int32, B, dev, contiguous=True)
        if seq_lens is None:
            new_seq_lens = None
        elif new_seq_lens is None:
            raise ValueError("out.new_seq_lens: required when seq_lens is given")
        else:
            check_vector("out.new_seq_lens", new_seq_lens, torch.int32, B, dev, contiguous=True)
        check_no_overlap((("out.accept_len", accept_len), ("out.out_tokens", out_tokens),
                          ("out.bonus", bonus), ("out.new_seq_lens", new_seq_lens)),
                         (("logits", logits), ("block_tokens", block_tokens),
                          ("num_drafts", num_drafts), ("temperature", temperature),
                          ("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                          ("positions", positions), ("draft_probs", draft_probs),
                          ("seq_lens", seq_lens), ("cu_rows", cu_rows)))


# --------------------------------------------------------------------------
# Trees (SPEC.md "Trees"; docs/tree.md). A draft tree of N node slots (N
# host-known, the same for the batch): slot 0 is the root (the anchor);
# ``parents[b, 0] = -1``; a used slot ``i > 0`` has ``0 <= parents[b, i] < i``;
# the first slot with parent -1 ends the used slots (or ``num_nodes[b]``).
# tree_mask
# --------------------------------------------------------------------------

def _check_parents(parents):
    check_tensor("parents", parents, ndim=2, dtypes=(torch.int32,))
    if parents.shape[1] < 1:
        raise ValueError("parents: expected at least one node slot (the root)")
    return parents.shape


def _check_tree_mask_out(out, B, N, dev):
    W = (N + 31) // 32
    if out is None:
        return (torch.empty((B, N, W), dtype=torch.int32, device=dev),
                torch.empty((B, N), dtype=torch.int32, device=dev))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("out: expected a (mask, depth) pair")
    mask, depth = out
    check_tensor("out.mask", mask, dtypes=(torch.int32,), device=dev, shape=(B, N, W), contiguous=True)
    check_tensor("out.depth", depth, dtypes=(torch.int32,), device=dev, shape=(B, N), contiguous=True)
    return mask, depth


def tree_mask(parents: Tensor, *, out=None, backend: Optional[str] = None):
    """Ancestor-or-self bits and depths of draft trees, on the device.

    Args:
        parents: int32 ``[B, N]`` (encoding in the module docstring); N up to
            any size (``ceil(N/32)`` words per row).
        out: optional ``(mask, depth)`` buffers of the shapes below.

    Returns:
        ``(mask, depth)``: ``mask`` int32 ``[B, N, ceil(N/32)]``, bit ``j % 32``
        of word ``j // 32`` of row (b, i) set iff slot j is slot i or one of
        its ancestors (the ``block_mask`` layout of :func:`block_attention`);
        an unused slot sees only itself. ``depth`` int32 ``[B, N]``, 0 for the
        root and for unused slots.
    """
    B, N = _check_parents(parents)
    dev = parents.device
    mask, depth = _check_tree_mask_out(out, B, N, dev)
    (parents,) = _dense(parents)
    _run("tree_mask", dev.type, backend, parents, mask, depth)
    return mask, depth


# --------------------------------------------------------------------------
# build_tree
# --------------------------------------------------------------------------

# The Triton kernel keeps top_k keys per split and N keys per request in registers.
BUILD_TREE_MAX_TOP_K = 64
BUILD_TREE_MAX_NODES = 4096


def _check_build_tree_out(out, B, N, dev):
    if out is None:
        return (torch.empty((B, N), dtype=torch.int64, device=dev),
                torch.empty((B, N), dtype=torch.int32, device=dev),
                torch.empty((B,), dtype=torch.int32, device=dev),
                torch.empty((B, N), dtype=torch.int32, device=dev))
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ValueError("out: expected a DraftTree or a 4-tuple "
                         "(tree_tokens, parents, num_nodes, depth)")
    tree_tokens, parents, num_nodes, depth = out
    check_tensor("out.tree_tokens", tree_tokens, dtypes=INDEX_DTYPES, device=dev, shape=(B, N),
                 contiguous=True)
    for name, t, shape in (("parents", parents, (B, N)), ("num_nodes", num_nodes, (B,)),
                           ("depth", depth, (B, N))):
        check_tensor(f"out.{name}", t, dtypes=(torch.int32,), device=dev, shape=shape,
                     contiguous=True)
    return tree_tokens, parents, num_nodes, depth


def build_tree(draft_logits: Tensor, num_nodes_budget: int, *, top_k: int = 8,
               temperature: Union[None, float, Tensor] = None, out=None,
               backend: Optional[str] = None, tp_group=None, vocab_start: int = 0,
               vocab_size: Optional[int] = None) -> "DraftTree":
    """The ``N - 1`` best draft paths of each request, as a tree, on the device.

    Candidates at depth d are the ``top_k`` tokens of row d-1 by logit (lowest
    id on ties); a node's score is the fp32 sum along its path of
    ``log_softmax(draft_logits / T)``; the tree is the ``N - 1`` best nodes
    (ties: shallower, then lower rank, then lower parent slot), listed best
    first, so parents come first. Fixed work for given (B, N, S, top_k), no
    host sync. Edge values (NaN, +inf, tiny T): docs/tree.md.

    Args:
        draft_logits: ``[B, S-1, V]`` fp32/bf16/fp16 (last dim contiguous): the
            drafter's logits for block positions 1..S-1.
        num_nodes_budget: N, node slots per request (1..4096), root included.
        top_k: candidates per depth (1..min(V, 64)).
        temperature: None (T = 1), a positive float, or fp32 ``[B]`` (values
            below ``SAMPLING_EPS`` = 1e-5, NaN included, count as 1e-5).
        out: optional :class:`DraftTree` (or 4-tuple) of buffers of the shapes below.
        tp_group, vocab_start, vocab_size: accepted for SPEC's signature; the
            vocab-parallel form is not implemented yet (NotImplementedError).

    Returns:
        :class:`DraftTree`: ``tree_tokens`` int64 ``[B, N]`` (slot 0 and unused
        slots -1: the caller writes the anchor into slot 0), ``parents`` int32
        ``[B, N]``, ``num_nodes`` int32 ``[B]``, ``depth`` int32 ``[B, N]``
        (unused slots: parent -1, depth 0).
    """
    check_tensor("draft_logits", draft_logits, ndim=3, dtypes=FLOAT_DTYPES, last_contiguous=True)
    dev = draft_logits.device
    B, D, V = draft_logits.shape
    if tp_group is not None or vocab_start != 0 or vocab_size is not None:
        raise NotImplementedError("build_tree: the vocab-parallel form (tp_group) is not "
                                  "implemented yet; gather the draft logits (docs/tree.md)")
    N = check_int("num_nodes_budget", num_nodes_budget, minimum=1)
    if N > BUILD_TREE_MAX_NODES:
        raise ValueError(f"num_nodes_budget: expected at most {BUILD_TREE_MAX_NODES}, got {N}")
    k = check_int("top_k", top_k, minimum=1)
    if k > min(V, BUILD_TREE_MAX_TOP_K):
        raise ValueError(f"top_k: expected at most min(V, {BUILD_TREE_MAX_TOP_K}) = "
                         f"{min(V, BUILD_TREE_MAX_TOP_K)}, got {k}")
    # The kernels' tie codes pack (depth, rank, slot) with power-of-two radices.
    code_span = (D + 1) * max(2, 1 << (k - 1).bit_length()) * max(2, 1 << (N - 1).bit_length())
    if code_span >= 2 ** 31:
        raise ValueError(f"num_nodes_budget, top_k: S * next_pow2(top_k) * next_pow2(N) must "
                         f"stay below 2^31, got {code_span}")
    if isinstance(temperature, torch.Tensor):
        check_vector("temperature", temperature, torch.float32, B, dev)
    elif temperature is not None:
        t = check_float("temperature", temperature, positive=True)
        temperature = None if t == 1.0 else torch.full((B,), t, dtype=torch.float32, device=dev)
    outs = _check_build_tree_out(out, B, N, dev)
    if out is not None:
        check_no_overlap(tuple(zip(("out.tree_tokens", "out.parents", "out.num_nodes",
                                    "out.depth"), outs)),
                         (("draft_logits", draft_logits), ("temperature", temperature)))
    from .reference.build_tree import DraftTree
    if B == 0:
        return DraftTree(*outs)
    (temperature,) = _dense(temperature)
    _run("build_tree", dev.type, backend, draft_logits, k, temperature, *outs)
    return DraftTree(*outs)


# --------------------------------------------------------------------------
# verify_tree
# --------------------------------------------------------------------------

from .reference.build_tree import DraftTree  # noqa: E402  (the result type lives beside its reference)


class TreeVerifyOutput(NamedTuple):
    """Result of :func:`verify_tree`.

    accept_len: int32 ``[B]`` accepted nodes (moves of the walk, root excluded).
    accepted_nodes: int32 ``[B, N]`` their slot indices in walk order, then -1.
    out_tokens: int32 ``[B, N]`` their tokens, then the bonus, then -1.
    bonus: int32 ``[B]`` the target's token at the node where the walk stopped.
    new_seq_lens: int32 ``[B]`` ``seq_lens + accept_len + 1``, or None.
    """
    accept_len: Tensor
    accepted_nodes: Tensor
    out_tokens: Tensor
    bonus: Tensor
    new_seq_lens: Optional[Tensor]




def _check_sampling(B, dev, temperature, top_k, top_p, seeds, positions):
    """The sampler arguments of verify_chain and verify_tree (docs/DESIGN.md)."""
    if temperature is None:
        for name, val in (("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                          ("positions", positions)):
            if val is not None:
                raise ValueError(f"{name}: only used with temperature; pass temperature (<= 0 for greedy rows)")
        return
    check_vector("temperature", temperature, torch.float32, B, dev)
    if seeds is None or positions is None:
        raise ValueError("seeds, positions: required with temperature, so that every request "
                         "draws its own noise (keyed by seed and position)")
    check_vector("seeds", seeds, torch.int64, B, dev)
    check_vector("positions", positions, torch.int64, B, dev)
    if top_k is not None:
        check_vector("top_k", top_k, torch.int32, B, dev)
    if top_p is not None:
        check_vector("top_p", top_p, torch.float32, B, dev)


def _check_verify_tree_out(out, B, N, dev, seq_lens):
    if out is None:
        e = lambda *shape: torch.empty(shape, dtype=torch.int32, device=dev)  # noqa: E731
        return e(B), e(B, N), e(B, N), e(B), (None if seq_lens is None else e(B))
    if not isinstance(out, (tuple, list)) or len(out) != 5:
        raise ValueError("out: expected a TreeVerifyOutput or a 5-tuple "
                         "(accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens)")
    accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens = out
    for name, t, shape in (("accept_len", accept_len, (B,)), ("accepted_nodes", accepted_nodes, (B, N)),
                           ("out_tokens", out_tokens, (B, N)), ("bonus", bonus, (B,))):
        check_tensor(f"out.{name}", t, dtypes=(torch.int32,), device=dev, shape=shape, contiguous=True)
    if seq_lens is None:
        new_seq_lens = None
    elif new_seq_lens is None:
        raise ValueError("out.new_seq_lens: required when seq_lens is given")
    else:
        check_tensor("out.new_seq_lens", new_seq_lens, dtypes=(torch.int32,), device=dev, shape=(B,),
                     contiguous=True)
    return accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens


def verify_tree(
    logits: Tensor, tree_tokens: Tensor, parents: Tensor, *, num_nodes: Optional[Tensor] = None,
    temperature: Optional[Tensor] = None, top_k: Optional[Tensor] = None,
    top_p: Optional[Tensor] = None, seeds: Optional[Tensor] = None,
    positions: Optional[Tensor] = None, seq_lens: Optional[Tensor] = None, out=None,
    backend: Optional[str] = None, tp_group=None, vocab_start: int = 0,
    vocab_size: Optional[int] = None,
) -> TreeVerifyOutput:
    """Sample-then-match acceptance of a draft tree, plus a bonus token.

    The target token ``t_i`` of node i is verify_chain's (greedy argmax, or
    the keyed Gumbel-max sample restricted by top-k / top-p) with the noise
    keyed by ``(seeds[b], positions[b] + depth(i) + 1, vocab id)``. The walk
    starts at node 0 and moves to the lowest used child whose token equals
    the current node's ``t`` until none does; the bonus is ``t`` of the last
    node. So the emitted tokens equal plain decoding with the same sampler.

    Args:
        logits: ``[B, N, V]`` or ``[B*N, V]`` fp32/bf16/fp16; row (b, i) is the
            target's distribution after node i (target run with :func:`tree_mask`).
        tree_tokens: int32/int64 ``[B, N]`` the token of each node (slot 0 the anchor).
        parents: int32 ``[B, N]`` (module docstring).
        num_nodes: int32 ``[B]`` used slots (1..N); wins over ``parents``.
        temperature, top_k, top_p, seeds, positions: as :func:`verify_chain`
            (``positions[b]``: the anchor's absolute position).
        seq_lens: int32 ``[B]``; gives ``new_seq_lens = seq_lens + accept_len + 1``.
        out: optional :class:`TreeVerifyOutput` (or 5-tuple) of buffers.
        tp_group, vocab_start, vocab_size: vocab-parallel verification, as
            :func:`verify_chain` (``logits`` this rank's shard; ``tree_tokens``
            global ids; ``V`` below is then ``vocab_size``).

    Returns:
        :class:`TreeVerifyOutput`; every token id in ``[0, V)``, NaN logits count as -inf.
    """
    check_tensor("tree_tokens", tree_tokens, ndim=2, dtypes=INDEX_DTYPES)
    dev = tree_tokens.device
    B, N = tree_tokens.shape
    if N < 1:
        raise ValueError("tree_tokens: expected at least one node slot (the root)")
    check_tensor("parents", parents, dtypes=(torch.int32,), device=dev, shape=(B, N))
    logits = _check_row_logits(logits, B, N, dev, "N")
    if tp_group is not None:
        from .vocab_parallel import check_tp_args
        check_tp_args(vocab_start, vocab_size, logits.shape[2], backend)
    elif vocab_start != 0 or vocab_size is not None:
        raise ValueError("vocab_start, vocab_size: only used with tp_group")
    if num_nodes is not None:
        check_tensor("num_nodes", num_nodes, dtypes=(torch.int32,), device=dev, shape=(B,))
    _check_sampling(B, dev, temperature, top_k, top_p, seeds, positions)
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), device=dev, shape=(B,))
    outs = _check_verify_tree_out(out, B, N, dev, seq_lens)
    tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions, seq_lens = _dense(
        tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions, seq_lens)
    if tp_group is not None:
        # As verify_chain: the shard protocol calls the collectives itself, outside the custom op.
        from .vocab_parallel import verify_tree_tp
        verify_tree_tp(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds,
                       positions, seq_lens, *outs, group=tp_group, vocab_start=vocab_start,
                       vocab_size=vocab_size)
        return TreeVerifyOutput(*outs)
    _run("verify_tree", dev.type, backend, logits, tree_tokens, parents, num_nodes, temperature,
         top_k, top_p, seeds, positions, seq_lens, *outs)
    return TreeVerifyOutput(*outs)


# --------------------------------------------------------------------------
# copy_kv
# --------------------------------------------------------------------------

def _check_copy_kv(src_slots, dst_slots, k_cache, v_cache):
    check_tensor("src_slots", src_slots, ndim=1, dtypes=(torch.int64,))
    dev = src_slots.device
    check_tensor("dst_slots", dst_slots, dtypes=(torch.int64,), device=dev,
                 shape=tuple(src_slots.shape))
    if isinstance(k_cache, torch.Tensor):
        check_tensor("k_cache", k_cache, ndim=5, device=dev)
        L = k_cache.shape[0]
    elif isinstance(k_cache, (list, tuple)) and len(k_cache) > 0:
        L = len(k_cache)
    else:
        raise ValueError("k_cache: expected a [L, num_pages, page_size, Hkv, D] tensor or a "
                         "non-empty list of L caches")
    k_caches = _layer_caches("k_cache", k_cache, L, dev)
    v_caches = _layer_caches("v_cache", v_cache, L, dev)
    if tuple(v_caches[0].shape) != tuple(k_caches[0].shape):
        raise ValueError(f"v_cache: expected the per-layer shape of k_cache {list(k_caches[0].shape)}, "
                         f"got {list(v_caches[0].shape)}")
    if v_caches[0].dtype != k_caches[0].dtype:
        raise ValueError(f"v_cache: expected the dtype of k_cache ({k_caches[0].dtype}), "
                         f"got {v_caches[0].dtype}")
    return k_caches, v_caches


def copy_kv(src_slots: Tensor, dst_slots: Tensor, k_cache, v_cache, *,
            backend: Optional[str] = None) -> None:
    """Move cache rows: every layer's K and V at ``src_slots[i]`` go to ``dst_slots[i]``.

    Args:
        src_slots, dst_slots: int64 ``[M]`` cache slots (slot s = page
            ``s // page_size``, row ``s % page_size``); ``dst < 0`` skips the pair.
        k_cache, v_cache: ``[L, num_pages, page_size, Hkv, D]`` or a list of L
            ``[num_pages, page_size, Hkv, D]`` caches (any dtype, fp8 included,
            copied bit for bit; any strides, the same for every layer).

    Every read happens before any write (a source may be another pair's
    destination); destinations must be distinct; nothing else changes.
    """
    k_caches, v_caches = _check_copy_kv(src_slots, dst_slots, k_cache, v_cache)
    dev = src_slots.device
    src_slots, dst_slots = _dense(src_slots, dst_slots)
    _run("copy_kv", dev.type, backend, src_slots, dst_slots, k_caches, v_caches)
