"""Public tree operations (SPEC.md "Trees"): ``tree_mask``, ``verify_tree``, ``copy_kv``.

Same conventions as :mod:`dflash_kernels.ops`: host-side validation (a
``ValueError`` naming the argument, never a read of a device value), output
allocation or ``out=`` checks, then a mutation-only ``torch.ops.dflash.*``
custom op that runs the backend chosen by :mod:`dflash_kernels._registry`.
How an engine strings these together: docs/tree.md.

Encoding of a draft tree with N node slots (N host-known, the same for the
batch): slot 0 is the root (the anchor); ``parents[b, 0] = -1``; a used slot
``i > 0`` has ``0 <= parents[b, i] < i``; the first slot with parent -1 ends
the used slots (or ``num_nodes[b]`` when given).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from . import _registry
from .ops import FLOAT_DTYPES, INDEX_DTYPES, _dense, _layer_caches, _resolve
from ._validation import check_tensor

__all__ = ["TreeVerifyOutput", "tree_mask", "verify_tree", "copy_kv"]

I32 = (torch.int32,)


# --------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------

@torch.library.custom_op("dflash::tree_mask", mutates_args=("mask", "depth"))
def _tree_mask_op(parents: Tensor, mask: Tensor, depth: Tensor, backend: str) -> None:
    _registry.get("tree_mask", backend)(parents, mask, depth)


@_tree_mask_op.register_fake
def _(parents, mask, depth, backend):
    return None


@torch.library.custom_op(
    "dflash::verify_tree",
    mutates_args=("accept_len", "accepted_nodes", "out_tokens", "bonus", "new_seq_lens"))
def _verify_tree_op(
    logits: Tensor, tree_tokens: Tensor, parents: Tensor, num_nodes: Optional[Tensor],
    temperature: Optional[Tensor], top_k: Optional[Tensor], top_p: Optional[Tensor],
    seeds: Optional[Tensor], positions: Optional[Tensor], seq_lens: Optional[Tensor],
    accept_len: Tensor, accepted_nodes: Tensor, out_tokens: Tensor, bonus: Tensor,
    new_seq_lens: Optional[Tensor], backend: str,
) -> None:
    _registry.get("verify_tree", backend)(
        logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions,
        seq_lens, accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens)


@_verify_tree_op.register_fake
def _(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions,
      seq_lens, accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens, backend):
    return None


@torch.library.custom_op("dflash::copy_kv", mutates_args=("k_caches", "v_caches"))
def _copy_kv_op(src_slots: Tensor, dst_slots: Tensor, k_caches: List[Tensor],
                v_caches: List[Tensor], backend: str) -> None:
    _registry.get("copy_kv", backend)(src_slots, dst_slots, k_caches, v_caches)


@_copy_kv_op.register_fake
def _(src_slots, dst_slots, k_caches, v_caches, backend):
    return None


# --------------------------------------------------------------------------
# tree_mask
# --------------------------------------------------------------------------

def _check_parents(parents):
    check_tensor("parents", parents, ndim=2, dtypes=I32)
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
    check_tensor("out.mask", mask, dtypes=I32, device=dev, shape=(B, N, W), contiguous=True)
    check_tensor("out.depth", depth, dtypes=I32, device=dev, shape=(B, N), contiguous=True)
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
    _tree_mask_op(parents, mask, depth, _resolve("tree_mask", dev.type, backend))
    return mask, depth


# --------------------------------------------------------------------------
# verify_tree
# --------------------------------------------------------------------------

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


def _check_tree_logits(logits, B, N, dev):
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, device=dev, last_contiguous=True)
    if logits.dim() == 2:
        if logits.shape[0] != B * N:
            raise ValueError(f"logits: expected {B * N} = B*N rows, got shape {list(logits.shape)}")
        logits = logits.view(B, N, logits.shape[1])
    elif logits.dim() != 3 or tuple(logits.shape[:2]) != (B, N):
        raise ValueError(f"logits: expected shape [{B}, {N}, V] or [{B * N}, V], got {list(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError("logits: expected a vocabulary of at least one token")
    return logits


def _check_sampling(B, dev, temperature, top_k, top_p, seeds, positions):
    """The sampler arguments, as verify_chain takes them (docs/DESIGN.md)."""
    if temperature is None:
        for name, val in (("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                          ("positions", positions)):
            if val is not None:
                raise ValueError(f"{name}: only used with temperature; pass temperature (<= 0 for greedy rows)")
        return
    check_tensor("temperature", temperature, dtypes=(torch.float32,), device=dev, shape=(B,))
    if seeds is None or positions is None:
        raise ValueError("seeds, positions: required with temperature, so that every request "
                         "draws its own noise (keyed by seed and position)")
    check_tensor("seeds", seeds, dtypes=(torch.int64,), device=dev, shape=(B,))
    check_tensor("positions", positions, dtypes=(torch.int64,), device=dev, shape=(B,))
    if top_k is not None:
        check_tensor("top_k", top_k, dtypes=I32, device=dev, shape=(B,))
    if top_p is not None:
        check_tensor("top_p", top_p, dtypes=(torch.float32,), device=dev, shape=(B,))


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
        check_tensor(f"out.{name}", t, dtypes=I32, device=dev, shape=shape, contiguous=True)
    if seq_lens is None:
        new_seq_lens = None
    elif new_seq_lens is None:
        raise ValueError("out.new_seq_lens: required when seq_lens is given")
    else:
        check_tensor("out.new_seq_lens", new_seq_lens, dtypes=I32, device=dev, shape=(B,),
                     contiguous=True)
    return accept_len, accepted_nodes, out_tokens, bonus, new_seq_lens


def verify_tree(
    logits: Tensor, tree_tokens: Tensor, parents: Tensor, *, num_nodes: Optional[Tensor] = None,
    temperature: Optional[Tensor] = None, top_k: Optional[Tensor] = None,
    top_p: Optional[Tensor] = None, seeds: Optional[Tensor] = None,
    positions: Optional[Tensor] = None, seq_lens: Optional[Tensor] = None, out=None,
    backend: Optional[str] = None,
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

    Returns:
        :class:`TreeVerifyOutput`; every token id in ``[0, V)``, NaN logits count as -inf.
    """
    check_tensor("tree_tokens", tree_tokens, ndim=2, dtypes=INDEX_DTYPES)
    dev = tree_tokens.device
    B, N = tree_tokens.shape
    if N < 1:
        raise ValueError("tree_tokens: expected at least one node slot (the root)")
    check_tensor("parents", parents, dtypes=I32, device=dev, shape=(B, N))
    logits = _check_tree_logits(logits, B, N, dev)
    if num_nodes is not None:
        check_tensor("num_nodes", num_nodes, dtypes=I32, device=dev, shape=(B,))
    _check_sampling(B, dev, temperature, top_k, top_p, seeds, positions)
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, dtypes=I32, device=dev, shape=(B,))
    outs = _check_verify_tree_out(out, B, N, dev, seq_lens)
    tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions, seq_lens = _dense(
        tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds, positions, seq_lens)
    _verify_tree_op(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds,
                    positions, seq_lens, *outs, _resolve("verify_tree", dev.type, backend))
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
    _copy_kv_op(src_slots, dst_slots, k_caches, v_caches, _resolve("copy_kv", dev.type, backend))
