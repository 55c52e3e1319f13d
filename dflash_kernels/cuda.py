"""CUDA backend: the ops of the compiled extension ``dflash_kernels._C`` (csrc/).

Importing this module fails with ImportError when the extension was not built,
which the registry reports as "backend unavailable". The functions have the
backend signatures of docs/DESIGN.md and write into the given outputs.

``verify_chain``'s compiled kernel covers greedy and keyed point-mass
sampling. Calls with ``top_k``, ``top_p`` or ``draft_probs`` (decided on the
host from which arguments are None, never from their values) run the Triton
backend instead, or the reference where Triton is unavailable.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.dflash.*_cuda)

__all__ = ["verify_chain", "write_kv"]


def _verify_chain_fallback():
    try:
        from .triton_backend.verify_chain import verify_chain as fn
    except ImportError:
        from .reference.verify_chain import verify_chain as fn
    return fn


def verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
                 draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens) -> None:
    """logits ``[B, S, V]`` fp32/fp16/bf16; outputs int32 (docs/DESIGN.md)."""
    if top_k is not None or top_p is not None or draft_probs is not None:
        _verify_chain_fallback()(logits, block_tokens, num_drafts, temperature, top_k, top_p,
                                 seeds, positions, draft_probs, seq_lens, accept_len, out_tokens,
                                 bonus, new_seq_lens)
        return
    torch.ops.dflash.verify_chain_cuda(
        logits, block_tokens, num_drafts, temperature, None, None, seeds, positions, None,
        seq_lens, accept_len, out_tokens, bonus, new_seq_lens)


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches, cos_sin_cache,
             eps, rope_neox, rotary_dim, k_scale, v_scale) -> None:
    """k, v ``[N, L, Hkv, D]`` fp16/bf16 into L paged caches ``[P, page, Hkv, D]``."""
    torch.ops.dflash.write_kv_cuda(
        k, v, k_norm_weight, positions, slot_mapping, list(k_caches), list(v_caches),
        cos_sin_cache, float(eps), bool(rope_neox), int(rotary_dim), k_scale, v_scale)
